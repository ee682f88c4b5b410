"""With a default upstream, a local push never changes what clients of a mirrored name get.

docker's ``registry-mirrors`` send bare names (``docker pull good`` asks
``/v2/library/good/...``), so with ``docker.io`` as the default upstream a
bare name is Docker Hub's. Local repositories live under ``[mirror]
local_prefixes``; a push anywhere else is refused, and a bare name outside
them is always read from the default upstream, whatever is stored locally.
"""
from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted

from fake_upstream import fake_upstream  # noqa: F401  (fixture)
from oci_client import OCI_MANIFEST, Client
from registryd.config import ConfigError, UpstreamConfig, load_config
from registryd.mirror.routing import Router

HUB = "docker.io"


def hub(fake: Any) -> UpstreamConfig:
    return UpstreamConfig(namespace=HUB, url=fake.url, default=True)


def spellings(repo: str, reference: str) -> list[str]:
    """The three ways clients ask for Docker Hub's ``repo``: docker (bare), containerd (?ns=), cri-o (path)."""
    return [f"/v2/{repo}/manifests/{reference}", f"/v2/{repo}/manifests/{reference}?ns={HUB}",
            f"/v2/{HUB}/{repo}/manifests/{reference}"]


@pytest_twisted.ensureDeferred
async def test_a_push_cannot_shadow_an_official_image(fake_upstream: Any, make_registry: Any) -> None:
    official = fake_upstream.add_image("library/good", "latest")
    registry = make_registry(upstreams=(hub(fake_upstream),), local_prefixes=("team",))
    client = Client(registry.url)
    blob = b"poison"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    for repo in ("library/good", "good"):
        reply = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", blob)
        assert reply.status == 405 and reply.codes == ["DENIED"], str(reply)
        assert "local_prefixes" in reply.json()["errors"][0]["message"], str(reply)
        reply = await client.put(f"/v2/{repo}/manifests/latest", b"{}", headers={"Content-Type": OCI_MANIFEST})
        assert reply.status == 405 and reply.codes == ["DENIED"], str(reply)
    for path in spellings("library/good", "latest") + ["/v2/good/manifests/latest"]:
        reply = await client.get(path, headers={"Accept": OCI_MANIFEST})
        assert reply.status == 200 and reply.header("Docker-Content-Digest") == official["digest"], str(reply)


@pytest_twisted.ensureDeferred
async def test_a_repository_stored_before_is_not_served_under_an_upstream_name(
        fake_upstream: Any, make_registry: Any, tmp_path: Any) -> None:
    """Pushed while there was no default upstream: once there is one, the bare name is the upstream's."""
    official = fake_upstream.add_image("library/good", "latest")
    data_dir = str(tmp_path / "shared")
    before = make_registry(data_dir=data_dir)
    local = await Client(before.url).push_image("library/good", "latest", seed="poison")
    await before.service.stopService()
    registry = make_registry(data_dir=data_dir, upstreams=(hub(fake_upstream),))
    client = Client(registry.url)
    for path in spellings("library/good", "latest") + [f"/v2/library/good/manifests/{local.digest}"]:
        reply = await client.get(path, headers={"Accept": OCI_MANIFEST})
        if local.digest in path:
            assert reply.status == 404, str(reply)   # asked of the upstream, which has no such manifest
        else:
            assert reply.status == 200 and reply.header("Docker-Content-Digest") == official["digest"], str(reply)


@pytest_twisted.ensureDeferred
async def test_local_prefixes_hold_pushable_local_repositories(fake_upstream: Any, make_registry: Any) -> None:
    upstream_image = fake_upstream.add_image("team/app", "v1", seed="upstream's team/app")
    registry = make_registry(upstreams=(hub(fake_upstream),), local_prefixes=("team", "ci/builds"))
    client = Client(registry.url)
    for repo in ("team/app", "team", "ci/builds/x"):
        image = await client.push_image(repo, "v1", seed=repo)
        reply = await client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert reply.status == 200 and reply.body == image.body, str(reply)
    # Docker Hub's team/app stays reachable by its namespaced spellings.
    for path in spellings("team/app", "v1")[1:]:
        reply = await client.get(path, headers={"Accept": OCI_MANIFEST})
        assert reply.status == 200 and reply.body == upstream_image["manifest"], str(reply)
    reply = await client.post("/v2/ci/other/blobs/uploads/")
    assert reply.status == 405 and "ci/builds" in reply.json()["errors"][0]["message"], str(reply)
    assert not [r for r in fake_upstream.requests if "/ci/" in r.path or r.path == "/v2/team/manifests/v1"]


