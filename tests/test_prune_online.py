"""Pruning the mirror cache inside a running server (POST /admin/prune, ``registryd prune --url``),
on the filesystem and on a shared S3 bucket, with the offline command's rules and report."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from typing import Any, Iterator

import attrs
import bcrypt
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from conftest import VENV_BIN, RunningRegistry, start_twistd, stop_process
from fake_upstream import FakeUpstream, fake_upstream  # noqa: F401  (fixture)
from oci_client import OCI_EMPTY, OCI_MANIFEST, Client
from registryd.auth.settings import AuthSettings
from registryd.config import StorageSettings, UpstreamConfig
from registryd.digest import digest_of, parse_digest
from registryd.storage.fs.driver import FsDriver
from registryd.storage.repositories import Repositories
from registryd.threads import InlinePool
from registryd.upkeep.online_prune import PruneSelection, server_pruner
from syncclient import request
from upstreams import build_index, push_image, reference_upstream  # noqa: F401  (fixture)
from support.wait import sleep

#: Admin POSTs must be JSON (cross-site form protection).
JSON = {"Content-Type": "application/json"}

NS = "mirror.test:5000"
DAY = 86400.0
#: The keys of ``registryd prune --json``: the server's report has the same shape.
REPORT_KEYS = {"data_dir", "dry_run", "older_than", "unused_for", "patterns", "repositories_matched",
               "removed", "counts"}


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: Any) -> Iterator[StorageSettings]:
    """Each driver; for s3 a fresh bucket on the session's Ceph."""
    if request.param == "filesystem":
        yield StorageSettings()
        return
    bucket = pytest_twisted.blockon(Deferred.fromCoroutine(request.getfixturevalue("ceph_s3").new_bucket()))
    yield StorageSettings("s3", s3=bucket.settings)
    pytest_twisted.blockon(Deferred.fromCoroutine(bucket.close()))


@pytest.fixture
def node(make_registry: Any, fake_upstream: FakeUpstream, storage: StorageSettings) -> RunningRegistry:  # noqa: F811
    return make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),), storage=storage)


def mirror_repos(node: RunningRegistry) -> Any:
    return node.service.api.mirror.mirrors[NS].repositories


async def cache(client: Client, repo: str, reference: str, media_type: str) -> str:
    """Pull a manifest through the mirror; its digest."""
    reply = await client.get(f"/v2/{repo}/manifests/{reference}?ns={NS}", headers={"Accept": media_type})
    assert reply.status == 200, str(reply)
    return reply.header("Docker-Content-Digest") or ""


async def cache_image(client: Client, fake: FakeUpstream, repo: str, tag: str = "1.0") -> str:
    image = fake.add_image(repo, tag, layer_sizes=[300], seed=f"{repo}:{tag}")
    return await cache(client, repo, tag, image["media_type"])


async def stored_path(node: RunningRegistry, path: str) -> bool:
    """Whether a report entry's ``path`` is in the store: a file under data_dir, or a key in the bucket."""
    store = node.service.store
    if store.driver == "s3":
        return await store.client.head_object(path) is not None
    return os.path.exists(os.path.join(node.data_dir, path))


async def revisions(node: RunningRegistry, remote: str) -> set[str]:
    return {str(digest) for digest in await mirror_repos(node).revisions(remote)}


# --- the storage interface's two new reads, filesystem driver (s3: test_s3_store.py) ---------

@pytest_twisted.ensureDeferred
async def test_revisions_and_pulls_on_the_filesystem(tmp_path: Any) -> None:
    root = tmp_path / "repositories"
    repos = Repositories(FsDriver(str(tmp_path), InlinePool()), "repositories/")
    one, two = digest_of(b"one"), digest_of(b"two")
    assert await repos.revisions("app") == {} and await repos.pulls("app") == {}
    await repos.add_manifest("app", one, OCI_MANIFEST, ["v1"], None)
    await repos.add_manifest("app", two, OCI_MANIFEST, [], None)
    os.utime(root / "app" / "_manifests" / "revisions" / "sha256" / one.hex, (1000.0, 1000.0))
    await repos.record_pull("app", two, 2000.0)
    (root / "app" / "_pulls" / "sha256" / "not-a-digest").write_bytes(b"")
    found = await repos.revisions("app")
    assert set(found) == {one, two} and found[one] == 1000.0 and abs(found[two] - time.time()) < 60
    assert await repos.pulls("app") == {two: 2000.0}


# --- through a running server, on both drivers ---------------------------------------------

