"""Online garbage collection, the mirror cache limit and last-pull times, through a running server."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import time
from typing import Any

import attrs
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from conftest import VENV_BIN, free_port, start_twistd, stop_process
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Client, descriptor, digest_of, encode
from registryd.storage.fs.driver import FsDriver
from registryd.storage.scan import Repository
from registryd.config import StorageSettings, UpstreamConfig
from registryd.digest import parse_digest
from registryd.storage.guard import BlobGuard
from registryd.storage.pulls import PullRecorder
from registryd.threads import InlinePool
from registryd.upkeep.collector import Collector
from registryd.upkeep.eviction import plan_eviction
from registryd.upkeep.survey import MirrorLink, MirrorManifest, Survey
from support.wait import sleep, wait_until
from syncclient import request
from upstreams import blob_path, push_image, reference_upstream  # noqa: F401

#: Admin POSTs must be JSON (cross-site form protection).
JSON = {"Content-Type": "application/json"}

NS = "upstream.test"


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def stored(data_dir: str, digest: str) -> bool:
    d = parse_digest(digest)
    return os.path.isfile(os.path.join(data_dir, "blobs", d.algorithm, d.hex[:2], d.hex))


def fake_digest(n: int) -> Any:
    return parse_digest("sha256:" + hashlib.sha256(str(n).encode()).hexdigest())


# --- units ---------------------------------------------------------------------

def test_guard_says_whether_a_digest_was_claimed_since_a_time() -> None:
    now = [100.0]
    guard = BlobGuard(clock=lambda: now[0])
    digest = fake_digest(1)
    assert not guard.claimed_since(digest, 50.0)
    guard.claim([digest])
    assert guard.claimed_since(digest, 100.0)
    assert guard.claimed_since(digest, 50.0)
    assert not guard.claimed_since(digest, 100.5)
    assert not guard.claimed_since(fake_digest(2), 0.0)
    assert guard.last_claim(digest) == 100.0


def _survey(manifests: list[tuple[str, int, float, list[int]]], local: list[int], sizes: dict[int, int],
            links: list[tuple[str, int, float]] = ()) -> Survey:
    survey = Survey(taken_at=1000.0)
    survey.blob_sizes = {fake_digest(n): size for n, size in sizes.items()}
    survey.local = {fake_digest(n) for n in local}
    for name, n, used, keeps in manifests:
        repo = Repository(name, name, NS, "/nowhere")
        survey.manifests.append(MirrorManifest(repo, fake_digest(n), used, frozenset(map(fake_digest, [n, *keeps])),
                                               None))
    for name, n, used in links:
        survey.links.append(MirrorLink(Repository(name, name, NS, "/nowhere"), fake_digest(n), used))
    return survey


def test_eviction_plan_takes_the_least_recently_used_first_and_never_local_content() -> None:
    sizes = {1: 1, 2: 1, 3: 1, 10: 100, 20: 100, 30: 100, 99: 500}
    # Three images sharing nothing but the local layer 99; image 2 is the least recently used.
    survey = _survey([("a", 1, 30.0, [10, 99]), ("b", 2, 10.0, [20, 99]), ("c", 3, 20.0, [30])],
                     local=[99], sizes=sizes)
    assert survey.mirror_bytes == 303
    plan = plan_eviction(survey, 250)
    assert [m.digest for m in plan.manifests] == [fake_digest(2)]
    assert set(plan.blobs) == {fake_digest(2), fake_digest(20)}
    assert plan.size_after == 202
    plan = plan_eviction(survey, 101)
    assert [m.digest for m in plan.manifests] == [fake_digest(2), fake_digest(3)]
    assert fake_digest(99) not in plan.blobs
    assert plan_eviction(survey, 303).manifests == []


def test_eviction_plan_keeps_a_blob_another_kept_manifest_shares() -> None:
    sizes = {1: 1, 2: 1, 10: 100, 20: 100}
    survey = _survey([("a", 1, 10.0, [10]), ("b", 2, 20.0, [10, 20])], local=[], sizes=sizes,
                     links=[("a", 5, 5.0)])
    plan = plan_eviction(survey, 201)
    # The blob-only link is oldest but holds no stored bytes; manifest a goes, its layer stays for b.
    assert [m.digest for m in plan.manifests] == [fake_digest(1)]
    assert set(plan.blobs) == {fake_digest(1)}
    plan = plan_eviction(survey, 50)
    assert set(plan.blobs) == {fake_digest(1), fake_digest(2), fake_digest(10), fake_digest(20)}


def test_a_collection_spares_what_was_claimed_while_it_ran(tmp_path) -> None:
    """The collector's deletion goes through the guard: a claim during the run keeps the blob."""
    data_dir = tmp_path / "data"
    blob = b"orphan" * 100
    digest = parse_digest(digest_of(blob))
    path = data_dir / "blobs" / "sha256" / digest.hex[:2] / digest.hex
    path.parent.mkdir(parents=True)
    path.write_bytes(blob)
    os.utime(path, (1, 1))
    (data_dir / "repositories").mkdir()
    guard = BlobGuard()
    times = iter([1000.0])
    collector = Collector(FsDriver(str(data_dir), InlinePool()), delay=0, dry_run=False, guard=guard,
                          clock=lambda: next(times))
    guard.claim([digest])  # at the real time, which is after the run's start (1000.0)
    result = collector.run()
    assert result.blobs == [] and path.exists()
    result = Collector(FsDriver(str(data_dir), InlinePool()), delay=0, dry_run=False, guard=guard).run()
    assert [b["digest"] for b in result.blobs] == [str(digest)] and not path.exists()


