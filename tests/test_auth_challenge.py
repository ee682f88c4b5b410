"""How registryd asks for credentials: the ``/v2/`` challenge and the token endpoint.

Real clients decide from ``GET /v2/`` alone whether to send the credentials
they hold (docker, containers/image), or retry with them after a ``401``
challenge on any request (containerd). So with users configured, nothing
an anonymous request may not read answers without a challenge: ``/v2/``
is ``401`` whatever anonymous users may pull, and a repository anonymous
may not pull is ``401`` + challenge, never a bare ``404``. The real
clients run in tests/e2e/test_auth_clients.py; this is the HTTP level.
"""
from __future__ import annotations

import base64
from typing import Any

import pytest
import pytest_twisted

from registryd.auth.policy import parse_access_rules
from test_security import ACCEPT, AuthClient, as_user, auth_settings, basic, write_htpasswd

pytestmark = pytest.mark.timeout(60)

USERS = {"alice": "alice-Secret-1", "reader": "reader-Secret-2"}
README_RULES = [
    {"users": ["anonymous", "*"], "repositories": ["public/**"], "actions": ["pull"]},
    {"users": ["alice"], "repositories": ["**"], "actions": ["pull", "push", "delete"]},
]
BASIC = 'Basic realm="registryd"'
#: What containers/image sends after a Basic challenge when it has no credentials.
EMPTY_BASIC = {"Authorization": "Basic " + base64.b64encode(b":").decode()}


async def registry_with(make_registry: Any, tmp_path: Any, rules: list[dict[str, Any]] | None) -> Any:
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), USERS)
    registry = make_registry(auth=auth_settings(htpasswd),
                             access=parse_access_rules(rules) if rules is not None else ())
    alice = AuthClient(registry.url, basic("alice", USERS["alice"]))
    for repository in ("public/app", "team/app"):
        image = await alice.push_image(repository, "v1", seed=repository)
        assert image.reply.status == 201, str(image.reply)
    return registry


def bearer(registry: Any) -> str:
    return f'Bearer realm="{registry.url}/v2/token",service="registryd"'


@pytest_twisted.ensureDeferred
async def test_base_challenges_anonymous_even_when_anonymous_may_pull(make_registry: Any, tmp_path: Any) -> None:
    """The README's case: everyone may pull public/**. GET and HEAD /v2/
    without credentials (or with the empty Basic credentials skopeo sends)
    answer 401 with a Bearer challenge to /v2/token; with credentials 200.
    Anonymous pulls of public/** still work without any token."""
    registry = await registry_with(make_registry, tmp_path, README_RULES)
    for headers in ({}, EMPTY_BASIC):
        client = AuthClient(registry.url, headers)
        for method in ("GET", "HEAD"):
            reply = await client.request(method, "/v2/", check=False)
            assert reply.status == 401, str(reply)
            assert reply.header("WWW-Authenticate") == bearer(registry)
            assert method == "HEAD" or reply.codes == ["UNAUTHORIZED"]
        manifest = await client.get("/v2/public/app/manifests/v1", headers={"Accept": ACCEPT}, check=False)
        assert manifest.status == 200, str(manifest)
    assert (await as_user(registry.url, "alice", USERS["alice"]).get("/v2/", check=False)).status == 200


@pytest_twisted.ensureDeferred
async def test_without_anonymous_access_the_challenge_is_basic(make_registry: Any, tmp_path: Any) -> None:
    """htpasswd without rules (anonymous may do nothing): Basic, as the
    reference registry; the empty Basic credentials are anonymous, not a
    failed login."""
    registry = await registry_with(make_registry, tmp_path, None)
    for headers in ({}, EMPTY_BASIC):
        reply = await AuthClient(registry.url, headers).get("/v2/", check=False)
        assert reply.status == 401 and reply.header("WWW-Authenticate") == BASIC, str(reply)
        assert "needs credentials" in reply.json()["errors"][0]["message"]


@pytest.mark.parametrize("headers", [{}, EMPTY_BASIC, {"Authorization": "Bearer anonymous"}],
                         ids=["no credentials", "empty Basic", "anonymous token"])
