"""``registryd prune``, in a running server (``POST /admin/prune``) or in the command, on either storage driver.

With ``[storage] driver = "s3"`` the mirror cache is not in the data
directory but in a bucket every node shares, so this pruner reads and
deletes only through per-upstream RepositoryBackends (MirrorCache's in a
server, the store's mirror folders in ``registryd prune``) and the store's
BlobBackend: the driver does not matter. Its report is ``registryd prune --json``.

The rules, as ``registryd prune --help`` gives them: in the repositories
matching a pattern, a tag or manifest revision goes when it was written (a
tag: last confirmed by the upstream) before ``now - older_than`` and neither
written nor pulled since ``now - unused_for``; a manifest that a kept tag
points at, or that a kept manifest names (an index's children), stays.
Local repositories are never looked at, and blobs are left to gc.

Each removal is re-checked just before it is made, against times read
again then: a tag the upstream confirmed, or a manifest a client pulled or
the mirror cached again, meanwhile stays.
"""
from __future__ import annotations

import math
import time
from typing import AbstractSet, Any, Callable, Mapping

import attrs

from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.globs import Glob
from registryd.manifests import parse_manifest
from registryd.mirror.cache import MirrorCache
from registryd.storage import Store
from registryd.storage.interface import BlobBackend, RepositoryBackend
from registryd.storage import layout
from registryd.upkeep.collector import referenced_digests
from registryd.upkeep.pins import Pin

#: MirrorCache reads cached manifests up to at least this much, whatever max_manifest_size says.
MIN_MANIFEST_LIMIT = 4 * 1024 * 1024
#: A duration past this (about 3000 years) is a typo, not a policy.
MAX_SECONDS = 1e11

Clock = Callable[[], float]


