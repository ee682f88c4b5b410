"""Keep the mirror cache under ``[mirror] max_size``, least recently pulled first.

The cache's size is the bytes of stored blobs that only mirror content keeps
(a layer that a local image also uses counts as local and is never evicted).
Over the limit, cached manifests go in order of last pull (or of caching,
for one never pulled since), and blobs linked into a mirrored repository by
a blob-only pull go by when they were fetched; a blob is freed once nothing
left in the cache keeps it. Whatever is evicted is fetched again from the
upstream on its next pull.

``plan_eviction`` is the same for both drivers; carrying the plan out is not.
In a data directory (``evict``), deletions go through the store's
BlobGuard: a blob claimed since the survey (by a push, a manifest, a fill)
stays. On a shared S3 bucket another node's claims are out of reach, so
registryd.upkeep.s3_survey deletes only manifests and links and leaves the
freed blobs to a collection (registryd.upkeep.s3_collector). Either way a
manifest pulled since the survey stays, and so do its blobs.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable

import attrs

from registryd.digest import Digest
from registryd.storage import layout
from registryd.storage.files import prune_empty_dirs, unlink_durably
from registryd.storage.guard import BlobGuard
from registryd.storage.repositories import RepositoryStore
from registryd.storage.scan import DataDir, Repository
from registryd.upkeep.survey import MirrorLink, MirrorManifest, Survey, last_used


@attrs.define
class EvictionPlan:
    manifests: list[MirrorManifest] = attrs.field(factory=list)
    blobs: dict[Digest, int] = attrs.field(factory=dict)     # digest -> size
    size_before: int = 0
    size_after: int = 0


@attrs.define
class Eviction:
    """What an eviction did: manifests and blobs (and their bytes) deleted."""

    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    kept: int = 0       # planned manifests left: pulled since the survey
    links: int = 0      # blob-only links deleted (S3; in a data directory the collector sweeps them)


def plan_eviction(survey: Survey, max_size: int) -> EvictionPlan:
    """What to evict, oldest use first, to bring the mirror-only bytes to ``max_size``."""
    evictable = survey.mirror_only()
    size = sum(survey.blob_sizes[d] for d in evictable)
    plan = EvictionPlan(size_before=size, size_after=size)
    if size <= max_size:
        return plan
    holders: Counter[Digest] = Counter()
    for manifest in survey.manifests:
        holders.update(manifest.keeps)
    for link in survey.links:
        holders[link.digest] += 1
    units: list[MirrorManifest | MirrorLink] = [*survey.manifests, *survey.links]
    units.sort(key=lambda unit: (unit.last_used, str(unit.digest)))
    for unit in units:
        if size <= max_size:
            break
        keeps = unit.keeps if isinstance(unit, MirrorManifest) else frozenset([unit.digest])
        if isinstance(unit, MirrorManifest):
            plan.manifests.append(unit)
        for digest in keeps:
            holders[digest] -= 1
            if holders[digest] == 0 and digest in evictable and digest not in plan.blobs:
                plan.blobs[digest] = survey.blob_sizes[digest]
                size -= survey.blob_sizes[digest]
    plan.size_after = size
    return plan


def evict(data: DataDir, plan: EvictionPlan, guard: BlobGuard, since: float,
          say: Callable[[str], None] = lambda line: None) -> Eviction:
    """Carry out ``plan`` on a data directory (blocking). ``since`` is when the survey began."""
    done = Eviction()
    stores: dict[str, RepositoryStore] = {}
    kept_back: set[Digest] = set()
    for manifest in plan.manifests:
        repository = manifest.repository
        assert isinstance(repository, Repository), "a survey of a data directory"
        revision = repository.revision_path(manifest.digest)
        if last_used(repository, manifest.digest, None) > since:
            kept_back.update(manifest.keeps)  # pulled again since the survey: it and its blobs stay
            done.kept += 1
            continue
        store = stores.setdefault(repository.root, RepositoryStore(repository.root, os.path.join(data.root, "tmp")))
        if store.delete_manifest(repository.remote, manifest.digest, manifest.subject):
            done.manifests += 1
            say(f"evicted manifest {repository.name}@{manifest.digest}")
        prune_empty_dirs(os.path.dirname(revision), repository.path)
    for digest, size in plan.blobs.items():
        if digest in kept_back:
            continue
        path = data.blob_path(digest)
        if guard.delete_unless_claimed(digest, since, lambda: unlink_durably(path)):
            done.blobs += 1
            done.bytes += size
            prune_empty_dirs(os.path.dirname(path), layout.local_path(data.root, f"{layout.BLOBS}{digest.algorithm}"))
    return done
