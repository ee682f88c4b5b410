"""Per-repository metadata over a storage driver: the one RepositoryBackend of every store.

A repository ``<name>`` under ``root`` (``repositories/`` or one upstream's
``mirror/<namespace folder>/``) holds the keys registryd.storage.layout maps:

* ``_blobs/<alg>/<hex>`` — empty: the blob is visible in this repository;
* ``_manifests/revisions/<alg>/<hex>`` — JSON ``{"mediaType": ...}``: the
  manifest (content in the blob store) belongs to this repository;
* ``_manifests/tags/<tag>`` — the digest the tag points at;
* ``_referrers/<alg>/<subject hex>/<alg>-<hex>`` — the descriptor of a
  manifest whose ``subject`` is that digest;
* ``_pulls/<alg>/<hex>`` — empty; its time is when the manifest was last
  pulled (advisory: never made durable).

A repository exists while it has a ``_manifests`` or ``_blobs`` folder (on
a bucket: a key in one). Writes keep the interface's order — revision,
referrer entry, then tags, each done before the next starts — so neither
a crash nor another node's read sees a tag without its revision. A driver
gives read-after-write consistency for single keys (S3 since 2020, RGW
always, a rename on disk), which is what lets another node see a tag the
moment its write returned.

Names and tags arrive validated (registryd.names). Keys are still built
only from strings that pass the same grammar: a read with an odd name
finds nothing, a write raises the registry's own NAME_INVALID or
MANIFEST_INVALID; nothing odd ever becomes part of a key.
"""
from __future__ import annotations

import functools
import json
import re
import time
from typing import Any, Callable

from twisted.internet.defer import DeferredSemaphore

from registryd.deferreds import bounded_gather
from registryd.digest import HEX_LENGTHS, Digest, parse_digest
from registryd.errors import RegistryError, digest_invalid, name_invalid
from registryd.lru import SizedLRU
from registryd.names import check_name, check_tag, is_tag
from registryd.storage import layout
from registryd.storage.driver import Driver, finish

#: Revisions, tags and referrer descriptors are small; a manifest's limit bounds them all.
METADATA_LIMIT = 4 * 1024 * 1024
#: Listings and reads one call keeps in flight (on S3, Agent's pool does not bound connections).
CONCURRENCY = 8
_HEX = re.compile(r"^[a-f0-9]+$")


@functools.lru_cache(maxsize=4096)
def _name_ok(name: str) -> bool:
    try:
        check_name(name)
    except RegistryError:
        return False
    return True


#: Tags and revisions whose values a Repositories keeps with their versions (a few hundred bytes each).
KNOWN_VALUES = 4096
#: Seconds a tag or revision must be older than for its value to be kept (see _validated).
SETTLED = 2.0


def _digest_ok(digest: Digest) -> bool:
    expected = HEX_LENGTHS.get(digest.algorithm)
    return expected is not None and len(digest.hex) == expected and bool(_HEX.match(digest.hex))