# --- online gc under load ---------------------------------------------------------

BASE_LAYER = b"base layer shared by every image " * 50


@attrs.define
class Slot:
    repo: str
    number: int
    generation: int = 0
    digest: str | None = None       # the manifest, while the image is alive
    blobs: list[bytes] = attrs.field(factory=list)
    lock: defer.DeferredLock = attrs.field(factory=defer.DeferredLock)
    dead_blobs: set[str] = attrs.field(factory=set)


def _image(slot: Slot) -> tuple[bytes, list[bytes]]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "slot": slot.number,
                         "generation": slot.generation}).encode()
    layer = f"layer {slot.number} {slot.generation} ".encode() * 400
    blobs = [config, BASE_LAYER, layer]
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(OCI_LAYER, BASE_LAYER), descriptor(OCI_LAYER, layer)]}
    return encode(document), blobs


async def _push(client: Client, slot: Slot) -> None:
    """As docker and skopeo push: HEAD each blob, upload the missing ones, then the manifest."""
    manifest, blobs = _image(slot)
    for blob in blobs:
        digest = digest_of(blob)
        if (await client.head(f"/v2/{slot.repo}/blobs/{digest}")).status != 200:
            await client.push_blob(slot.repo, blob)
    reply = await client.push_manifest(slot.repo, f"s{slot.number}", manifest, OCI_MANIFEST)
    assert reply.status == 201, f"pushing slot {slot.number} generation {slot.generation}: {reply}"
    slot.digest, slot.blobs = digest_of(manifest), blobs


