"""One contract, every Store: the data directory, memory, a bucket on the Ceph of tests/ceph.py, containerd.

The contract is registryd.storage.interface (its docstring and protocols):
blobs, repositories and upload sessions, asked the way the API, the mirror
and upkeep ask them. Each test runs once per store with the same
assertions; where a store legitimately differs, the test reads the store's
declared capabilities (``shared``, ``self_collecting``), never its name.
containerd is one private daemon for the module (``module_containerd``),
each test a namespace of its own; s3 a fresh bucket per test.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, AsyncIterator, cast

import pytest
import pytest_twisted
from twisted.internet import reactor

from registryd.digest import Digest, digest_of
from registryd.errors import RegistryError
from registryd.manifests import parse_manifest
from registryd.storage.containerd.appendable import PREFIX as SESSION
from registryd.storage.containerd.settings import ContainerdSettings
from registryd.storage.containerd.store import ContainerdStore
from registryd.storage.fs.store import FsStore
from registryd.storage.interface import Store
from registryd.storage.memory import MemoryDriver
from registryd.storage.memory_store import DriverStore
from registryd.storage.s3.store import S3Store
from registryd.threads import BlockingPool
from s3_helpers import PausingSink

STORES = ["filesystem", "memory", pytest.param("s3", marks=pytest.mark.s3),
          pytest.param("containerd", marks=pytest.mark.e2e)]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: The host the containerd store records this module's local repositories under.
HOSTNAME = "registry.example"
_NAMESPACES = itertools.count()


@pytest_twisted.async_yield_fixture(params=STORES)
async def store(request: Any, tmp_path: Any) -> AsyncIterator[Store]:
    """A prepared, empty Store of one kind, built as registryd.storage.open_store builds it."""
    pool = BlockingPool(cast(Any, reactor), 2, name="store-contract")
    pool.start()
    root = str(tmp_path / "data")
    bucket = None
    made: Store
    if request.param == "filesystem":
        made = FsStore(root, pool)
    elif request.param == "memory":
        made = DriverStore(root, pool, MemoryDriver())
    elif request.param == "s3":
        bucket = await request.getfixturevalue("ceph_s3").new_bucket()
        made = S3Store(root, pool, bucket.settings, reactor)
    else:
        daemon = request.getfixturevalue("module_containerd")
        made = ContainerdStore(root, pool, ContainerdSettings(
            socket=daemon.address, namespace=f"contract{next(_NAMESPACES)}", hostname=HOSTNAME,
            content_dir=os.path.join(daemon.root, "io.containerd.content.v1.content")), reactor, keep=3600)
    made.prepare()
    made.recover()
    made.check_store()
    try:
        yield made
    finally:
        await made.close()
        if bucket is not None:
            await bucket.close()
        pool.stop()


async def stored(store: Store, data: bytes) -> Digest:
    digest = digest_of(data)
    await store.blobs.put(digest, data)
    return digest


async def sent(store: Store, digest: Digest, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the blob as the API gives them to a client: by sendfile from the
    source's local file where it has one (registryd.web.sendfile: from an offset), else by ``send``."""
    source = await store.blobs.open(digest)
    assert source is not None
    try:
        local = source.local_file()
        if local is not None:
            return os.pread(local.fileno(), end - start, start)
        sink = PausingSink()
        await source.send(sink, start, end)
        assert sink.producer is None     # let go of the consumer when done
        return b"".join(sink.chunks)
    finally:
        source.close()


