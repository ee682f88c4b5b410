"""The S3 storage backends (Blobs and Repositories over the S3 driver) against a real radosgw."""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from s3_helpers import PausingSink, node_b, repos, s3  # noqa: F401  (fixtures)
from registryd.digest import Digest, digest_of
from registryd.errors import RegistryError
from registryd.storage.guard import BlobGuard
from registryd.storage.s3 import S3Client, S3Error
from registryd.storage.blobs import Blobs
from registryd.storage.s3.driver import S3Driver
from registryd.storage.layout import blob_key

MiB = 1024 * 1024
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def d(text: str) -> Digest:
    return digest_of(text.encode())


async def all_keys(client: S3Client) -> list[str]:
    return [entry.key async for entry in client.list_objects()]


def record_calls(monkeypatch: Any, client: S3Client, log: list[tuple[str, str]],
                 before_put: Any = None) -> None:
    """Log every PUT and DELETE ``client`` makes, in order; ``before_put(key)`` may check the store first."""
    put, delete = client.put_object, client.delete_object

    async def recording_put(key: str, body: Any, **kw: Any) -> str:
        if before_put is not None:
            await before_put(key)
        log.append(("PUT", key))
        return await put(key, body, **kw)

    async def recording_delete(key: str) -> None:
        log.append(("DELETE", key))
        await delete(key)

    monkeypatch.setattr(client, "put_object", recording_put)
    monkeypatch.setattr(client, "delete_object", recording_delete)


# -- repositories -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_blob_links(s3: S3Client) -> None:
    r = repos(s3)
    blob = d("layer")
    assert not await r.exists("lib/app")
    assert not await r.has_blob("lib/app", blob)
    await r.link_blob("lib/app", blob)
    await r.link_blob("lib/app", blob)  # idempotent
    assert await r.has_blob("lib/app", blob)
    assert await r.exists("lib/app")
    assert not await r.exists("lib")  # a parent is no repository
    assert await all_keys(s3) == [f"repositories/lib/app/_blobs/sha256/{blob.hex}"]
    assert await r.unlink_blob("lib/app", blob)
    assert not await r.unlink_blob("lib/app", blob)
    assert not await r.has_blob("lib/app", blob)
    # No directories in S3: a repository with nothing left in it is gone.
    assert not await r.exists("lib/app")


@pytest_twisted.ensureDeferred
async def test_manifests_and_tags(s3: S3Client) -> None:
    r = repos(s3)
    m = d("manifest")
    assert await r.tags("app") is None
    assert await r.manifest_media_type("app", m) is None
    assert await r.resolve_tag("app", "v1") is None
    assert await r.tag_mtime("app", "v1") is None
    await r.link_blob("app", d("layer"))
    assert await r.tags("app") == []  # exists, no tags

    before = time.time()
    await r.add_manifest("app", m, MANIFEST, ["v1", "latest", "1.0_rc-2"], None)
    assert await r.manifest_media_type("app", m) == MANIFEST
    assert await r.tags("app") == ["1.0_rc-2", "latest", "v1"]
    assert await r.resolve_tag("app", "latest") == m
    mtime = await r.tag_mtime("app", "v1")
    assert mtime is not None and before - 2 <= mtime <= time.time() + 2
    assert await s3.get_small(f"repositories/app/_manifests/revisions/sha256/{m.hex}", 100) == \
        json.dumps({"mediaType": MANIFEST}).encode()
    assert await s3.get_small("repositories/app/_manifests/tags/v1", 100) == str(m).encode()

    # Re-tagging overwrites.
    other = d("other")
    await r.add_manifest("app", other, INDEX, ["v1"], None)
    assert await r.resolve_tag("app", "v1") == other
    assert await r.manifest_media_type("app", other) == INDEX

    assert await r.delete_tag("app", "v1")
    assert not await r.delete_tag("app", "v1")
    assert await r.resolve_tag("app", "v1") is None
    assert await r.tags("app") == ["1.0_rc-2", "latest"]
    # The upstream confirmed v1 -> other: the tag is written as it says.
    await r.touch_tag("app", "v1", other)
    assert await r.resolve_tag("app", "v1") == other