async def _verify(client: Client, slot: Slot) -> None:
    reply = await client.get(f"/v2/{slot.repo}/manifests/s{slot.number}", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.header("Docker-Content-Digest") == slot.digest, str(reply)
    for blob in slot.blobs:
        reply = await client.get(f"/v2/{slot.repo}/blobs/{digest_of(blob)}")
        assert reply.status == 200 and reply.body == blob, f"slot {slot.number}: {reply}"


@pytest_twisted.ensureDeferred
async def test_online_gc_under_continuous_push_pull_and_delete(make_registry) -> None:
    """Collections run back to back while clients push, re-push, pull and delete; every
    image alive at the end pulls whole, and what was deleted is collected afterwards."""
    registry = make_registry(gc_interval=1, gc_delay=2)
    client = Client(registry.url)
    rng = random.Random(7)
    slots = [Slot(f"load/app{i % 3}", i) for i in range(12)]
    stop = [False]
    passes: list[dict[str, Any]] = []
    actions = {"push": 0, "pull": 0, "delete": 0}

    async def worker() -> None:
        while not stop[0]:
            slot = rng.choice(slots)
            await slot.lock.acquire()
            try:
                if slot.digest is None:
                    if rng.random() < 0.5:
                        slot.generation += 1     # else: push the deleted image again, same blobs
                    await _push(client, slot)
                    actions["push"] += 1
                elif rng.random() < 0.7:
                    await _verify(client, slot)
                    actions["pull"] += 1
                else:
                    reply = await client.delete(f"/v2/{slot.repo}/manifests/{slot.digest}")
                    assert reply.status == 202, str(reply)
                    slot.digest = None
                    actions["delete"] += 1
            finally:
                slot.lock.release()

    async def collector() -> None:
        while not stop[0]:
            reply = await client.post("/admin/gc?delay=2", headers=JSON)
            assert reply.status == 200, str(reply)
            passes.append(reply.json())

    def enough() -> bool:   # what is asserted of the load below
        return (len(passes) >= 5 and all(a > 10 for a in actions.values())
                and sum(len(p["removed_blobs"]) for p in passes) > 0)

    load = [defer.ensureDeferred(worker()) for _ in range(6)] + [defer.ensureDeferred(collector())]
    deadline = time.monotonic() + 10
    while not enough() and time.monotonic() < deadline:    # the load goes on until then, 10 s at most
        await sleep(0.1)
    stop[0] = True
    await defer.gatherResults(load, consumeErrors=True)
    assert len(passes) >= 5 and all(a > 10 for a in actions.values()), (len(passes), actions)
    assert sum(len(p["removed_blobs"]) for p in passes) > 0, "no collection removed anything during the load"
    for slot in slots:
        if slot.digest is not None:
            await _verify(client, slot)

    # With the load stopped, one pass without delay leaves exactly what live images use.
    final = await client.post("/admin/gc?delay=0", headers=JSON)
    assert final.status == 200
    alive = {digest_of(b) for s in slots if s.digest for b in s.blobs} | {s.digest for s in slots if s.digest}
    for slot in slots:
        if slot.digest is not None:
            await _verify(client, slot)
    on_disk = {f"sha256:{name}" for _, _, files in os.walk(os.path.join(registry.data_dir, "blobs")) for name in files}
    assert on_disk == alive
    metrics = (await client.get("/metrics")).body.decode()
    assert metric(metrics, "registryd_gc_runs_total", outcome="ok") >= len(passes) + 1
    assert metric(metrics, "registryd_gc_reclaimed_bytes_total") > 0
    fsck = subprocess.run([os.path.join(VENV_BIN, "registryd"), "fsck", "--data-dir", registry.data_dir],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest_twisted.ensureDeferred
async def test_a_failed_scheduled_pass_does_not_stop_the_next(make_registry, monkeypatch) -> None:
    calls = []
    real_run = Collector.run

    def flaky(self: Collector) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error", "/data/blobs")
        return real_run(self)

    monkeypatch.setattr(Collector, "run", flaky)
    registry = make_registry(gc_interval=1, gc_delay=0)
    client = Client(registry.url)
    orphan = await client.push_blob("team/app", b"nobody references me")
    for _ in range(100):
        # A blob leaves blobs/ when it is moved to the trash, before its run ends and is counted.
        metrics = (await client.get("/metrics")).body.decode()
        if len(calls) >= 2 and not stored(registry.data_dir, orphan) \
                and metric(metrics, "registryd_gc_runs_total", outcome="ok") >= 1:
            break
        await sleep(0.1)
    assert metric(metrics, "registryd_gc_runs_total", outcome="failed") == 1
    assert metric(metrics, "registryd_gc_runs_total", outcome="ok") >= 1
    assert not stored(registry.data_dir, orphan)


@pytest_twisted.ensureDeferred
async def test_admin_gc_endpoint_is_for_admins_and_checks_its_delay(make_registry) -> None:
    registry = make_registry()
    client = Client(registry.url)
    reply = await client.post("/admin/gc?delay=soon", headers=JSON)
    assert reply.status == 400 and reply.codes == ["UNSUPPORTED"]
    assert (await client.get("/admin/gc")).status == 405
    orphan = await client.push_blob("team/app", b"young orphan")
    report = (await client.post("/admin/gc", headers=JSON)).json()      # [gc] delay: an hour
    assert report["removed_blobs"] == [] and report["kept_young"] == 1
    report = (await client.post("/admin/gc?delay=0", headers=JSON)).json()
    assert [b["digest"] for b in report["removed_blobs"]] == [orphan]


# --- mirror cache limit -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_mirror_cache_evicts_least_recently_pulled_and_never_local(reference_upstream, make_registry) -> None:
    up = reference_upstream("open")
    mib = 1024 * 1024
    images = {name: push_image(up, f"lib/{name}", "v1", layer_sizes=(mib,), seed=name) for name in "abcd"}
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=up.url),),
                             mirror_max_size=int(2.5 * mib), usage_interval=3600)
    upkeep = registry.service.upkeep
    # Every pull recorded, not once a second per manifest: what is tested is eviction's order.
    registry.service.api.pulls = PullRecorder(interval=0)
    mirrored = registry.service.api.mirror.mirrors[NS].repositories
    client = Client(registry.url)
    local_layer = os.urandom(3 * mib)   # alone bigger than the limit: local content is never evicted
    local_digest = await client.push_blob("team/big", local_layer)

    async def pull(name: str) -> None:
        image = images[name]
        began = time.time()
        reply = await client.get(f"/v2/{NS}/lib/{name}/manifests/v1", headers={"Accept": image["media_type"]})
        assert reply.status == 200, str(reply)
        for blob in (image["config"], *image["layers"]):
            reply = await client.get(f"/v2/{NS}/lib/{name}/blobs/{blob['digest']}")
            assert reply.status == 200 and hashlib.sha256(reply.body).hexdigest() == blob["digest"][7:]

        async def recorded() -> bool:   # in the background
            return (await mirrored.pulls(f"lib/{name}")).get(parse_digest(image["digest"]), 0.0) >= began
        await wait_until(recorded, 10, f"a pull time of lib/{name}")

    def cached(name: str) -> bool:
        return stored(registry.data_dir, images[name]["layers"][0]["digest"])

    for name in "abc":
        await pull(name)
    await pull("a")          # now b is the least recently pulled
    await upkeep.survey()
    assert [n for n in "abcd" if cached(n)] == ["a", "c"]
    assert stored(registry.data_dir, local_digest)
    await pull("d")
    await upkeep.survey()
    assert [n for n in "abcd" if cached(n)] == ["a", "d"]
    assert upkeep.last_size.mirror_bytes <= 2.5 * mib
    metrics = (await client.get("/metrics")).body.decode()
    assert metric(metrics, "registryd_mirror_evicted_manifests_total") == 2
    assert metric(metrics, "registryd_mirror_evicted_bytes_total") >= 2 * mib
    assert metric(metrics, "registryd_store_bytes", kind="local") == len(local_layer)
    assert metric(metrics, "registryd_mirror_cache_max_bytes") == int(2.5 * mib)
    # What was evicted comes back from the upstream on the next pull.
    fetched = await up.acount("GET", blob_path("lib/b", images["b"]["layers"][0]["digest"]))
    await pull("b")
    assert await up.acount("GET", blob_path("lib/b", images["b"]["layers"][0]["digest"])) == fetched + 1
    assert (await client.get(f"/v2/team/big/blobs/{local_digest}")).body == local_layer


