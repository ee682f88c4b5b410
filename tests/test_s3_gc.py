"""Garbage collection of a shared S3 store (the Collector on an S3Driver) against a real radosgw.

LastModified cannot be set, so "old" is made with the collector's clock: a
clock a day ahead makes everything written now older than a one-hour delay.
"""
from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import deferLater

from s3_helpers import node_b, repos, s3  # noqa: F401  (fixtures)
from registryd.digest import Digest, digest_of
from registryd.storage.fs.driver import FsDriver
from registryd.storage.guard import BlobGuard
from registryd.storage.s3 import S3Client, S3Unavailable
from registryd.storage.blobs import Blobs
from registryd.storage.s3.driver import S3Driver
from registryd.storage.layout import blob_key, trash_key
from registryd.threads import InlinePool
from registryd.upkeep.collector import Collector

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DAY = 86400.0


def ahead(seconds: float) -> Callable[[], float]:
    return lambda: time.time() + seconds


async def put_blob(client: S3Client, data: bytes) -> Digest:
    digest = digest_of(data)
    await Blobs(S3Driver(client), BlobGuard()).put(digest, data)
    return digest


async def exists(client: S3Client, digest: Digest) -> bool:
    return await client.head_object(blob_key(digest)) is not None


async def keys(client: S3Client, prefix: str = "") -> list[str]:
    return [entry.key async for entry in client.list_objects(prefix)]


def manifest_doc(config: Digest, layers: list[Digest], subject: Digest | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(config), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": str(layer), "size": 2}
                   for layer in layers],
    }
    if subject is not None:
        doc["subject"] = {"mediaType": MANIFEST, "digest": str(subject), "size": 2}
    return json.dumps(doc).encode()


async def push_image(client: S3Client, name: str, tags: list[str], layers: list[bytes],
                     namespace: str | None = None, subject: Digest | None = None) -> list[Digest]:
    """Config, layers (linked), manifest and revision, as a push stores them: [manifest, config, *layers]."""
    r = repos(client, namespace)
    stored = [await put_blob(client, data) for data in layers]
    config = await put_blob(client, json.dumps({"image": name, "layers": [str(d) for d in stored]}).encode())
    for digest in (config, *stored):
        await r.link_blob(name, digest)
    doc = manifest_doc(config, stored, subject)
    manifest = await put_blob(client, doc)
    referrer = (subject, {"mediaType": MANIFEST, "digest": str(manifest), "size": len(doc)}) if subject else None
    await r.add_manifest(name, manifest, MANIFEST, tags, referrer)
    return [manifest, config, *stored]


async def push_like_api(client: S3Client, name: str, doc: bytes, named: list[Digest], tag: str) -> bool:
    """A manifest PUT on another node, the API half of the protocol: check, write the revision,
    look again at every blob (its own content too), then tag. False: MANIFEST_BLOB_UNKNOWN."""
    blobs, r = Blobs(S3Driver(client), BlobGuard()), repos(client)
    for digest in named:
        if await blobs.size(digest) is None:
            return False
    manifest = digest_of(doc)
    existed = await r.manifest_media_type(name, manifest) is not None
    await blobs.put(manifest, doc)
    await r.add_manifest(name, manifest, MANIFEST, [], None)
    for digest in (manifest, *named):
        if await blobs.size(digest) is None:
            if not existed:
                await r.delete_manifest(name, manifest, None)
            return False
    await r.touch_tag(name, tag, manifest)
    return True


async def committed_blobs_exist(client: S3Client) -> list[str]:
    """Every digest a revision in the bucket names that is missing from ``blobs/`` (should be none)."""
    missing = []
    for key in await keys(client, "repositories/"):
        if "/_manifests/revisions/" not in key:
            continue
        algorithm, hexpart = key.rsplit("/", 2)[1:]
        manifest = Digest(algorithm, hexpart)
        doc = await client.get_small(blob_key(manifest), 1 << 20)
        if doc is None:
            missing.append(f"{key}: its manifest")
            continue
        named = [json.loads(doc)["config"]["digest"]] + [layer["digest"] for layer in json.loads(doc)["layers"]]
        for text in named:
            algorithm, _, hexpart = text.partition(":")
            if not await exists(client, Digest(algorithm, hexpart)):
                missing.append(f"{key}: {text}")
    return missing


