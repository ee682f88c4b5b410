"""``registryd gc`` through its console script, on copies of a data directory
that a real ``twistd -n registryd`` filled over HTTP (blocking client), and
on an S3 bucket that an in-process registryd on the S3 driver filled."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from conftest import start_twistd, stop_process
from registryd.admin.gc import collect_in_command
from registryd.units import human_size
from registryd.config import StorageSettings
from registryd.digest import parse_digest
from registryd.storage.layout import blob_key
from registryd.storage.s3.driver import S3Driver
from registryd.upkeep.collector import Collector
from registryd.upkeep.marker import list_trash
from oci_client import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, Client, descriptor, digest_of, encode
from syncclient import push_blob, request, sha256
from test_cli_ls import blob_file, bucket_objects, files_under, run, write_s3_config
from support.wait import sleep
from support.cli import run_main

HOUR = 3600


@attrs.frozen
class Pushed:
    repo: str
    tag: str
    digest: str
    media_type: str
    blobs: tuple[str, ...]     # config and layers (none for an index)


@attrs.define
class Store:
    data_dir: str
    images: list[Pushed]       # everything that must survive and pull
    gone: Pushed               # its manifest was deleted: its blobs are garbage
    orphan: str                # a blob pushed without a manifest
    young: str                 # another one, which stays "just pushed"


def push_image(host: str, repo: str, tag: str | None, seed: str, shared: bytes = b"") -> Pushed:
    """Push an image; without ``tag``, by digest (as an index's children are)."""
    config = json.dumps({"os": "linux", "seed": seed}).encode()
    layer = f"layer {repo} {seed}".encode() * 50
    layers = [layer] + ([shared] if shared else [])
    blobs = tuple(push_blob(host, repo, data) for data in [config, *layers])
    body = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                   "layers": [descriptor(OCI_LAYER, data) for data in layers]})
    tag = tag or sha256(body)
    reply = request(host, "PUT", f"/v2/{repo}/manifests/{tag}", body, {"Content-Type": OCI_MANIFEST})
    assert reply.status == 201, reply.body
    return Pushed(repo, tag, sha256(body), OCI_MANIFEST, blobs)


def push_index(host: str, repo: str, tag: str, children: list[Pushed]) -> Pushed:
    body = encode({"schemaVersion": 2, "mediaType": OCI_INDEX,
                   "manifests": [{"mediaType": c.media_type, "digest": c.digest, "size": 0} for c in children]})
    reply = request(host, "PUT", f"/v2/{repo}/manifests/{tag}", body, {"Content-Type": OCI_INDEX})
    assert reply.status == 201, reply.body
    return Pushed(repo, tag, sha256(body), OCI_INDEX, ())


def link_file(data_dir: str, repo: str, digest: str) -> str:
    return os.path.join(data_dir, "repositories", repo, "_blobs", *digest.split(":"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: Any) -> Store:
    data_dir = str(tmp_path_factory.mktemp("gc") / "data")
    process, server = start_twistd(data_dir)
    try:
        host = server.host
        shared = b"a layer both app images use" * 40
        v1 = push_image(host, "team/app", "v1", "1", shared)
        v2 = push_image(host, "team/app", "v2", "2", shared)
        children = [push_image(host, "team/multi", None, f"arch{i}") for i in range(2)]
        index = push_index(host, "team/multi", "1.0", children)
        gone = push_image(host, "team/gone", "old", "gone")
        orphan = push_blob(host, "team/app", b"pushed, but no manifest came" * 30)
        young = push_blob(host, "team/app", b"pushed moments ago" * 30)
    finally:
        stop_process(process)
    # As a DELETE of the manifest leaves it: no tag, no revision; blobs and links stay.
    repo = os.path.join(data_dir, "repositories", "team/gone", "_manifests")
    os.unlink(os.path.join(repo, "tags", "old"))
    os.unlink(os.path.join(repo, "revisions", *gone.digest.split(":")))
    return Store(data_dir, [v1, v2, *children, index], gone, orphan, young)


def age(root: str, seconds: float) -> None:
    then = time.time() - seconds
    for directory, _, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(directory, name), (then, then))


@pytest.fixture
def store(template: Store, tmp_path: Any) -> Iterator[Store]:
    """A copy where everything is two hours old, except the young blob."""
    data_dir = str(tmp_path / "data")
    shutil.copytree(template.data_dir, data_dir, symlinks=True)
    # What gc must never look at, old as well.
    for sub, name in (("uploads/abc", "data"), ("tmp", "x"), ("quarantine/20240101T000000Z/blobs/sha256/00", "00ff")):
        os.makedirs(os.path.join(data_dir, sub), exist_ok=True)
        with open(os.path.join(data_dir, sub, name), "wb") as f:
            f.write(b"leave me")
    age(data_dir, 2 * HOUR)
    os.utime(blob_file(data_dir, template.young))
    yield attrs.evolve(template, data_dir=data_dir)


