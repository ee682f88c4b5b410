"""One contract, every storage driver: the data directory, a bucket on the Ceph of tests/ceph.py, memory.

The shared contract is registryd.storage.driver's docstring; each test
below runs once per driver with the same assertions.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater

from registryd.storage.driver import Appendable, BodySpool, Driver, Entry, TooLarge, finish
from registryd.storage.fs.driver import FsDriver
from registryd.storage.memory import MemoryDriver
from registryd.storage.s3.driver import S3Driver
from registryd.threads import BlockingPool, InlinePool
from s3_helpers import PausingSink

MiB = 1024 * 1024
DRIVERS = ["filesystem", "memory", pytest.param("s3", marks=pytest.mark.s3)]


@pytest_twisted.async_yield_fixture(params=DRIVERS)
async def driver(request: Any, tmp_path: Any) -> AsyncIterator[Driver]:
    if request.param == "filesystem":
        pool = BlockingPool(reactor, 2, name="contract")
        pool.start()
        yield FsDriver(str(tmp_path / "data"), pool)
        pool.stop()
    elif request.param == "memory":
        yield MemoryDriver()
    else:
        # The smallest parts S3 takes: a few MiB of appended bodies make parts and a tail.
        client = await request.getfixturevalue("ceph_s3").new_bucket(prefix="site/", part_size=5 * MiB)
        yield S3Driver(client)
        await client.close()


class StoppingSink(PausingSink):
    """A client that goes away after the first bytes: it stops the producer at its first write."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.received == len(data):
            self.producer.stopProducing()


async def keys(driver: Driver, prefix: str = "", delimiter: str | None = None) -> list[str]:
    return [entry.key async for entry in driver.list(prefix, delimiter)]


async def written_again_later(driver: Driver, key: str, data: bytes) -> None:
    """A second write that the driver can tell from the first (a bucket's times are whole seconds)."""
    if driver.name == "s3":
        await deferLater(reactor, 1.1, lambda: None)
    await driver.write(key, data)


@pytest_twisted.ensureDeferred
async def test_write_read_stat(driver: Driver) -> None:
    before = time.time()
    assert await driver.write("blobs/sha256/ab/abc", b"hello") is True
    assert await driver.read("blobs/sha256/ab/abc", 100) == b"hello"
    entry = await driver.stat("blobs/sha256/ab/abc")
    assert entry is not None and entry.key == "blobs/sha256/ab/abc" and entry.size == 5 and not entry.is_prefix
    assert entry.modified is not None and before - 2 <= entry.modified <= time.time() + 2
    assert entry.version
    # Missing keys are no error; a folder is no key.
    assert await driver.stat("blobs/sha256/ab/nothing") is None
    assert await driver.read("blobs/sha256/ab/nothing", 100) is None
    assert await driver.stat("blobs/sha256/ab") is None
    assert await driver.read("blobs/sha256", 100) is None
    # A second write replaces the value and its version.
    await driver.write("blobs/sha256/ab/abc", b"hello again")
    again = await driver.stat("blobs/sha256/ab/abc")
    assert again is not None and again.size == 11 and await driver.read("blobs/sha256/ab/abc", 100) == b"hello again"
    await written_again_later(driver, "blobs/sha256/ab/abc", b"hello once more")
    third = await driver.stat("blobs/sha256/ab/abc")
    assert third is not None and (third.version, third.modified) != (entry.version, entry.modified)


@pytest_twisted.ensureDeferred
async def test_read_limit(driver: Driver) -> None:
    await driver.write("tags/v1", b"x" * 10)
    assert await driver.read("tags/v1", 10) == b"x" * 10
    with pytest.raises(TooLarge):
        await driver.read("tags/v1", 9)