@pytest_twisted.ensureDeferred
async def test_older_than_keeps_young_tags_what_a_kept_index_lists_and_local_content(
        node: RunningRegistry, fake_upstream: FakeUpstream) -> None:  # noqa: F811
    """--older-than by a future clock (S3 LastModified cannot be backdated): content cached
    before ``boundary`` is old, the index cached after it is young and keeps its children."""
    client = Client(node.url)
    old = await cache_image(client, fake_upstream, "lib/old")
    other = await cache_image(client, fake_upstream, "other/x")
    children = [fake_upstream.add_image("lib/keep", None, layer_sizes=[200], seed=f"child{i}") for i in range(2)]
    for child in children:
        await cache(client, "lib/keep", child["digest"], child["media_type"])
    local = await client.push_image("lib/old", "1.0", seed="local")     # a local repository of the same name
    await sleep(2.1)   # past S3's one-second LastModified, whichever way it rounds
    boundary = time.time()
    index = build_index(children)
    fake_upstream.add_manifest("lib/keep", index["manifest"], index["media_type"], "multi")
    await cache(client, "lib/keep", "multi", index["media_type"])

    pruner = server_pruner(node.service.api.mirror, node.service.store, 4 << 20, clock=lambda: boundary - 1 + DAY)
    selection = PruneSelection(older_than=DAY, patterns=(f"{NS}/lib/*",), dry_run=True)
    dry = await pruner.run(selection)
    assert set(dry) == REPORT_KEYS and dry["dry_run"] is True and dry["older_than"] == DAY
    assert [(r["kind"], r["repository"], r.get("tag"), r["digest"]) for r in dry["removed"]] == [
        ("tag", f"{NS}/lib/old", "1.0", old), ("manifest", f"{NS}/lib/old", None, old)]
    assert dry["repositories_matched"] == 2 and dry["counts"] == {"tag": 1, "manifest": 1, "referrer": 0}
    for entry in dry["removed"]:
        assert await stored_path(node, entry["path"]), entry

    report = await pruner.run(attrs.evolve(selection, dry_run=False))
    assert report["removed"] == dry["removed"] and report["dry_run"] is False
    for entry in report["removed"]:
        assert not await stored_path(node, entry["path"]), entry
    repos = mirror_repos(node)
    # No tag is left (on S3 nothing at all: no blob of it was pulled, so none is linked there).
    assert await repos.tags("lib/old") in ([], None) and await revisions(node, "lib/old") == set()
    assert await revisions(node, "lib/keep") == {index["digest"], *(c["digest"] for c in children)}
    assert await repos.tags("other/x") == ["1.0"] and await revisions(node, "other/x") == {other}
    store = node.service.store
    assert await store.repositories.tags("lib/old") == ["1.0"]
    assert (await client.get("/v2/lib/old/manifests/1.0")).header("Docker-Content-Digest") == local.digest
    assert await store.blobs.size(parse_digest(old)) is not None, "blobs are gc's business"
    # Nothing old is left; the next pull fetches it from the upstream again.
    assert (await pruner.run(attrs.evolve(selection, dry_run=False)))["removed"] == []
    fetches = fake_upstream.count("GET", "/v2/lib/old/manifests/1.0")
    assert await cache(client, "lib/old", "1.0", OCI_MANIFEST) == old
    assert fake_upstream.count("GET", "/v2/lib/old/manifests/1.0") == fetches + 1


@pytest_twisted.ensureDeferred
async def test_unused_for_honours_a_recent_pull(node: RunningRegistry,
                                                fake_upstream: FakeUpstream) -> None:  # noqa: F811
    client = Client(node.url)
    idle = await cache_image(client, fake_upstream, "lib/idle")
    busy = await cache_image(client, fake_upstream, "lib/busy")
    await sleep(2.1)   # also past the recorder's once-a-second limit
    boundary = time.time()
    assert (await client.head(f"/v2/lib/busy/manifests/{busy}?ns={NS}")).status == 200
    for _ in range(100):    # the pull time is written without waiting for it
        pulled = (await mirror_repos(node).pulls("lib/busy")).get(parse_digest(busy), 0.0)
        if pulled > boundary - 1:
            break
        await sleep(0.05)
    else:
        raise AssertionError("the pull was not recorded")
    pruner = server_pruner(node.service.api.mirror, node.service.store, 4 << 20, clock=lambda: boundary - 1 + DAY)
    report = await pruner.run(PruneSelection(unused_for=DAY))
    assert [(r["kind"], r["repository"], r["digest"]) for r in report["removed"]] == [
        ("tag", f"{NS}/lib/idle", idle), ("manifest", f"{NS}/lib/idle", idle)]
    assert report["unused_for"] == DAY and report["older_than"] is None and report["repositories_matched"] == 2
    assert await mirror_repos(node).tags("lib/busy") == ["1.0"]
    assert await revisions(node, "lib/busy") == {busy}


