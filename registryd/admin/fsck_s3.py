"""``registryd fsck [--repair]`` on the S3 driver: the data directory's checks and repair, on a bucket.

The rules are registryd.admin.fsck_rules' (``Checker``); this module reads the
bucket for them. Every key is listed once, with its size and LastModified,
one top-level prefix after the other:

1. ``blobs/``: each blob is streamed through a hasher (BLOB_CONCURRENCY at a
   time, never held in memory) and compared with the digest it is stored
   under.
2. ``trash/``: blobs a garbage collection set aside. The collection puts
   back what is still referenced and purges the rest, so a blob found only
   there counts as present, and each run's folder is one line of
   information.
3. ``repositories/`` and ``mirror/``: tags, revisions and referrer entries
   are read (small objects), and each repository is checked by the rules
   (REPOSITORY_CONCURRENCY at a time; the report keeps their order). As on
   the filesystem these are listed after the blobs were hashed, so a blob or
   a key the rules do not find in the listings is looked for again (a HEAD)
   before it counts as missing: a node may have written it since. A key
   deleted between the listing and its read is simply gone.
4. ``uploads/`` and anything else: information only. Upload sessions
   untouched for longer than ``upload_expiry`` are the servers' to remove.
   ``quarantine/`` (earlier repairs) is not looked at.

``--repair`` moves each damaged object to ``quarantine/<UTC timestamp>/<key>``
(under the configured prefix): a server-side copy, and the delete of the
original only once the copy is there. It looks whether the finding still
holds (the blob is the one hashed, the tag says what it said, the content is
still missing) right before the copy, and again before the delete, and
leaves the object alone if not. S3 has no conditional delete, so a node
could still write the key between that last look and the delete, as for
registryd.upkeep.s3_collector; the window is one request. The quarantine
folder is claimed by writing its fsck.json with If-None-Match first, so two
repairs never share one.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Any, Callable

import attrs

from registryd.admin import AdminError
from registryd.admin.fsck_rules import (
    BlobState,
    BlobUnchanged,
    Checker,
    ContentMissing,
    Move,
    Recheck,
    TagUnchanged,
    finish,
    plural,
    quarantine_names,
)
from registryd.admin.progress import Progress
from registryd.admin.store_access import run_with_store
from registryd.config import Config
from registryd.digest import Digest
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.documents import ObjectEntry
from registryd.storage.s3.errors import ObjectTooLarge, S3Error, S3Unavailable
from registryd.storage.s3.listing import BlobEntry, list_blobs
from registryd.storage.s3.upload_state import HashSink
from registryd.storage import layout
from registryd.storage.layout import BLOBS, MIRROR, REPOSITORIES, UPLOADS, blob_key
from registryd.storage.s3.upload_state import session_of
from registryd.storage.scan import (
    Repository,
    RepositoryScan,
    Revision,
    Tag,
    digest_or_none,
    parse_referrer,
    parse_revision,
    parse_tag,
)
from registryd.deferreds import bounded_each
from registryd.units import human_size
from registryd.upkeep.s3_collector import LEFTOVER_AGE
from registryd.upkeep.s3_marker import (
    TRASH,
    RepositoryKey,
    TrashEntry,
    list_trash,
    read_document,
    split_repository_key,
)

QUARANTINE = "quarantine/"
#: Top-level folders of a registryd bucket (``_registryd/`` holds the readiness probe's key).
LAYOUT = (BLOBS, REPOSITORIES, MIRROR, UPLOADS, TRASH, QUARANTINE, "_registryd/")
#: Blobs streamed through a hasher at once.
BLOB_CONCURRENCY = 4
#: Repositories checked at once; each reads its small objects READ_CONCURRENCY at a time.
REPOSITORY_CONCURRENCY = 4
READ_CONCURRENCY = 8
#: Tags, revisions and referrer entries are tiny; anything past this is no such thing.
METADATA_LIMIT = 4 * 1024 * 1024


class _Hashing(HashSink):
    """Hashes a blob as its GET delivers it (one chunk at a time), and moves the progress bar."""

    def __init__(self, algorithm: str, progress: Progress) -> None:
        super().__init__(hashlib.new(algorithm))
        self._progress = progress

    def write(self, data: bytes) -> None:
        super().write(data)
        self._progress.advance(size=len(data))


@attrs.define
class _Keys:
    """One repository's keys in the listing, before its small objects are read."""

    repository: Repository
    links: dict[Digest, str] = attrs.field(factory=dict)
    revisions: dict[Digest, str] = attrs.field(factory=dict)
    tags: dict[str, str] = attrs.field(factory=dict)
    referrers: list[tuple[Digest | None, str]] = attrs.field(factory=list)
    unexpected: list[str] = attrs.field(factory=list)
    #: Only a ``_manifests`` or ``_blobs`` key makes a repository (as on disk and in the catalog).
    real: bool = False

    def add(self, place: RepositoryKey, key: str) -> None:
        rest = place.rest
        if place.marker in layout.MARKERS:
            self.real = True
        if place.marker == layout.LINKS_MARKER and len(rest) == 2 and (digest := digest_or_none(*rest)) is not None:
            self.links[digest] = key
        elif place.marker == layout.MANIFESTS_MARKER and len(rest) == 3 and rest[0] == layout.REVISIONS_FOLDER \
                and (digest := digest_or_none(rest[1], rest[2])) is not None:
            self.revisions[digest] = key
        elif place.marker == layout.MANIFESTS_MARKER and len(rest) == 2 and rest[0] == layout.TAGS_FOLDER and rest[1]:
            self.tags[rest[1]] = key
        elif place.marker == layout.REFERRERS_MARKER and len(rest) == 3:
            self.referrers.append((digest_or_none(rest[0], rest[1]), key))
        elif place.marker != layout.PULLS_MARKER:
            self.unexpected.append(key)