@pytest_twisted.ensureDeferred
async def test_pull_times_are_recorded_for_ls(make_registry) -> None:
    registry = make_registry()
    client = Client(registry.url)
    image = await client.push_image("team/app", "v1", seed="pulls")
    before = time.time()
    ls = subprocess.run([os.path.join(VENV_BIN, "registryd"), "ls", "--json", "--data-dir", registry.data_dir],
                        capture_output=True, text=True, check=True)
    assert json.loads(ls.stdout)["repositories"][0]["last_pull"] is None
    assert (await client.head("/v2/team/app/manifests/v1")).status == 200
    marker = os.path.join(registry.data_dir, "repositories", "team", "app", "_pulls", "sha256", image.digest[7:])
    for _ in range(50):
        if os.path.exists(marker):
            break
        await sleep(0.05)
    assert os.path.getmtime(marker) >= before - 1
    ls = subprocess.run([os.path.join(VENV_BIN, "registryd"), "ls", "--json", "--data-dir", registry.data_dir],
                        capture_output=True, text=True, check=True)
    last_pull = json.loads(ls.stdout)["repositories"][0]["last_pull"]
    assert last_pull is not None and last_pull.startswith(time.strftime("%Y-%m-%dT", time.gmtime()))
    # Deleting the manifest takes its pull time with it.
    assert (await client.delete(f"/v2/team/app/manifests/{image.digest}")).status == 202
    assert not os.path.exists(marker)