def hook_before(monkeypatch: Any, client: S3Client, method: str,
                hook: Callable[..., Awaitable[None]]) -> None:
    """Run ``hook(*args)`` before every call of ``client.<method>``."""
    original = getattr(client, method)

    async def hooked(*args: Any, **kw: Any) -> Any:
        await hook(*args)
        return await original(*args, **kw)

    monkeypatch.setattr(client, method, hooked)


# -- marking and sweeping ---------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_keeps_everything_referenced(s3: S3Client) -> None:
    image = await push_image(s3, "lib/app", ["v1"], [b"layer one", b"layer two"])
    child_a = await push_image(s3, "lib/multi", [], [b"amd64 layer"])
    child_b = await push_image(s3, "lib/multi", [], [b"arm64 layer"])
    # An index: its children are named only by its document (and their own revisions).
    index_doc = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MANIFEST, "digest": str(child[0]), "size": 2} for child in (child_a, child_b)]}).encode()
    index = await put_blob(s3, index_doc)
    await repos(s3).add_manifest("lib/multi", index, INDEX, ["latest"], None)
    # A signature: its referrer entry keeps it and its subject.
    signature = await push_image(s3, "lib/app", [], [b"signature"], subject=image[0])
    # Referrer entry and tag alone (their revisions gone) still keep what they name.
    by_referrer = await put_blob(s3, b"named only by a referrer entry")
    await s3.put_object(f"repositories/lib/app/_referrers/sha256/{image[0].hex}/sha256-{by_referrer.hex}", b"{}")
    tag_only = await put_blob(s3, b"named only by a tag")
    await s3.put_object("repositories/lib/app/_manifests/tags/bare", str(tag_only).encode())
    mirrored = await push_image(s3, "library/alpine", ["3"], [b"alpine layer"], namespace="docker.io:5000")
    orphan = await put_blob(s3, b"nothing names me")

    kept = [*image, *child_a, *child_b, index, *signature, by_referrer, tag_only, *mirrored]
    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    await collector.collect()

    for digest in kept:
        assert await exists(s3, digest), digest
    assert not await exists(s3, orphan)
    report = collector.report()
    assert report["removed_blobs"] == [{"digest": str(orphan), "size": len(b"nothing names me"),
                                        "path": blob_key(orphan)}]
    assert report["kept_referenced"] == len(set(kept))
    assert report["kept_young"] == 0 and report["restored"] == 0
    assert report["repositories"] == 3
    assert report["manifests"] == 6
    assert await keys(s3, "trash/") == []


@pytest_twisted.ensureDeferred
async def test_removes_old_unreferenced_blobs_and_their_links(s3: S3Client) -> None:
    image = await push_image(s3, "lib/app", ["v1"], [b"kept"])
    dropped = await push_image(s3, "lib/app", [], [b"dropped layer"])
    await repos(s3).delete_manifest("lib/app", dropped[0], None)
    never_stored = digest_of(b"a link whose blob never arrived")
    await repos(s3).link_blob("lib/app", never_stored)

    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    result = await collector.collect()

    assert [await exists(s3, digest) for digest in dropped] == [False, False, False]
    assert all([await exists(s3, digest) for digest in image])
    report = collector.report()
    assert sorted(b["digest"] for b in report["removed_blobs"]) == sorted(str(d) for d in dropped)
    assert report["bytes_reclaimed"] == result.reclaimed == sum(b["size"] for b in report["removed_blobs"])
    assert sorted(link["digest"] for link in report["removed_links"]) == \
        sorted(str(d) for d in [never_stored, *dropped[1:]])
    assert all(link["repository"] == "lib/app" for link in report["removed_links"])
    remaining = await keys(s3, "repositories/lib/app/_blobs/")
    assert sorted(remaining) == sorted(f"repositories/lib/app/_blobs/sha256/{d.hex}" for d in image[1:])
    assert await keys(s3, "trash/") == []


