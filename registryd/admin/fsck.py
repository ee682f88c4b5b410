"""``registryd fsck [--repair]``: re-hash every blob, check every repository.

The rules (``Checker``): what is damage and what is information, how each
finding reads, which files a repair moves and what it looks at again right
before moving one. The reader (``StoreFsck``) lists and reads the store
over its storage driver, so one run works on a data directory, a bucket or
memory alike.

Checking only reads. Repairing only moves damaged files into
``quarantine/<timestamp>/`` (same relative path; a rename on the same
filesystem, a server-side copy and then a delete in a bucket), in an order
that keeps the store consistent for a running server at every step: tags,
then referrer entries, then manifest revisions, then blob links, then blobs.
Nothing is ever deleted that was not copied first.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import sys
import time
from typing import Any, Callable, Iterator, Protocol, Union

import attrs

from registryd.admin import EXIT_DAMAGE, EXIT_OK, AdminError
from registryd.admin.fsck_rules import (
    BlobState,
    BlobUnchanged,
    Checker,
    ContentMissing,
    Finding,
    Move,
    Recheck,
    StoreView,
    TagUnchanged,
    finish,
    plural,
    quarantine_names,
)
from registryd.admin.progress import Progress
from registryd.admin.store_access import add_store_arguments, load_admin_config, run_with_store, store_errors_reported
from registryd.deferreds import bounded_each
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import Manifest, parse_manifest
from registryd.storage.driver import Driver, Entry, TooLarge
from registryd.storage.driver import finish as completed
from registryd.storage import layout
from registryd.storage.layout import (
    BLOBS, LINKS_MARKER, MANIFESTS_MARKER, MARKERS, MIRROR, PULLS_MARKER, REFERRERS_MARKER, REPOSITORIES,
    REVISIONS_FOLDER, TAGS_FOLDER, TMP, TRASH, UPLOADS, blob_key, folder_namespace,
)
from registryd.storage.listing import BlobEntry, list_blobs
from registryd.storage.interface import Store
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
from registryd.units import human_size
from registryd.upkeep.collector import LEFTOVER_AGE
from registryd.upkeep.marker import (
    CONCURRENCY,
    RepositoryKey,
    TrashEntry,
    list_trash,
    read_document,
    split_repository_key,
)


DESCRIPTION = """\
Check the store the config names (the data directory, or the S3 bucket of
[storage] driver = "s3"): re-hash every blob (streamed, so any size works)
and compare it with the digest it is stored under; check that every manifest
revision's content exists and parses, that every tag points at a manifest the
repository has, that every blob a manifest references is there (linked in the
repository, content present and intact), that an image index's manifests are
in the repository, and that referrer entries and blob links are not dangling.
Each problem is one line on standard output. A progress bar goes to standard
error when it is a terminal.

Non-distributable (foreign) layers need not be there. In mirrored
repositories, blobs and manifests not fetched yet are fine (the cache fills
on demand): they are counted as "not cached", which is information, not
damage; so is a manifest kept exactly as the upstream sent it that does not
parse, and so is anything found where the store keeps its content that is
not part of its layout (it is left alone). Upload sessions past their
expiry and blobs a garbage collection set aside in trash/ are information
too: the servers remove those sessions, and a collection puts back what is
still referenced and purges the rest.

With --repair, damaged files are moved into quarantine/<UTC timestamp>/ of
the data directory (or of the bucket, under its prefix), under their path in
the store: corrupted blobs; manifest revisions whose content is gone,
corrupted or unusable (a local image whose blob is missing, a local index
whose manifest is missing), with their tags and referrer entries; dangling
tags, referrer entries and blob links. Nothing is lost (in a bucket an
original is deleted only once its copy is in quarantine/); fsck.json in that
folder says why each file is there. Afterwards the store is consistent and a
second fsck is clean; push a quarantined image again to restore it (mirrored
content is fetched again on demand).

