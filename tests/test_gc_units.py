"""The garbage collector (registryd.upkeep.collector) over the in-memory driver, on a fake clock,
and once on a data directory: the races the trash + re-mark protocol closes, crash leftovers,
young blobs. Milliseconds each: "old" is a clock moved forward, not a sleep."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import pytest
import pytest_twisted

from registryd.digest import Digest, digest_of
from registryd.storage.driver import Driver
from registryd.storage.fs.driver import FsDriver
from registryd.storage.guard import BlobGuard
from registryd.storage.memory import MemoryDriver
from registryd.storage.layout import blob_key, trash_key
from registryd.threads import InlinePool
from registryd.upkeep.collector import LEFTOVER_AGE, Collector

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryDriver:
    return MemoryDriver(clock=clock)


async def put_blob(driver: Driver, data: bytes) -> Digest:
    digest = digest_of(data)
    await driver.write(blob_key(digest), data)
    return digest


def manifest_doc(config: Digest, layers: list[Digest]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(config),
                                  "size": 2},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": str(d),
                                   "size": 2} for d in layers]}).encode()


async def add_revision(driver: Driver, name: str, manifest: Digest) -> None:
    key = f"repositories/{name}/_manifests/revisions/{manifest.algorithm}/{manifest.hex}"
    await driver.write(key, json.dumps({"mediaType": MANIFEST}).encode())


async def link(driver: Driver, name: str, digest: Digest) -> None:
    await driver.write(f"repositories/{name}/_blobs/{digest.algorithm}/{digest.hex}", b"")


async def exists(driver: Driver, digest: Digest) -> bool:
    return await driver.stat(blob_key(digest)) is not None


async def keys(driver: Driver, prefix: str) -> list[str]:
    return [entry.key async for entry in driver.list(prefix)]


def collector(driver: Driver, clock: Clock, delay: float = HOUR, guard: BlobGuard | None = None,
              dry_run: bool = False) -> Collector:
    return Collector(driver, delay, dry_run, guard=guard or BlobGuard(clock=clock), clock=clock)


async def old_image(store: MemoryDriver, clock: Clock) -> tuple[Digest, Digest, Digest, bytes]:
    """A config, a layer and their manifest document, stored two hours ago, named by nothing yet."""
    layer = await put_blob(store, b"an old layer")
    config = await put_blob(store, b"{}")
    doc = manifest_doc(config, [layer])
    manifest = await put_blob(store, doc)
    clock.now += 2 * HOUR
    return layer, config, manifest, doc


@pytest_twisted.ensureDeferred
async def test_young_blobs_stay_and_old_unreferenced_ones_go(store: MemoryDriver, clock: Clock) -> None:
    kept_layer, config = await put_blob(store, b"kept layer"), await put_blob(store, b"config")
    manifest = await put_blob(store, manifest_doc(config, [kept_layer]))
    await add_revision(store, "lib/app", manifest)
    orphan = await put_blob(store, b"old orphan")
    clock.now += 2 * HOUR
    young = await put_blob(store, b"pushed a minute ago")
    clock.now += 60

    run = collector(store, clock)
    result = await run.collect()
    assert [b["digest"] for b in result.blobs] == [str(orphan)]
    assert await exists(store, young) and not await exists(store, orphan)
    assert all([await exists(store, d) for d in (kept_layer, config, manifest)])
    report = run.report()
    assert report["kept_young"] == 1 and report["kept_referenced"] == 3 and report["restored"] == 0
    assert report["data_dir"] == "memory" and report["manifests"] == 1 and report["repositories"] == 1
    assert await keys(store, "trash/") == []


@pytest.mark.parametrize("when", ["before the move", "after the move, before the second mark"])
@pytest_twisted.ensureDeferred
async def test_a_manifest_written_during_the_run_keeps_its_blobs(store: MemoryDriver, clock: Clock,
                                                                 monkeypatch: Any, when: str) -> None:
    """The race the re-mark closes: the first mark saw nothing naming these blobs; a manifest
    committed before the second mark (from another process: no claim here) brings them back."""
    layer, config, manifest, _ = await old_image(store, clock)
    run = collector(store, clock)
    pushed: list[bool] = []

    async def push() -> None:
        if not pushed:
            pushed.append(True)
            await add_revision(store, "lib/app", manifest)

    if when == "before the move":
        real_move = store.move

        async def move(src: str, dst: str, **kw: Any) -> bool:
            if src.startswith("blobs/"):
                await push()
            return await real_move(src, dst, **kw)

        monkeypatch.setattr(store, "move", move)
    else:
        remark = run._remark

        async def push_then_remark() -> None:
            assert not await exists(store, layer), "the layer is in the trash now"
            await push()
            await remark()

        monkeypatch.setattr(run, "_remark", push_then_remark)
    await run.collect()

    assert pushed and all([await exists(store, d) for d in (layer, config, manifest)])
    report = run.report()
    assert report["removed_blobs"] == [] and report["restored"] == 3 and report["kept_referenced"] == 3
    assert await keys(store, "trash/") == []


@pytest.mark.parametrize("when", ["before the move", "during the move", "before the second mark"])
@pytest_twisted.ensureDeferred
async def test_a_claim_in_this_process_keeps_the_blob(store: MemoryDriver, clock: Clock, monkeypatch: Any,
                                                       when: str) -> None:
    """An upload, a mount or a manifest in this process claims the digest: at any moment of the
    run, the blob stays (without a lock held across the move)."""
    blob = await put_blob(store, b"mounted meanwhile")
    clock.now += 2 * HOUR
    guard = BlobGuard(clock=clock)
    run = collector(store, clock, guard=guard)
    if when == "before the move":
        real_delete = Collector._delete

        def claimed_first(self: Collector, digest: Digest, key: str) -> bool:
            guard.claim([digest])
            return real_delete(self, digest, key)

        monkeypatch.setattr(Collector, "_delete", claimed_first)
    elif when == "during the move":
        real_move = store.move

        async def move(src: str, dst: str, expect: Any = None, unless: Callable[[], bool] | None = None,
                       **kw: Any) -> bool:
            def claimed_then_asked() -> bool:
                guard.claim([blob])
                return unless is not None and unless()
            return await real_move(src, dst, expect=expect, unless=claimed_then_asked if src.startswith("blobs/")
                                   else unless, **kw)

        monkeypatch.setattr(store, "move", move)
    else:
        remark = run._remark

        async def claim_then_remark() -> None:
            guard.claim([blob])
            await remark()

        monkeypatch.setattr(run, "_remark", claim_then_remark)
    await run.collect()
    assert await exists(store, blob)
    report = run.report()
    assert report["removed_blobs"] == [] and report["kept_young"] == 1
    assert report["restored"] == (1 if when == "before the second mark" else 0)


@pytest_twisted.ensureDeferred
async def test_a_blob_written_again_since_the_listing_stays(store: MemoryDriver, clock: Clock,
                                                            monkeypatch: Any) -> None:
    blob = await put_blob(store, b"uploaded again")
    clock.now += 2 * HOUR
    real_move = store.move

    async def move(src: str, dst: str, **kw: Any) -> bool:
        if src == blob_key(blob):
            await store.write(src, b"uploaded again")  # an upload committed it anew
        return await real_move(src, dst, **kw)

    monkeypatch.setattr(store, "move", move)
    run = collector(store, clock)
    await run.collect()
    assert await exists(store, blob)
    assert run.report()["kept_young"] == 1 and run.report()["removed_blobs"] == []
    assert await keys(store, "trash/") == []


@pytest_twisted.ensureDeferred
async def test_leftovers_of_a_crashed_run_are_put_back_or_purged(store: MemoryDriver, clock: Clock) -> None:
    layer_data, config_data = b"layer in the trash", b"config in the trash"
    layer, config = digest_of(layer_data), digest_of(config_data)
    doc = manifest_doc(config, [layer])
    manifest = digest_of(doc)
    garbage = digest_of(b"garbage in the trash")
    for digest, data in ((layer, layer_data), (config, config_data), (manifest, doc),
                         (garbage, b"garbage in the trash")):
        await store.write(trash_key("crashed", digest), data)
    await add_revision(store, "lib/app", manifest)   # committed while the crashed run held them aside

    # Within the leftover age they may be another run's, in progress: left alone.
    clock.now += LEFTOVER_AGE - 1
    early = collector(store, clock, delay=0)
    await early.collect()
    assert len(await keys(store, "trash/")) == 4 and early.report()["restored"] == 0

    clock.now += 2
    run = collector(store, clock)
    await run.collect()
    assert await keys(store, "trash/") == []
    assert all([await exists(store, d) for d in (layer, config, manifest)])
    assert not await exists(store, garbage)
    report = run.report()
    assert report["restored"] == 3
    assert report["removed_blobs"] == [{"digest": str(garbage), "size": len(b"garbage in the trash"),
                                        "path": trash_key("crashed", garbage)}]


@pytest_twisted.ensureDeferred
async def test_a_failed_run_puts_back_what_it_moved(store: MemoryDriver, clock: Clock, monkeypatch: Any) -> None:
    blobs = [await put_blob(store, f"orphan {n}".encode()) for n in range(3)]
    clock.now += 2 * HOUR
    run = collector(store, clock)

    async def store_fails() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(run, "_remark", store_fails)
    with pytest.raises(OSError):
        await run.collect()
    assert [await exists(store, d) for d in blobs] == [True, True, True]
    assert await keys(store, "trash/") == []


@pytest_twisted.ensureDeferred
async def test_links_to_gone_blobs_go_once_old(store: MemoryDriver, clock: Clock) -> None:
    present = await put_blob(store, b"present")
    await store.write("repositories/lib/app/_manifests/tags/v1", str(present).encode())
    gone = digest_of(b"gone long ago")
    for digest in (present, gone):
        await link(store, "lib/app", digest)
    await store.write(f"mirror/docker.io/library/alpine/_blobs/sha256/{gone.hex}", b"")
    clock.now += 2 * HOUR
    on_its_way = digest_of(b"on its way")
    await link(store, "lib/app", on_its_way)   # young: its blob may be on its way
    run = collector(store, clock)
    await run.collect()
    assert sorted((x["repository"], x["digest"]) for x in run.report()["removed_links"]) == sorted(
        [("lib/app", str(gone)), ("docker.io/library/alpine", str(gone))])
    assert await keys(store, "repositories/lib/app/_blobs/") == sorted(
        f"repositories/lib/app/_blobs/sha256/{d.hex}" for d in (present, on_its_way))


def test_on_a_data_directory_trash_is_a_rename_and_leftovers_come_back(tmp_path: Any) -> None:
    """The same protocol on disk: a crashed run's trash (a referenced manifest's layer, and
    garbage) is put back or purged, and no empty folder of it stays behind."""
    root = tmp_path / "data"
    layer_data = b"layer a crashed run moved aside"
    layer = digest_of(layer_data)
    doc = manifest_doc(layer, [layer])
    manifest = digest_of(doc)
    garbage = digest_of(b"garbage a crashed run moved aside")
    files = {trash_key("crashed", layer): layer_data, trash_key("crashed", garbage): b"garbage a crashed run moved aside",
             blob_key(manifest): doc,
             f"repositories/lib/app/_manifests/revisions/sha256/{manifest.hex}": json.dumps(
                 {"mediaType": MANIFEST}).encode(),
             f"repositories/lib/app/_blobs/sha256/{layer.hex}": b""}
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (1, 1))
    result = Collector(FsDriver(str(root), InlinePool()), delay=HOUR, dry_run=False).run()
    assert result.restored == 1 and [b["digest"] for b in result.blobs] == [str(garbage)]
    assert (root / blob_key(layer)).read_bytes() == layer_data
    assert [path for path in (root / "trash").rglob("*") if path.is_file()] == []
    # The folders the purge emptied go at the start of the next run.
    again = Collector(FsDriver(str(root), InlinePool()), delay=0, dry_run=False).run()
    assert again.blobs == [] and again.directories > 0 and os.listdir(root / "trash") == []


def test_a_write_whose_folder_a_collection_pruned_meanwhile_still_lands(tmp_path: Any, monkeypatch: Any) -> None:
    """A collection prunes a blob folder it emptied while a writer had just made it: the
    writer's rename finds no folder, makes it again and lands (it used to fail with ENOENT)."""
    from registryd.storage import files

    target = tmp_path / "blobs" / "sha256" / "ab" / "abcd"
    (tmp_path / "tmp").mkdir()
    real_rename = os.rename
    pruned: list[str] = []

    def rename(src: str, dst: str) -> None:
        if not pruned:
            pruned.append(dst)
            os.rmdir(os.path.dirname(dst))   # the collector's prune, between make_dirs and rename
        real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    files.write_atomic(str(tmp_path / "tmp"), str(target), b"manifest")
    assert pruned and target.read_bytes() == b"manifest"
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("durable", [True, False])
def test_a_write_whose_parent_folder_a_collection_pruned_between_two_mkdirs_still_lands(
        tmp_path: Any, monkeypatch: Any, durable: bool) -> None:
    """A manifest PUT made _manifests/revisions/sha256 while the online GC pruned the emptied
    revisions folder above it: the mkdir found no parent (a 500 in a fresh-clone run). The
    writer walks up again and lands."""
    from registryd.storage import files

    revisions = tmp_path / "repositories" / "app" / "_manifests" / "revisions"
    revisions.mkdir(parents=True)
    target = revisions / "sha256" / "abcd" / "link"
    (tmp_path / "tmp").mkdir()
    real_mkdir = os.mkdir
    pruned: list[str] = []

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if not pruned and str(path) == str(revisions / "sha256"):
            pruned.append(str(path))
            os.rmdir(revisions)   # the collector's prune, after the writer saw revisions/ there
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "mkdir", mkdir)
    files.write_atomic(str(tmp_path / "tmp"), str(target), b"sha256:abcd", durable=durable)
    assert pruned and target.read_bytes() == b"sha256:abcd"
    assert os.listdir(tmp_path / "tmp") == []