@pytest_twisted.ensureDeferred
async def test_touch_tag_moves_last_modified(s3: S3Client) -> None:
    r = repos(s3)
    m = d("manifest")
    await r.add_manifest("app", m, MANIFEST, ["v1"], None)
    written = await r.tag_mtime("app", "v1")
    assert written is not None
    # LastModified has one-second resolution: wait for the next second.
    await deferLater(reactor, 1.1, lambda: None)
    await r.touch_tag("app", "v1", m)
    touched = await r.tag_mtime("app", "v1")
    assert touched is not None and touched >= written + 1
    assert await r.resolve_tag("app", "v1") == m


@pytest_twisted.ensureDeferred
async def test_add_manifest_writes_revision_referrer_then_tags(s3: S3Client, node_b: S3Client,
                                                               monkeypatch: Any) -> None:
    r = repos(s3)
    m, subject = d("signature"), d("image")
    revision = f"repositories/app/_manifests/revisions/sha256/{m.hex}"
    entry = f"repositories/app/_referrers/sha256/{subject.hex}/sha256-{m.hex}"
    seen_before_tags: list[bool] = []

    async def check(key: str) -> None:
        # What another node sees at the moment each tag is about to be written.
        if "/_manifests/tags/" in key:
            seen_before_tags.append(await node_b.head_object(revision) is not None
                                    and await node_b.head_object(entry) is not None)

    log: list[tuple[str, str]] = []
    record_calls(monkeypatch, s3, log, check)
    descriptor = {"mediaType": MANIFEST, "digest": str(m), "size": 123, "artifactType": "application/x-sig"}
    await r.add_manifest("app", m, MANIFEST, ["a", "b"], (subject, descriptor))
    assert log == [("PUT", revision), ("PUT", entry), ("PUT", "repositories/app/_manifests/tags/a"),
                   ("PUT", "repositories/app/_manifests/tags/b")]
    assert seen_before_tags == [True, True]
    assert await r.referrers("app", subject) == [descriptor]


@pytest_twisted.ensureDeferred
async def test_delete_manifest(s3: S3Client, monkeypatch: Any) -> None:
    r = repos(s3)
    m, kept, subject = d("m"), d("kept"), d("subject")
    descriptor = {"mediaType": MANIFEST, "digest": str(m), "size": 1}
    await r.add_manifest("app", m, MANIFEST, ["a", "b"], (subject, descriptor))
    await r.add_manifest("app", kept, MANIFEST, ["c"], None)
    await r.record_pull("app", m, time.time())
    assert f"repositories/app/_pulls/sha256/{m.hex}" in await all_keys(s3)

    log: list[tuple[str, str]] = []
    record_calls(monkeypatch, s3, log)
    assert await r.delete_manifest("app", m, subject)
    assert log == [("DELETE", "repositories/app/_manifests/tags/a"),
                   ("DELETE", "repositories/app/_manifests/tags/b"),
                   ("DELETE", f"repositories/app/_referrers/sha256/{subject.hex}/sha256-{m.hex}"),
                   ("DELETE", f"repositories/app/_pulls/sha256/{m.hex}"),
                   ("DELETE", f"repositories/app/_manifests/revisions/sha256/{m.hex}")]
    assert await r.tags("app") == ["c"]
    assert await r.manifest_media_type("app", m) is None
    assert await r.referrers("app", subject) == []
    assert await all_keys(s3) == [f"repositories/app/_manifests/revisions/sha256/{kept.hex}",
                                  "repositories/app/_manifests/tags/c"]
    assert not await r.delete_manifest("app", m, subject)
    assert await r.manifest_media_type("app", kept) == MANIFEST


@pytest_twisted.ensureDeferred
async def test_referrers_in_key_order(s3: S3Client) -> None:
    r = repos(s3)
    subject = d("image")
    referrers = sorted((d(f"ref{i}") for i in range(12)), key=lambda digest: digest.hex)
    for i, digest in enumerate(reversed(referrers)):
        descriptor = {"mediaType": MANIFEST, "digest": str(digest), "size": i}
        await r.add_manifest("app", digest, MANIFEST, [], (subject, descriptor))
    found = await r.referrers("app", subject)
    assert [item["digest"] for item in found] == [str(digest) for digest in referrers]
    assert await r.referrers("app", d("nothing")) == []
    assert await r.referrers("other", subject) == []