fsck is safe while the server is stopped, and alongside a running server
(with S3: every node that shares the bucket): without --repair it only reads;
--repair only renames (in a bucket: copies each object to quarantine/, then
deletes the original), and leaves alone a tag or blob that changed since it
was checked, or content that reappeared: it looks again right before each
move. Pushes and deletes made during the run can show up as problems that
are gone by the next run: run fsck again before acting on them."""

EPILOG = """\
exit status:
  0  the store is clean (information such as "not cached" does not count)
  1  damage was found (with --repair: and moved to quarantine; run fsck again)
  2  bad arguments
  3  the check could not be done: missing or unreadable data directory, bad
     config file, permission denied, a rename that failed; with S3: the
     bucket cannot be reached, or refuses a listing, a read or a copy"""

# Order of the moves: what points at something goes before what it points at.
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--repair", action="store_true",
                        help="move damaged files into quarantine/<timestamp>/ of the data directory or "
                             "bucket (renames only; in a bucket: copy, then delete)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")





QUARANTINE = "quarantine/"
#: Top-level folders of a registryd store (``_registryd/`` holds a bucket's readiness probe's key,
#: ``tmp/`` a data directory's files being written).
LAYOUT = (BLOBS, REPOSITORIES, MIRROR, UPLOADS, TRASH, QUARANTINE, "_registryd/", TMP)
#: Blobs streamed through a hasher at once.
BLOB_CONCURRENCY = 4
#: Repositories checked at once; each reads its small objects READ_CONCURRENCY at a time.
REPOSITORY_CONCURRENCY = 4
READ_CONCURRENCY = 8
#: Tags, revisions and referrer entries are tiny; anything past this is no such thing.
METADATA_LIMIT = 4 * 1024 * 1024


@attrs.define
class _Keys:
    """One repository's keys in the listing, before its small objects are read."""

    repository: Repository
    links: dict[Digest, str] = attrs.field(factory=dict)
    revisions: dict[Digest, str] = attrs.field(factory=dict)
    tags: dict[str, str] = attrs.field(factory=dict)
    referrers: list[tuple[Digest | None, str]] = attrs.field(factory=list)
    unexpected: list[str] = attrs.field(factory=list)
    #: Only a ``_manifests`` or ``_blobs`` key makes a repository (as in the catalog).
    real: bool = False

    def add(self, place: RepositoryKey, key: str) -> None:
        rest = place.rest
        if place.marker in MARKERS:
            self.real = True
        if place.marker == LINKS_MARKER and len(rest) == 2 and (digest := digest_or_none(*rest)) is not None:
            self.links[digest] = key
        elif place.marker == MANIFESTS_MARKER and len(rest) == 3 and rest[0] == REVISIONS_FOLDER \
                and (digest := digest_or_none(rest[1], rest[2])) is not None:
            self.revisions[digest] = key
        elif place.marker == MANIFESTS_MARKER and len(rest) == 2 and rest[0] == TAGS_FOLDER and rest[1]:
            self.tags[rest[1]] = key
        elif place.marker == REFERRERS_MARKER and len(rest) == 3:
            self.referrers.append((digest_or_none(rest[0], rest[1]), key))
        elif place.marker != PULLS_MARKER:
            self.unexpected.append(key)


# The small values, as registryd.storage.scan reads them; ``data`` None: too large to be one.

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


def _identity(entry: Entry) -> tuple[str, float | None]:
    """What tells the value hashed from one written since (a file's inode and mtime; an ETag and Last-Modified)."""
    return (entry.version, entry.modified)