@pytest_twisted.ensureDeferred
async def test_what_anonymous_may_not_read_is_a_challenge_never_a_404(
        make_registry: Any, tmp_path: Any, headers: dict[str, str]) -> None:
    """team/app exists, team/missing does not; anonymous may pull neither
    (but public/app, whichever way it says it is anonymous).
    Both answer 401 with a challenge (a client holding credentials retries
    with them, and nobody learns which exists); /v2/ too."""
    registry = await registry_with(make_registry, tmp_path, README_RULES)
    client = AuthClient(registry.url, headers)
    assert (await client.get("/v2/", check=False)).status == 401
    public = await client.get("/v2/public/app/manifests/v1", headers={"Accept": ACCEPT}, check=False)
    assert public.status == 200, str(public)
    for repository in ("team/app", "team/missing"):
        for method, path in (("GET", f"/v2/{repository}/manifests/v1"), ("HEAD", f"/v2/{repository}/manifests/v1"),
                             ("GET", f"/v2/{repository}/tags/list"),
                             ("GET", f"/v2/{repository}/blobs/sha256:{'0' * 64}")):
            reply = await client.request(method, path, headers={"Accept": ACCEPT}, check=False)
            assert reply.status == 401, f"{method} {path}: {reply}"
            assert reply.header("WWW-Authenticate") == BASIC, f"{method} {path}: {reply}"


@pytest_twisted.ensureDeferred
async def test_token_endpoint(make_registry: Any, tmp_path: Any) -> None:
    """What docker does after the Bearer challenge: GET /v2/token, with its
    Basic credentials or without; then ``Authorization: Bearer``. A token
    carries its user's rights, the anonymous one anonymous rights; wrong
    credentials, a forged token and a token whose password changed are 401."""
    registry = await registry_with(make_registry, tmp_path, README_RULES)
    query = "/v2/token?service=registryd&scope=repository:team/app:pull,push&account=alice"
    anonymous = await AuthClient(registry.url).get(query)
    assert anonymous.json()["token"] == anonymous.json()["access_token"] == "anonymous"
    assert anonymous.json()["expires_in"] > 0 and anonymous.header("Cache-Control") == "no-store"
    issued = await AuthClient(registry.url, basic("alice", USERS["alice"])).get(query)
    token = issued.json()["token"]
    assert USERS["alice"] not in token                      # not in clear, at least
    as_alice = AuthClient(registry.url, {"Authorization": f"Bearer {token}"})
    assert (await as_alice.get("/v2/")).status == 200
    pushed = await as_alice.push_image("team/new", "v1", seed="bearer")
    assert pushed.reply.status == 201, str(pushed.reply)
    as_anonymous = AuthClient(registry.url, {"Authorization": "Bearer anonymous"})
    assert (await as_anonymous.get("/v2/public/app/tags/list")).status == 200
    refused = await as_anonymous.post("/v2/public/app/blobs/uploads/", check=False)
    assert refused.status == 401 and refused.header("WWW-Authenticate") == BASIC

    wrong = await AuthClient(registry.url, basic("alice", "wrong")).get(query, check=False)
    assert wrong.status == 401 and wrong.header("WWW-Authenticate") == BASIC, str(wrong)
    for forged in ("rd1.bm9ib2R5OnNlY3JldA", "rd1.!!!", "eyJhbGciOiJub25lIn0.e30.", "anonymous2"):
        reply = await AuthClient(registry.url, {"Authorization": f"Bearer {forged}"}).get("/v2/", check=False)
        assert reply.status == 401, (forged, str(reply))
    write_htpasswd(str(tmp_path / "htpasswd"), {**USERS, "alice": "alice-Changed-2"})
    registry.service.auth.reload()
    reply = await as_alice.get("/v2/team/app/tags/list", check=False)
    assert reply.status == 401, str(reply)

    # a registry without users has no token endpoint, and no challenge
    open_registry = make_registry()
    reply = await AuthClient(open_registry.url).get("/v2/token", check=False)
    assert reply.status == 404, str(reply)
    assert (await AuthClient(open_registry.url).get("/v2/")).status == 200