# The small objects, as registryd.storage.scan reads their files; ``data`` None: too large to be one.

def _revision(digest: Digest, key: str, data: bytes | None) -> Revision:
    if data is None:
        return Revision(digest, key, None, 'the revision file is not JSON {"mediaType": ...}')
    return parse_revision(digest, key, data)


def _tag(name: str, key: str, data: bytes | None) -> Tag:
    if data is None:
        return Tag(name, key, None, f"the tag file does not hold a digest: it is larger than {METADATA_LIMIT} bytes")
    return parse_tag(name, key, data)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class S3Fsck(Checker):
    """One run over a bucket: findings, and the moves a repair would make (a StoreView of its own)."""

    def __init__(self, client: S3Client, namespaces: dict[str, str], upload_expiry: float, gc_delay: float,
                 stream: Any = None, progress: bool | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(self)
        self.client = client
        self.namespaces = namespaces      # mirror folder -> upstream namespace
        self.upload_expiry = upload_expiry
        self.gc_delay = gc_delay
        self.stream = stream if stream is not None else sys.stderr
        self.progress_enabled = progress
        self.trash: dict[Digest, list[TrashEntry]] = {}
        self.sizes: dict[str, int] = {}
        self._clock = clock
        self._present: dict[Digest, bool] = {}
        self._trash_now: set[Digest] = set()

    # --- StoreView: keys, looked for again where a node may have written them since the listing

    def rel(self, path: str) -> str:
        return path

    async def appeared(self, digest: Digest) -> bool:
        if digest in self.trash:
            return True  # a collection puts it back if it is referenced
        present = self._present.get(digest)
        if present is None:
            present = self._present[digest] = await self.client.head_object(blob_key(digest)) is not None
        return present

    async def manifest(self, digest: Digest) -> bytes | None:
        try:
            return await read_document(self.client, digest, self.trash)
        except ObjectTooLarge:
            # The API reads no manifest past this size either: it cannot be parsed.
            return b""

    async def exists(self, path: str) -> bool:
        return await self.client.head_object(path) is not None

    # --- the run ------------------------------------------------------------------

    async def check(self) -> None:
        top = [entry async for entry in self.client.list_objects("", delimiter="/")]
        await self.check_blobs()
        # Read before the repositories: a blob found only in the trash counts as there.
        self.trash = await list_trash(self.client)
        await self.check_repositories()
        self.check_trash()
        await self.check_uploads()
        await self.check_elsewhere(top)

    def _progress(self, label: str, items: int, size: int) -> Progress:
        return Progress(f"registryd fsck: {label}", items, size, self.stream, self.progress_enabled)

    async def _small(self, key: str) -> tuple[bool, bytes | None]:
        """(found, its bytes); None for the bytes of an object too large to be a tag or revision."""
        try:
            data = await self.client.get_small(key, METADATA_LIMIT)
        except ObjectTooLarge:
            return True, None
        return data is not None, data

    # --- blobs ------------------------------------------------------------------

    async def check_blobs(self) -> None:
        unexpected: list[ObjectEntry] = []
        blobs = sorted((await list_blobs(self.client, unexpected)).values(), key=lambda b: b.key)
        for entry in unexpected:
            self.unexpected_blob(entry.key)
        states: dict[Digest, BlobState] = {}
        progress = self._progress("re-hashing blobs", len(blobs), sum(b.size for b in blobs))
        try:
            await bounded_each(blobs, lambda blob: self._hash(blob, progress, states), BLOB_CONCURRENCY)
        finally:
            progress.close()
        for blob in blobs:  # in key order, whichever finished first
            self.sizes[blob.key] = blob.size
            state = states.get(blob.digest)
            if state is not None:  # else removed while we looked (a collection)
                self.blob_checked(blob.digest, state)

    async def _hash(self, blob: BlobEntry, progress: Progress, states: dict[Digest, BlobState]) -> None:
        sink = _Hashing(blob.digest.algorithm, progress)
        try:
            info = await self.client.get_object(blob.key, sink)
        except S3Error as e:
            if e.status != 404:
                raise
            return
        finally:
            progress.advance(items=1)
        actual = Digest(blob.digest.algorithm, sink.hasher.hexdigest())
        # ETag and Last-Modified as a HEAD shows them: the repair's "still the object we hashed?"
        identity = (info.etag, info.last_modified)
        if actual == blob.digest:
            states[blob.digest] = BlobState(blob.key, sink.received, True, str(actual), identity)
        else:
            states[blob.digest] = BlobState(blob.key, sink.received, False, f"its content hashes to {actual}",
                                            identity)

    # --- repositories -------------------------------------------------------------

    def _repository(self, place: RepositoryKey) -> Repository:
        root = place.root.rstrip("/")
        if place.folder is None:
            return Repository(place.remote, place.remote, None, root)
        # As DataDir.namespace: the config's upstreams name their folders; else only a port's ':' is '_'.
        namespace = self.namespaces.get(place.folder) or place.folder.replace("_", ":")
        return Repository(f"{namespace}/{place.remote}", place.remote, namespace, root)

    async def check_repositories(self) -> None:
        found: dict[tuple[str, str], _Keys] = {}
        outside: list[str] = []
        for root in (REPOSITORIES, MIRROR):
            async for entry in self.client.list_objects(root):
                self.sizes[entry.key] = entry.size
                place = split_repository_key(entry.key)
                if place is None:
                    outside.append(entry.key)
                    continue
                keys = found.get((place.root, place.remote))
                if keys is None:
                    keys = found[(place.root, place.remote)] = _Keys(self._repository(place))
                keys.add(place, entry.key)
        # Local repositories by name, then each mirror folder's (as DataDir.repositories).
        ordered = sorted((keys for keys in found.values() if keys.real),
                         key=lambda k: (k.repository.upstream is not None, k.repository.root, k.repository.remote))
        for keys in found.values():
            if not keys.real:
                outside.extend(sorted([*keys.links.values(), *keys.revisions.values(), *keys.tags.values(),
                                       *(key for _, key in keys.referrers), *keys.unexpected]))
        parts: dict[int, Checker] = {}
        progress = self._progress("checking repositories", len(ordered), 0)

        async def check(item: tuple[int, _Keys]) -> None:
            index, keys = item
            part = self.part()
            await part.check_repository(await self._scan(keys))
            parts[index] = part
            progress.advance(items=1)

        try:
            await bounded_each(enumerate(ordered), check, REPOSITORY_CONCURRENCY)
        finally:
            progress.close()
        for index in range(len(ordered)):
            self.merge(parts[index])
        for key in sorted(outside):
            self.info("unexpected", key, "not part of any repository; left alone", key)

    async def _scan(self, keys: _Keys) -> RepositoryScan:
        """The repository's small objects, read; those deleted since the listing are left out."""
        read: dict[str, tuple[bool, bytes | None]] = {}
        wanted = [*keys.revisions.values(), *keys.tags.values(),
                  *(key for subject, key in keys.referrers if subject is not None)]

        async def fetch(key: str) -> None:
            read[key] = await self._small(key)

        await bounded_each(wanted, fetch, READ_CONCURRENCY)
        scan = RepositoryScan(keys.repository, dict(keys.links), unexpected=list(keys.unexpected))
        for digest, key in keys.revisions.items():
            found, data = read[key]
            if found:
                scan.revisions[digest] = _revision(digest, key, data)
        for name, key in sorted(keys.tags.items()):
            found, data = read[key]
            if found:
                scan.tags.append(_tag(name, key, data))
        for subject, key in keys.referrers:
            found, data = read.get(key, (True, b""))
            if found:
                scan.referrers.append(parse_referrer(subject, key, data))
        return scan

    # --- what the servers clean up themselves -------------------------------------

    def check_trash(self) -> None:
        runs: dict[str, list[TrashEntry]] = {}
        for entries in self.trash.values():
            for entry in entries:
                runs.setdefault(entry.run, []).append(entry)
        stopped = self._clock() - max(self.gc_delay, LEFTOVER_AGE)
        for run, entries in sorted(runs.items()):
            since = min((e.last_modified for e in entries if e.last_modified is not None), default=None)
            what = f"{plural(len(entries), 'blob')} ({human_size(sum(e.size for e in entries))})"
            if since is not None and since < stopped:
                message = (f"{what} set aside on {_when(since)} by a garbage collection that stopped: the next "
                           f"collection puts back what is still referenced and purges the rest")
            else:
                message = (f"{what} set aside by a garbage collection in progress: it puts back what is "
                           f"still referenced and purges the rest")
            self.info("trash", f"{TRASH}{run}/", message, f"{TRASH}{run}/")

    async def check_uploads(self) -> None:
        newest: dict[str, float] = {}
        async for entry in self.client.list_objects(UPLOADS):
            upload_id = session_of(entry.key)
            if upload_id is not None:
                newest[upload_id] = max(newest.get(upload_id, 0.0), entry.last_modified or 0.0)
        cutoff = self._clock() - self.upload_expiry
        for upload_id, when in sorted(newest.items()):
            if when < cutoff:
                folder = f"{UPLOADS}{upload_id}/"
                self.info("upload-expired", folder, f"an upload session untouched since {_when(when)}, past "
                          f"upload_expiry ({self.upload_expiry:g} s): a server removes it", folder)

    async def check_elsewhere(self, top: list[ObjectEntry]) -> None:
        """Keys outside the folders of registryd's layout (one line per top-level folder)."""
        for entry in top:
            if entry.key in LAYOUT:
                continue
            if not entry.is_prefix:
                self.info("unexpected", entry.key, "not part of registryd's layout; left alone", entry.key)
                continue
            count = 0
            async for _ in self.client.list_objects(entry.key):
                count += 1
            self.info("unexpected", entry.key, f"{plural(count, 'object')} outside registryd's layout; "
                      f"left alone", entry.key)

    # --- repair -----------------------------------------------------------------

    async def still_damaged(self, recheck: Recheck | None) -> bool:
        if isinstance(recheck, BlobUnchanged):
            info = await self.client.head_object(recheck.state.path)
            return info is not None and (info.etag, info.last_modified) == recheck.state.identity
        if isinstance(recheck, ContentMissing):
            return (recheck.digest not in self._trash_now
                    and await self.client.head_object(blob_key(recheck.digest)) is None)
        if isinstance(recheck, TagUnchanged):
            found, data = await self._small(recheck.tag.path)
            return found and _tag(recheck.tag.name, recheck.tag.path, data) == recheck.tag
        return True

    async def repair(self) -> tuple[str | None, list[dict[str, str]]]:
        """Move every damaged object into a new quarantine folder; what moved."""
        moves = self.ordered_moves()
        if not moves:
            return None, []
        quarantine = await self._claim_quarantine()
        self._trash_now = set(await list_trash(self.client))
        moved: list[dict[str, str]] = []
        for move in moves:
            target = f"{quarantine}/{move.path}"
            if await self._move(move, target):
                moved.append({"kind": move.kind, "path": move.path, "moved_to": target, "reason": move.reason})
        await self.client.put_object(f"{quarantine}/fsck.json", self.quarantine_report(moved),
                                     content_type="application/json")
        return quarantine, moved

    async def _move(self, move: Move, target: str) -> bool:
        if not await self.still_damaged(move.recheck):
            return False  # repaired or replaced meanwhile (a running node)
        try:
            await self.client.copy_large(move.path, target, self.sizes.get(move.path, 0))
        except S3Error as e:
            if e.status != 404:
                raise
            return False  # gone meanwhile
        if not await self.still_damaged(move.recheck):
            await self.client.delete_object(target)
            return False
        await self.client.delete_object(move.path)
        return True

    async def _claim_quarantine(self) -> str:
        for name in quarantine_names():
            folder = f"{QUARANTINE}{name}"
            try:
                await self.client.put_object(f"{folder}/fsck.json", self.quarantine_report([]),
                                             if_none_match=True, content_type="application/json")
            except S3Error as e:
                if e.code != "PreconditionFailed":
                    raise
                continue
            return folder
        raise AdminError(f"cannot claim a quarantine folder under {QUARANTINE}")


def run_s3(config: Config, args: argparse.Namespace) -> int:
    """``registryd fsck`` on the bucket ``config`` names (exit status 3 when it cannot be done)."""
    namespaces = layout.namespace_folders(u.namespace for u in config.upstreams)

    async def main(store: Any, reactor: Any) -> tuple[S3Fsck, str, str | None, list[dict[str, str]]]:
        fsck = S3Fsck(store.client, namespaces, config.upload_expiry, config.gc_delay)
        location = store.location()
        try:
            await fsck.check()
            quarantine, moved = await fsck.repair() if args.repair else (None, [])
        except (S3Error, S3Unavailable) as e:
            raise AdminError(f"{location}: {e}") from None
        return fsck, location, quarantine, moved

    fsck, location, quarantine, moved = run_with_store(config, main)
    return finish(fsck, location, args, quarantine, moved, moved_what="objects")

