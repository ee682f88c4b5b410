"""Garbage collection of the blob store, over any storage driver, safe across processes and nodes.

One protocol for the data directory, an S3 bucket every node shares, and
memory (unit tests); it is chosen by nothing but the driver given. Run by
``registryd gc`` and by the server (every ``[gc] interval``, and
``POST /admin/gc``), alongside the server(s) serving.

1. List ``blobs/`` and ``trash/``, then mark (registryd.upkeep.marker):
   revisions, tags and referrer entries of ``repositories/`` and
   ``mirror/`` keep what they name; links are remembered with their times.
2. Candidates: blobs nothing keeps whose time, every link's and this
   process's last claim (registryd.storage.guard) are older than
   ``now - delay``.
3. Move each candidate to ``trash/<run>/<alg>/<2 hex>/<hex>`` (a rename on
   disk; a copy, a look and a delete on S3): not if it vanished, was
   written again since the listing, or was claimed here (checked before
   the move, and again once it is in the trash, before the original goes).
   Then mark again. A trashed blob that is kept now, that got a new link
   or a claim since the run began, is put back; the rest is purged.
4. Links older than the delay to blobs that are gone are deleted.
5. At the start of a run, trash older than ``max(delay, LEFTOVER_AGE)`` is
   what a crashed run left: put back if kept, purged otherwise.

Crash safety: every step leaves a state the next run handles, so only
putting a blob back is made durable; moves into the trash, purges and
link deletions that a crash undoes are found again (on disk this saves
an fsync per blob).

Why the second mark closes the race with a manifest PUT elsewhere: that
PUT writes its revision, then looks at every blob it names (its own
document too), and answers MANIFEST_BLOB_UNKNOWN (removing the revision)
if one is gone; only then does it write tags. If its look found the blob,
the look came before our move, so the revision was written before our
second mark began: the mark sees it and the blob comes back. If the look
came after our move, the push fails cleanly. Either way no committed
manifest names a missing blob, and no lock is held across any I/O: the
BlobGuard's claims are only read.

Trash keys carry the run's id, so two collections running at once never
share one: a run only purges what it moved itself, and one that still has
to put a blob back always finds its own copy. Anything in the trash can be
the only copy of a manifest document, so the mark reads documents there
too (a revision committed meanwhile names layers only its document knows).
``uploads/``, ``tmp/`` and ``quarantine/`` are never looked at.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterable

import attrs
from twisted.logger import Logger

from registryd.deferreds import bounded_each
from registryd.digest import Digest
from registryd.storage.driver import Driver, finish
from registryd.storage.guard import BlobGuard
from registryd.storage.layout import TRASH, blob_key, trash_key
from registryd.storage.listing import BlobEntry, list_blobs
from registryd.upkeep.marker import CONCURRENCY, Marker, TrashEntry, list_trash, referenced_digests

__all__ = ["Collection", "Collector", "LEFTOVER_AGE", "collection_report", "referenced_digests"]

log = Logger()

#: Trash younger than this may belong to a collection running in another process or on another
#: node; every run must get from its first move to its last restore well within it.
LEFTOVER_AGE = 3600.0


@attrs.define
class Collection:
    """One run's outcome; ``restored``: blobs moved to the trash and put back."""

    blobs: list[dict[str, Any]] = attrs.field(factory=list)
    links: list[dict[str, Any]] = attrs.field(factory=list)
    young: int = 0
    kept: int = 0
    directories: int = 0
    restored: int = 0

    @property
    def reclaimed(self) -> int:
        return sum(b["size"] for b in self.blobs)


def collection_report(where: str, dry_run: bool, delay: float, result: Collection, marker: Any) -> dict[str, Any]:
    """A collection as one JSON document (``where``: the store)."""
    return {
        "data_dir": where,
        "dry_run": dry_run,
        "delay": delay,
        "removed_blobs": result.blobs,
        "removed_links": result.links,
        "removed_directories": result.directories,
        "bytes_reclaimed": result.reclaimed,
        "kept_referenced": result.kept,
        "kept_young": result.young,
        "repositories": marker.repositories,
        "manifests": marker.manifests,
        "restored": result.restored,
    }