def gc(data_dir: str, *args: str) -> Any:
    return run("gc", "--data-dir", data_dir, *args)


def garbage(store: Store) -> set[str]:
    return {store.orphan, store.gone.digest, *store.gone.blobs}


def size_of(data_dir: str, digests: set[str]) -> int:
    return sum(os.path.getsize(blob_file(data_dir, d)) for d in digests)


def all_referenced(store: Store) -> set[str]:
    return {d for image in store.images for d in (image.digest, *image.blobs)}


# --- tests ------------------------------------------------------------------------


def test_help() -> None:
    result = run("gc", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("--dry-run", "--delay SECONDS", "--json", "--config FILE", "--data-dir DIR", "default 3600",
                  "alongside a running server", "younger than --delay", "uploads/, tmp/ and quarantine/",
                  "registryd prune", "exit status", "2 bad arguments", "3 gc could not be done"):
        assert words in text, words
    assert "gc" in run("--help").stdout


def test_gc_sweeps_garbage_and_every_image_still_pulls(store: Store) -> None:
    reclaimable = size_of(store.data_dir, garbage(store))
    orphan_size = os.path.getsize(blob_file(store.data_dir, store.orphan))
    untouchable = {rel: h for rel, h in files_under(store.data_dir).items()
                   if rel.split("/")[0] in ("uploads", "tmp", "quarantine")}
    result = gc(store.data_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    removed = {line.split()[2] for line in lines if line.startswith("removed blob ")}
    assert removed == garbage(store)
    line = next(x for x in lines if store.orphan in x and x.startswith("removed blob"))
    assert line.endswith(f"({human_size(orphan_size)}, {orphan_size} bytes)"), line
    links = [x for x in lines if x.startswith("removed link ")]
    assert f"removed link team/app -> {store.orphan} (its blob is gone)" in links
    assert len(links) == 1 + len(store.gone.blobs)  # the deleted image's blobs were linked in team/gone
    assert lines[-1].startswith("4 blobs removed, ") and f"({reclaimable} bytes) reclaimed" in lines[-1]
    assert "1 unreferenced blob younger than 3600s kept" in lines[-1]

    for digest in garbage(store):
        assert not os.path.exists(blob_file(store.data_dir, digest))
    assert not os.path.exists(link_file(store.data_dir, "team/app", store.orphan))
    for digest in all_referenced(store) | {store.young}:
        assert os.path.isfile(blob_file(store.data_dir, digest)), digest
    assert os.path.exists(link_file(store.data_dir, "team/app", store.young))
    assert {rel: h for rel, h in files_under(store.data_dir).items()
            if rel.split("/")[0] in ("uploads", "tmp", "quarantine")} == untouchable
    # Empty prefix directories went with their blobs.
    for digest in garbage(store):
        parent = os.path.dirname(blob_file(store.data_dir, digest))
        assert not os.path.isdir(parent) or os.listdir(parent)

    again = gc(store.data_dir, "--json")
    assert json.loads(again.stdout)["removed_blobs"] == []

    # A registryd started on the collected store serves every image completely.
    process, server = start_twistd(store.data_dir)
    try:
        for image in store.images:
            for reference in (image.tag, image.digest):
                reply = request(server.host, "GET", f"/v2/{image.repo}/manifests/{reference}",
                                headers={"Accept": image.media_type})
                assert reply.status == 200 and sha256(reply.body) == image.digest, (image, reference)
            for digest in image.blobs:
                reply = request(server.host, "GET", f"/v2/{image.repo}/blobs/{digest}")
                assert reply.status == 200 and sha256(reply.body) == digest, (image, digest)
        reply = request(server.host, "GET", f"/v2/team/gone/blobs/{store.gone.blobs[0]}")
        assert reply.status == 404
    finally:
        stop_process(process)


def test_dry_run_removes_nothing(store: Store) -> None:
    before = files_under(store.data_dir)
    result = gc(store.data_dir, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert {line.split()[3] for line in lines if line.startswith("would remove blob ")} == garbage(store)
    assert lines[-1].startswith("4 blobs would be removed, ") and "would be reclaimed" in lines[-1]
    assert files_under(store.data_dir) == before


def test_json(store: Store) -> None:
    dry = json.loads(gc(store.data_dir, "--json", "--dry-run").stdout)
    result = gc(store.data_dir, "--json")
    assert result.returncode == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert {b["digest"] for b in report["removed_blobs"]} == garbage(store)
    assert report["bytes_reclaimed"] == sum(b["size"] for b in report["removed_blobs"]) > 0
    assert report["dry_run"] is False and report["delay"] == 3600
    assert report["kept_young"] == 1
    assert report["kept_referenced"] == len(all_referenced(store))
    assert {(x["repository"], x["digest"]) for x in report["removed_links"]} == \
        {("team/app", store.orphan)} | {("team/gone", d) for d in store.gone.blobs}
    assert dict(dry, dry_run=False, removed_directories=0) == dict(report, removed_directories=0)


def test_delay_keeps_blobs_pushed_recently(store: Store) -> None:
    age(store.data_dir, 0)  # everything was just written
    before = files_under(store.data_dir)
    report = json.loads(gc(store.data_dir, "--json").stdout)
    assert report["removed_blobs"] == [] and report["kept_young"] == len(garbage(store)) + 1
    assert files_under(store.data_dir) == before
    # A recent link (a cross-repository mount) keeps an old blob too.
    age(os.path.join(store.data_dir, "blobs"), 2 * HOUR)
    os.utime(link_file(store.data_dir, "team/app", store.orphan))
    report = json.loads(gc(store.data_dir, "--json", "--delay", "1h").stdout)
    # Only the deleted manifest's own content: no link names it, and it is old.
    assert {b["digest"] for b in report["removed_blobs"]} == {store.gone.digest}
    assert os.path.exists(blob_file(store.data_dir, store.orphan))


def test_errors(tmp_path: Any) -> None:
    missing = str(tmp_path / "nothing")
    result = gc(missing)
    assert result.returncode == 3
    assert result.stderr == f"registryd gc: the data directory {missing} does not exist\n"
    os.mkdir(tmp_path / "empty")
    result = gc(str(tmp_path / "empty"))
    assert result.returncode == 3 and result.stderr.startswith("registryd gc: ") and "not a registryd" in result.stderr
    for bad in (["--delay", "soon"], ["--delay", "-5"], ["--frobnicate"]):
        result = run_main("gc", "--data-dir", str(tmp_path), *bad)
        assert result.returncode == 2, bad
        assert "usage: registryd" in result.stderr


# --- the S3 driver: one pass of the S3 collector on the bucket ----------------------------

#: The keys of ``registryd gc --json`` on the data directory; S3 adds "restored".
REPORT_KEYS = {"data_dir", "dry_run", "delay", "removed_blobs", "removed_links", "removed_directories",
               "bytes_reclaimed", "kept_referenced", "kept_young", "repositories", "manifests"}


def key(digest: str) -> str:
    return blob_key(parse_digest(digest))


@pytest_twisted.ensureDeferred
async def test_s3_gc_collects_the_bucket_and_every_image_still_pulls(make_registry: Any, ceph_s3: Any,
                                                                      tmp_path: Any) -> None:
    bucket = await ceph_s3.new_bucket()
    try:
        node = make_registry(storage=StorageSettings("s3", s3=bucket.settings))
        client = Client(node.url)
        images = [await client.push_image("team/app", "v1", seed="1"), await client.push_image("team/app", "v2", seed="2")]
        children = [await client.push_image("team/multi", seed=f"arch{i}") for i in range(2)]
        images += [*children, await client.push_index("team/multi", children, "1.0")]
        gone = await client.push_image("team/gone", "old", seed="gone")
        assert (await client.delete(f"/v2/team/gone/manifests/{gone.digest}")).status == 202
        orphan = await client.push_blob("team/app", b"pushed, but no manifest came" * 30)
        await client.start_upload("team/app")     # a session in progress: uploads/ is never touched
        referenced = {d for image in images for d in (image.digest, *map(digest_of, image.blobs))}
        garbage = {orphan, gone.digest, *map(digest_of, gone.blobs)}
        await sleep(2.1)    # LastModified is to the second: all of it is older than --delay 0's cutoff
        config = write_s3_config(tmp_path, bucket.settings)
        before = await bucket_objects(bucket)
        assert {key(d) for d in referenced | garbage} <= set(before)
        uploads = {k: v for k, v in before.items() if k.startswith("uploads/")}
        assert uploads

        # The default delay: everything is younger than an hour, nothing goes.
        young = run("gc", "-c", config, "--json")
        assert young.returncode == 0, young.stderr
        assert young.stderr == ""
        report = json.loads(young.stdout)
        assert set(report) == REPORT_KEYS | {"restored"} and report["data_dir"] == f"s3://{bucket.settings.bucket}/"
        assert report["removed_blobs"] == [] and report["kept_young"] == len(garbage)
        assert report["kept_referenced"] == len(referenced) and report["delay"] == 3600
        assert report["repositories"] == 3 and report["manifests"] == len(images)
        dry = run("gc", "-c", config, "--delay", "0", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        lines = dry.stdout.splitlines()
        assert {line.split()[3] for line in lines if line.startswith("would remove blob ")} == garbage
        assert lines[-1].startswith("4 blobs would be removed, ") and "would be reclaimed" in lines[-1]
        assert await bucket_objects(bucket) == before

        result = run("gc", "-c", config, "--delay", "0")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert {line.split()[2] for line in lines if line.startswith("removed blob ")} == garbage
        size = before[key(orphan)][0]
        assert f"removed blob {orphan} ({human_size(size)}, {size} bytes)" in lines
        links = {line for line in lines if line.startswith("removed link ")}
        assert links == {f"removed link {repo} -> {digest} (its blob is gone)"
                         for repo, digest in [("team/app", orphan), *(("team/gone", digest_of(b)) for b in gone.blobs)]}
        reclaimed = sum(before[key(d)][0] for d in garbage)
        assert lines[-1].startswith("4 blobs removed, ") and f"({reclaimed} bytes) reclaimed; 3 links removed" in lines[-1]
        after = await bucket_objects(bucket)
        link_keys = {f"repositories/team/app/_blobs/{orphan.replace(':', '/')}",
                     *(f"repositories/team/gone/_blobs/{digest_of(b).replace(':', '/')}" for b in gone.blobs)}
        assert set(before) - set(after) == {key(d) for d in garbage} | link_keys
        assert {k: v for k, v in after.items() if k in before} == {k: v for k, v in before.items() if k in after}
        assert not any(k.startswith("trash/") for k in after)
        assert {k: v for k, v in after.items() if k.startswith("uploads/")} == uploads
        again = json.loads(run("gc", "-c", config, "--delay", "0", "--json").stdout)
        assert again["removed_blobs"] == [] and again["removed_links"] == []

        # The node on the bucket serves every image completely; the collected blobs are gone.
        for image in images:
            reply = await client.get(f"/v2/{image.reply.url.split('/v2/')[1]}", headers={"Accept": image.media_type})
            assert reply.status == 200 and digest_of(reply.body) == image.digest, image.digest
            for blob in image.blobs:
                reply = await client.get(f"/v2/team/{'app' if image in images[:2] else 'multi'}/blobs/{digest_of(blob)}")
                assert reply.status == 200 and reply.body == blob
        assert (await client.get(f"/v2/team/gone/blobs/{digest_of(gone.blobs[0])}")).status == 404
    finally:
        await bucket.close()


class _Shutdown:
    """The part of a reactor collect_in_command uses: before-shutdown triggers, fired by the test."""

    def __init__(self) -> None:
        self.triggers: list[Any] = []
        self.waits: list[Deferred[None]] = []

    def addSystemEventTrigger(self, phase: str, event: str, fn: Any) -> Any:
        assert (phase, event) == ("before", "shutdown")
        self.triggers.append(fn)
        return fn

    def removeSystemEventTrigger(self, handle: Any) -> None:
        self.triggers.remove(handle)

    def fire(self) -> None:
        self.waits = [fn() for fn in self.triggers]


@pytest_twisted.ensureDeferred
async def test_s3_interrupted_gc_puts_back_what_it_moved(make_registry: Any, ceph_s3: Any) -> None:
    """An interrupt (SIGINT) once the blobs are in trash/: the run puts them back, and shutdown waits for it."""
    bucket = await ceph_s3.new_bucket()
    try:
        node = make_registry(storage=StorageSettings("s3", s3=bucket.settings))
        client = Client(node.url)
        image = await client.push_image("team/app", "v1", seed="1")
        garbage = {await client.push_blob("team/app", f"garbage {i}".encode() * 40) for i in range(3)}
        await sleep(2.1)
        before = await bucket_objects(bucket)
        shutdown = _Shutdown()
        in_trash: set[str] = set()

        class Interrupted(Collector):
            async def _remark(self) -> None:
                in_trash.update(str(digest) for digest in await list_trash(S3Driver(bucket)))
                # Once this run awaits the store again: cancellation reaches a request in flight.
                reactor.callLater(0, shutdown.fire)
                await super()._remark()

        assert await collect_in_command(Interrupted(S3Driver(bucket), 0, False), shutdown) is None
        assert in_trash == garbage, "the interrupt came while the garbage was in trash/"
        assert len(shutdown.waits) == 1 and shutdown.waits[0].called
        assert await bucket_objects(bucket) == before, "every moved blob is back, and trash/ is empty"

        # Uninterrupted, the same run collects, and leaves no trigger behind.
        shutdown = _Shutdown()
        report = await collect_in_command(Collector(S3Driver(bucket), 0, False), shutdown)
        assert report is not None and {b["digest"] for b in report["removed_blobs"]} == garbage
        assert shutdown.triggers == []
        left = await bucket_objects(bucket)
        assert {key(d) for d in (image.digest, *map(digest_of, image.blobs))} <= set(left)
        assert not any(key(d) in left for d in garbage)
    finally:
        await bucket.close()