@pytest_twisted.ensureDeferred
async def test_stream_feeds_the_whole_value_in_order(driver: Driver) -> None:
    value = os.urandom(3 * 1024 * 1024 + 17)     # past one chunk on every driver
    await driver.write("blobs/sha256/cd/cde", value)
    chunks: list[bytes] = []
    entry = await driver.stream("blobs/sha256/cd/cde", chunks.append)
    assert b"".join(chunks) == value and len(chunks) > 1
    listed = await driver.stat("blobs/sha256/cd/cde")
    assert entry is not None and listed is not None
    assert (entry.key, entry.size, entry.version, entry.modified) == (listed.key, len(value), listed.version,
                                                                      listed.modified)
    assert await driver.stream("blobs/sha256/cd/nothing", chunks.append) is None
    assert await driver.stream("blobs/sha256", chunks.append) is None      # a folder is no key


@pytest_twisted.ensureDeferred
async def test_send_streams_a_range_at_the_consumers_pace(driver: Driver) -> None:
    value = os.urandom(3 * 1024 * 1024 + 17)     # past one chunk on every driver
    await driver.write("blobs/sha256/cd/cde", value)
    whole = PausingSink(pause_every=256 * 1024)
    assert await driver.send("blobs/sha256/cd/cde", whole, 0, len(value)) is True
    assert whole.data == value and whole.pauses >= 3
    assert whole.registrations == 1 and whole.producer is None      # registered, then let go
    # Once paused, no more than what one socket read had pulled in arrives.
    assert whole.while_paused <= 256 * 1024
    for start, end in [(0, 1), (10, 20), (1024 * 1024, 2 * 1024 * 1024 + 5), (len(value) - 3, len(value))]:
        part = PausingSink()
        assert await driver.send("blobs/sha256/cd/cde", part, start, end) is True
        assert part.data == value[start:end], (start, end)
    missing = PausingSink()
    assert await driver.send("blobs/sha256/cd/nothing", missing, 0, 10) is False
    assert missing.data == b"" and missing.registrations == 0


@pytest_twisted.ensureDeferred
async def test_send_ends_when_the_consumer_stops_it(driver: Driver) -> None:
    """A client that goes away stops the producer: the send ends with CancelledError, the rest unsent."""
    value = os.urandom(3 * 1024 * 1024 + 17)
    await driver.write("blobs/sha256/cd/cde", value)
    stopping = StoppingSink()
    with pytest.raises(CancelledError):
        await driver.send("blobs/sha256/cd/cde", stopping, 0, len(value))
    assert 0 < stopping.received < len(value) and stopping.producer is None


@pytest_twisted.ensureDeferred
async def test_put_file_consumes_a_local_file(driver: Driver, tmp_path: Any) -> None:
    key = "blobs/sha256/ef/efg"
    path = tmp_path / "verified"         # beside the data directory: one filesystem
    value = os.urandom(100_000)
    path.write_bytes(value)
    await driver.put_file(key, str(path))
    assert not path.exists()
    assert await driver.read(key, len(value)) == value
    # The same content again (another node's fill, a second push): one value, the file consumed.
    path.write_bytes(value)
    await driver.put_file(key, str(path))
    assert not path.exists()
    assert await driver.read(key, len(value)) == value and await keys(driver, "blobs/") == [key]


@pytest_twisted.ensureDeferred
async def test_write_if_absent(driver: Driver) -> None:
    assert await driver.write("uploads/u1/state", b"first", if_absent=True) is True
    assert await driver.write("uploads/u1/state", b"second", if_absent=True) is False
    assert await driver.read("uploads/u1/state", 100) == b"first"
    assert await driver.write("uploads/u1/state", b"third") is True
    assert await driver.read("uploads/u1/state", 100) == b"third"


@pytest_twisted.ensureDeferred
async def test_a_write_that_need_not_be_durable_is_still_a_whole_value(driver: Driver) -> None:
    """``durable=False`` (a mirror's links) spares the fsyncs, not the atomicity nor ``if_absent``."""
    key = "mirror/docker.io/lib/app/_blobs/sha256/ab"
    assert await driver.write(key, b"", if_absent=True, durable=False) is True
    assert await driver.write(key, b"again", if_absent=True, durable=False) is False
    entry = await driver.stat(key)
    assert entry is not None and entry.size == 0 and await driver.read(key, 10) == b""
    assert await driver.write(key, b"new", durable=False) is True
    assert await driver.read(key, 10) == b"new"


