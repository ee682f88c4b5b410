"""Keep the mirror cache under ``[mirror] max_size``, least recently pulled first.

The cache's size is the bytes of stored blobs that only mirror content keeps
(a layer that a local image also uses counts as local and is never evicted).
Over the limit, cached manifests go in order of last pull (or of caching,
for one never pulled since), and blobs linked into a mirrored repository by
a blob-only pull go by when they were fetched; a blob is freed once nothing
left in the cache keeps it. Whatever is evicted is fetched again from the
upstream on its next pull.

``plan_eviction`` decides; ``evict`` carries the plan out over any storage
driver. It deletes the planned manifests (their tags, referrer entry and
pull marker with them, tags first, so a tag never outlives its revision)
and the blob-only links whose blobs the plan frees. Every deletion is
checked first against times listed again: a manifest pulled (or cached
again) since the survey stays, and so do its blobs; a link written again
since (a fill) stays.

The freed blobs themselves: given the BlobGuard that sees every claim on
the store (a data directory, which one process serves), ``evict`` deletes
each one unless it was claimed (by a push, a manifest, a fill) since the
survey began, as the collector does: moved into the trash, the claims looked
at once it is there, then purged; no lock is held across the I/O. Without it (a bucket every node shares: another node's claim
is in that node's memory), they are left to the collection and its
trash/re-mark protocol (registryd.upkeep.collector), which the scheduler
runs right after and which removes those older than ``[gc] delay``. Every
node may evict at the same time: deletions are idempotent, so overlapping
runs only find less to do.
"""
from __future__ import annotations

import math
import uuid
from collections import Counter
from typing import Callable, Iterable

import attrs
from twisted.logger import Logger

from registryd.deferreds import bounded_each
from registryd.digest import Digest
from registryd.storage.driver import Driver
from registryd.storage.guard import BlobGuard
from registryd.storage.layout import PULLS, REVISIONS, TAGS, blob_key, pull_key, referrer_key, revision_key, trash_key
from registryd.upkeep.marker import CONCURRENCY, TAG_LIMIT
from registryd.upkeep.survey import MirrorLink, MirrorManifest, Survey, SurveyedRepository

log = Logger()


@attrs.define
class EvictionPlan:
    manifests: list[MirrorManifest] = attrs.field(factory=list)
    blobs: dict[Digest, int] = attrs.field(factory=dict)     # digest -> size
    size_before: int = 0
    size_after: int = 0


@attrs.define
class Eviction:
    """What an eviction did: manifests, links and blobs (and their bytes) deleted.

    ``blobs``/``bytes`` also count those the collection that follows removes (the scheduler adds them).
    """

    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    kept: int = 0       # planned manifests left: pulled since the survey
    links: int = 0      # blob-only links deleted
    gone: int = 0       # planned manifests already removed elsewhere
    kept_back: set[Digest] = attrs.field(factory=set)       # what the manifests pulled since keep
    #: Freed blobs left to the collection: digest -> size.
    left: dict[Digest, int] = attrs.field(factory=dict)


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
            if holders[digest] == 0 and digest in evictable and digest not in survey.pinned and digest not in plan.blobs:
                plan.blobs[digest] = survey.blob_sizes[digest]
                size -= survey.blob_sizes[digest]
    plan.size_after = size
    return plan


async def _listed_times(driver: Driver, prefix: str) -> dict[str, float]:
    """The last component of each key under ``prefix`` (``<alg>/<hex>``), with its time."""
    return {entry.key[len(prefix):]: entry.modified or 0.0 async for entry in driver.list(prefix)}