async def image(store: Store, layer: bytes, subject: tuple[Digest, int] | None = None,
                **extra: Any) -> tuple[Digest, bytes]:
    """An OCI image manifest (its config and layer stored), stored as content: (digest, bytes)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "layer": layer.hex()}).encode()
    document: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": str(await stored(store, config)), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": str(await stored(store, layer)), "size": len(layer)}],
        **extra,
    }
    if subject is not None:
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": str(subject[0]), "size": subject[1]}
    data = json.dumps(document, sort_keys=True).encode()
    return await stored(store, data), data


async def refused(status: int, code: str, call: Any) -> RegistryError:
    try:
        await call
    except RegistryError as e:
        assert (e.status, e.code) == (status, code), e
        return e
    raise AssertionError(f"not refused with {status} {code}")


# -- blobs ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_put_blob_is_sized_read_and_sent_by_range(store: Store) -> None:
    data = os.urandom(300 * 1024 + 17)
    digest = await stored(store, data)
    assert await store.blobs.size(digest) == len(data)
    assert await store.blobs.read(digest, len(data)) == data
    assert await store.blobs.read(digest, 10) == data[:10]     # a limit gives the first bytes
    for start, end in [(0, len(data)), (0, 1), (10, 20), (100 * 1024, 200 * 1024 + 5), (len(data) - 3, len(data))]:
        assert await sent(store, digest, start, end) == data[start:end], (start, end)
    source = await store.blobs.open(digest)
    assert source is not None and source.size == len(data)
    local = source.local_file()
    if local is not None:    # a file for sendfile: the blob's bytes, nothing else
        assert os.fstat(local.fileno()).st_size == len(data)
    source.close()
    assert (await store.blob_sizes()).get(digest) == len(data)
    await store.blobs.put(digest, data)     # the same content again: no error, nothing changes
    assert await store.blobs.size(digest) == len(data) and await store.blobs.read(digest, 5) == data[:5]


@pytest_twisted.ensureDeferred
async def test_an_absent_blob_is_none_everywhere(store: Store) -> None:
    missing = digest_of(b"never stored")
    assert await store.blobs.size(missing) is None
    assert await store.blobs.open(missing) is None
    assert await store.blobs.read(missing, 100) is None
    assert await store.blobs.delete(missing) is False
    assert missing not in await store.blob_sizes()


@pytest_twisted.ensureDeferred
async def test_a_deleted_blob_is_gone_and_a_second_delete_says_so(store: Store) -> None:
    digest = await stored(store, b"short-lived")
    kept = await stored(store, b"kept")
    assert await store.blobs.delete(digest) is True
    assert await store.blobs.size(digest) is None and await store.blobs.read(digest, 100) is None
    assert await store.blobs.open(digest) is None
    assert await store.blobs.delete(digest) is False
    assert await store.blobs.read(kept, 100) == b"kept"


@pytest_twisted.ensureDeferred
async def test_commit_file_stores_a_verified_file_and_consumes_it(store: Store) -> None:
    data = os.urandom(64 * 1024)
    path = os.path.join(store.tmp_dir, "fill")
    with open(path, "wb") as f:
        f.write(data)
    digest = digest_of(data)
    await store.blobs.commit_file(path, digest)
    assert not os.path.exists(path)
    assert await store.blobs.size(digest) == len(data)
    assert await sent(store, digest, 0, len(data)) == data


# -- repositories ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_blob_is_linked_to_one_repository_and_unlinked(store: Store) -> None:
    repos = store.repositories
    digest = await stored(store, b"layer")
    assert await repos.has_blob("team/app", digest) is False
    await repos.link_blob("team/app", digest)
    assert await repos.has_blob("team/app", digest) is True
    assert await repos.has_blob("team/other", digest) is False
    assert await repos.unlink_blob("team/app", digest) is True
    assert await repos.has_blob("team/app", digest) is False
    assert await repos.unlink_blob("team/app", digest) is False
    assert await store.blobs.size(digest) == 5      # unlinking leaves the content to collection


@pytest_twisted.ensureDeferred
async def test_a_manifest_with_tags_is_resolved_listed_and_typed(store: Store) -> None:
    repos = store.repositories
    assert await repos.exists("team/app") is False
    assert await repos.tags("team/app") is None
    assert await repos.revisions("team/app") == {}
    assert await repos.catalog() == []
    before = time.time()
    digest, _ = await image(store, b"layer one")
    await repos.add_manifest("team/app", digest, OCI_MANIFEST, ["1.0", "latest"], None)
    assert await repos.exists("team/app") is True
    assert await repos.resolve_tag("team/app", "1.0") == digest
    assert await repos.resolve_tag("team/app", "latest") == digest
    assert await repos.resolve_tag("team/app", "2.0") is None
    assert await repos.resolve_tag("team/other", "1.0") is None
    assert await repos.tags("team/app") == ["1.0", "latest"]
    assert await repos.manifest_media_type("team/app", digest) == OCI_MANIFEST
    assert await repos.manifest_media_type("team/other", digest) is None
    assert await repos.manifest_media_type("team/app", digest_of(b"other")) is None
    revisions = await repos.revisions("team/app")
    assert list(revisions) == [digest] and before - 2 <= revisions[digest] <= time.time() + 2
    written = await repos.tag_mtime("team/app", "1.0")
    assert written is not None and before - 2 <= written <= time.time() + 2
    assert await repos.tag_mtime("team/app", "2.0") is None
    # A second repository, nested: the catalog is every name, sorted.
    await repos.add_manifest("a/b/c", digest, OCI_MANIFEST, ["x"], None)
    assert await repos.catalog() == ["a/b/c", "team/app"]
    assert await repos.tags("a/b/c") == ["x"]


@pytest_twisted.ensureDeferred
async def test_set_tags_moves_a_tag_and_delete_tag_removes_it(store: Store) -> None:
    repos = store.repositories
    first, _ = await image(store, b"first")
    second, _ = await image(store, b"second")
    await repos.add_manifest("team/app", first, OCI_MANIFEST, ["latest", "1.0"], None)
    await repos.add_manifest("team/app", second, OCI_MANIFEST, [], None)
    assert await repos.resolve_tag("team/app", "latest") == first
    await repos.set_tags("team/app", second, ["latest", "2.0"])
    assert await repos.resolve_tag("team/app", "latest") == second
    assert await repos.resolve_tag("team/app", "2.0") == second
    assert await repos.resolve_tag("team/app", "1.0") == first
    assert await repos.tags("team/app") == ["1.0", "2.0", "latest"]
    assert set(await repos.revisions("team/app")) == {first, second}
    assert await repos.delete_tag("team/app", "latest") is True
    assert await repos.resolve_tag("team/app", "latest") is None
    assert await repos.delete_tag("team/app", "latest") is False
    assert await repos.tags("team/app") == ["1.0", "2.0"]
    # touch_tag points a tag at what the upstream confirmed.
    await repos.touch_tag("team/app", "1.0", second)
    assert await repos.resolve_tag("team/app", "1.0") == second
    assert await repos.tag_mtime("team/app", "1.0") is not None


@pytest_twisted.ensureDeferred
async def test_delete_manifest_removes_the_revision_and_its_tags(store: Store) -> None:
    repos = store.repositories
    gone, _ = await image(store, b"gone")
    kept, _ = await image(store, b"kept")
    await repos.add_manifest("team/app", gone, OCI_MANIFEST, ["old", "older"], None)
    await repos.add_manifest("team/app", kept, OCI_MANIFEST, ["new"], None)
    assert await repos.delete_manifest("team/app", gone, None) is True
    assert await repos.manifest_media_type("team/app", gone) is None
    assert await repos.resolve_tag("team/app", "old") is None
    assert await repos.resolve_tag("team/app", "older") is None
    assert await repos.tags("team/app") == ["new"]
    assert list(await repos.revisions("team/app")) == [kept]
    assert await repos.delete_manifest("team/app", gone, None) is False
    assert await repos.manifest_media_type("team/app", kept) == OCI_MANIFEST


@pytest_twisted.ensureDeferred
async def test_referrers_list_a_manifest_with_a_subject_until_it_is_deleted(store: Store) -> None:
    repos = store.repositories
    subject, subject_data = await image(store, b"the image")
    await repos.add_manifest("team/app", subject, OCI_MANIFEST, ["1.0"], None)
    assert await repos.referrers("team/app", subject) == []
    annotations = {"org.example.kind": "sbom"}
    referrer, data = await image(store, b"an sbom", subject=(subject, len(subject_data)),
                                 artifactType="application/vnd.example.sbom.v1", annotations=annotations)
    entry = parse_manifest(data, OCI_MANIFEST).referrer_entry(referrer, len(data))   # as the API writes it
    assert entry is not None and entry[0] == subject
    await repos.add_manifest("team/app", referrer, OCI_MANIFEST, [], entry)
    listed = await repos.referrers("team/app", subject)
    assert listed == [entry[1]]
    assert listed[0]["digest"] == str(referrer) and listed[0]["size"] == len(data)
    assert listed[0]["artifactType"] == "application/vnd.example.sbom.v1"
    assert listed[0]["annotations"] == annotations and listed[0]["mediaType"] == OCI_MANIFEST
    assert await repos.referrers("team/other", subject) == []
    assert await repos.referrers("team/app", referrer) == []
    assert await repos.delete_manifest("team/app", referrer, subject) is True
    assert await repos.referrers("team/app", subject) == []
    assert await repos.resolve_tag("team/app", "1.0") == subject


@pytest_twisted.ensureDeferred
async def test_an_upstreams_mirrored_repositories_are_apart_from_the_local_ones(store: Store) -> None:
    """What the mirror caches of one upstream is that upstream's (its TTL clock: ``touch_tag``),
    never a local repository of the same name, nor another upstream's."""
    docker = store.mirror_repositories("docker.io")
    quay = store.mirror_repositories("quay.io")
    first, _ = await image(store, b"mirrored")
    second, _ = await image(store, b"upstream moved on")
    await docker.add_manifest("library/alpine", first, OCI_MANIFEST, ["3.20"], None)
    assert await docker.resolve_tag("library/alpine", "3.20") == first
    assert await docker.catalog() == ["library/alpine"]
    assert await quay.resolve_tag("library/alpine", "3.20") is None and await quay.catalog() == []
    assert await store.repositories.resolve_tag("library/alpine", "3.20") is None
    assert "library/alpine" not in await store.repositories.catalog()
    checked = await docker.tag_mtime("library/alpine", "3.20")
    assert checked is not None
    await docker.add_manifest("library/alpine", second, OCI_MANIFEST, [], None)
    await docker.touch_tag("library/alpine", "3.20", second)
    assert await docker.resolve_tag("library/alpine", "3.20") == second
    touched = await docker.tag_mtime("library/alpine", "3.20")
    assert touched is not None and touched >= checked


