"""Mark and sweep of an S3 store that several registryd nodes share, while every node serves.

The filesystem collector's rules (``registryd.upkeep.collector``), with one
change: a blob's deletion cannot wait on the BlobGuard of the node that
uses it, so it is made undoable, and undone when the store says so.

1. List ``blobs/``, then mark (``registryd.upkeep.s3_marker``): revisions,
   tags and referrer entries of ``repositories/`` and ``mirror/`` keep what
   they name; links are remembered with their LastModified.
2. Candidates: blobs nothing keeps whose LastModified, every link's and
   this node's last claim are older than ``now - delay``.
3. Move each candidate to ``trash/<run>/<alg>/<2 hex>/<hex>`` (server-side
   copy, then delete of the original; not if a HEAD after the copy shows
   it gone or written again), then mark again. A trashed blob
   that is kept now, that got a new link or (this node) a claim since the
   run began, is copied back; the rest is purged from the trash.
4. Links older than the delay to blobs that are gone are deleted.
5. At the start of a run, trash older than ``max(delay, LEFTOVER_AGE)`` is
   what a crashed run left: restored if kept, purged otherwise.

Why the second mark closes the race with a manifest PUT on another node:
that PUT writes its revision, then HEADs every blob it names (its own
document too), and answers MANIFEST_BLOB_UNKNOWN (removing the revision)
if one is gone; only then does it write tags. If its HEAD
found the blob, the HEAD came before our delete, so the revision was
written before our second mark began: the mark sees it and the blob comes
back. If the HEAD came after our delete, the push fails cleanly. Either way
no committed manifest names a missing blob.

Trash keys carry the run's id, so two collections running at once never
share one: a run only purges what it moved itself, and one that still has
to put a blob back always finds its own copy. Anything in the trash can be
the only copy of a manifest document, so the mark reads documents there
too (a revision committed meanwhile names layers only its document knows).
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Callable, Iterable

import attrs
from twisted.logger import Logger

from registryd.digest import Digest
from registryd.storage.guard import BlobGuard
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.errors import S3Error, S3Unavailable
from registryd.storage.layout import blob_key
from registryd.upkeep.collector import Collection, collection_report
from registryd.storage.s3.listing import BlobEntry, list_blobs
from registryd.upkeep.s3_marker import S3Marker, TrashEntry, each, list_trash, trash_key

log = Logger()

#: Trash younger than this may belong to a collection running on another node;
#: every run must get from its first move to its last restore well within it.
LEFTOVER_AGE = 3600.0


@attrs.define
class S3Collection(Collection):
    """One run's outcome; ``restored``: blobs moved to the trash and put back."""

    restored: int = 0


@attrs.define
class _Moved:
    blob: BlobEntry
    trash: str | None = None    # None in a dry run