@pytest.mark.parametrize("how", ["head-then-manifest", "upload-again"])
@pytest_twisted.ensureDeferred
async def test_a_blob_reused_while_a_pass_sweeps_is_not_removed(make_registry, monkeypatch, how) -> None:
    """The race the guard closes: a pass judged a blob unused (its image was deleted) and is
    about to unlink it when a client pushes the image again, finding the blob (HEAD) or
    uploading it again. The pass is held just before its first unlink while that happens."""
    import threading

    registry = make_registry()
    client = Client(registry.url)
    slot = Slot("team/app", 1)
    await _push(client, slot)
    assert (await client.delete(f"/v2/team/app/manifests/{slot.digest}")).status == 202
    paused, resume = threading.Event(), threading.Event()
    real_delete = Collector._delete

    def held_delete(self: Collector, digest: Any, path: str) -> bool:
        if not paused.is_set():
            paused.set()
            resume.wait(30)
        return real_delete(self, digest, path)

    monkeypatch.setattr(Collector, "_delete", held_delete)
    gc = defer.ensureDeferred(client.post("/admin/gc?delay=0", headers=JSON))
    while not paused.is_set():
        await sleep(0.02)
    manifest, blobs = _image(slot)
    for blob in blobs:
        digest = digest_of(blob)
        if how == "head-then-manifest":
            assert (await client.head(f"/v2/team/app/blobs/{digest}")).status == 200
        else:
            await client.push_blob("team/app", blob)
    assert (await client.push_manifest("team/app", "s1", manifest, OCI_MANIFEST)).status == 201
    slot.digest = digest_of(manifest)
    resume.set()
    report = (await gc).json()
    assert report["removed_blobs"] == []
    await _verify(client, slot)