@pytest_twisted.ensureDeferred
async def test_pull_times_are_kept_unless_the_store_collects_its_own(store: Store) -> None:
    """Pull times feed prune and the mirror's eviction, which leave a self-collecting store alone:
    there they may be dropped (containerd's images have no place for them). A shared store dates
    them by its own clock (a bucket's LastModified, to the second), any other by ``when``."""
    repos = store.repositories
    digest, _ = await image(store, b"pulled")
    await repos.add_manifest("team/app", digest, OCI_MANIFEST, ["1.0"], None)
    before = time.time()
    when = float(int(before) - 100)
    await repos.record_pull("team/app", digest, when)
    await repos.record_pull("team/app", digest_of(b"no such revision"), when)   # not recorded
    pulls = await repos.pulls("team/app")
    if store.self_collecting:
        assert pulls in ({}, {digest: when})
        return
    assert list(pulls) == [digest]
    if store.shared:
        assert before - 2 <= pulls[digest] <= time.time() + 2
    else:
        assert pulls[digest] == when
    await repos.delete_manifest("team/app", digest, None)
    assert await repos.pulls("team/app") == {}


# -- uploads --------------------------------------------------------------------


async def leftovers(store: Store) -> list[str]:
    """What the store holds of upload sessions: keys under ``uploads/``, files in the local
    ``uploads/`` folder, and on containerd its ingests and leases of sessions."""
    found = [entry.key async for entry in store.objects.list("uploads/")]
    for directory, _, files in os.walk(os.path.join(store.root, "uploads")):
        found += [os.path.join(directory, name) for name in files]
    if isinstance(store, ContainerdStore):
        found += [f"ingest {status.ref}" for status in await store.client.statuses()]
        found += [f"lease {lease.id}" for lease in await store.client.leases() if lease.id.startswith(SESSION)]
    return sorted(found)


