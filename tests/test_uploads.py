"""Upload sessions (registryd.storage.uploads), written once over any driver: here over memory and a
data directory, in-process and fast (the bucket's are tests/test_s3_uploads.py, on Ceph)."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import pytest_twisted

from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.storage import layout
from registryd.storage.fs.store import FsStore
from registryd.storage.memory import MemoryDriver
from registryd.storage.memory_store import DriverStore
from registryd.storage.uploads import Upload, UploadStore
from registryd.threads import InlinePool


def sha256(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def patch(uploads: UploadStore, upload: Upload, data: bytes, start: int | None = None) -> None:
    writer = uploads.open_writer(upload, upload.size if start is None else start, None)
    writer.write(data)
    await uploads.acknowledge(writer)


async def keys(driver: Any, prefix: str) -> list[str]:
    return [entry.key async for entry in driver.list(prefix)]


@pytest_twisted.ensureDeferred
async def test_a_session_lives_in_the_driver_until_its_commit(tmp_path: Any) -> None:
    memory = MemoryDriver()
    store = DriverStore(str(tmp_path), InlinePool(), memory)
    upload = await store.uploads.create("team/app")
    await patch(store.uploads, upload, b"hello ")
    assert await keys(memory, layout.UPLOADS) == [f"uploads/{upload.id}/data", f"uploads/{upload.id}/state"]
    assert await memory.read(f"uploads/{upload.id}/data", 100) == b"hello "
    writer = store.uploads.open_writer(upload, None, "sha256")
    writer.write(b"world")
    await store.uploads.commit(writer, sha256(b"hello world"))
    assert await store.blobs.read(sha256(b"hello world"), 100) == b"hello world"
    assert await keys(memory, layout.UPLOADS) == []
    assert [name for _, _, names in os.walk(tmp_path) for name in names] == []   # nothing local
    with pytest.raises(RegistryError) as caught:
        await store.uploads.get("team/app", upload.id)
    assert caught.value.code == "BLOB_UPLOAD_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_a_wrong_start_or_a_cut_body_changes_nothing(tmp_path: Any) -> None:
    memory = MemoryDriver()
    uploads = DriverStore(str(tmp_path), InlinePool(), memory).uploads
    upload = await uploads.create("team/app")
    await patch(uploads, upload, b"x" * 10)
    for start in (0, 9, 11):   # one node: anything but the end is refused at once
        with pytest.raises(RegistryError) as caught:
            uploads.open_writer(upload, start, None)
        assert caught.value.status == 416 and caught.value.headers["Range"] == "0-9"
    writer = uploads.open_writer(upload, 10, None)
    writer.write(b"cut off")
    writer.abandon()
    assert await memory.read(f"uploads/{upload.id}/data", 100) == b"x" * 10 and not upload.busy
    wrong = sha256(b"not this")
    writer = uploads.open_writer(upload, 10, None)
    with pytest.raises(RegistryError) as caught:
        await uploads.commit(writer, wrong)
    assert caught.value.code == "DIGEST_INVALID"
    assert await keys(memory, "") == []   # nothing stored under a digest it does not have


@pytest_twisted.ensureDeferred
async def test_sessions_untouched_past_the_expiry_are_reaped_by_the_driver_clock(tmp_path: Any) -> None:
    now = [1000.0]
    memory = MemoryDriver(clock=lambda: now[0])
    store = DriverStore(str(tmp_path), InlinePool(), memory)
    uploads = UploadStore(memory, memory.appendable(store.tmp_dir, store.pool), store.blobs, clock=memory.clock)
    old, busy, fresh = [await uploads.create("team/app") for _ in range(3)]
    writer = uploads.open_writer(busy, 0, None)
    now[0] = 1500.0
    await patch(uploads, fresh, b"recent")
    now[0] = 2000.0
    assert await uploads.reap(600) == 1     # old: 1000 < 1400; busy is skipped; fresh was touched at 1500
    assert uploads.known("team/app", old.id) is None
    assert uploads.known("team/app", busy.id) is busy and uploads.known("team/app", fresh.id) is fresh
    writer.abandon()
    assert sorted(layout.session_of(key) for key in await keys(memory, layout.UPLOADS)) == sorted(
        [busy.id, fresh.id, fresh.id])


@pytest_twisted.ensureDeferred
async def test_a_data_directory_session_survives_a_restart(tmp_path: Any) -> None:
    """After a restart the data file's size is the session's: what was fsynced is acknowledged."""
    store = FsStore(str(tmp_path), InlinePool())
    store.prepare()
    upload = await store.uploads.create("team/app")
    await patch(store.uploads, upload, b"a" * 1000)
    restarted = FsStore(str(tmp_path), InlinePool())
    again = await restarted.uploads.get("team/app", upload.id)
    assert (again.size, again.hasher) == (1000, None)
    writer = restarted.uploads.open_writer(again, 1000, None)
    writer.write(b"b" * 24)
    digest = sha256(b"a" * 1000 + b"b" * 24)
    await restarted.uploads.commit(writer, digest)   # verified by hashing the file again
    assert await restarted.blobs.read(digest, 2000) == b"a" * 1000 + b"b" * 24
    assert os.listdir(tmp_path / "uploads") == []


@pytest_twisted.ensureDeferred
async def test_a_session_acknowledged_before_the_upgrade_is_continued_after_it(tmp_path: Any) -> None:
    """A data directory's session from before the one upload store (``state.json``, its data
    file) is still known after the upgrade's restart, continued and committed."""
    session = tmp_path / "uploads" / ("c" * 32)
    session.mkdir(parents=True)
    (session / "state.json").write_bytes(b'{"repo": "team/app", "started": 1700000000.5}')
    (session / "data").write_bytes(b"a" * 100)
    store = FsStore(str(tmp_path), InlinePool())
    store.prepare()
    upload = await store.uploads.get("team/app", "c" * 32)
    assert (upload.size, upload.started) == (100, 1700000000.5)
    with pytest.raises(RegistryError):
        await store.uploads.get("other/app", "c" * 32)
    writer = store.uploads.open_writer(upload, 100, None)
    writer.write(b"b" * 5)
    digest = sha256(b"a" * 100 + b"b" * 5)
    await store.uploads.commit(writer, digest)
    assert await store.blobs.read(digest, 200) == b"a" * 100 + b"b" * 5
    assert os.listdir(tmp_path / "uploads") == []