@pytest_twisted.ensureDeferred
async def test_touch_dates_an_empty_marker(driver: Driver) -> None:
    """A pull time: the writer's ``when`` where the store keeps it, else the store's own now."""
    key = "repositories/app/_pulls/sha256/ab"
    before = time.time()
    await driver.touch(key, 2000.0)
    entry = await driver.stat(key)
    assert entry is not None and entry.size == 0 and entry.modified is not None
    if driver.name == "s3":
        assert before - 2 <= entry.modified <= time.time() + 2
    else:
        assert entry.modified == 2000.0
    await driver.touch(key, 3000.0)
    again = await driver.stat(key)
    assert again is not None and again.size == 0 and (driver.name == "s3" or again.modified == 3000.0)
    assert [entry.key async for entry in driver.list("repositories/")] == [key]


@pytest_twisted.ensureDeferred
async def test_listing_is_in_key_order_with_sizes(driver: Driver) -> None:
    # "a-b" sorts before "a/...": '-' is below '/' (a directory walk must not put "a/" first).
    written = ["r/a/z", "r/a-b", "r/a/b/c", "r/b", "r/ab", "r/a/b-c", "s/x"]
    for n, key in enumerate(written):
        await driver.write(key, b"v" * n)
    listed = [entry async for entry in driver.list("r/")]
    assert [e.key for e in listed] == sorted(k for k in written if k.startswith("r/"))
    assert {e.key: e.size for e in listed} == {k: n for n, k in enumerate(written) if k.startswith("r/")}
    assert all(e.modified is not None and not e.is_prefix for e in listed)
    # A prefix is a string prefix, not a folder.
    assert await keys(driver, "r/a") == ["r/a-b", "r/a/b-c", "r/a/b/c", "r/a/z", "r/ab"]
    assert await keys(driver, "r/a/b") == ["r/a/b-c", "r/a/b/c"]
    assert await keys(driver, "nothing/") == []
    assert await keys(driver, "") == sorted(written)


@pytest_twisted.ensureDeferred
async def test_listing_with_a_delimiter_rolls_up_common_prefixes(driver: Driver) -> None:
    for key in ("m/docker.io/lib/x", "m/docker.io/y", "m/ghcr.io/z", "m/file", "m/docker-hub/q"):
        await driver.write(key, b"1")
    listed = [entry async for entry in driver.list("m/", "/")]
    assert [(e.key, e.is_prefix) for e in listed] == [
        ("m/docker-hub/", True), ("m/docker.io/", True), ("m/file", False), ("m/ghcr.io/", True)]
    assert await keys(driver, "m/docker.io/", "/") == ["m/docker.io/lib/", "m/docker.io/y"]
    assert await keys(driver, "m/d", "/") == ["m/docker-hub/", "m/docker.io/"]


@pytest_twisted.ensureDeferred
async def test_copy(driver: Driver) -> None:
    await driver.write("blobs/a", b"content")
    assert await driver.copy("blobs/a", "trash/run/a") is True
    assert await driver.read("blobs/a", 100) == b"content"
    assert await driver.read("trash/run/a", 100) == b"content"
    assert await driver.copy("blobs/missing", "trash/run/missing") is False
    assert await driver.stat("trash/run/missing") is None


@pytest_twisted.ensureDeferred
async def test_move(driver: Driver) -> None:
    await driver.write("blobs/sha256/ab/abc", b"content")
    await driver.write("trash/old", b"replaced")
    assert await driver.move("blobs/sha256/ab/abc", "trash/old") is True
    assert await driver.stat("blobs/sha256/ab/abc") is None
    assert await driver.read("trash/old", 100) == b"content"
    assert await driver.move("blobs/sha256/ab/abc", "trash/again") is False
    assert await driver.stat("trash/again") is None
    # Emptied folders go with the value (a data directory would list them as prefixes), below the top two.
    assert await keys(driver, "blobs/sha256/", "/") == []
    await driver.tidy("blobs/")
    assert await keys(driver, "blobs/", "/") == []