@pytest_twisted.ensureDeferred
async def test_keeps_young_blobs(s3: S3Client) -> None:
    young = await put_blob(s3, b"just pushed")
    collector = Collector(S3Driver(s3), 3600, dry_run=False)
    await collector.collect()
    assert await exists(s3, young)
    assert collector.report()["kept_young"] == 1 and collector.report()["removed_blobs"] == []


@pytest_twisted.ensureDeferred
async def test_a_young_link_or_a_claim_keeps_an_old_blob(s3: S3Client) -> None:
    linked = await put_blob(s3, b"linked later")
    claimed = await put_blob(s3, b"claimed by this node")
    orphan = await put_blob(s3, b"old and alone")
    await deferLater(reactor, 1.1, lambda: None)  # LastModified counts whole seconds
    await repos(s3).link_blob("lib/app", linked)
    listed = {entry.key: entry.last_modified async for entry in s3.list_objects()}
    blob_time = listed[blob_key(linked)]
    link_time = listed[f"repositories/lib/app/_blobs/sha256/{linked.hex}"]
    assert blob_time is not None and link_time is not None and link_time >= blob_time + 1
    def clock() -> float:
        """Half a second past the delay for the blobs: the link is younger than that."""
        return blob_time + 10 + 0.5

    guard = BlobGuard(clock=clock)
    guard.claim([claimed])

    collector = Collector(S3Driver(s3), 10, dry_run=False, guard=guard, clock=clock)
    await collector.collect()
    assert await exists(s3, linked) and await exists(s3, claimed)
    assert not await exists(s3, orphan)
    assert collector.report()["kept_young"] == 2


@pytest_twisted.ensureDeferred
async def test_dry_run_removes_nothing(s3: S3Client) -> None:
    await push_image(s3, "lib/app", ["v1"], [b"kept"])
    orphan = await put_blob(s3, b"would go")
    await repos(s3).link_blob("lib/app", orphan)
    dangling = digest_of(b"never stored")
    await repos(s3).link_blob("lib/app", dangling)
    before = await keys(s3)

    collector = Collector(S3Driver(s3), 3600, dry_run=True, clock=ahead(DAY))
    await collector.collect()

    assert await keys(s3) == before
    report = collector.report()
    assert report["dry_run"] is True
    assert [b["digest"] for b in report["removed_blobs"]] == [str(orphan)]
    assert sorted(link["digest"] for link in report["removed_links"]) == sorted([str(orphan), str(dangling)])
    assert report["restored"] == 0


# -- the race with a manifest PUT on another node ---------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_revision_added_before_the_second_mark_brings_its_blobs_back(s3: S3Client, node_b: S3Client,
                                                                            monkeypatch: Any) -> None:
    layer = await put_blob(s3, b"an old layer nobody names yet")
    config = await put_blob(s3, b"{}")
    # An old manifest document, pushed again: it is a candidate itself, and only
    # its copy in the trash can tell the second mark what it names.
    old_doc = manifest_doc(config, [layer])
    old_manifest = await put_blob(s3, old_doc)
    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    remark = collector._remark

    async def another_node_pushes() -> None:
        assert not await exists(s3, layer)  # moved to the trash
        await repos(node_b).add_manifest("lib/app", old_manifest, MANIFEST, [], None)
        await remark()

    monkeypatch.setattr(collector, "_remark", another_node_pushes)
    await collector.collect()

    for digest in (layer, config, old_manifest):
        assert await exists(s3, digest)
    assert await Blobs(S3Driver(s3), BlobGuard()).read(layer, 100) == b"an old layer nobody names yet"
    report = collector.report()
    assert report["restored"] == 3 and report["kept_referenced"] == 3 and report["removed_blobs"] == []
    assert await keys(s3, "trash/") == []


