"""``[[sync]]`` jobs against real upstreams on loopback: Debian's docker-registry (open and with
token auth, no referrers API: the tag schema) and registryd itself (with the referrers API).

The upstream repositories are pushed by skopeo (tests/sync_upstream.py), signatures and SBOMs by
the ORAS Python SDK. Upstream requests are counted from docker-registry's access log.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from conftest import VENV_BIN
from oci_client import Client
from registryd.config import UpstreamConfig
from registryd.digest import parse_digest
from registryd.sync_settings import sync_jobs
from support.wait import wait_until
from sync_upstream import TagSpec, build_tags, load_into, push_tags, version_tags
from terminal import run_with_terminal_stderr
from fake_upstream import fake_upstream  # noqa: F401
from upstreams import OCI_INDEX, ReferenceUpstream, client_for, push_manifest, reference_upstream  # noqa: F401
from upstreams import shared_pki
from support.ports import free_port

NS = "upstream.test:5000"
ADMIN = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: Any) -> dict[str, Any]:
    """Three repositories pushed once by skopeo into a docker-registry: lib/versions (32 version
    tags and an rc), lib/builds (32 tags that are no versions), other/app (3 tags)."""
    directory = str(tmp_path_factory.mktemp("sync-seed"))
    os.makedirs(os.path.join(directory, "data"))
    up = ReferenceUpstream("open", directory, free_port(), "http", shared_pki(tmp_path_factory))
    up.start()
    try:
        specs = [*version_tags("lib/versions", 32), TagSpec("lib/versions", "1.1.0-rc.1", "2025-01-01T00:00:00Z"),
                 TagSpec("lib/versions", "latest", "2025-01-01T00:00:00Z"),
                 *build_tags("lib/builds", 32), *[TagSpec("other/app", f"v{i}") for i in range(3)]]
        digests = push_tags(up.host, specs, os.path.join(directory, "push"))
    finally:
        up.close()
    return {"data": up.data_dir, "specs": specs, "digests": digests}


def job_table(**overrides: Any) -> dict[str, Any]:
    table = {"name": "base", "upstream": NS, "repositories": ["lib/*"]}
    table.update(overrides)
    return table


def sync_config(up: Any, *tables: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    settings = {"username": up.username, "password": up.password} if up.username else {}
    settings.update(upstream)
    return {"upstreams": (UpstreamConfig(NS, up.url, **settings),),
            "syncs": sync_jobs("sync", list(tables))}


async def run_job(registry: Any, job: str, dry_run: bool = False) -> dict[str, Any]:
    client = Client(registry.url)
    reply = await client.post(f"/admin/sync?job={job}" + ("&dry_run=1" if dry_run else ""), b"{}", headers=ADMIN)
    assert reply.status == 200, reply
    return dict(reply.json())


async def mirror_tags(registry: Any, remote: str) -> list[str]:
    return await registry.service.store.mirror_repositories(NS).tags(remote) or []


def outcomes(document: dict[str, Any]) -> dict[str, str]:
    return {f"{e['repository']}:{e['tag']}": e["outcome"] for e in document["report"]}


@pytest_twisted.ensureDeferred
async def test_a_job_copies_the_selected_tags_of_globbed_repositories_through_token_auth(
        seeded: dict[str, Any], reference_upstream: Any, make_registry: Any) -> None:
    up = reference_upstream("token", allow_anonymous=False)
    load_into(up, seeded["data"])
    registry = make_registry(**sync_config(up, job_table(
        include_tags=[r"1\.\d+\.\d+.*", r"build-\d+"], exclude_tags=[r".*-rc\..*"], keep_latest=5)))
    document = await run_job(registry, "base")
    assert document["errors"] == 0, document["messages"]
    assert sorted(document["repositories"]) == ["lib/builds", "lib/versions"]   # other/app matches no glob
    # Versions: the five highest (the rc excluded, "latest" matches no include pattern).
    assert await mirror_tags(registry, "lib/versions") == sorted(f"1.0.{i}" for i in range(27, 32))
    # Not versions: the five created last.
    builds = sorted((s for s in seeded["specs"] if s.repository == "lib/builds"), key=lambda s: s.created)
    assert await mirror_tags(registry, "lib/builds") == sorted(s.tag for s in builds[-5:])
    assert document["images"] == 10 and set(outcomes(document).values()) == {"copied"}
    # Stored as a pull stores it: pulling every synced image through registryd asks the upstream nothing.
    before = await up.acount(None, r"/v2/.*")
    client = Client(registry.url)
    for remote in ("lib/versions", "lib/builds"):
        for tag in await mirror_tags(registry, remote):
            manifest = await client.get(f"/v2/{NS}/{remote}/manifests/{tag}",
                                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
            assert manifest.status == 200
            assert manifest.header("Docker-Content-Digest") == seeded["digests"][(remote, tag)]
            for descriptor in [manifest.json()["config"], *manifest.json()["layers"]]:
                blob = await client.get(f"/v2/{NS}/{remote}/blobs/{descriptor['digest']}")
                assert blob.status == 200 and len(blob.body) == descriptor["size"]
    assert await up.acount(None, r"/v2/.*") == before
    # A second run finds everything there: HEADs and tag lists only, nothing fetched.
    gets = await up.acount("GET", r"/v2/.*/(manifests|blobs)/.*")
    again = await run_job(registry, "base")
    assert set(outcomes(again).values()) == {"unchanged"} and again["images"] == 0
    assert await up.acount("GET", r"/v2/.*/(manifests|blobs)/.*") == gets


@pytest_twisted.ensureDeferred
async def test_moved_tags_are_updated_and_vanished_ones_kept_or_removed_per_mirror_deletes(
        seeded: dict[str, Any], reference_upstream: Any, make_registry: Any, tmp_path: Any) -> None:
    up = reference_upstream("open")
    load_into(up, seeded["data"])
    table = job_table(repositories=["lib/versions"], include_tags=[r"1\.0\.\d+"], keep_latest=3, interval=86400)
    data_dir = str(tmp_path / "mirror-data")
    registry = make_registry(data_dir=data_dir, **sync_config(up, table))
    first = await run_job(registry, "base")
    assert outcomes(first) == {f"lib/versions:1.0.{i}": "copied" for i in (29, 30, 31)}
    # Upstream, 1.0.31 moves to a new image and 1.0.30 is deleted.
    moved = await deferToThread(push_tags, up.host, [TagSpec("lib/versions", "1.0.31", salt="moved")],
                                str(tmp_path / "push"))
    client = client_for(up)
    await deferToThread(client.expect, 202, "DELETE",
                        f"/v2/lib/versions/manifests/{seeded['digests'][('lib/versions', '1.0.30')]}")
    second = await run_job(registry, "base")
    assert outcomes(second) == {"lib/versions:1.0.31": "updated", "lib/versions:1.0.29": "unchanged",
                                "lib/versions:1.0.28": "copied", "lib/versions:1.0.30": "kept"}, second["report"]
    repositories = registry.service.store.mirror_repositories(NS)
    assert str(await repositories.resolve_tag("lib/versions", "1.0.31")) == moved[("lib/versions", "1.0.31")]
    assert await mirror_tags(registry, "lib/versions") == ["1.0.28", "1.0.29", "1.0.30", "1.0.31"]
    # The same job with mirror_deletes removes the vanished tag from the cache.
    await registry.service.stopService()
    again = make_registry(data_dir=data_dir, **sync_config(up, {**table, "mirror_deletes": True}))
    third = await run_job(again, "base")
    assert outcomes(third)["lib/versions:1.0.30"] == "deleted"
    assert await mirror_tags(again, "lib/versions") == ["1.0.28", "1.0.29", "1.0.31"]


@pytest_twisted.ensureDeferred
async def test_eviction_and_prune_spare_what_a_job_lists(seeded: dict[str, Any], reference_upstream: Any,
                                                           make_registry: Any, monkeypatch: Any) -> None:
    import registryd.sync.upstream
    monkeypatch.setattr(registryd.sync.upstream, "BACKOFF", 0.05)    # the retries of the run without upstream
    up = reference_upstream("open")
    load_into(up, seeded["data"])
    registry = make_registry(mirror_max_size=1, **sync_config(up, job_table(repositories=["other/app"])))
    assert (await run_job(registry, "base"))["images"] == 3
    # A pull of another image: ordinary cache, the eviction's to take.
    client = Client(registry.url)
    pulled = await client.get(f"/v2/{NS}/lib/builds/manifests/build-00",
                              headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    for descriptor in [pulled.json()["config"], *pulled.json()["layers"]]:
        assert (await client.get(f"/v2/{NS}/lib/builds/blobs/{descriptor['digest']}")).status == 200
    await registry.service.upkeep.survey()      # the cache is over max_size (1 byte)
    repositories = registry.service.store.mirror_repositories(NS)
    assert await repositories.tags("lib/builds") in (None, [])      # evicted
    assert await mirror_tags(registry, "other/app") == ["v0", "v1", "v2"]
    for tag in ("v0", "v1", "v2"):
        reply = await client.get(f"/v2/{NS}/other/app/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        for descriptor in [reply.json()["config"], *reply.json()["layers"]]:
            assert await registry.service.store.blobs.size(parse_digest(descriptor["digest"])) is not None
    # prune of the whole cache leaves the synced tags and manifests alone.
    reply = await client.post("/admin/prune?pattern=**", b"{}", headers=ADMIN)
    assert reply.status == 200, reply
    assert not [e for e in reply.json()["removed"] if e["repository"] == f"{NS}/other/app"]
    assert await mirror_tags(registry, "other/app") == ["v0", "v1", "v2"]
    # A run that cannot reach the upstream keeps listing what the job copied before.
    up.stop()
    failed = await run_job(registry, "base")
    assert failed["errors"] == 1 and "connection refused" in failed["messages"][0].lower(), failed["messages"]
    await registry.service.upkeep.survey()
    assert await mirror_tags(registry, "other/app") == ["v0", "v1", "v2"]


@pytest_twisted.ensureDeferred
async def test_a_restart_mid_job_resumes_without_fetching_anything_twice(
        seeded: dict[str, Any], reference_upstream: Any, make_registry: Any, tmp_path: Any) -> None:
    up = reference_upstream("open")
    load_into(up, seeded["data"])
    data_dir = str(tmp_path / "mirror-data")
    config = sync_config(up, job_table(repositories=["lib/builds"], concurrency=1))
    first = make_registry(data_dir=data_dir, **config)     # a job that never ran starts at once
    slot = first.service.sync.slots["base"]
    await wait_until(lambda: slot.progress is not None and slot.progress.done >= 8, 20, "8 images synced")
    await first.service.stopService()                    # mid-job
    assert slot.last is None and slot.progress.done < 32
    second = make_registry(data_dir=data_dir, **config)   # resumes at once
    resumed = second.service.sync.slots["base"]
    await wait_until(lambda: resumed.last is not None, 30, "the resumed run to end")
    assert resumed.last.errors == 0 and await mirror_tags(second, "lib/builds") == sorted(
        s.tag for s in seeded["specs"] if s.repository == "lib/builds")
    entries = await deferToThread(up.requests, 0.1)
    gets = [e.path for e in entries if e.method == "GET" and re.search(r"/(blobs|manifests)/sha256:", e.path)]
    assert gets and len(gets) == len(set(gets)), [g for g in set(gets) if gets.count(g) > 1]
    heads = [e.path for e in entries if e.method == "HEAD" and "/manifests/" in e.path]
    # The stop let the image under way finish; the images done before it are not even asked about again.
    assert len(heads) == len(set(heads)) == 32, [h for h in set(heads) if heads.count(h) > 1]


@pytest_twisted.ensureDeferred
async def test_429_is_waited_out_as_retry_after_says_then_with_a_backoff(
        fake_upstream: Any, make_registry: Any, monkeypatch: Any) -> None:
    import registryd.sync.upstream
    monkeypatch.setattr(registryd.sync.upstream, "BACKOFF", 0.2)
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[2000])
    manifest = fake_upstream.manifest_path("lib/app", "v1")
    layer = fake_upstream.blob_path("lib/app", image["layers"][0]["digest"])
    fake_upstream.status(manifest, 429, retry_after=1, times=2)
    fake_upstream.status(layer, 429, times=2)            # no Retry-After: 0.2 s, then 0.4 s
    registry = make_registry(upstreams=(UpstreamConfig(NS, fake_upstream.url),),
                             syncs=sync_jobs("sync", [job_table(repositories=["lib/app"], interval=86400)]))
    started = time.monotonic()
    document = await run_job(registry, "base")
    elapsed = time.monotonic() - started
    assert document["errors"] == 0 and outcomes(document) == {"lib/app:v1": "copied"}, document
    assert document["throttled"] >= 4
    assert fake_upstream.count("HEAD", manifest) == 3 and fake_upstream.count("GET", layer) == 3
    assert elapsed >= 2 + 0.6


@pytest_twisted.ensureDeferred
async def test_offline_pauses_jobs(reference_upstream: Any, make_registry: Any) -> None:
    up = reference_upstream("open")
    registry = make_registry(offline=True, **sync_config(up, job_table(repositories=["lib/app"], interval=1)))
    client = Client(registry.url)
    reply = await client.post("/admin/sync?job=base", b"{}", headers=ADMIN)
    assert reply.status == 409 and "paused" in reply.json()["errors"][0]["message"]
    status = await client.get("/admin/sync?job=base")
    assert status.json()["paused"] is True and status.json()["next_run"] is None
    page = await client.get("/")
    assert "paused (offline)" in page.body.decode()
    from support.wait import sleep
    await sleep(1.5)                                      # past the interval: still nothing asked
    assert await up.acount(None, r"/v2/.+") == 0


def oras_push(host: str, target: str, payload: bytes, media_type: str, subject: dict[str, Any] | None,
              workdir: str) -> str:
    """Push a one-file artifact with the ORAS Python SDK (a real client); its manifest digest."""
    import oras.client
    import oras.oci

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, target.replace("/", "_").replace(":", "_"))
    with open(path, "wb") as f:
        f.write(payload)
    client = oras.client.OrasClient(hostname=host, insecure=True)
    response = client.push(target=f"{host}/{target}", files=[f"{path}:{media_type}"], disable_path_validation=True,
                           subject=oras.oci.Subject(**subject) if subject else None, quiet=True)
    assert response.status_code == 201, response.text
    return str(response.headers["Docker-Content-Digest"])


async def manifest_descriptor(url: str, repository: str, reference: str) -> dict[str, Any]:
    reply = await Client(url).get(f"/v2/{repository}/manifests/{reference}",
                                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert reply.status == 200, reply
    return {"mediaType": reply.header("Content-Type"), "digest": reply.header("Docker-Content-Digest"),
            "size": len(reply.body)}


@pytest_twisted.ensureDeferred
async def test_cosign_style_tags_come_along_from_an_upstream_without_the_referrers_api(
        reference_upstream: Any, make_registry: Any, tmp_path: Any) -> None:
    up = reference_upstream("open")     # distribution 2.8: no referrers API
    digests = await deferToThread(push_tags, up.host, [TagSpec("lib/signed", "v1"), TagSpec("lib/signed", "v2")],
                                  str(tmp_path / "push"))
    prefix = digests[("lib/signed", "v1")].replace(":", "-")
    signature = await deferToThread(oras_push, up.host, f"lib/signed:{prefix}.sig", b"a signature",
                                    "application/vnd.dev.cosign.simplesigning.v1+json", None, str(tmp_path / "oras"))
    sbom = await deferToThread(oras_push, up.host, f"lib/signed:{prefix}.sbom", b'{"spdxVersion": "SPDX-2.3"}',
                               "text/spdx+json", None, str(tmp_path / "oras"))
    # The distribution spec's fallback: an artifact with a subject, listed by an index tagged sha256-<hex>.
    image = await manifest_descriptor(up.url, "lib/signed", "v1")
    attestation = await deferToThread(oras_push, up.host, "lib/signed:attestation", b'{"predicate": {}}',
                                      "application/vnd.in-toto+json", image, str(tmp_path / "oras"))
    described = await manifest_descriptor(up.url, "lib/signed", attestation)
    fallback = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [described]}).encode()
    await deferToThread(push_manifest, up, "lib/signed", prefix, fallback, OCI_INDEX)
    registry = make_registry(**sync_config(up, job_table(repositories=["lib/signed"], include_tags=[r"v\d+"])))
    document = await run_job(registry, "base")
    assert document["errors"] == 0 and document["images"] == 2, document["messages"]
    # Asked by the images copied at once (concurrency 2) until its first 404, then the tag schema only.
    assert await up.acount("GET", r"/v2/lib/signed/referrers/.*") in (1, 2)
    assert await mirror_tags(registry, "lib/signed") == sorted([prefix, f"{prefix}.sbom", f"{prefix}.sig", "v1", "v2"])
    up.stop()      # everything is served from the cache now
    client = Client(registry.url)
    found = (await client.get(f"/v2/{NS}/lib/signed/referrers/{image['digest']}")).json()["manifests"]
    assert [entry["digest"] for entry in found] == [attestation]
    for tag, digest, payload in ((f"{prefix}.sig", signature, b"a signature"),
                                 (f"{prefix}.sbom", sbom, b'{"spdxVersion": "SPDX-2.3"}')):
        reply = await client.get(f"/v2/{NS}/lib/signed/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert reply.status == 200 and reply.header("Docker-Content-Digest") == digest
        layer = reply.json()["layers"][0]["digest"]
        assert (await client.get(f"/v2/{NS}/lib/signed/blobs/{layer}")).body == payload


@pytest_twisted.ensureDeferred
async def test_referrers_come_along_recursively_from_an_upstream_with_the_referrers_api(
        make_registry: Any, tmp_path: Any, monkeypatch: Any) -> None:
    import registryd.sync.upstream
    monkeypatch.setattr(registryd.sync.upstream, "PAGE_SIZE", 2)     # the tag list in pages, by Link
    upstream = make_registry()           # registryd itself, which has the referrers API
    digests = await deferToThread(push_tags, upstream.host, [TagSpec("lib/signed", f"v{i}") for i in range(5)],
                                  str(tmp_path / "push"))
    image = await manifest_descriptor(upstream.url, "lib/signed", "v0")
    signature = await deferToThread(oras_push, upstream.host, "lib/signed:sig-v0", b"a signature",
                                    "application/vnd.dev.cosign.simplesigning.v1+json", image, str(tmp_path / "o"))
    signed = await manifest_descriptor(upstream.url, "lib/signed", "sig-v0")
    attestation = await deferToThread(oras_push, upstream.host, "lib/signed:att-of-sig", b'{"predicate": {}}',
                                      "application/vnd.in-toto+json", signed, str(tmp_path / "o"))
    registry = make_registry(upstreams=(UpstreamConfig(NS, upstream.url),), syncs=sync_jobs("sync", [
        job_table(repositories=["lib/signed"], include_tags=[r"v\d+"], interval=86400)]))
    document = await run_job(registry, "base")
    assert document["errors"] == 0 and document["images"] == 5, document["messages"]
    assert digests[("lib/signed", "v0")] == image["digest"]
    metrics = (await Client(upstream.url).get("/metrics")).body.decode()
    pages = sum(float(m) for m in re.findall(r'registryd_http_requests_total\{[^}]*route="tags"[^}]*\} (\S+)',
                                             metrics))
    assert pages >= 4        # 7 tags, 2 a page
    await upstream.service.stopService()      # from the cache from now on
    client = Client(registry.url)
    found = (await client.get(f"/v2/{NS}/lib/signed/referrers/{image['digest']}")).json()["manifests"]
    assert [entry["digest"] for entry in found] == [signature]
    nested = (await client.get(f"/v2/{NS}/lib/signed/referrers/{signature}")).json()["manifests"]
    assert [entry["digest"] for entry in nested] == [attestation]
    reply = await client.get(f"/v2/{NS}/lib/signed/manifests/{attestation}",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert reply.status == 200
    layer = reply.json()["layers"][0]["digest"]
    assert (await client.get(f"/v2/{NS}/lib/signed/blobs/{layer}")).body == b'{"predicate": {}}'


def write_config(path: str, data_dir: str, up: Any, job: str = 'repositories = ["other/app"]') -> str:
    with open(path, "w") as f:
        f.write(f'data_dir = "{data_dir}"\n[[upstream]]\nnamespace = "{NS}"\nurl = "{up.url}"\n'
                f'[[sync]]\nname = "base"\nupstream = "{NS}"\n{job}\n')
    return path


REGISTRYD = os.path.join(VENV_BIN, "registryd")


@pytest_twisted.ensureDeferred
async def test_registryd_sync_now_in_the_server_with_dry_run_report_metrics_and_status_page(
        seeded: dict[str, Any], reference_upstream: Any, make_registry: Any) -> None:
    up = reference_upstream("open")
    load_into(up, seeded["data"])
    registry = make_registry(**sync_config(up, job_table(repositories=["other/app"], interval=86400)))
    slot = registry.service.sync.slots["base"]
    await wait_until(lambda: slot.running is None and slot.last is not None, 10, "the first scheduled run")
    await registry.service.store.mirror_repositories(NS).delete_tag("other/app", "v1")   # to copy again
    dry = await deferToThread(subprocess.run, [REGISTRYD, "sync", "--now", "base", "--dry-run", "--url",
                                               registry.url], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert any(line.startswith("would copy other/app:v1 sha256:") for line in lines), lines
    assert any(line.startswith("unchanged other/app:v0") for line in lines), lines
    assert "v1" not in await mirror_tags(registry, "other/app")          # the dry run copied nothing
    done = await deferToThread(subprocess.run, [REGISTRYD, "sync", "--now", "base", "--url", registry.url],
                               capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Its manifest and blobs were still stored: only the tag is written again, nothing fetched.
    assert re.search(r"^copied other/app:v1 sha256:\S+ \(0 manifests, 0 blobs fetched", done.stdout, re.M), \
        done.stdout
    assert "sync base: copied 1 images" in done.stdout
    assert await mirror_tags(registry, "other/app") == ["v0", "v1", "v2"]
    client = Client(registry.url)
    metrics = (await client.get("/metrics")).body.decode()
    assert 'registryd_sync_last_images{job="base"} 1.0' in metrics
    assert 'registryd_sync_runs_total{job="base"} 2.0' in metrics
    assert re.search(r'registryd_sync_last_duration_seconds\{job="base"\} \d', metrics)
    page = (await client.get("/")).body.decode()
    assert 'id="sync"' in page and "<b>base</b>" in page
    unknown = await deferToThread(subprocess.run, [REGISTRYD, "sync", "--now", "nope", "--url", registry.url],
                                  capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no [[sync]] job is named 'nope'" in unknown.stderr, unknown.stderr


@pytest_twisted.ensureDeferred
async def test_registryd_sync_now_alongside_draws_a_progress_bar_and_reports_each_image(
        seeded: dict[str, Any], reference_upstream: Any, tmp_path: Any) -> None:
    up = reference_upstream("open")
    load_into(up, seeded["data"])
    os.makedirs(tmp_path / "data")      # a new site: empty
    config = write_config(str(tmp_path / "registryd.toml"), str(tmp_path / "data"), up)
    status, out, terminal = await deferToThread(run_with_terminal_stderr,
                                                [REGISTRYD, "sync", "--now", "base", "-c", config])
    assert status == 0, terminal
    assert b"registryd sync base [" in terminal
    assert sorted(line.split()[1] for line in out.splitlines() if line.startswith("copied ")) == \
        ["other/app:v0", "other/app:v1", "other/app:v2"]
    listed = await deferToThread(subprocess.run, [REGISTRYD, "sync", "-c", config], capture_output=True,
                                 text=True, timeout=60)
    assert listed.returncode == 0 and re.match(r"base \(upstream.test:5000\): last run .*: 3 images", listed.stdout)
    unknown = await deferToThread(subprocess.run, [REGISTRYD, "sync", "--now", "nope", "-c", config],
                                  capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no [[sync]] job named 'nope'" in unknown.stderr


@pytest_twisted.ensureDeferred
async def test_the_jobs_of_one_upstream_take_turns(seeded: dict[str, Any], reference_upstream: Any,
                                                     make_registry: Any) -> None:
    up = reference_upstream("open")
    load_into(up, seeded["data"])
    registry = make_registry(**sync_config(up, job_table(name="a", repositories=["lib/builds"]),
                                           job_table(name="b", repositories=["lib/versions"])))
    slots = registry.service.sync.slots      # both never ran: both are due at once
    await wait_until(lambda: all(slot.last is not None for slot in slots.values()), 30, "both runs")
    first, second = sorted((slot.last for slot in slots.values()), key=lambda last: last.started)
    assert first.ended <= second.started, (first, second)
    assert first.images and second.images


@pytest_twisted.ensureDeferred
async def test_a_platform_filter_copies_only_those_children_of_an_index(reference_upstream: Any,
                                                                          make_registry: Any) -> None:
    from upstreams import push_image, push_index

    up = reference_upstream("open")
    amd64 = await deferToThread(push_image, up, "lib/multi", None, [1500])
    arm64 = await deferToThread(push_image, up, "lib/multi", None, [2500])
    index = await deferToThread(push_index, up, "lib/multi", "v1", [amd64, arm64])   # amd64, then arm64
    registry = make_registry(**sync_config(up, job_table(repositories=["lib/multi"], platforms=["linux/arm64"])))
    document = await run_job(registry, "base")
    assert document["errors"] == 0 and outcomes(document) == {"lib/multi:v1": "copied"}, document["messages"]
    assert await up.acount("GET", rf"/v2/lib/multi/manifests/{arm64['digest']}") == 1
    assert await up.acount("GET", rf"/v2/lib/multi/manifests/{amd64['digest']}") == 0
    assert await up.acount("GET", rf"/v2/lib/multi/blobs/{amd64['layers'][0]['digest']}") == 0
    repositories = registry.service.store.mirror_repositories(NS)
    assert str(await repositories.resolve_tag("lib/multi", "v1")) == index["digest"]
    assert await repositories.has_blob("lib/multi", parse_digest(arm64["layers"][0]["digest"]))


@pytest_twisted.ensureDeferred
async def test_a_job_killed_mid_run_resumes_after_the_restart(seeded: dict[str, Any], reference_upstream: Any,
                                                               tmp_path: Any) -> None:
    """A crash (SIGKILL), not a stop: the state written after each image is all there is."""
    import signal

    from conftest import start_twistd, stop_process

    up = reference_upstream("open")
    load_into(up, seeded["data"])
    config = str(tmp_path / "registryd.toml")
    with open(config, "w") as f:
        f.write(f'[[upstream]]\nnamespace = "{NS}"\nurl = "{up.url}"\n'
                f'[[sync]]\nname = "base"\nupstream = "{NS}"\nrepositories = ["lib/builds"]\nconcurrency = 1\n')
    data_dir = str(tmp_path / "data")
    state = os.path.join(data_dir, "_registryd", "sync", "base", "state.json")

    def done() -> int:
        try:
            with open(state) as f:
                return len(json.load(f)["done"])
        except (OSError, ValueError):
            return 0

    process, _ = await deferToThread(start_twistd, data_dir, "--config", config)
    try:
        await wait_until(lambda: done() >= 8, 30, "8 images synced")
    finally:
        process.send_signal(signal.SIGKILL)
        await deferToThread(process.wait)
    killed_at = done()
    assert 8 <= killed_at < 32
    process, running = await deferToThread(start_twistd, data_dir, "--config", config)
    try:
        await wait_until(lambda: os.path.exists(state) and json.load(open(state))["last"] is not None, 30,
                         "the resumed run to end")
        with open(state) as f:
            last = json.load(f)["last"]
        # The images done before the kill are not copied again (the one under way may have been whole).
        assert last["errors"] == 0 and 32 - killed_at - 1 <= last["images"] <= 32 - killed_at
    finally:
        await deferToThread(stop_process, process)
    entries = await deferToThread(up.requests, 0.1)
    gets = [e.path for e in entries if e.method == "GET" and re.search(r"/(blobs|manifests)/sha256:", e.path)]
    twice = {g for g in gets if gets.count(g) > 1}
    # Only what the image under way when it was killed had fetched (its manifest, config, layer) comes again.
    assert len(twice) <= 3, twice
    heads = [e.path for e in entries if e.method == "HEAD" and "/manifests/" in e.path]
    assert len(set(heads)) == 32 and len(heads) - 32 <= 1, len(heads)