@pytest_twisted.ensureDeferred
async def test_record_pull(s3: S3Client) -> None:
    r = repos(s3)
    m = d("m")
    await r.record_pull("app", m, time.time())
    assert await all_keys(s3) == []  # no revision, no marker
    await r.add_manifest("app", m, MANIFEST, [], None)
    await r.record_pull("app", m, time.time())
    marker = await s3.head_object(f"repositories/app/_pulls/sha256/{m.hex}")
    assert marker is not None and marker.size == 0
    assert marker.last_modified is not None and abs(marker.last_modified - time.time()) < 5


@pytest_twisted.ensureDeferred
async def test_revisions_and_pulls_with_their_last_modified(s3: S3Client, monkeypatch: Any) -> None:
    """One listing each (what an online prune reads); odd keys in those folders are skipped."""
    r = repos(s3, "mirror.test:5000")
    one, two = d("one"), d("two")
    assert await r.revisions("lib/app") == {} and await r.pulls("lib/app") == {}
    assert await r.revisions("Bad Name") == {}
    await r.add_manifest("lib/app", one, MANIFEST, ["v1"], None)
    await r.add_manifest("lib/app", two, MANIFEST, [], None)
    await r.record_pull("lib/app", two, time.time())
    await s3.put_object("mirror/mirror.test_5000/lib/app/_pulls/sha256/short", b"")
    await s3.put_object(f"mirror/mirror.test_5000/lib/app/_pulls/md5/{two.hex}", b"")
    calls: list[str] = []
    listing = s3.list_objects

    def counting(prefix: str = "", *args: Any, **kw: Any) -> Any:
        calls.append(prefix)
        return listing(prefix, *args, **kw)

    monkeypatch.setattr(s3, "list_objects", counting)
    found = await r.revisions("lib/app")
    pulls = await r.pulls("lib/app")
    monkeypatch.undo()
    assert calls == ["mirror/mirror.test_5000/lib/app/_manifests/revisions/",
                     "mirror/mirror.test_5000/lib/app/_pulls/"]
    assert set(found) == {one, two} and all(abs(when - time.time()) < 60 for when in found.values())
    assert list(pulls) == [two] and abs(pulls[two] - time.time()) < 60
    assert await repos(s3).revisions("lib/app") == {}, "the local root is another repository"


@pytest_twisted.ensureDeferred
async def test_catalog_nested_names_and_a_mirror_root(s3: S3Client) -> None:
    local, mirror = repos(s3), repos(s3, "registry-1.docker.io:443")
    assert mirror.root == "mirror/registry-1.docker.io_443/"
    assert await local.catalog() == []
    m = d("m")
    names = ["a", "a/b", "a/b/c", "lib/app", "x__y/z.w-1", "0numeric/z"]
    for name in names:
        await local.add_manifest(name, m, MANIFEST, ["v1"], None)
    await local.link_blob("links/only", d("layer"))
    # Pull markers and referrers alone make no repository.
    await s3.put_object("repositories/ghost/_pulls/sha256/" + m.hex, b"")
    await s3.put_object(f"repositories/ghost2/_referrers/sha256/{m.hex}/sha256-{m.hex}", b"{}")
    await mirror.add_manifest("library/alpine", m, MANIFEST, ["3"], None)
    await mirror.link_blob("a", d("layer"))

    assert await local.catalog() == sorted(names + ["links/only"])
    assert await mirror.catalog() == ["a", "library/alpine"]
    # The two roots never see each other.
    assert await mirror.tags("a") == []
    assert await local.tags("a") == ["v1"]
    assert await local.tags("library/alpine") is None
    assert await mirror.resolve_tag("library/alpine", "3") == m
    assert await local.resolve_tag("library/alpine", "3") is None
    assert not await mirror.exists("lib/app")


@pytest_twisted.ensureDeferred
async def test_catalog_of_many_repositories(s3: S3Client) -> None:
    r = repos(s3)
    names = [f"team{i % 3}/app{i:02d}" for i in range(30)]
    await gatherResults([Deferred.fromCoroutine(r.link_blob(name, d(name))) for name in names])
    assert await r.catalog() == sorted(names)


@pytest.mark.parametrize("name", ["", "../x", "a/../b", "A", "a//b", "/a", "a/", "a/_blobs", "_x", "a b",
                                  "a%2fb", "x" * 300])