@pytest.mark.parametrize("moment", ["before the delete", "after the delete"])
@pytest_twisted.ensureDeferred
async def test_a_push_during_the_move_commits_whole_or_fails(s3: S3Client, node_b: S3Client, monkeypatch: Any,
                                                             moment: str) -> None:
    layer = await put_blob(s3, b"old layer")
    config = await put_blob(s3, b"old config")
    doc = manifest_doc(config, [layer])
    outcome: list[bool] = []

    async def push_now() -> None:
        outcome.append(await push_like_api(node_b, "lib/app", doc, [config, layer], "v1"))

    original = s3.delete_object

    pushed: Deferred[None] = Deferred()
    started: list[str] = []

    async def delete(key: str) -> None:
        # The first of the two originals to go: before it the push finds both.
        # The other one waits for the push (the moves run side by side).
        if key not in (blob_key(layer), blob_key(config)):
            return await original(key)
        if started:
            await pushed
            return await original(key)
        started.append(key)
        if moment == "before the delete":
            await push_now()
        await original(key)
        if moment == "after the delete":
            await push_now()
        pushed.callback(None)

    monkeypatch.setattr(s3, "delete_object", delete)
    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    await collector.collect()

    committed = outcome == [True]
    assert committed == (moment == "before the delete")
    assert await committed_blobs_exist(s3) == []
    if committed:
        assert await exists(s3, layer) and await exists(s3, config)
        assert collector.report()["restored"] >= 1
    else:
        assert await repos(s3).manifest_media_type("lib/app", digest_of(doc)) is None
        assert await repos(s3).resolve_tag("lib/app", "v1") is None


@pytest.mark.parametrize("use", ["a claim on this node", "a new link on another node"])
@pytest_twisted.ensureDeferred
async def test_a_use_during_the_run_brings_the_blob_back(s3: S3Client, node_b: S3Client, monkeypatch: Any,
                                                        use: str) -> None:
    blob = await put_blob(s3, b"mounted meanwhile")
    await repos(s3).link_blob("lib/app", blob)
    await deferLater(reactor, 1.1, lambda: None)  # so the new link has a later LastModified
    clock = ahead(DAY)
    guard = BlobGuard(clock=clock)
    collector = Collector(S3Driver(s3), 3600, dry_run=False, guard=guard, clock=clock)
    remark = collector._remark

    async def used_then_remark() -> None:
        if use == "a claim on this node":
            guard.claim([blob])
        else:
            await repos(node_b).link_blob("lib/app", blob)  # a mount: the same link, written again
        await remark()

    monkeypatch.setattr(collector, "_remark", used_then_remark)
    await collector.collect()
    assert await exists(s3, blob)
    report = collector.report()
    assert report["restored"] == 1 and report["kept_young"] == 1
    assert report["removed_blobs"] == [] and report["removed_links"] == []


@pytest_twisted.ensureDeferred
async def test_a_blob_written_again_during_the_move_stays(s3: S3Client, node_b: S3Client, monkeypatch: Any) -> None:
    blob = await put_blob(s3, b"uploaded again")
    await deferLater(reactor, 1.1, lambda: None)  # so the new write has a later LastModified

    original = s3.copy_large

    async def copy(src: str, dst: str, size: int) -> str:
        etag = await original(src, dst, size)
        if src == blob_key(blob):
            await node_b.put_object(src, b"uploaded again")  # after the copy, before the look
        return etag

    monkeypatch.setattr(s3, "copy_large", copy)
    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    await collector.collect()
    assert await exists(s3, blob)
    assert collector.report()["kept_young"] == 1 and collector.report()["removed_blobs"] == []
    assert await keys(s3, "trash/") == []


@pytest_twisted.ensureDeferred
async def test_a_new_revision_without_its_document_holds_everything_back(s3: S3Client, node_b: S3Client,
                                                                         monkeypatch: Any) -> None:
    broken = await push_image(s3, "lib/old", ["v1"], [b"old"])
    await s3.delete_object(blob_key(broken[0]))  # an old revision without its manifest: fsck's business
    orphan = await put_blob(s3, b"its layer, perhaps")
    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    remark = collector._remark

    async def a_revision_nothing_can_read() -> None:
        await repos(node_b).add_manifest("lib/app", digest_of(b"a manifest nowhere"), MANIFEST, [], None)
        await remark()

    monkeypatch.setattr(collector, "_remark", a_revision_nothing_can_read)
    await collector.collect()
    assert await exists(s3, orphan)
    assert collector.report()["removed_blobs"] == [] and collector.report()["restored"] == 3

    # Once it is old, it no longer holds anything back (as on the filesystem).
    again = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    await again.collect()
    assert not await exists(s3, orphan)