@pytest_twisted.ensureDeferred
async def test_move_of_an_expected_value(driver: Driver) -> None:
    await driver.write("blobs/x", b"old value")
    listed = await driver.stat("blobs/x")
    assert listed is not None
    assert await driver.move("blobs/x", "trash/r/x", expect=listed) is True
    assert await driver.move("trash/r/x", "blobs/x") is True
    # Written again since it was listed: not moved, left in place.
    stale = await driver.stat("blobs/x")
    assert stale is not None
    await written_again_later(driver, "blobs/x", b"old value")
    assert await driver.move("blobs/x", "trash/r/x", expect=stale) is False
    assert await driver.read("blobs/x", 100) == b"old value"
    assert await driver.stat("trash/r/x") is None
    assert await driver.move("blobs/gone", "trash/r/gone", expect=Entry("blobs/gone", 1, 0.0, "v")) is False


@pytest_twisted.ensureDeferred
async def test_move_unless_puts_the_value_back(driver: Driver) -> None:
    await driver.write("blobs/y", b"claimed meanwhile")
    asked: list[bool] = []

    async def where() -> tuple[bool, bool]:
        return await driver.stat("blobs/y") is not None, await driver.stat("trash/r/y") is not None

    def unless() -> bool:
        asked.append(True)
        return True

    assert await driver.move("blobs/y", "trash/r/y", expect=await driver.stat("blobs/y"), unless=unless) is False
    assert asked == [True] and await where() == (True, False)
    assert await driver.read("blobs/y", 100) == b"claimed meanwhile"
    assert await driver.move("blobs/y", "trash/r/y", unless=lambda: False) is True
    assert await where() == (False, True)


@pytest_twisted.ensureDeferred
async def test_delete(driver: Driver) -> None:
    for key in ("repositories/a/_blobs/sha256/1", "repositories/a/_blobs/sha256/2", "blobs/sha256/cd/3"):
        await driver.write(key, b"x")
    assert await driver.delete("blobs/sha256/cd/3") is True
    assert await driver.delete("blobs/sha256/cd/3") is False
    assert await keys(driver, "blobs/sha256/", "/") == []
    assert await driver.delete_many(["repositories/a/_blobs/sha256/1", "repositories/a/_blobs/sha256/2",
                                     "repositories/a/_blobs/sha256/missing"]) == []
    assert await keys(driver, "repositories/") == []
    assert await keys(driver, "repositories/a/_blobs/", "/") == []
    assert await driver.delete_many([]) == []


@pytest_twisted.ensureDeferred
async def test_a_quick_delete_leaves_folders_for_tidy(driver: Driver) -> None:
    await driver.write("trash/run1/sha256/ab/1", b"x")
    await driver.write("trash/run2/sha256/cd/2", b"x")
    assert await driver.delete_many(["trash/run1/sha256/ab/1"], durable=False) == []
    assert await keys(driver, "trash/") == ["trash/run2/sha256/cd/2"]
    if driver.name == "filesystem":
        assert await keys(driver, "trash/", "/") == ["trash/run1/", "trash/run2/"]
    tidied = await driver.tidy("trash/")
    assert await keys(driver, "trash/", "/") == ["trash/run2/"]
    assert tidied == (3 if driver.name == "filesystem" else 0)
    assert await driver.tidy("nothing/") == 0


@pytest_twisted.ensureDeferred
async def test_keys_that_could_leave_the_store_are_refused(driver: Driver) -> None:
    for bad in ("../escape", "/absolute", "a//b", "a/./b", "trailing/", ""):
        with pytest.raises(ValueError):
            await driver.write(bad, b"x")
        await driver.write("ok", b"x")
        with pytest.raises(ValueError):
            await driver.copy("ok", bad)