def _seconds(key: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < MAX_SECONDS:   # also refuses nan and inf
        raise ValueError(f"{key} must be a number of seconds, not {text[:100]!r}")
    return value


@attrs.frozen
class PruneSelection:
    """What one prune removes: the query of ``POST /admin/prune``, validated."""

    older_than: float | None = None
    unused_for: float | None = None
    patterns: tuple[str, ...] = ()
    dry_run: bool = False

    @classmethod
    def from_query(cls, older_than: str | None, unused_for: str | None, patterns: list[str],
                   dry_run: str | None) -> PruneSelection:
        """Raise ValueError with a message for the client on anything unusable."""
        selection = cls(_seconds("older_than", older_than), _seconds("unused_for", unused_for),
                        tuple(patterns), dry_run in ("1", "true"))
        for pattern in patterns:
            try:
                Glob.parse(pattern)
            except ValueError as e:
                raise ValueError(f"pattern {pattern[:100]!r} is not a glob of <namespace>/<repository>: "
                                 f"it {e}") from None
        if selection.older_than is None and selection.unused_for is None and not patterns:
            raise ValueError("give older_than=SECONDS, unused_for=SECONDS, pattern=GLOB or several "
                             "(pattern=** selects the whole mirror cache)")
        return selection


@attrs.define
class _Repository:
    """One mirrored repository's prune, through its backend."""

    backend: RepositoryBackend
    blobs: BlobBackend
    manifest_limit: int
    name: str                   # as clients pull it: <namespace>/<repository>
    remote: str                 # its name in the backend
    path: str                   # its place in the store, for the report: mirror/<namespace>/<repository>/
    cutoff: float
    unused_cutoff: float | None
    dry_run: bool
    removed: list[dict[str, Any]]
    contents: dict[Digest, bytes | None] = attrs.field(factory=dict)
    #: Manifests a [[sync]] job lists (upkeep.pins): kept, with the tags pointing at them.
    pinned: frozenset[Digest] = frozenset()

    def _old(self, written: float | None, digest: Digest | None, pulls: dict[Digest, float]) -> bool:
        """Written before the older_than cutoff, and neither written nor pulled since unused_for's."""
        if written is None or written >= self.cutoff:
            return False
        if self.unused_cutoff is None:
            return True
        pulled = pulls.get(digest, 0.0) if digest is not None else 0.0
        return max(written, pulled) < self.unused_cutoff

    async def _pulls(self) -> dict[Digest, float]:
        return await self.backend.pulls(self.remote) if self.unused_cutoff is not None else {}

    def _report(self, kind: str, rel: str, digest: Digest | None, **extra: str) -> None:
        entry: dict[str, Any] = {"kind": kind, "repository": self.name, "path": self.path + rel, **extra}
        if digest is not None:
            entry["digest"] = str(digest)
        self.removed.append(entry)

    async def prune(self) -> None:
        revisions = await self.backend.revisions(self.remote)
        pulls = await self._pulls()
        todo = await self._prune_tags(pulls)
        todo += [digest for digest, written in revisions.items()
                 if digest in self.pinned or not self._old(written, digest, pulls)]
        keep: set[Digest] = set()
        while todo:
            digest = todo.pop()
            if digest in keep or digest not in revisions:
                continue
            keep.add(digest)
            content = await self._content(digest)
            if content is not None:
                todo.extend(referenced_digests(content))
        await self._prune_manifests(sorted(digest for digest in revisions if digest not in keep))

    async def _prune_tags(self, pulls: dict[Digest, float]) -> list[Digest]:
        """Remove the old tags; the digests the remaining ones point at."""
        kept: list[Digest] = []
        old: list[tuple[str, Digest | None]] = []
        for tag in await self.backend.tags(self.remote) or []:
            digest = await self._resolve(tag)
            if digest not in self.pinned and self._old(await self.backend.tag_mtime(self.remote, tag), digest, pulls):
                old.append((tag, digest))
            elif digest is not None:
                kept.append(digest)
        if old and not self.dry_run:
            pulls = await self._pulls()
        for tag, digest in old:
            # Re-checked: the upstream may have confirmed it, a client pulled it, since the scan.
            if self.dry_run or (self._old(await self.backend.tag_mtime(self.remote, tag), digest, pulls)
                                and await self.backend.delete_tag(self.remote, tag)):
                self._report("tag", layout.tag_key(tag), digest, tag=tag)
        if not self.dry_run:
            # Tags written meanwhile (not in the scan) keep their manifests too.
            for tag in await self.backend.tags(self.remote) or []:
                digest = await self._resolve(tag)
                if digest is not None:
                    kept.append(digest)
        return kept

    async def _prune_manifests(self, doomed: list[Digest]) -> None:
        """Remove the revisions nothing keeps, with their referrer entries (and pull times)."""
        if not doomed:
            return
        subjects = {digest: await self._subject(digest) for digest in doomed}
        listed = {digest for digest, subject in subjects.items()
                  if subject is not None and await self._lists(subject, digest)}
        revisions: dict[Digest, float] = {}
        pulls: dict[Digest, float] = {}
        if not self.dry_run:
            revisions, pulls = await self.backend.revisions(self.remote), await self._pulls()
        gone = []
        for digest in doomed:
            # Re-checked: cached again or pulled since the scan, it stays.
            if self.dry_run or (self._old(revisions.get(digest), digest, pulls)
                                and await self.backend.delete_manifest(self.remote, digest, subjects[digest])):
                gone.append(digest)
        for digest in gone:
            subject = subjects[digest]
            if digest in listed and subject is not None:
                self._report("referrer", layout.referrer_key(subject, digest), digest, subject=str(subject))
        for digest in gone:
            self._report("manifest", layout.revision_key(digest), digest)

    async def _resolve(self, tag: str) -> Digest | None:
        try:
            return await self.backend.resolve_tag(self.remote, tag)
        except RegistryError:
            return None     # a tag that holds no digest keeps nothing

    async def _content(self, digest: Digest) -> bytes | None:
        if digest not in self.contents:
            self.contents[digest] = await self.blobs.read(digest, self.manifest_limit)
        return self.contents[digest]

    async def _subject(self, digest: Digest) -> Digest | None:
        """The manifest's subject, as the mirror saw it when it stored the referrer entry."""
        content = await self._content(digest)
        if content is None:
            return None
        try:
            media_type = await self.backend.manifest_media_type(self.remote, digest)
            return parse_manifest(content, media_type).subject
        except (RegistryError, ValueError, KeyError, TypeError):
            return None     # stored as the upstream sent it: no referrer entry was made

    async def _lists(self, subject: Digest, digest: Digest) -> bool:
        entries = await self.backend.referrers(self.remote, subject)
        return any(entry.get("digest") == str(digest) for entry in entries)


class OnlinePruner:
    """Prunes the mirror cache of a running server: one backend per upstream namespace."""

    def __init__(self, mirrors: Mapping[str, RepositoryBackend], blobs: BlobBackend, where: str,
                 manifest_limit: int, clock: Clock = time.time, pinned: AbstractSet[Pin] = frozenset()) -> None:
        self._pinned = pinned
        self._mirrors = mirrors
        self._blobs = blobs
        self._where = where
        self._limit = manifest_limit
        self._clock = clock

    async def run(self, selection: PruneSelection) -> dict[str, Any]:
        """Prune, and report as ``registryd prune --json`` does."""
        now = self._clock()
        cutoff = now - selection.older_than if selection.older_than is not None else math.inf
        unused_cutoff = now - selection.unused_for if selection.unused_for is not None else None
        patterns = [Glob.parse(pattern) for pattern in selection.patterns]
        removed: list[dict[str, Any]] = []
        matched = 0
        for namespace in sorted(self._mirrors):
            backend = self._mirrors[namespace]
            for remote in await backend.catalog():
                name = f"{namespace}/{remote}"
                if patterns and not any(pattern.matches(name) for pattern in patterns):
                    continue
                matched += 1
                await _Repository(backend=backend, blobs=self._blobs, manifest_limit=self._limit, name=name,
                                  remote=remote, path=f"{layout.repositories_root(namespace)}{remote}/", cutoff=cutoff,
                                  unused_cutoff=unused_cutoff, dry_run=selection.dry_run, removed=removed,
                                  pinned=frozenset(d for n, r, d in self._pinned if (n, r) == (namespace, remote))
                                  ).prune()
        counts = {kind: sum(1 for entry in removed if entry["kind"] == kind)
                  for kind in ("tag", "manifest", "referrer")}
        return {"data_dir": self._where, "dry_run": selection.dry_run, "older_than": selection.older_than,
                "unused_for": selection.unused_for, "patterns": list(selection.patterns),
                "repositories_matched": matched, "removed": removed, "counts": counts}


def server_pruner(cache: MirrorCache, store: Store, manifest_limit: int,
                  clock: Clock = time.time, pinned: AbstractSet[Pin] = frozenset()) -> OnlinePruner:
    """The pruner of a server's mirror cache; its report names the store as gc's does.

    ``manifest_limit`` is ``max_manifest_size``: nothing larger was cached, and
    a document cut short would hide the children of a kept index.
    """
    where = store.objects.location
    mirrors = {namespace: mirror.repositories for namespace, mirror in cache.mirrors.items()}
    return OnlinePruner(mirrors, store.blobs, where, max(manifest_limit, MIN_MANIFEST_LIMIT), clock, pinned)