@pytest_twisted.ensureDeferred
async def test_odd_names_find_nothing_and_write_nothing(s3: S3Client, name: str) -> None:
    r = repos(s3)
    m = d("m")
    await s3.put_object("repositories/a/_manifests/tags/v1", str(m).encode())
    assert not await r.exists(name)
    assert not await r.has_blob(name, m)
    assert await r.tags(name) is None
    assert await r.resolve_tag(name, "v1") is None
    assert await r.tag_mtime(name, "v1") is None
    assert await r.manifest_media_type(name, m) is None
    assert await r.referrers(name, m) == []
    assert not await r.delete_tag(name, "v1")
    assert not await r.unlink_blob(name, m)
    assert not await r.delete_manifest(name, m, None)
    await r.touch_tag(name, "v1", m)
    await r.record_pull(name, m, time.time())
    for write in (r.link_blob(name, m), r.add_manifest(name, m, MANIFEST, ["v1"], None)):
        with pytest.raises(RegistryError) as caught:
            await write
        assert caught.value.code == "NAME_INVALID"
    assert await all_keys(s3) == ["repositories/a/_manifests/tags/v1"]


@pytest_twisted.ensureDeferred
async def test_odd_tags_and_digests(s3: S3Client) -> None:
    r = repos(s3)
    m = d("m")
    await s3.put_object("repositories/a/_manifests/tags/v1", str(m).encode())
    for tag in ("../tags/v1", "a/b", "", ".v1", "x" * 200):
        assert await r.resolve_tag("a", tag) is None
        assert not await r.delete_tag("a", tag)
    with pytest.raises(RegistryError) as caught:
        await r.add_manifest("app", m, MANIFEST, ["ok", "not/ok"], None)
    assert caught.value.code == "MANIFEST_INVALID"
    bogus = Digest("sha256", "../../x")
    assert not await r.has_blob("a", bogus)
    with pytest.raises(RegistryError) as caught:
        await r.link_blob("a", bogus)
    assert caught.value.code == "DIGEST_INVALID"
    # Nothing was written: not even the revision of the manifest with a bad tag.
    assert await all_keys(s3) == ["repositories/a/_manifests/tags/v1"]


@pytest_twisted.ensureDeferred
async def test_a_second_node_sees_writes_at_once(s3: S3Client, node_b: S3Client) -> None:
    a, b = repos(s3), repos(node_b)
    m, n = d("m"), d("n")
    await a.add_manifest("lib/app", m, MANIFEST, ["v1", "latest"], None)
    assert await b.resolve_tag("lib/app", "v1") == m
    assert await b.tags("lib/app") == ["latest", "v1"]
    assert await b.catalog() == ["lib/app"]
    await b.add_manifest("lib/app", n, MANIFEST, ["v1"], None)
    assert await a.resolve_tag("lib/app", "v1") == n
    assert await b.delete_manifest("lib/app", m, None)
    assert await a.tags("lib/app") == ["v1"]
    assert await a.manifest_media_type("lib/app", m) is None


# -- blobs ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_put_read_size_delete(s3: S3Client) -> None:
    guard = BlobGuard()
    blobs = Blobs(S3Driver(s3), guard)
    data = b'{"schemaVersion": 2}'
    digest = digest_of(data)
    assert await blobs.size(digest) is None
    assert await blobs.read(digest, 100) is None
    assert await blobs.open(digest) is None
    assert guard.last_claim(digest) is None
    await blobs.put(digest, data)
    assert guard.last_claim(digest) is not None
    assert await all_keys(s3) == [blob_key(digest)]
    await blobs.put(digest, data)  # already there: If-None-Match refuses, which is success
    assert await blobs.size(digest) == len(data)
    assert await blobs.read(digest, 100) == data
    assert await blobs.read(digest, 5) == data[:5]  # at most ``limit``, as a file read gives
    assert await blobs.delete(digest)
    assert not await blobs.delete(digest)
    assert await blobs.size(digest) is None


@pytest_twisted.ensureDeferred
async def test_open_and_send_ranges_with_backpressure(s3: S3Client) -> None:
    blobs = Blobs(S3Driver(s3), BlobGuard())
    data = os.urandom(3 * MiB + 17)
    digest = digest_of(data)
    await blobs.put(digest, data)
    source = await blobs.open(digest)
    assert source is not None
    try:
        assert source.size == len(data)
        assert source.local_file() is None
        assert source.redirect_url(60) is None  # not built with presign
        whole = PausingSink(pause_every=256 * 1024)
        await source.send(whole, 0, len(data))
        assert whole.data == data
        assert whole.pauses >= 5 and whole.producer is None and whole.registrations == 1
        # Once paused, no more than what one socket read had pulled in arrives.
        assert whole.while_paused <= 256 * 1024
        for start, end in [(0, 1), (10, 20), (MiB, 2 * MiB + 5), (len(data) - 3, len(data))]:
            part = PausingSink()
            await source.send(part, start, end)
            assert part.data == data[start:end], (start, end)
        empty = PausingSink()
        await source.send(empty, 5, 5)
        assert empty.data == b"" and empty.registrations == 0
    finally:
        source.close()