@pytest_twisted.ensureDeferred
async def test_optional_capabilities(driver: Driver) -> None:
    await driver.write("blobs/a", b"on disk?")
    path = driver.local_path("blobs/a")
    url = driver.presign("blobs/a", 60)
    if driver.name == "filesystem":
        assert path is not None and open(path, "rb").read() == b"on disk?" and url is None
    elif driver.name == "s3":
        assert path is None and url is not None and "X-Amz-Signature=" in url
    else:
        assert path is None and url is None
    threaded = driver.threaded()
    if driver.name == "filesystem":
        assert threaded is not None
        twin, pool = threaded

        def blocking() -> bytes | None:
            assert finish(twin.write("blobs/b", b"from a worker thread"))
            return finish(twin.read("blobs/b", 100))

        assert await pool.run(blocking) == b"from a worker thread"
        assert await driver.read("blobs/b", 100) == b"from a worker thread"
    else:
        assert threaded is None


def test_the_filesystem_driver_writes_through_tmp_and_leaves_nothing_there(tmp_path: Any) -> None:
    from registryd.threads import InlinePool

    fs = FsDriver(str(tmp_path), InlinePool())
    assert finish(fs.write("blobs/a", b"1")) and finish(fs.copy("blobs/a", "blobs/b"))
    assert not finish(fs.write("blobs/a", b"2", if_absent=True))
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(os.listdir(tmp_path / "blobs")) == ["a", "b"]


def test_the_filesystem_driver_skips_fsync_only_when_told(tmp_path: Any, monkeypatch: Any) -> None:
    """A durable write fsyncs the file and its folder; ``durable=False`` neither (a mirror link per layer)."""
    from registryd.storage import files  # where the driver's placing and syncing live
    from registryd.threads import InlinePool

    synced: list[str] = []
    monkeypatch.setattr(files, "fsync_dir", lambda path: synced.append(path))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("file"), real_fsync(fd))[1])
    fs = FsDriver(str(tmp_path), InlinePool())
    assert finish(fs.write("repositories/app/_blobs/sha256/ab", b""))
    assert "file" in synced and str(tmp_path / "repositories" / "app" / "_blobs" / "sha256") in synced
    synced.clear()
    assert finish(fs.write("mirror/ns/app/_blobs/sha256/ab", b"", durable=False))
    assert synced == [] and os.listdir(tmp_path / "tmp") == []
    assert finish(fs.read("mirror/ns/app/_blobs/sha256/ab", 10)) == b""


def test_the_filesystem_driver_deletes_beside_a_concurrent_prune(tmp_path: Any, monkeypatch: Any) -> None:
    """Two tags deleted at once in two threads: the other delete may prune the emptied folder
    between this one's unlink and its fsync of the folder; the delete still succeeds."""
    from registryd.storage import files  # where the driver's placing and syncing live
    from registryd.threads import InlinePool

    fs = FsDriver(str(tmp_path), InlinePool())
    finish(fs.write("repositories/app/_manifests/tags/v1", b"sha256:ab"))
    real = files.fsync_dir

    def pruned_meanwhile(path: str) -> None:
        if path.endswith(os.path.join("_manifests", "tags")) and os.path.isdir(path):
            os.rmdir(path)      # what the other thread's _prune does once the folder is empty
        real(path)

    monkeypatch.setattr(files, "fsync_dir", pruned_meanwhile)
    assert finish(fs.delete("repositories/app/_manifests/tags/v1")) is True
    assert finish(fs.stat("repositories/app/_manifests/tags/v1")) is None


def test_the_filesystem_driver_writes_beside_a_concurrent_prune(tmp_path: Any, monkeypatch: Any) -> None:
    """A tag written while another thread deletes the folder's last tag: the folder may be pruned
    between its creation and the rename into it; the write makes it again."""
    from registryd.storage import files  # where the driver's placing and syncing live
    from registryd.threads import InlinePool

    fs = FsDriver(str(tmp_path), InlinePool())
    real = files.make_dirs
    pruned: list[str] = []

    def made_then_pruned(path: str, durable: bool = True) -> None:
        real(path, durable)
        if path.endswith(os.path.join("_manifests", "tags")) and not pruned:
            os.rmdir(path)
            pruned.append(path)

    monkeypatch.setattr(files, "make_dirs", made_then_pruned)
    assert finish(fs.write("repositories/app/_manifests/tags/v2", b"sha256:cd")) is True
    assert pruned and finish(fs.read("repositories/app/_manifests/tags/v2", 100)) == b"sha256:cd"
    assert os.listdir(tmp_path / "tmp") == []