async def append(store: Store, upload: Any, start: int | None, body: bytes) -> None:
    writer = store.uploads.open_writer(upload, start, None)
    assert (writer.start, writer.end) == (upload.size, upload.size)
    for at in range(0, len(body), 1000):
        writer.write(body[at:at + 1000])
    assert writer.written == len(body) and writer.end == writer.start + len(body)
    await store.uploads.acknowledge(writer)


async def commit(store: Store, upload: Any, digest: Digest) -> None:
    """The closing PUT without a body, as the API makes it."""
    await store.uploads.commit(store.uploads.open_writer(upload, None, None), digest)


@pytest_twisted.ensureDeferred
async def test_an_upload_in_two_bodies_commits_under_its_digest(store: Store) -> None:
    uploads = store.uploads
    upload: Any = await uploads.create("team/app")
    at_hand = uploads.known("team/app", upload.id)
    assert at_hand is not None and at_hand.id == upload.id and at_hand.size == 0    # no waiting
    assert uploads.known("team/other", upload.id) is None
    first, second = os.urandom(5000), os.urandom(7001)
    await append(store, upload, 0, first)
    assert upload.size == len(first)
    await append(store, upload, len(first), second)
    assert upload.size == len(first) + len(second)
    again = await uploads.get("team/app", upload.id)
    assert again.id == upload.id and again.size == len(first) + len(second)
    await refused(404, "BLOB_UPLOAD_UNKNOWN", uploads.get("team/other", upload.id))
    digest = digest_of(first + second)
    assert await store.blobs.size(digest) is None
    await commit(store, again, digest)
    assert await leftovers(store) == []
    assert await store.blobs.size(digest) == len(first) + len(second)
    assert await sent(store, digest, 0, len(first) + len(second)) == first + second
    await refused(404, "BLOB_UPLOAD_UNKNOWN", uploads.get("team/app", upload.id))