@pytest_twisted.ensureDeferred
async def test_redirect_url_is_presigned(s3: S3Client) -> None:
    blobs = Blobs(S3Driver(s3), BlobGuard(), redirect=True)
    data = os.urandom(1000)
    digest = digest_of(data)
    await blobs.put(digest, data)
    source = await blobs.open(digest)
    assert source is not None
    url = source.redirect_url(300)
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    response = await http.get(url)
    assert response.code == 200
    assert await response.content() == data
    tampered = await http.get(url.replace("X-Amz-Expires=300", "X-Amz-Expires=301"))
    assert tampered.code == 403
    await tampered.content()


def write_file(path: str, size: int) -> bytes:
    data = (hashlib.sha256(b"seed").digest() * (size // 32 + 1))[:size]
    data = b"".join(i.to_bytes(4, "big") + data[i + 4:i + 4096] for i in range(0, size, 4096))
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest_twisted.ensureDeferred
async def test_commit_file_goes_multipart_above_the_part_size(ceph_s3: Any, tmp_path: Any) -> None:
    client = await ceph_s3.new_bucket(part_size=5 * MiB)
    try:
        guard = BlobGuard()
        blobs = Blobs(S3Driver(client), guard)
        path = str(tmp_path / "fill")
        data = write_file(path, 20 * MiB + 123)
        digest = digest_of(data)
        await blobs.commit_file(path, digest)
        assert not os.path.exists(path)
        assert guard.last_claim(digest) is not None
        info = await client.head_object(blob_key(digest))
        assert info is not None and info.size == len(data)
        assert info.etag.endswith("-5")  # 4 parts of 5 MiB and one of 123 bytes
        sink = PausingSink()
        source = await blobs.open(digest)
        assert source is not None
        await source.send(sink, 0, source.size)
        assert hashlib.sha256(sink.data).hexdigest() == digest.hex
        assert [u async for u in client.list_multipart_uploads()] == []

        # The same content again (another node's fill): no second upload, the file is still consumed.
        write_file(path, 20 * MiB + 123)
        await blobs.commit_file(path, digest)
        assert not os.path.exists(path)
        again = await client.head_object(blob_key(digest))
        assert again is not None and again.etag == info.etag
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_commit_file_single_put(s3: S3Client, tmp_path: Any) -> None:
    guard = BlobGuard()
    blobs = Blobs(S3Driver(s3), guard)
    path = str(tmp_path / "small")
    data = write_file(path, 100_000)
    digest = digest_of(data)
    await blobs.commit_file(path, digest)
    assert not os.path.exists(path)
    assert guard.last_claim(digest) is not None
    assert await blobs.read(digest, MiB) == data
    info = await s3.head_object(blob_key(digest))
    assert info is not None and "-" not in info.etag


@pytest_twisted.ensureDeferred
async def test_failed_multipart_is_aborted_and_the_file_kept(ceph_s3: Any, tmp_path: Any,
                                                             monkeypatch: Any) -> None:
    client = await ceph_s3.new_bucket(part_size=5 * MiB)
    try:
        blobs = Blobs(S3Driver(client), BlobGuard())
        path = str(tmp_path / "fill")
        data = write_file(path, 16 * MiB)
        digest = digest_of(data)
        upload_part = client.upload_part
        sent: list[int] = []

        async def failing(key: str, upload_id: str, number: int, *args: Any) -> str:
            if number == 3:
                raise S3Error(500, "InternalError", "injected", key, "UploadPart")
            sent.append(number)
            return await upload_part(key, upload_id, number, *args)

        monkeypatch.setattr(client, "upload_part", failing)
        with pytest.raises(S3Error, match="injected"):
            await blobs.commit_file(path, digest)
        assert os.path.exists(path)
        assert await blobs.size(digest) is None
        assert [u async for u in client.list_multipart_uploads()] == []
    finally:
        await client.close()