class StoreFsck(Checker):
    """One run over the store a driver holds (a data directory, a bucket, memory): findings, and
    the moves a repair would make. A StoreView of its own.

    Every key is listed once, with its size and time, one top-level folder after the other:

    1. ``blobs/``: each blob is streamed through a hasher (BLOB_CONCURRENCY at a
       time, never held in memory) and compared with the digest it is stored under.
    2. ``trash/``: blobs a garbage collection set aside. The collection puts
       back what is still referenced and purges the rest, so a blob found only
       there counts as present, and each run's folder is one line of information.
    3. ``repositories/`` and ``mirror/``: tags, revisions and referrer entries
       are read (small values), and each repository is checked by the rules
       (REPOSITORY_CONCURRENCY at a time; the report keeps their order). These
       are listed after the blobs were hashed, so a blob or a key the rules do
       not find in the listings is looked for again before it counts as
       missing: a server may have written it since. A key deleted between the
       listing and its read is simply gone.
    4. ``uploads/`` and anything else: information only. Upload sessions
       untouched for longer than ``upload_expiry`` are the servers' to remove.
       ``quarantine/`` (earlier repairs) is not looked at.

    ``repair`` moves each damaged value to ``quarantine/<UTC timestamp>/<key>``
    through the driver (a rename on disk; a server-side copy, then the delete
    of the original, in a bucket). It looks whether the finding still holds
    (the blob is the one hashed, the tag says what it said, the content is
    still missing) right before the move, and the move itself leaves alone a
    value written again since that look. The quarantine folder is claimed by
    writing its fsck.json only if absent first, so two repairs never share one.
    """

    def __init__(self, driver: Driver, namespaces: dict[str, str], upload_expiry: float, gc_delay: float,
                 stream: Any = None, progress: bool | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(self)
        self.driver = driver
        self.namespaces = namespaces      # mirror folder -> upstream namespace
        self.upload_expiry = upload_expiry
        self.gc_delay = gc_delay
        self.stream = stream if stream is not None else sys.stderr
        self.progress_enabled = progress
        self.trash: dict[Digest, list[TrashEntry]] = {}
        self._clock = clock
        self._present: dict[Digest, bool] = {}
        self._trash_now: set[Digest] = set()

    @property
    def unit(self) -> str:
        """What the store's values are, for the report: files on disk, objects elsewhere."""
        return "files" if self.driver.local_path(QUARANTINE + "fsck.json") is not None else "objects"

    async def run(self, repair: bool) -> tuple[str | None, list[dict[str, str]]]:
        """``check``, then ``repair`` if asked: whole in one worker thread over the driver's threaded
        twin when it has one (thousands of stats and reads, one thread hop)."""
        twin = self.driver.threaded()
        if twin is None:
            return await self._check_and_repair(repair)
        blocking, pool = twin
        driver, self.driver = self.driver, blocking
        try:
            return await pool.run(lambda: completed(self._check_and_repair(repair)))
        finally:
            self.driver = driver

    async def _check_and_repair(self, repair: bool) -> tuple[str | None, list[dict[str, str]]]:
        await self.check()
        return await self.repair() if repair else (None, [])

    # --- StoreView: keys, looked for again where a server may have written them since the listing

    def rel(self, path: str) -> str:
        return path

    async def appeared(self, digest: Digest) -> bool:
        if digest in self.trash:
            return True  # a collection puts it back if it is referenced
        present = self._present.get(digest)
        if present is None:
            present = self._present[digest] = await self.driver.stat(blob_key(digest)) is not None
        return present

    async def manifest(self, digest: Digest) -> bytes | None:
        try:
            return await read_document(self.driver, digest, self.trash)
        except TooLarge:
            # The API reads no manifest past this size either: it cannot be parsed.
            return b""

    async def exists(self, path: str) -> bool:
        return await self.driver.stat(path) is not None

    # --- the run ------------------------------------------------------------------

    async def check(self) -> None:
        top = [entry async for entry in self.driver.list("", delimiter="/")]
        await self.check_blobs()
        # Read before the repositories: a blob found only in the trash counts as there.
        self.trash = await list_trash(self.driver)
        await self.check_repositories()
        self.check_trash()
        await self.check_uploads()
        await self.check_elsewhere(top)

    def _progress(self, label: str, items: int, size: int) -> Progress:
        return Progress(f"registryd fsck: {label}", items, size, self.stream, self.progress_enabled)

    async def _small(self, key: str) -> tuple[bool, bytes | None]:
        """(found, its bytes); None for the bytes of a value too large to be a tag or revision."""
        try:
            data = await self.driver.read(key, METADATA_LIMIT)
        except TooLarge:
            return True, None
        return data is not None, data

    # --- blobs ------------------------------------------------------------------

    async def check_blobs(self) -> None:
        unexpected: list[Entry] = []
        blobs = sorted((await list_blobs(self.driver, unexpected)).values(), key=lambda b: b.key)
        for entry in unexpected:
            self.unexpected_blob(entry.key)
        states: dict[Digest, BlobState] = {}
        progress = self._progress("re-hashing blobs", len(blobs), sum(b.size for b in blobs))
        try:
            await bounded_each(blobs, lambda blob: self._hash(blob, progress, states), BLOB_CONCURRENCY)
        finally:
            progress.close()
        for blob in blobs:  # in key order, whichever finished first
            state = states.get(blob.digest)
            if state is not None:  # else removed while we looked (a collection)
                self.blob_checked(blob.digest, state)

    async def _hash(self, blob: BlobEntry, progress: Progress, states: dict[Digest, BlobState]) -> None:
        hasher = hashlib.new(blob.digest.algorithm)
        received = [0]

        def write(data: bytes) -> None:
            hasher.update(data)
            received[0] += len(data)
            progress.advance(size=len(data))

        try:
            read = await self.driver.stream(blob.key, write)
        except PermissionError:
            raise  # the command cannot do its job: one line, exit status 3
        except OSError as e:
            # A disk that fails to read this file: damage to this blob, not the end of the check.
            states[blob.digest] = BlobState(blob.key, blob.size, False, f"cannot be read: {e.strerror}",
                                            _identity(blob.entry))
            return
        finally:
            progress.advance(items=1)
        if read is None:
            return
        actual = Digest(blob.digest.algorithm, hasher.hexdigest())
        if actual == blob.digest:
            states[blob.digest] = BlobState(blob.key, received[0], True, str(actual), _identity(read))
        else:
            states[blob.digest] = BlobState(blob.key, received[0], False, f"its content hashes to {actual}",
                                            _identity(read))

    # --- repositories -------------------------------------------------------------

    def _repository(self, place: RepositoryKey) -> Repository:
        root = place.root.rstrip("/")
        if place.folder is None:
            return Repository(place.remote, place.remote, None, root)
        namespace = folder_namespace(place.folder, self.namespaces)
        return Repository(f"{namespace}/{place.remote}", place.remote, namespace, root)

    async def check_repositories(self) -> None:
        found: dict[tuple[str, str], _Keys] = {}
        outside: list[str] = []
        for root in (REPOSITORIES, MIRROR):
            async for entry in self.driver.list(root):
                place = split_repository_key(entry.key)
                if place is None:
                    outside.append(entry.key)
                    continue
                keys = found.get((place.root, place.remote))
                if keys is None:
                    keys = found[(place.root, place.remote)] = _Keys(self._repository(place))
                keys.add(place, entry.key)
        # Local repositories by name, then each mirror folder's.
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
        """The repository's small values, read; those deleted since the listing are left out."""
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
        async for entry in self.driver.list(UPLOADS):
            upload_id = layout.session_of(entry.key)
            if upload_id is not None:
                newest[upload_id] = max(newest.get(upload_id, 0.0), entry.modified or 0.0)
        cutoff = self._clock() - self.upload_expiry
        for upload_id, when in sorted(newest.items()):
            if when < cutoff:
                folder = f"{UPLOADS}{upload_id}/"
                self.info("upload-expired", folder, f"an upload session untouched since {_when(when)}, past "
                          f"upload_expiry ({self.upload_expiry:g} s): a server removes it", folder)

    async def check_elsewhere(self, top: list[Entry]) -> None:
        """Keys outside the folders of registryd's layout (one line per top-level folder that holds any)."""
        for entry in top:
            if entry.key in LAYOUT:
                continue
            if not entry.is_prefix:
                self.info("unexpected", entry.key, "not part of registryd's layout; left alone", entry.key)
                continue
            count = 0
            async for _ in self.driver.list(entry.key):
                count += 1
            if count:  # an empty directory on disk holds nothing
                self.info("unexpected", entry.key, f"{plural(count, 'object')} outside registryd's layout; "
                          f"left alone", entry.key)

    # --- repair -----------------------------------------------------------------

    async def still_damaged(self, recheck: Recheck | None, now: Entry) -> bool:
        """Does the finding still hold, for the value ``now`` describes (just looked at)?"""
        if isinstance(recheck, BlobUnchanged):
            return _identity(now) == recheck.state.identity
        if isinstance(recheck, ContentMissing):
            return (recheck.digest not in self._trash_now
                    and await self.driver.stat(blob_key(recheck.digest)) is None)
        if isinstance(recheck, TagUnchanged):
            found, data = await self._small(recheck.tag.path)
            return found and _tag(recheck.tag.name, recheck.tag.path, data) == recheck.tag
        return True

    async def repair(self) -> tuple[str | None, list[dict[str, str]]]:
        """Move every damaged value into a new quarantine folder; what moved."""
        moves = self.ordered_moves()
        if not moves:
            return None, []
        quarantine = await self._claim_quarantine()
        self._trash_now = set(await list_trash(self.driver))
        moved: list[dict[str, str]] = []
        for move in moves:
            target = f"{quarantine}/{move.path}"
            if await self._move(move, target, quarantine):
                moved.append({"kind": move.kind, "path": move.path, "moved_to": target, "reason": move.reason})
        await self.driver.write(f"{quarantine}/fsck.json", self.quarantine_report(moved))
        return quarantine, moved

    async def _move(self, move: Move, target: str, quarantine: str) -> bool:
        now = await self.driver.stat(move.path)
        if now is None or not await self.still_damaged(move.recheck, now):
            return False  # gone, repaired or replaced meanwhile (a running server)
        try:
            # Only the value just looked at: one written again since stays where it is.
            return await self.driver.move(move.path, target, expect=now)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise AdminError(f"cannot move {move.path} into {quarantine}: it is on another filesystem") from None
            raise

    async def _claim_quarantine(self) -> str:
        for name in quarantine_names():
            folder = f"{QUARANTINE}{name}"
            if await self.driver.write(f"{folder}/fsck.json", self.quarantine_report([]), if_absent=True):
                return folder
        raise AdminError(f"cannot claim a quarantine folder under {QUARANTINE}")


def run(args: argparse.Namespace) -> int:
    """``registryd fsck`` on the store the config names (exit status 3 when it cannot be done)."""
    config = load_admin_config(args)
    namespaces = {u.namespace.replace(":", "_"): u.namespace for u in config.upstreams}

    async def main(store: Store, reactor: Any) -> tuple[StoreFsck, str, str | None, list[dict[str, str]]]:
        fsck = StoreFsck(store.objects, namespaces, config.upload_expiry, config.gc_delay)
        location = fsck.driver.location
        with store_errors_reported(location):
            quarantine, moved = await fsck.run(args.repair)
        return fsck, location, quarantine, moved

    fsck, location, quarantine, moved = run_with_store(config, main)
    return finish(fsck, location, args, quarantine, moved, moved_what=fsck.unit)