def test_gc_url_collects_inside_a_running_server(tmp_path) -> None:
    """``registryd gc --url`` as an admin of a real twistd registryd with htpasswd."""
    registryd = os.path.join(VENV_BIN, "registryd")
    htpasswd = str(tmp_path / "htpasswd")
    for user in ("admin", "dev"):
        subprocess.run([registryd, "htpasswd", "--password-stdin", "--cost", "4", htpasswd, user],
                       input=f"{user}-secret\n", text=True, check=True, capture_output=True)
    config = tmp_path / "registryd.toml"
    config.write_text(f'[auth]\nhtpasswd = "{htpasswd}"\nadmin_users = ["admin"]\n')
    (tmp_path / "admin.pw").write_text("admin-secret\n")
    (tmp_path / "dev.pw").write_text("dev-secret\n")
    process, server = start_twistd(str(tmp_path / "data"), "--config", str(config))
    try:
        auth = {"Authorization": "Basic " + base64.b64encode(b"dev:dev-secret").decode()}
        blob = b"pushed, never referenced"
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        reply = request(server.host, "POST", f"/v2/team/app/blobs/uploads/?digest={digest}", blob, headers=auth)
        assert reply.status == 201, reply

        def gc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run([registryd, "gc", "--url", server.url, *args], capture_output=True, text=True,
                                  env={**os.environ, **(env or {})})

        refused = gc("--user", "dev", "--password-file", str(tmp_path / "dev.pw"))
        assert refused.returncode == 3 and refused.stderr.count("\n") == 1
        assert "refused the collection: 403" in refused.stderr
        anonymous = gc()
        assert anonymous.returncode == 3 and ": 401 " in anonymous.stderr
        dry = gc("--user", "admin", "--password-file", str(tmp_path / "admin.pw"), "--delay", "0", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would remove blob {digest}" in dry.stdout and stored(server.data_dir, digest)
        done = gc("--user", "admin", "--delay", "0", "--json", env={"REGISTRYD_PASSWORD": "admin-secret"})
        assert done.returncode == 0, done.stderr
        assert [b["digest"] for b in json.loads(done.stdout)["removed_blobs"]] == [digest]
        assert not stored(server.data_dir, digest)
        closed = subprocess.run([registryd, "gc", "--url", f"http://127.0.0.1:{free_port()}"],
                                capture_output=True, text=True)
        assert closed.returncode == 3 and "cannot reach" in closed.stderr and closed.stderr.count("\n") == 1
        bad = subprocess.run([registryd, "gc", "--url", "ftp://x"], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    finally:
        stop_process(process)


@pytest_twisted.ensureDeferred
async def test_a_push_whose_blob_vanished_after_its_check_is_refused_without_a_trace(make_registry) -> None:
    """The API half of collecting on a shared store: a collector on another node may take a
    blob between the manifest's first check and its commit; the last look refuses the push
    and leaves neither revision nor tag."""
    registry = make_registry()
    client = Client(registry.url)
    slot = Slot("team/app", 3)
    manifest, blobs = _image(slot)
    for blob in blobs:
        await client.push_blob(slot.repo, blob)
    layer = parse_digest(digest_of(blobs[2]))
    store = registry.service.store
    real_size = store.blobs.size
    looks: list[int] = []

    async def vanishing(digest: Any) -> int | None:
        if digest == layer:
            looks.append(1)
            if len(looks) > 1:
                return None     # gone by the last look
        return await real_size(digest)

    store.blobs.size = vanishing
    reply = await client.push_manifest(slot.repo, "s3", manifest, OCI_MANIFEST)
    store.blobs.size = real_size
    assert reply.status == 400 and reply.codes == ["MANIFEST_BLOB_UNKNOWN"], str(reply)
    assert (await client.get(f"/v2/{slot.repo}/manifests/{digest_of(manifest)}")).status == 404
    assert (await client.get(f"/v2/{slot.repo}/tags/list")).json()["tags"] == []
    # Pushed again with the blob there, it lands.
    assert (await client.push_manifest(slot.repo, "s3", manifest, OCI_MANIFEST)).status == 201


@pytest_twisted.ensureDeferred
async def test_online_gc_on_the_shared_s3_store(make_registry, ceph_s3) -> None:  # noqa: F811
    """POST /admin/gc on a node of an S3 store: the same rules, through the bucket."""
    bucket = await ceph_s3.new_bucket()
    try:
        registry = make_registry(storage=StorageSettings("s3", s3=bucket.settings))
        client = Client(registry.url)
        slot = Slot("team/app", 4)
        await _push(client, slot)
        orphan = await client.push_blob("team/app", b"pushed, never referenced, on s3")
        report = (await client.post("/admin/gc?delay=0", headers=JSON)).json()
        assert [b["digest"] for b in report["removed_blobs"]] == [orphan]
        assert report["data_dir"].startswith("s3://")
        await _verify(client, slot)
        keys = [entry.key async for entry in bucket.list_objects("blobs/")]
        assert not any(key.endswith(orphan[7:]) for key in keys)
        metrics = (await client.get("/metrics")).body.decode()
        assert metric(metrics, "registryd_gc_runs_total", outcome="ok") == 1
    finally:
        await bucket.close()