class Repositories:
    """RepositoryBackend for the repositories under ``root`` (a key prefix ending in ``/``) of ``driver``.

    ``durable_links`` False is for the mirror cache: a link lost in a crash
    is made again by the next pull, so it is not worth an fsync per layer.
    """

    def __init__(self, driver: Driver, root: str, durable_links: bool = True) -> None:
        self.driver = driver
        self.root = root if root.endswith("/") else root + "/"
        self._durable_links = durable_links
        # What a tag or a revision said, by key and the version it had then: a stat
        # proves it still says so (any write changes the version), without a read and a parse.
        self._known: SizedLRU[str, tuple[str, Any]] = SizedLRU(KNOWN_VALUES)

    # -- keys: None for a name, tag or digest that fails validation --------------

    def _repo(self, name: str) -> str | None:
        return f"{self.root}{name}/" if _name_ok(name) else None

    def _under(self, name: str, digest: Digest, key: Callable[[Digest], str]) -> str | None:
        """The key ``key(digest)`` (registryd.storage.layout) in the repository ``name``."""
        repo = self._repo(name)
        if repo is None or not _digest_ok(digest):
            return None
        return repo + key(digest)

    def _link(self, name: str, digest: Digest) -> str | None:
        return self._under(name, digest, layout.link_key)

    def _revision(self, name: str, digest: Digest) -> str | None:
        return self._under(name, digest, layout.revision_key)

    def _pull(self, name: str, digest: Digest) -> str | None:
        return self._under(name, digest, layout.pull_key)

    def _referrers(self, name: str, subject: Digest) -> str | None:
        return self._under(name, subject, layout.referrers_key)

    def _referrer(self, name: str, subject: Digest, digest: Digest) -> str | None:
        folder = self._referrers(name, subject)
        if folder is None or not _digest_ok(digest):
            return None
        return folder + layout.referrer_entry(digest)

    def _tags(self, name: str) -> str | None:
        repo = self._repo(name)
        return repo + layout.TAGS if repo is not None else None

    def _tag(self, name: str, tag: str) -> str | None:
        folder = self._tags(name)
        return folder + tag if folder is not None and is_tag(tag) else None

    def _checked(self, key: str | None, name: str, tag: str | None = None, *digests: Digest) -> str:
        """``key`` for a write, or the registry error saying which part was unusable."""
        if key is not None:
            return key
        check_name(name)
        if tag is not None:
            check_tag(tag)
        for digest in digests:
            if not _digest_ok(digest):
                raise digest_invalid(f"invalid digest {str(digest)[:150]!r}")
        raise name_invalid(name)

    # -- reads --------------------------------------------------------------------

    async def exists(self, name: str) -> bool:
        """One listing of the repository's own ``_``-folders (never of its nested repositories)."""
        repo = self._repo(name)
        if repo is None:
            return False
        async for entry in self.driver.list(repo + "_", delimiter="/"):
            if entry.is_prefix and entry.key[len(repo):-1] in layout.MARKERS:
                return True
        return False

    async def has_blob(self, name: str, digest: Digest) -> bool:
        key = self._link(name, digest)
        return key is not None and await self.driver.stat(key) is not None

    async def manifest_media_type(self, name: str, digest: Digest) -> str | None:
        media_type: str | None = await self._validated(self._revision(name, digest),
                                                       lambda data: json.loads(data)["mediaType"])
        return media_type

    async def resolve_tag(self, name: str, tag: str) -> Digest | None:
        found: Digest | None = await self._validated(self._tag(name, tag),
                                                     lambda data: parse_digest(data.decode().strip()))
        return found

    async def tag_mtime(self, name: str, tag: str) -> float | None:
        key = self._tag(name, tag)
        entry = await self.driver.stat(key) if key is not None else None
        return entry.modified if entry is not None else None

    async def tags(self, name: str) -> list[str] | None:
        folder = self._tags(name)
        if folder is None:
            return None
        found = [entry.key[len(folder):] async for entry in self.driver.list(folder)]
        if not found and not await self.exists(name):
            return None
        return sorted(tag for tag in found if is_tag(tag))

    async def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        folder = self._referrers(name, subject)
        if folder is None:
            return []
        keys = [entry.key async for entry in self.driver.list(folder) if "/" not in entry.key[len(folder):]]
        # An entry deleted between the listing and its read is simply gone.
        found = await bounded_gather(keys, self._get, CONCURRENCY)
        return [json.loads(data) for data in found if data is not None]

    async def revisions(self, name: str) -> dict[Digest, float]:
        """One listing of ``_manifests/revisions/``: each one's time is when it was written."""
        return await self._stamps(name, layout.REVISIONS)

    async def pulls(self, name: str) -> dict[Digest, float]:
        """One listing of ``_pulls/``: each marker's time is its manifest's last pull."""
        return await self._stamps(name, layout.PULLS)

    async def catalog(self) -> list[str]:
        """Every repository name, sorted: a walk of the folders, one listing per folder.

        A walk, not one listing of every key: a mirror holds a link per layer
        pulled, and those would dominate a flat listing many times over. Over
        a driver with a blocking twin (the data directory) the whole walk is
        one trip to its pool.
        """
        threaded = self.driver.threaded()
        if threaded is not None:
            twin, pool = threaded
            return await pool.run(lambda: finish(Repositories(twin, self.root)._catalog()))
        return await self._catalog()

    async def _catalog(self) -> list[str]:
        names: set[str] = set()
        limit = DeferredSemaphore(CONCURRENCY)

        async def walk(path: str) -> None:
            async with limit:
                entries = [entry async for entry in self.driver.list(self.root + path, delimiter="/")]
            below = []
            for entry in entries:
                if not entry.is_prefix:
                    continue
                component = entry.key[len(self.root + path):-1]
                if component in layout.MARKERS:
                    if path and _name_ok(path[:-1]):
                        names.add(path[:-1])
                elif component and not component.startswith("_"):
                    below.append(path + component + "/")
            await bounded_gather(below, walk, None)

        await walk("")
        return sorted(names)

    # -- writes -------------------------------------------------------------------

    async def link_blob(self, name: str, digest: Digest) -> None:
        # Written again when it exists: a link's new time is a use that a running gc's re-mark
        # sees (upkeep.collector), on this node or another. One write, no stat first.
        await self.driver.write(self._checked(self._link(name, digest), name, None, digest), b"",
                                durable=self._durable_links)

    async def unlink_blob(self, name: str, digest: Digest) -> bool:
        key = self._link(name, digest)
        return key is not None and await self.driver.delete(key)

    async def add_manifest(self, name: str, digest: Digest, media_type: str, tags: list[str],
                           referrer: tuple[Digest, dict[str, Any]] | None) -> None:
        """Revision, referrer entry, then tags, each write done before the next starts:
        neither this node's crash nor another node's read sees a tag without its revision."""
        # Every key first: an unusable tag must not leave a revision behind.
        writes = [(self._checked(self._revision(name, digest), name, None, digest),
                   json.dumps({"mediaType": media_type}).encode())]
        if referrer is not None:
            subject, descriptor = referrer
            writes.append((self._checked(self._referrer(name, subject, digest), name, None, subject, digest),
                           json.dumps(descriptor).encode()))
        tag_keys = [self._checked(self._tag(name, tag), name, tag) for tag in tags]
        for key, body in writes:
            await self.driver.write(key, body)
        for key in tag_keys:
            await self.driver.write(key, str(digest).encode())

    async def set_tags(self, name: str, digest: Digest, tags: list[str]) -> None:
        tag_keys = [self._checked(self._tag(name, tag), name, tag) for tag in tags]
        for key in tag_keys:
            await self.driver.write(key, str(digest).encode())

    async def delete_manifest(self, name: str, digest: Digest, subject: Digest | None) -> bool:
        """Tags pointing at it, its referrer entry, its pull marker, then the revision:
        the reverse of ``add_manifest``, so a tag never outlives its revision.

        A tag moved to another digest by another node between our read and our
        delete is deleted too: no driver has a conditional delete.
        """
        revision = self._revision(name, digest)
        folder = self._tags(name)
        if revision is None or folder is None or await self.driver.stat(revision) is None:
            return False
        tag_keys = [entry.key async for entry in self.driver.list(folder)]
        targets = await bounded_gather(tag_keys, self._get, CONCURRENCY)
        for key, target in zip(tag_keys, targets):
            if target is not None and target.decode().strip() == str(digest):
                await self.driver.delete(key)
        if subject is not None:
            entry = self._referrer(name, subject, digest)
            if entry is not None:
                await self.driver.delete(entry)
        pull = self._pull(name, digest)
        if pull is not None:
            await self.driver.delete(pull)
        await self.driver.delete(revision)
        return True

    async def touch_tag(self, name: str, tag: str, digest: Digest) -> None:
        """Move the tag's time to now by writing the digest the upstream just confirmed.

        One write: whatever another node wrote meanwhile, the tag ends as the
        upstream says it is. A bucket's LastModified has one-second
        resolution, so a touch within the second of the write may not show.
        """
        key = self._tag(name, tag)
        if key is not None:
            await self.driver.write(key, str(digest).encode())

    async def delete_tag(self, name: str, tag: str) -> bool:
        key = self._tag(name, tag)
        return key is not None and await self.driver.delete(key)

    async def record_pull(self, name: str, digest: Digest, when: float) -> None:
        """Date the pull marker ``when`` (on a bucket: the store's clock, to the second),
        only while the revision exists. Advisory: never made durable."""
        revision = self._revision(name, digest)
        pull = self._pull(name, digest)
        if revision is None or pull is None or await self.driver.stat(revision) is None:
            return
        await self.driver.touch(pull, when)

    # -- helpers ------------------------------------------------------------------

    async def _get(self, key: str | None) -> bytes | None:
        return await self.driver.read(key, METADATA_LIMIT) if key is not None else None

    async def _validated(self, key: str | None, parse: Callable[[bytes], Any]) -> Any:
        """``parse`` of the value of ``key`` (None when absent), read and parsed again only
        when a stat finds it written since: a tag or revision read on every manifest GET
        costs a stat. Checked on every call, so a write or delete by any process shows at once."""
        if key is None:
            return None
        entry = await self.driver.stat(key)
        if entry is None:
            self._known.discard(key)
            return None
        known = self._known.get(key)
        if known is not None and entry.version and known[0] == entry.version:
            return known[1]
        data = await self._get(key)
        if data is None:
            return None
        value = parse(data)
        if entry.version and entry.modified is not None and entry.modified <= time.time() - SETTLED:
            # The version of the stat before the read: a write between them makes the next stat
            # differ. Only for a value older than SETTLED seconds: a file's version (inode, mtime
            # to the clock tick, size) could repeat for writes within one tick, never for a write
            # made after a version learned this late.
            self._known.put(key, (entry.version, value))
        return value

    async def _stamps(self, name: str, folder: str) -> dict[Digest, float]:
        """``<alg>/<hex>`` keys under the repository's ``folder`` by digest, with their times."""
        repo = self._repo(name)
        if repo is None:
            return {}
        prefix = repo + folder
        found: dict[Digest, float] = {}
        async for entry in self.driver.list(prefix):
            algorithm, _, hexpart = entry.key[len(prefix):].partition("/")
            digest = Digest(algorithm, hexpart)
            if entry.modified is not None and _digest_ok(digest):
                found[digest] = entry.modified
        return found