@pytest_twisted.ensureDeferred
async def test_without_a_default_upstream_every_other_name_stays_local(fake_upstream: Any, make_registry: Any) -> None:
    registry = make_registry(upstreams=(UpstreamConfig(namespace=HUB, url=fake_upstream.url),))
    image = await Client(registry.url).push_image("library/good", "latest")
    reply = await Client(registry.url).get("/v2/library/good/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.body == image.body
    assert fake_upstream.requests == []


@pytest.mark.parametrize("text, message", [
    ('[mirror]\nlocal_prefixes = ["Team"]', "'mirror.local_prefixes[0]' must be a repository path"),
    ('[mirror]\nlocal_prefixes = ["team/"]', "'mirror.local_prefixes[0]' must be a repository path"),
    ('[mirror]\nlocal_prefixes = "team"', "'mirror.local_prefixes' must be a list"),
    ('[mirror]\nlocal_prefixes = ["library"]\n[[upstream]]\nnamespace = "docker.io"\ndefault = true',
     "would shadow Docker Hub's official images"),
    ('[mirror]\nlocal_prefixes = ["ghcr.io/me"]\n[[upstream]]\nnamespace = "ghcr.io"',
     "'ghcr.io/me' is the namespace of an upstream"),
    ('[[upstream]]\nnamespace = "x.io"\nallowed_hosts = ["https://cdn.example"]',
     "'upstream[0].allowed_hosts[0]' must be a host"),
    ('[[upstream]]\nnamespace = "x.io"\nallowed_hosts = "cdn.example"', "'upstream[0].allowed_hosts' must be a list"),
    ('[[upstream]]\nnamespace = "x.io"\nurl = "https://x.io:99999"', "'upstream[0].url' must be http(s)://host[:port]"),
    ('[[upstream]]\nnamespace = "x.io"\nurl = "https://user@x.io"', "'upstream[0].url' must be http(s)://host[:port]"),
])
def test_bad_local_prefixes_allowed_hosts_and_urls_stop_start_up(tmp_path: Any, text: str, message: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert message in str(info.value)


def test_allowed_hosts_defaults(tmp_path: Any) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[mirror]\nlocal_prefixes = ["team", "ci/builds"]\n'
                    '[[upstream]]\nnamespace = "docker.io"\ndefault = true\n'
                    '[[upstream]]\nnamespace = "quay.io"\n'
                    '[[upstream]]\nnamespace = "ghcr.io"\nallowed_hosts = ["*.example.com", "cdn.example:8443"]\n')
    config = load_config(str(path))
    assert config.local_prefixes == ("team", "ci/builds")
    hub_config, quay, ghcr = config.upstreams
    assert hub_config.allowed_hosts == ("auth.docker.io", "production.cloudflare.docker.com")
    assert quay.allowed_hosts == ()
    assert ghcr.allowed_hosts == ("*.example.com", "cdn.example:8443")


@pytest.mark.parametrize("name, ns, expected", [
    ("team", None, None),
    ("team/app", None, None),
    ("team/a/b", None, None),
    ("teams/app", None, ("docker.io", "teams/app")),       # a prefix is whole path components
    ("good", None, ("docker.io", "library/good")),
    ("library/good", None, ("docker.io", "library/good")),
    ("team/app", "docker.io", ("docker.io", "team/app")),  # asked by namespace: the upstream's
    ("docker.io/team/app", None, ("docker.io", "team/app")),
])
def test_routes_with_local_prefixes(name: str, ns: str | None, expected: tuple[str, str] | None) -> None:
    router = Router((UpstreamConfig(namespace=HUB, url="https://registry-1.docker.io", default=True),), ("team",))
    route = router.route(name, ns)
    assert (route.upstream.namespace, route.remote) == expected if expected else route is None