def test_the_filesystem_driver_reads_a_tiny_value_without_its_pool(tmp_path: Any) -> None:
    """A tag or a revision is read on the caller's thread (as cheap as a stat): a manifest GET waits
    on no thread hop. A larger value is read in the pool."""
    class CountingPool:
        calls = 0

        async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            CountingPool.calls += 1
            return fn(*args, **kwargs)

    fs = FsDriver(str(tmp_path), CountingPool())
    finish(fs.write("repositories/app/_manifests/tags/v1", b"sha256:ab"))
    finish(fs.write("blobs/big", b"x" * (fs_driver_inline() + 1)))
    CountingPool.calls = 0
    assert finish(fs.read("repositories/app/_manifests/tags/v1", 100)) == b"sha256:ab"
    assert finish(fs.read("repositories/app/_manifests/tags/missing", 100)) is None
    assert CountingPool.calls == 0
    assert finish(fs.read("blobs/big", 1 << 20)) == b"x" * (fs_driver_inline() + 1)
    assert CountingPool.calls == 1
    with pytest.raises(TooLarge):
        finish(fs.read("repositories/app/_manifests/tags/v1", 4))


def fs_driver_inline() -> int:
    from registryd.storage.fs.driver import INLINE_READ
    return INLINE_READ


def test_the_memory_driver_stamps_writes_with_its_clock() -> None:
    now = [1000.0]
    memory = MemoryDriver(clock=lambda: now[0])
    finish(memory.write("a", b"1"))
    now[0] = 2000.0
    finish(memory.copy("a", "b"))
    assert [(e.key, e.modified) for e in finish(_all(memory))] == [("a", 1000.0), ("b", 2000.0)]


async def _all(driver: Driver) -> list[Entry]:
    return [entry async for entry in driver.list("")]


# -- appendable values: upload sessions (registryd.storage.uploads) ---------------------------

def appendable(driver: Driver, tmp_path: Any) -> Appendable:
    return driver.appendable(str(tmp_path / "spool"), InlinePool())


def another_node(driver: Driver, tmp_path: Any) -> Appendable:
    """The same store seen by another instance: a restarted process, another node on the bucket."""
    if isinstance(driver, FsDriver):
        return FsDriver(driver.root, InlinePool()).appendable(str(tmp_path / "spool-b"), InlinePool())
    if isinstance(driver, S3Driver):
        return S3Driver(driver.client).appendable(str(tmp_path / "spool-b"), InlinePool())
    return driver.appendable(str(tmp_path / "spool-b"), InlinePool())   # memory is one process's


def spooled(data: Appendable, prefix: str, size: int, body: bytes) -> BodySpool:
    spool = data.spool(prefix, size)
    for start in range(0, len(body), 64 * 1024):
        spool.write(body[start:start + 64 * 1024])
    return spool


async def append(data: Appendable, prefix: str, record: dict[str, Any], size: int,
                 body: bytes) -> dict[str, Any]:
    """Append ``body`` after ``size`` bytes; the record to keep (saved once where recorded)."""
    saved: list[dict[str, Any]] = []

    async def save(new: dict[str, Any]) -> None:
        saved.append(new)

    spool = spooled(data, prefix, size, body)
    try:
        await data.append(prefix, record, spool, len(body), save, unmoved)
    finally:
        spool.close()
    assert len(saved) == (1 if data.recorded and body else 0)
    return saved[0] if saved else record


async def unmoved() -> None:
    pass


async def sealed_value(driver: Driver, data: Appendable, prefix: str, record: dict[str, Any],
                       final: bytes, size: int) -> bytes:
    """Seal with ``final``: the value read back (placed at a key unless it is a local file), checked
    against its hash."""
    spool = spooled(data, prefix, size, final)
    try:
        sealed = await data.seal(prefix, record, spool, len(final), unmoved)
        assert sealed.seen
        digest = (await data.hash(sealed, hashlib.sha256())).hexdigest()
        if sealed.path is not None:
            with open(sealed.path, "rb") as f:
                value = f.read()
        else:
            await data.place(sealed, "blobs/sha256/placed")
            value = await driver.read("blobs/sha256/placed", 64 * MiB) or b""
    finally:
        spool.close()
    assert hashlib.sha256(value).hexdigest() == digest
    return value