@pytest_twisted.ensureDeferred
async def test_two_processes_on_one_data_directory_continue_each_others_sessions(tmp_path: Any) -> None:
    """Worker processes share a data directory: what one remembers of a session is used only while
    the data file still has the size it acknowledged, and one body at a time is written to it."""
    one, two = FsStore(str(tmp_path), InlinePool()), FsStore(str(tmp_path), InlinePool())
    one.prepare()
    upload = await one.uploads.create("team/app")
    await patch(one.uploads, upload, b"a" * 10)
    other = await two.uploads.get("team/app", upload.id)
    await patch(two.uploads, other, b"b" * 5)
    assert one.uploads.known("team/app", upload.id) is None       # moved on elsewhere: read it again
    again = await one.uploads.get("team/app", upload.id)
    assert (again.size, again.hasher) == (15, None)
    assert one.uploads.open_here("team/app", upload.id)
    writing = two.uploads.open_writer(await two.uploads.get("team/app", upload.id), 15, None)
    with pytest.raises(RegistryError) as caught:                  # the other process holds the session
        one.uploads.open_writer(again, 15, None)
    assert caught.value.status == 416
    writing.write(b"c" * 3)
    await two.uploads.acknowledge(writing)
    with pytest.raises(RegistryError) as caught:                  # a stale look at it: 416 with the end
        one.uploads.open_writer(again, 15, None)
    assert (caught.value.status, caught.value.detail) == (416, {"size": 18})
    last = one.uploads.open_writer(await one.uploads.get("team/app", upload.id), 18, None)
    await one.uploads.commit(last, sha256(b"a" * 10 + b"b" * 5 + b"c" * 3))
    assert not two.uploads.open_here("team/app", upload.id)