async def delete_manifest(driver: Driver, repository: SurveyedRepository, digest: Digest,
                          subject: Digest | None) -> bool:
    """Tags pointing at it, its referrer entry, its pull marker, then the revision; False if it was gone.

    A tag moved to another digest between our read and our delete is deleted
    too: a bucket has no conditional DELETE.
    """
    revision = repository.key(revision_key(digest))
    if await driver.stat(revision) is None:
        return False
    tags = [entry.key async for entry in driver.list(repository.key(TAGS))]

    async def untag(key: str) -> None:
        target = await driver.read(key, TAG_LIMIT)
        if target is not None and target.decode("utf-8", "replace").strip() == str(digest):
            await driver.delete(key)

    await bounded_each(tags, untag, CONCURRENCY)
    if subject is not None:
        await driver.delete(repository.key(referrer_key(subject, digest)))
    await driver.delete(repository.key(pull_key(digest)))
    return await driver.delete(revision)


async def evict(driver: Driver, survey: Survey, plan: EvictionPlan, guard: BlobGuard | None,
                say: Callable[[str], None] = lambda line: None) -> Eviction:
    """Carry ``plan`` out; ``guard``: the one that sees every claim on the store, or None (see the module)."""
    done = Eviction()
    by_repository: dict[SurveyedRepository, list[MirrorManifest]] = {}
    for manifest in plan.manifests:
        by_repository.setdefault(manifest.repository, []).append(manifest)

    async def evict_manifests(item: tuple[SurveyedRepository, list[MirrorManifest]]) -> None:
        repository, manifests = item
        # Listed again now: a pull, or a caching again, since the survey moved these times.
        revisions = await _listed_times(driver, repository.key(REVISIONS))
        pulls = await _listed_times(driver, repository.key(PULLS))
        for manifest in manifests:
            name = f"{manifest.digest.algorithm}/{manifest.digest.hex}"
            written = revisions.get(name)
            if written is None:
                done.gone += 1
            elif max(written, pulls.get(name, 0.0)) > manifest.last_used:
                done.kept += 1
                done.kept_back.update(manifest.keeps)
            elif await delete_manifest(driver, repository, manifest.digest, manifest.subject):
                done.manifests += 1
                say(f"evicted manifest {repository.name}@{manifest.digest}")
                log.debug("evicted manifest {name}@{digest}", name=repository.name, digest=str(manifest.digest))
            else:
                done.gone += 1

    async def unlink(link: MirrorLink) -> None:
        found = await driver.stat(link.repository.link_key(link.digest))
        # A bucket's HEAD gives its time to the second; a listing's may be finer.
        if found is None or found.modified is None or found.modified >= math.floor(link.last_used) + 1:
            return  # gone already, or written again by a fill since the survey
        if await driver.delete(found.key):
            done.links += 1

    await bounded_each(by_repository.items(), evict_manifests, CONCURRENCY)
    await bounded_each(_freed_links(survey.links, plan), unlink, CONCURRENCY)
    freed = {digest: size for digest, size in plan.blobs.items() if digest not in done.kept_back}
    if guard is None:
        done.left = freed
    else:
        await _delete_blobs(driver, freed, guard, survey.taken_at, done)
    return done


async def _delete_blobs(driver: Driver, freed: dict[Digest, int], guard: BlobGuard, since: float,
                        done: Eviction) -> None:
    """Each freed blob, unless claimed since ``since``, as the collector removes one: moved into a
    trash of its own, the claims looked at once it is there (a claim since puts it back), then
    purged. No lock is held across the I/O; a crash leaves a trash the next collection handles."""
    run = f"evict-{uuid.uuid4().hex}"

    async def delete(item: tuple[Digest, int]) -> None:
        digest, size = item
        if guard.claimed_since(digest, since):
            return
        trash = trash_key(run, digest)
        if await driver.move(blob_key(digest), trash, unless=lambda: guard.claimed_since(digest, since),
                             durable=False):
            await driver.delete(trash)
            done.blobs += 1
            done.bytes += size

    await bounded_each(freed.items(), delete, CONCURRENCY)


def _freed_links(links: Iterable[MirrorLink], plan: EvictionPlan) -> list[MirrorLink]:
    return [link for link in links if link.digest in plan.blobs]