@pytest_twisted.ensureDeferred
async def test_appended_bodies_make_one_value_any_instance_continues(driver: Driver, tmp_path: Any) -> None:
    data = appendable(driver, tmp_path)
    bodies = [random.Random(n).randbytes(size) for n, size in enumerate((3 * MiB, 4 * MiB + 5, 1000))]
    prefix, record, size = "uploads/s1/", {}, 0
    await driver.write(prefix + "state", b"{}")
    assert await data.measure(prefix, record, 0) == 0
    for body in bodies:
        record = await append(data, prefix, record, size, body)
        size += len(body)
        assert await data.measure(prefix, record, size) == size
    record = await append(data, prefix, record, size, b"")   # an empty body changes nothing
    # Another instance knows how far it got (a file's size, or the record) and continues it.
    other = another_node(driver, tmp_path)
    assert await other.measure(prefix, record, size) == size
    if data.recorded:
        with pytest.raises(ValueError):
            await other.measure(prefix, record, size + 1)
    final = random.Random(9).randbytes(2 * MiB)
    assert await sealed_value(driver, other, prefix, record, final, size) == b"".join(bodies) + final
    await other.remove(prefix, record, prefix + "state")
    assert await keys(driver, "uploads/") == []
    assert await other.reap_strays("uploads/", time.time() + 3600, set(), no_record) == 0


async def no_record(folder: str) -> dict[str, Any] | None:
    return None


@pytest_twisted.ensureDeferred
async def test_a_dropped_body_leaves_the_value_as_appended(driver: Driver, tmp_path: Any) -> None:
    data = appendable(driver, tmp_path)
    first, cut, again = b"a" * 1000, b"b" * 3000, b"c" * 500
    prefix = "uploads/s2/"
    record = await append(data, prefix, {}, 0, first)
    spool = spooled(data, prefix, len(first), cut)
    spool.drop()
    assert await another_node(driver, tmp_path).measure(prefix, record, len(first)) == len(first)
    record = await append(data, prefix, record, len(first), again)
    assert await sealed_value(driver, data, prefix, record, b"", len(first + again)) == first + again
    assert not os.path.isdir(tmp_path / "spool") or os.listdir(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_an_empty_value(driver: Driver, tmp_path: Any) -> None:
    data = appendable(driver, tmp_path)
    assert await sealed_value(driver, data, "uploads/s3/", {}, b"", 0) == b""


@pytest_twisted.ensureDeferred
async def test_what_no_record_names_is_reaped(driver: Driver, tmp_path: Any) -> None:
    """A node that died between its parts and its record (a bucket) leaves a stray that reap_strays
    removes once it is old, unless a record names it; a value that is its keys leaves none."""
    data = appendable(driver, tmp_path)
    prefix, named = "uploads/s4/", []

    async def dies(new: dict[str, Any]) -> None:
        named.append(new)
        raise RuntimeError("the node died")

    spool = spooled(data, prefix, 0, random.Random(4).randbytes(6 * MiB))
    with pytest.raises(RuntimeError) if data.recorded else contextlib.nullcontext():
        await data.append(prefix, {}, spool, 6 * MiB, dies, unmoved)
    spool.close()

    async def record_of(folder: str) -> dict[str, Any] | None:
        return named[0] if folder == "s4" and named else None

    later = time.time() + 3600
    assert await data.reap_strays("uploads/", time.time() - 3600, set(), no_record) == 0   # too young
    assert await data.reap_strays("uploads/", later, {"s4"}, no_record) == 0               # skipped
    assert await data.reap_strays("uploads/", later, set(), record_of) == 0                # named
    assert await data.reap_strays("uploads/", later, set(), no_record) == (1 if data.recorded else 0)
    assert await data.reap_strays("uploads/", later, set(), no_record) == 0
    await data.remove(prefix, None, prefix + "state")
    assert await keys(driver, "uploads/") == []