@pytest_twisted.ensureDeferred
async def test_the_route_with_patterns_dry_run_and_referrers(node: RunningRegistry,
                                                             fake_upstream: FakeUpstream) -> None:  # noqa: F811
    client = Client(node.url)
    image = fake_upstream.add_image("lib/a", "1.0", layer_sizes=[300], seed="a")
    await cache(client, "lib/a", "1.0", image["media_type"])
    empty = fake_upstream.add_blob("lib/a", b"{}")
    signature = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": OCI_EMPTY, "digest": empty, "size": 2},
        "layers": [{"mediaType": OCI_EMPTY, "digest": empty, "size": 2}],
        "subject": {"mediaType": image["media_type"], "digest": image["digest"], "size": len(image["manifest"])},
    }).encode()
    sig = fake_upstream.add_manifest("lib/a", signature, OCI_MANIFEST)
    await cache(client, "lib/a", sig, OCI_MANIFEST)
    await cache_image(client, fake_upstream, "lib/b")
    await cache_image(client, fake_upstream, "other/x")
    await client.push_image("lib/a", "1.0", seed="local")
    repos = mirror_repos(node)
    assert [r["digest"] for r in await repos.referrers("lib/a", parse_digest(image["digest"]))] == [sig]
    await sleep(1.1)   # older_than=0: everything written before now, LastModified's second included

    dry = (await client.post(f"/admin/prune?older_than=0&pattern={NS}/lib/a&dry_run=1", headers=JSON)).json()
    expected = [("tag", image["digest"]), ("referrer", sig), *sorted([("manifest", sig), ("manifest", image["digest"])],
                                                                       key=lambda item: item[1])]
    assert [(r["kind"], r["digest"]) for r in dry["removed"]] == expected
    assert set(dry) == REPORT_KEYS and dry["patterns"] == [f"{NS}/lib/a"] and dry["older_than"] == 0
    assert dry["data_dir"] == (node.data_dir if node.service.store.driver == "filesystem"
                               else f"s3://{node.service.store.client.settings.bucket}/")
    referrer = dry["removed"][1]
    assert referrer["subject"] == image["digest"] and referrer["path"].startswith("mirror/mirror.test_5000/lib/a/")
    for entry in dry["removed"]:
        assert await stored_path(node, entry["path"]), entry

    report = (await client.post(f"/admin/prune?older_than=0&pattern={NS}/lib/a", headers=JSON)).json()
    assert report["removed"] == dry["removed"] and report["counts"] == {"tag": 1, "manifest": 2, "referrer": 1}
    for entry in report["removed"]:
        assert not await stored_path(node, entry["path"]), entry
    assert await repos.referrers("lib/a", parse_digest(image["digest"])) == []
    assert await repos.tags("lib/b") == ["1.0"] and await repos.tags("other/x") == ["1.0"]
    assert await node.service.store.repositories.tags("lib/a") == ["1.0"], "local repositories are never touched"

    # Patterns match <namespace>/<repository>: without the namespace nothing matches.
    missed = (await client.post("/admin/prune?pattern=other/*&pattern=lib/**", headers=JSON)).json()
    assert missed["repositories_matched"] == 0 and missed["removed"] == []
    # A pattern alone: whatever the age; two patterns match either.
    rest = (await client.post(f"/admin/prune?pattern={NS}/other/*&pattern={NS}/lib/b", headers=JSON)).json()
    assert {(r["kind"], r["repository"]) for r in rest["removed"]} == {
        (kind, f"{NS}/{repo}") for kind in ("tag", "manifest") for repo in ("lib/b", "other/x")}
    assert rest["repositories_matched"] == 2 and rest["older_than"] is None
    assert await node.service.store.blobs.size(parse_digest(image["digest"])) is not None, "blobs are gc's business"


def _htpasswd(path: Any, *users: str) -> str:
    path.write_text("".join(f"{user}:{bcrypt.hashpw(f'{user}-secret'.encode(), bcrypt.gensalt(4)).decode()}\n"
                            for user in users))
    return str(path)


def _basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{user}-secret".encode()).decode()}