@pytest_twisted.ensureDeferred
async def test_a_body_at_the_wrong_offset_is_refused_with_416(store: Store) -> None:
    """Before the end: refused at once. Beyond the end this node knows: refused at once, except
    on a shared store, where another node may have acknowledged that far (then at ``acknowledge``)."""
    uploads = store.uploads
    upload: Any = await uploads.create("team/app")
    await append(store, upload, None, b"0123456789")
    with pytest.raises(RegistryError) as before:
        uploads.open_writer(upload, 3, None)
    assert (before.value.status, before.value.headers["Range"]) == (416, "0-9")
    try:
        writer = uploads.open_writer(upload, 15, None)
    except RegistryError as e:
        assert e.status == 416
    else:
        assert store.shared, "a start beyond the end was taken by a store only this node writes"
        writer.write(b"later")
        await refused(416, "BLOB_UPLOAD_INVALID", uploads.acknowledge(writer))
    # A body open makes a second one wait its turn: 416 meanwhile.
    writer = uploads.open_writer(upload, None, None)
    with pytest.raises(RegistryError) as busy:
        uploads.open_writer(upload, 10, None)
    assert busy.value.status == 416
    writer.abandon()      # a body cut off: the session stays as acknowledged
    assert (await uploads.get("team/app", upload.id)).size == 10
    await append(store, upload, 10, b"abc")
    await commit(store, upload, digest_of(b"0123456789abc"))
    assert await store.blobs.read(digest_of(b"0123456789abc"), 100) == b"0123456789abc"


@pytest_twisted.ensureDeferred
async def test_a_commit_under_a_wrong_digest_stores_nothing(store: Store) -> None:
    uploads = store.uploads
    upload: Any = await uploads.create("team/app")
    blobs_before = await store.blob_sizes()
    await append(store, upload, 0, b"what was sent")
    assert await leftovers(store)     # the session is somewhere
    claimed = digest_of(b"what was claimed")
    error = await refused(400, "DIGEST_INVALID", commit(store, upload, claimed))
    assert error.detail == {"digest": str(claimed)}
    assert await store.blobs.size(claimed) is None
    assert await store.blobs.size(digest_of(b"what was sent")) is None
    await refused(404, "BLOB_UPLOAD_UNKNOWN", uploads.get("team/app", upload.id))
    assert await store.blob_sizes() == blobs_before and await leftovers(store) == []


@pytest_twisted.ensureDeferred
async def test_a_cancelled_upload_is_unknown(store: Store) -> None:
    uploads = store.uploads
    upload: Any = await uploads.create("team/app")
    await append(store, upload, 0, b"abandoned")
    assert await leftovers(store)
    await uploads.cancel(upload)
    assert await leftovers(store) == []
    assert uploads.known("team/app", upload.id) is None
    await refused(404, "BLOB_UPLOAD_UNKNOWN", uploads.get("team/app", upload.id))
    assert await store.blobs.size(digest_of(b"abandoned")) is None


@pytest_twisted.ensureDeferred
async def test_reap_removes_only_expired_sessions(store: Store) -> None:
    uploads = store.uploads
    empty = await uploads.create("team/app")
    written = await uploads.create("team/app")
    await append(store, written, 0, b"some bytes")
    assert await uploads.reap(3600) == 0
    assert (await uploads.get("team/app", written.id)).size == 10
    await uploads.get("team/app", empty.id)
    # An expiry in the past: every session is older than it.
    assert await uploads.reap(-60) == 2
    await refused(404, "BLOB_UPLOAD_UNKNOWN", uploads.get("team/app", empty.id))
    await refused(404, "BLOB_UPLOAD_UNKNOWN", uploads.get("team/app", written.id))
    assert await uploads.reap(-60) == 0
    assert await leftovers(store) == []


# -- the store ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_store_reports_itself_ready(store: Store) -> None:
    assert store.driver in ("filesystem", "memory", "s3", "containerd")
    assert await store.check_backend() is None
    assert await store.check_ready() is None
    assert store.readiness_problem(0) is None
    assert store.location()