@attrs.define
class _Moved:
    blob: BlobEntry
    trash: str | None = None    # None in a dry run


class Collector:
    """One mark and sweep of the store ``driver`` holds; ``guard``: this process's BlobGuard when run
    inside the server."""

    def __init__(self, driver: Driver, delay: float, dry_run: bool, guard: BlobGuard | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.driver = driver
        self.delay = delay
        self.dry_run = dry_run
        self.guard = guard or BlobGuard()
        self.result = Collection()
        self.marker = Marker(self.driver)
        self.run_id = uuid.uuid4().hex[:16]
        self.started = 0.0
        self._clock = clock

    async def collect(self) -> Collection:
        """One run, where it costs least: on a driver with blocking calls (a data directory) whole
        in one worker thread of its pool (``run``); elsewhere here, on the reactor."""
        threaded = self.driver.threaded()
        if threaded is None:
            return await self._run()
        self.driver, pool = threaded
        self.marker.driver = self.driver
        return await pool.run(self.run)

    def run(self) -> Collection:
        """One run, to its end, in this thread: over a driver whose calls block (a data directory)."""
        threaded = self.driver.threaded()
        if threaded is not None:
            self.driver = self.marker.driver = threaded[0]
        return finish(self._run())

    def report(self) -> dict[str, Any]:
        """The run as one JSON document (``registryd gc --json`` and ``POST /admin/gc``)."""
        return collection_report(self.driver.location, self.dry_run, self.delay, self.result, self.marker)

    async def _run(self) -> Collection:
        self.started = self._clock()
        cutoff = self.started - self.delay
        # Blobs are listed before marking: a blob stored later is no
        # candidate, and a manifest committed before the mark is seen by it.
        if not self.dry_run:
            # The folders earlier runs' purges emptied (a purge leaves them: it ends sooner so).
            self.result.directories += await self.driver.tidy(TRASH)
        blobs = await list_blobs(self.driver)
        trash = await list_trash(self.driver)
        await self.marker.update(trash)
        if not self.dry_run:
            await self._leftovers(trash, set(blobs), self.started - max(self.delay, LEFTOVER_AGE))
        candidates = self._candidates(blobs.values(), cutoff)
        gone: set[Digest] = set()
        if candidates:
            gone = await self._collect(candidates, cutoff)
        await self._sweep_links(set(blobs) - gone, gone, cutoff)
        return self.result

    def _removed_blob(self, digest: Digest, size: int, key: str) -> None:
        self.result.blobs.append({"digest": str(digest), "size": size, "path": key})

    # -- candidates -------------------------------------------------------------

    def _claimed(self, digest: Digest) -> bool:
        return self.guard.claimed_since(digest, self.started)

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
                await bounded_each(candidates, lambda blob: self._move(blob, moved, gone), CONCURRENCY)
            if not moved:
                return gone
            await self._remark()
            restore, purge = self._judge(moved, links_before, unreadable_before, cutoff)
            if not self.dry_run:
                await bounded_each(restore, self._restore, CONCURRENCY, keep_going=True)
        except BaseException:
            if not self.dry_run:
                await self._put_back(list(moved.values()))
            raise
        failed = set()
        if purge and not self.dry_run:
            # Not durable: what a crash brings back to the trash, a later run purges.
            failed = set(await self.driver.delete_many([m.trash for m in purge if m.trash is not None],
                                                       durable=False))
            for key in failed:
                log.warn("could not purge {key} from the trash; a later run purges it", key=key)
        for m in purge:
            if m.trash not in failed:
                gone.add(m.blob.digest)
                self._removed_blob(m.blob.digest, m.blob.size, m.blob.key)
        return gone

    def _delete(self, digest: Digest, key: str) -> bool:
        """May the blob at ``key`` go to the trash now? Not if this process claimed it since the run
        began. Asked just before each move (on a data directory, in the run's worker thread)."""
        return not self._claimed(digest)

    async def _move(self, blob: BlobEntry, moved: dict[Digest, _Moved], gone: set[Digest]) -> None:
        """Into this run's trash: unless it vanished, was written again since the listing (an
        upload committed it anew) or was claimed here, before or during the move."""
        if not self._delete(blob.digest, blob.key):
            self.result.young += 1
            return
        key = trash_key(self.run_id, blob.digest)
        # Recorded before the move: a failure from here on puts it back.
        moved[blob.digest] = _Moved(blob, key)
        # Not durable: a crash that undoes it leaves the blob where it was, which is as good.
        # (The blob folder it empties stays: it is reused, and `registryd gc` tidies blobs/.)
        if await self.driver.move(blob.key, key, expect=blob.entry, unless=lambda: self._claimed(blob.digest),
                                  durable=False):
            return
        del moved[blob.digest]
        if await self.driver.stat(blob.key) is None:
            gone.add(blob.digest)
        else:
            self.result.young += 1

    async def _remark(self) -> None:
        """The second mark, once every move is done (tests hook in before it)."""
        await self.marker.update(await list_trash(self.driver))

    def _judge(self, moved: dict[Digest, _Moved], links_before: dict[Digest, dict[str, float | None]],
               unreadable_before: set[str], cutoff: float) -> tuple[list[_Moved], list[_Moved]]:
        """(to put back, to purge) after the second mark.

        A revision whose document is nowhere (not in ``blobs/``, not in any
        trash) names blobs we cannot know. An old one is fsck's business; one
        written during the run or within the delay is a push in flight, and
        its layers may be among ours: all go back.
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
        if await self._move_back(m.trash, m.blob.key):
            self.result.restored += 1

    async def _move_back(self, source: str, key: str) -> bool:
        if await self.driver.move(source, key):
            return True
        if await self.driver.stat(key) is None:
            log.error("{key} was to be put back, but its trash copy {source} is gone", key=key, source=source)
        return False

    async def _put_back(self, moved: list[_Moved]) -> None:
        """A run that failed half-way leaves nothing in the trash it could not judge."""
        try:
            await bounded_each(moved, self._restore, CONCURRENCY, keep_going=True)
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
            rest = entries
            if digest not in listed:
                rest = entries[1:]
                if await self._move_back(entries[0].key, blob_key(digest)):
                    self.result.restored += 1
            if rest:
                await self.driver.delete_many([entry.key for entry in rest])

        await bounded_each(restore, put_back, CONCURRENCY, keep_going=True)
        keys = [entry.key for _, entries in purge for entry in entries]
        failed = set(await self.driver.delete_many(keys, durable=False)) if keys else set()
        for digest, entries in purge:
            if digest not in listed and entries[0].key not in failed:
                self._removed_blob(digest, entries[0].size, entries[0].key)

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
        # A collection elsewhere may be about to put one back.
        in_trash = await list_trash(self.driver)
        absent: set[Digest] = set()

        async def check(digest: Digest) -> None:
            if (self.dry_run and digest in gone) or await self.driver.stat(blob_key(digest)) is None:
                absent.add(digest)

        await bounded_each([digest for digest in stale if digest not in in_trash], check, CONCURRENCY)
        links = sorted((link for digest in absent for link in stale[digest]), key=lambda link: link.key)
        failed = set()
        if links and not self.dry_run:
            # Not durable: a link a crash brings back still names a missing blob; a later run sweeps it.
            # (Its emptied folder stays, as the repository's _blobs/ does.)
            failed = set(await self.driver.delete_many([link.key for link in links], durable=False))
        for link in links:
            if link.key not in failed:
                self.result.links.append({"repository": link.repository, "digest": str(link.digest),
                                          "path": link.key})