@pytest_twisted.ensureDeferred
async def test_refused_for_non_admins_and_bad_arguments(make_registry: Any, tmp_path: Any) -> None:
    registry = make_registry(auth=AuthSettings(htpasswd=_htpasswd(tmp_path / "htpasswd", "admin", "dev"),
                                               admin_users=("admin",)))
    client = Client(registry.url)
    anonymous = await client.post("/admin/prune?pattern=**", headers=JSON)
    assert anonymous.status == 401 and anonymous.codes == ["UNAUTHORIZED"]
    dev = await client.post("/admin/prune?pattern=**", headers={**_basic("dev"), **JSON})
    assert dev.status == 403 and dev.codes == ["DENIED"]
    for query, words in [("", "give older_than"), ("?dry_run=1", "give older_than"),
                         ("?older_than=abc", "older_than must be a number of seconds"),
                         ("?older_than=-1", "older_than"), ("?unused_for=nan", "unused_for"),
                         ("?unused_for=inf", "unused_for"), ("?older_than=1e12", "older_than"),
                         ("?pattern=", "not a glob"), ("?pattern=lib/%5Bab%5D", "not a glob"),
                         ("?pattern=**&pattern=Lib/App", "not a glob")]:
        reply = await client.post(f"/admin/prune{query}", headers={**_basic("admin"), **JSON})
        assert reply.status == 400 and reply.codes == ["UNSUPPORTED"], query
        assert words in reply.json()["errors"][0]["message"], (query, reply.json())
    assert (await client.get("/admin/prune?pattern=**", headers=_basic("admin"))).status == 405
    done = await client.post("/admin/prune?pattern=**&older_than=60", headers={**_basic("admin"), **JSON})
    assert done.status == 200 and done.json()["repositories_matched"] == 0


# --- the command, end to end -----------------------------------------------------------------

def test_prune_url_against_twistd(tmp_path: Any, reference_upstream: Any) -> None:  # noqa: F811
    """``registryd prune --url`` as an admin of a twistd registryd mirroring a reference registry."""
    upstream = reference_upstream("open")
    image = push_image(upstream, "lib/app", "1.0", layer_sizes=[500])
    registryd = os.path.join(VENV_BIN, "registryd")
    config = tmp_path / "registryd.toml"
    config.write_text(f'[auth]\nhtpasswd = "{_htpasswd(tmp_path / "htpasswd", "admin", "dev")}"\n'
                      f'admin_users = ["admin"]\n\n[[upstream]]\nnamespace = "{NS}"\nurl = "{upstream.url}"\n')
    for user in ("admin", "dev"):
        (tmp_path / f"{user}.pw").write_text(f"{user}-secret\n")
    process, server = start_twistd(str(tmp_path / "data"), "--config", str(config))
    try:
        reply = request(server.host, "GET", f"/v2/lib/app/manifests/1.0?ns={NS}",
                        headers={"Accept": image["media_type"], **_basic("admin")})
        assert reply.status == 200, reply.body
        tag = os.path.join(server.data_dir, "mirror", NS.replace(":", "_"), "lib/app", "_manifests", "tags", "1.0")
        assert os.path.exists(tag)

        def prune(user: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([registryd, "prune", "--url", server.url, "--user", user, "--password-file",
                                   str(tmp_path / f"{user}.pw"), *args], capture_output=True, text=True, timeout=60)

        refused = prune("dev", "--pattern", "**")
        assert refused.returncode == 3 and "refused the prune: 403" in refused.stderr
        assert refused.stderr.count("\n") == 1
        bad = prune("admin")
        assert bad.returncode == 2 and bad.stderr.startswith("registryd prune: give --older-than")
        digest = image["digest"]
        dry = prune("admin", "--pattern", f"{NS}/**", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [
            f"would remove tag {NS}/lib/app:1.0 -> {digest}",
            f"would remove manifest {NS}/lib/app@{digest}",
            "1 tag, 1 manifest and 0 referrer entries would be removed in 1 of 1 matching mirrored repository",
            "blobs are not removed by prune: run `registryd gc` to reclaim the space of those no longer referenced",
        ]
        assert os.path.exists(tag)
        done = prune("admin", "--pattern", f"{NS}/**", "--older-than", "0s", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert set(report) == REPORT_KEYS and report["counts"] == {"tag": 1, "manifest": 1, "referrer": 0}
        assert not os.path.exists(tag)
        assert not os.path.exists(os.path.join(server.data_dir, report["removed"][1]["path"]))
    finally:
        stop_process(process)