class S3Collector:
    """One mark and sweep of the bucket ``client`` works on; ``guard`` is this node's BlobGuard."""

    def __init__(self, client: S3Client, delay: float, dry_run: bool, guard: BlobGuard | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.delay = delay
        self.dry_run = dry_run
        self.guard = guard or BlobGuard()
        self.result = S3Collection()
        self.marker = S3Marker(client)
        self.run_id = uuid.uuid4().hex[:16]
        self.started = 0.0
        self._client = client
        self._clock = clock

    async def run(self) -> S3Collection:
        self.started = self._clock()
        cutoff = self.started - self.delay
        # Blobs are listed before marking: a blob stored later is no
        # candidate, and a manifest committed before the mark is seen by it.
        blobs = await list_blobs(self._client)
        trash = await list_trash(self._client)
        await self.marker.update(trash)
        if not self.dry_run:
            await self._leftovers(trash, set(blobs), self.started - max(self.delay, LEFTOVER_AGE))
        candidates = self._candidates(blobs.values(), cutoff)
        gone: set[Digest] = set()
        if candidates:
            gone = await self._collect(candidates, cutoff)
        await self._sweep_links(set(blobs) - gone, gone, cutoff)
        return self.result

    def report(self) -> dict[str, Any]:
        """The run as one JSON document: the filesystem Collector's, plus ``restored``."""
        settings = self._client.settings
        return {**collection_report(f"s3://{settings.bucket}/{settings.prefix}", self.dry_run, self.delay,
                                    self.result, self.marker),
                "restored": self.result.restored}

    # -- candidates -------------------------------------------------------------

    def _claimed(self, digest: Digest) -> bool:
        claim = self.guard.last_claim(digest)
        return claim is not None and claim >= self.started

    def _candidates(self, blobs: Iterable[BlobEntry], cutoff: float) -> list[BlobEntry]:
        candidates = []
        for blob in blobs:
            if blob.digest in self.marker.keep:
                self.result.kept += 1
                continue
            times = [blob.last_modified, *(link.last_modified for link in self.marker.links.get(blob.digest, []))]
            claim = self.guard.last_claim(blob.digest)
            if any(t is None or t > cutoff for t in times) or (claim is not None and claim > cutoff):
                self.result.young += 1
                continue
            candidates.append(blob)
        return candidates

    def _link_times(self, digest: Digest) -> dict[str, float | None]:
        return {link.key: link.last_modified for link in self.marker.links.get(digest, [])}

    # -- move, mark again, restore or purge ---------------------------------------

    async def _collect(self, candidates: list[BlobEntry], cutoff: float) -> set[Digest]:
        """Steps 3 and 4's input: the digests whose blob is gone (or would be) after this run."""
        links_before = {blob.digest: self._link_times(blob.digest) for blob in candidates}
        unreadable_before = {key for key, _ in self.marker.unreadable}
        moved: dict[Digest, _Moved] = {}
        gone: set[Digest] = set()
        try:
            if self.dry_run:
                moved = {blob.digest: _Moved(blob) for blob in candidates}
            else:
                await each(candidates, lambda blob: self._move(blob, moved, gone))
            if not moved:
                return gone
            await self._remark()
            restore, purge = self._judge(moved, links_before, unreadable_before, cutoff)
            if not self.dry_run:
                await each(restore, self._restore, keep_going=True)
        except BaseException:
            if not self.dry_run:
                await self._put_back(list(moved.values()))
            raise
        failed = set()
        if purge and not self.dry_run:
            failures = await self._client.delete_objects([m.trash for m in purge if m.trash is not None])
            failed = {failure.key for failure in failures}
            for failure in failures:
                log.warn("could not purge {key} from the trash ({code}); a later run purges it",
                         key=failure.key, code=failure.code)
        for m in purge:
            if m.trash not in failed:
                gone.add(m.blob.digest)
                self.result.blobs.append({"digest": str(m.blob.digest), "size": m.blob.size, "path": m.blob.key})
        return gone

    async def _move(self, blob: BlobEntry, moved: dict[Digest, _Moved], gone: set[Digest]) -> None:
        """Copy to this run's trash, then delete the original: unless it vanished, was written
        again since the listing (an upload committed it anew) or was claimed on this node."""
        if self._claimed(blob.digest):
            self.result.young += 1
            return
        key = trash_key(self.run_id, blob.digest)
        try:
            await self._client.copy_large(blob.key, key, blob.size)
            info = await self._client.head_object(blob.key)
        except S3Error as e:
            if e.status != 404:
                await self._drop_copy(key)
                raise
            gone.add(blob.digest)
            return
        except BaseException:
            # Cancelled (an interrupted `registryd gc`) or failed: the original is
            # still in place, so a copy in trash/ would only be clutter.
            await self._drop_copy(key)
            raise
        rewritten = info is not None and (info.last_modified is None or blob.last_modified is None
                                          or info.last_modified >= math.floor(blob.last_modified) + 1)
        if info is None or rewritten or self._claimed(blob.digest):
            await self._client.delete_object(key)
            if info is None:
                gone.add(blob.digest)
            else:
                self.result.young += 1
            return
        # Recorded before the delete: a failure from here on puts it back.
        moved[blob.digest] = _Moved(blob, key)
        await self._client.delete_object(blob.key)

    async def _drop_copy(self, key: str) -> None:
        """Best effort: a copy left behind is purged by a later run anyway."""
        try:
            await self._client.delete_object(key)
        except (S3Error, S3Unavailable):
            pass

    async def _remark(self) -> None:
        """The second mark, once every move is done (tests hook in before it)."""
        await self.marker.update(await list_trash(self._client))

    def _judge(self, moved: dict[Digest, _Moved], links_before: dict[Digest, dict[str, float | None]],
               unreadable_before: set[str], cutoff: float) -> tuple[list[_Moved], list[_Moved]]:
        """(to put back, to purge) after the second mark.

        A revision whose document is nowhere (not in ``blobs/``, not in any
        trash) names blobs we cannot know. An old one is fsck's business, as
        on the filesystem; one written during the run or within the delay is
        a push in flight, and its layers may be among ours: all go back.
        """
        unsure = [key for key, t in self.marker.unreadable
                  if key not in unreadable_before or t is None or t > cutoff]
        if unsure:
            log.warn("revision {key} is new but its manifest is nowhere to be read; "
                     "nothing is removed this run", key=unsure[0])
        restore, purge = [], []
        for digest, m in moved.items():
            if digest in self.marker.keep or unsure:
                self.result.kept += 1
                restore.append(m)
            elif self._link_times(digest) != links_before[digest] or self._claimed(digest):
                self.result.young += 1
                restore.append(m)
            else:
                purge.append(m)
        return restore, purge

    async def _restore(self, m: _Moved) -> None:
        assert m.trash is not None
        if await self._copy_back(m.trash, m.blob.key, m.blob.size):
            self.result.restored += 1
        await self._client.delete_object(m.trash)

    async def _copy_back(self, source: str, key: str, size: int) -> bool:
        try:
            await self._client.copy_large(source, key, size)
            return True
        except S3Error as e:
            if e.status != 404:
                raise
        if await self._client.head_object(key) is None:
            log.error("{key} was to be put back, but its trash copy {source} is gone", key=key, source=source)
        return False

    async def _put_back(self, moved: list[_Moved]) -> None:
        """A run that failed half-way leaves nothing in the trash it could not judge."""
        try:
            await each(moved, self._restore, keep_going=True)
        except Exception as e:
            log.error("garbage collection failed and could not put every moved blob back ({error}); "
                      "the next run restores those still referenced", error=str(e))

    # -- leftovers and links ------------------------------------------------------

    async def _leftovers(self, trash: dict[Digest, list[TrashEntry]], listed: set[Digest], before: float) -> None:
        """What crashed runs left in the trash: kept ones back, the rest purged."""
        restore: list[tuple[Digest, list[TrashEntry]]] = []
        purge: list[tuple[Digest, list[TrashEntry]]] = []
        for digest, entries in trash.items():
            old = [e for e in entries if e.last_modified is not None and e.last_modified <= before]
            if old:
                (restore if digest in self.marker.keep else purge).append((digest, old))

        async def put_back(item: tuple[Digest, list[TrashEntry]]) -> None:
            digest, entries = item
            if digest not in listed and await self._copy_back(entries[0].key, blob_key(digest), entries[0].size):
                self.result.restored += 1
            for entry in entries:
                await self._client.delete_object(entry.key)

        await each(restore, put_back, keep_going=True)
        keys = [entry.key for _, entries in purge for entry in entries]
        failed = {failure.key for failure in await self._client.delete_objects(keys)} if keys else set()
        for digest, entries in purge:
            if digest not in listed and entries[0].key not in failed:
                self.result.blobs.append({"digest": str(digest), "size": entries[0].size, "path": entries[0].key})

    async def _sweep_links(self, listed: set[Digest], gone: set[Digest], cutoff: float) -> None:
        """Links older than the delay whose blob is gone: none in ``blobs/``, none in any trash."""
        stale = {}
        for digest, links in self.marker.links.items():
            if digest in listed or self._claimed(digest):
                continue
            old = [link for link in links if link.last_modified is not None and link.last_modified <= cutoff]
            if old:
                stale[digest] = old
        if not stale:
            return
        # A collection on another node may be about to put one back.
        in_trash = await list_trash(self._client)
        absent: set[Digest] = set()

        async def check(digest: Digest) -> None:
            if (self.dry_run and digest in gone) or await self._client.head_object(blob_key(digest)) is None:
                absent.add(digest)

        await each([digest for digest in stale if digest not in in_trash], check)
        links = sorted((link for digest in absent for link in stale[digest]), key=lambda link: link.key)
        failed = set()
        if links and not self.dry_run:
            failed = {failure.key for failure in await self._client.delete_objects([link.key for link in links])}
        for link in links:
            if link.key not in failed:
                self.result.links.append({"repository": link.repository, "digest": str(link.digest),
                                          "path": link.key})