@pytest_twisted.ensureDeferred
async def test_a_failed_run_puts_moved_blobs_back(s3: S3Client, monkeypatch: Any) -> None:
    blobs = [await put_blob(s3, f"orphan {n}".encode()) for n in range(3)]
    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))

    async def store_goes_away() -> None:
        raise S3Unavailable("the store stopped answering")

    monkeypatch.setattr(collector, "_remark", store_goes_away)
    with pytest.raises(S3Unavailable):
        await collector.collect()
    assert [await exists(s3, digest) for digest in blobs] == [True, True, True]
    assert await keys(s3, "trash/") == []


# -- leftovers, links, two collectors --------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_leftovers_of_a_crashed_run(s3: S3Client) -> None:
    # A crashed run moved a manifest and its layer aside after a push named them.
    layer_data, config_data = b"layer in the trash", b"config in the trash"
    layer, config = digest_of(layer_data), digest_of(config_data)
    doc = manifest_doc(config, [layer])
    manifest = digest_of(doc)
    garbage = digest_of(b"garbage in the trash")
    for digest, data in ((layer, layer_data), (config, config_data), (manifest, doc),
                         (garbage, b"garbage in the trash")):
        await s3.put_object(trash_key("crashed", digest), data)
    await repos(s3).add_manifest("lib/app", manifest, MANIFEST, ["v1"], None)

    # Within the leftover age, a run leaves them alone: it may be another node's, in progress.
    early = Collector(S3Driver(s3), 0, dry_run=False)
    await early.collect()
    assert len(await keys(s3, "trash/")) == 4 and early.report()["restored"] == 0

    collector = Collector(S3Driver(s3), 3600, dry_run=False, clock=ahead(DAY))
    await collector.collect()
    assert await keys(s3, "trash/") == []
    for digest in (layer, config, manifest):
        assert await exists(s3, digest)
    assert not await exists(s3, garbage)
    report = collector.report()
    assert report["restored"] == 3
    assert report["removed_blobs"] == [{"digest": str(garbage), "size": len(b"garbage in the trash"),
                                        "path": trash_key("crashed", garbage)}]


@pytest_twisted.ensureDeferred
async def test_link_sweep(s3: S3Client) -> None:
    r = repos(s3)
    present = await put_blob(s3, b"present")
    await s3.put_object("repositories/lib/app/_manifests/tags/v1", str(present).encode())
    for digest in (present, digest_of(b"gone long ago"), digest_of(b"in another run's trash")):
        await r.link_blob("lib/app", digest)
    await repos(s3, "docker.io").link_blob("library/alpine", digest_of(b"gone long ago"))
    # Another node's collection holds this one aside right now: it may put it back.
    await s3.put_object(trash_key("running", digest_of(b"in another run's trash")), b"in another run's trash")

    # Blobs and links are past the delay; the trash entry is within the leftover age.
    collector = Collector(S3Driver(s3), 600, dry_run=False, clock=ahead(1800))
    await collector.collect()
    removed = sorted((link["repository"], link["digest"]) for link in collector.report()["removed_links"])
    assert removed == sorted([("lib/app", str(digest_of(b"gone long ago"))),
                              ("docker.io/library/alpine", str(digest_of(b"gone long ago")))])
    assert sorted(await keys(s3, "repositories/lib/app/_blobs/")) == sorted(
        f"repositories/lib/app/_blobs/sha256/{d.hex}" for d in (present, digest_of(b"in another run's trash")))

    # A young link to a missing blob stays (its blob may be on its way).
    await r.link_blob("lib/app", digest_of(b"on its way"))
    young = Collector(S3Driver(s3), 3600, dry_run=False)
    await young.collect()
    assert young.report()["removed_links"] == []


@pytest_twisted.ensureDeferred
async def test_two_collectors_at_once_lose_nothing_referenced(s3: S3Client, node_b: S3Client,
                                                              monkeypatch: Any) -> None:
    node_c = S3Client(s3.settings, reactor)  # where the pushes come from
    try:
        images = [await push_image(s3, f"lib/app{n}", ["v1"], [f"layer {n}".encode()]) for n in range(3)]
        orphans = [await put_blob(s3, f"orphan {n}".encode()) for n in range(12)]
        raced = orphans[:6]
        outcomes: dict[Digest, bool] = {}
        pushes: dict[Digest, Deferred[None]] = {}

        async def push(digest: Digest) -> None:
            """One push per digest; whoever else gets here waits for it to end."""
            if digest in pushes:
                return await pushes[digest]
            pushes[digest] = Deferred()
            doc = manifest_doc(digest, [])
            outcomes[digest] = await push_like_api(node_c, "race/app", doc, [digest], f"t{digest.hex[:8]}")
            pushes.pop(digest).callback(None)
            pushes[digest] = succeed(None)

        async def before_delete(key: str) -> None:
            # Before the first delete of these originals by either node: these pushes commit.
            for digest in raced[:4]:
                if key == blob_key(digest):
                    await push(digest)

        hook_before(monkeypatch, s3, "delete_object", before_delete)
        hook_before(monkeypatch, node_b, "delete_object", before_delete)
        # Trash of the other run is within the leftover age; blobs are past the delay.
        first = Collector(S3Driver(s3), 0, dry_run=False, clock=ahead(2))
        second = Collector(S3Driver(node_b), 0, dry_run=False, clock=ahead(2))
        remark = first._remark

        async def pushes_then_remark() -> None:
            for digest in raced[4:]:
                await push(digest)
            await remark()

        monkeypatch.setattr(first, "_remark", pushes_then_remark)
        await gatherResults([Deferred.fromCoroutine(c.collect()) for c in (first, second)])

        for image in images:
            for digest in image:
                assert await exists(s3, digest), digest
        assert await committed_blobs_exist(s3) == []
        assert [outcomes[digest] for digest in raced[:4]] == [True] * 4
        for digest, committed in outcomes.items():
            if committed:
                assert await exists(s3, digest)
            else:
                assert await repos(s3).manifest_media_type("race/app", digest_of(manifest_doc(digest, []))) is None
        for digest in orphans[6:]:
            assert not await exists(s3, digest)
        assert await keys(s3, "trash/") == []
    finally:
        await node_c.close()


@pytest_twisted.ensureDeferred
async def test_a_run_puts_back_from_its_own_trash_copy(s3: S3Client, node_b: S3Client, monkeypatch: Any) -> None:
    """Both nodes move the blob aside; one purges it, the other must put it back (its node
    claimed it): the purge of one run never takes the copy another run still needs."""
    blob = await put_blob(s3, b"moved by both")
    clock = ahead(2)
    guard = BlobGuard(clock=clock)
    ours = Collector(S3Driver(s3), 0, dry_run=False, guard=guard, clock=clock)
    theirs = Collector(S3Driver(node_b), 0, dry_run=False, clock=clock)

    async def the_other_node_collects_first(key: str) -> None:
        if key == blob_key(blob) and not theirs.started:
            await theirs.collect()

    hook_before(monkeypatch, s3, "delete_object", the_other_node_collects_first)
    remark = ours._remark

    async def claim_then_remark() -> None:
        guard.claim([blob])  # a mount on our node, say
        await remark()

    monkeypatch.setattr(ours, "_remark", claim_then_remark)
    await ours.collect()
    assert [b["digest"] for b in theirs.report()["removed_blobs"]] == [str(blob)]
    assert ours.report()["restored"] == 1
    assert await Blobs(S3Driver(s3), BlobGuard()).read(blob, 100) == b"moved by both"
    assert await keys(s3, "trash/") == []


# -- the report ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_report_has_the_filesystem_collectors_keys(s3: S3Client, tmp_path: Any) -> None:
    filesystem = Collector(FsDriver(str(tmp_path), InlinePool()), 0, dry_run=True)
    filesystem.run()
    collector = Collector(S3Driver(s3), 0, dry_run=True)
    await collector.collect()
    report = collector.report()
    assert set(report) == set(filesystem.report()) | {"restored"}
    assert report["data_dir"] == f"s3://{s3.settings.bucket}/site/"
    assert report["removed_directories"] == 0
    json.dumps(report)
