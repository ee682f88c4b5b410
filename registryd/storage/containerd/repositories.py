"""Repositories as containerd's images (a RepositoryBackend).

A repository is every image whose name starts with its image repository
(``registryd.storage.containerd.names``): ``<repo>:<tag>`` is a tag,
``<repo>@<digest>`` a manifest revision without one; the target of either
is a revision. A manifest inside a revision's index (a platform's manifest),
and every blob that a revision names, belongs to the repository too: that
is how images containerd pulled or imported itself are served whole.
A blob pushed to a repository before any manifest names it is recorded the
way containerd records where it pulled content from: the repository's path
in the content's ``containerd.io/distribution.source.<host>`` label.

Referrers are the revisions whose image carries the ``io.registryd.subject``
label; their descriptors are read from the manifests themselves. Pull times
are not kept (containerd's images have nowhere for them): ``pulls`` is empty.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any, Callable

import attrs

from registryd.digest import Digest, digest_of
from registryd.errors import RegistryError, denied, manifest_invalid
from registryd.manifests import parse_manifest
from registryd.names import check_name, check_tag, is_tag
from registryd.storage.containerd.blobs import ContainerdBlobs
from registryd.storage.containerd.client import ContainerdClient
from registryd.storage.containerd.labels import gc_labels, references
from registryd.storage.containerd.names import (
    ImageName, Naming, digest_name, digest_or_none, is_repository_name, parse_image_name, source_label, tag_name,
)
from registryd.storage.containerd.proto import containerd_api_pb2 as api

#: The image label naming the subject of a revision pushed with one (the referrers API).
SUBJECT_LABEL = "io.registryd.subject"
#: The name containerd's CRI gives an image besides its references: its image ID.
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
#: Manifests and indexes are small; this bounds a read of one.
MANIFEST_LIMIT = 4 * 1024 * 1024
#: Indexes nest (an index of indexes); deeper than this is not followed.
MAX_DEPTH = 4
#: Revisions whose closure is remembered (content is immutable: an entry never goes stale).
CLOSURES = 4096


@attrs.frozen
class Closure:
    """Everything a revision names, down through its indexes: blobs, and manifests with their media types."""

    blobs: frozenset[Digest]
    manifests: dict[Digest, str]


def _seconds(timestamp: Any) -> float:
    return float(timestamp.seconds) + timestamp.nanos / 1e9


class ContainerdRepositories:
    """The repositories one Naming gives containerd's images (see the module docstring)."""

    def __init__(self, client: ContainerdClient, blobs: ContainerdBlobs, naming: Naming,
                 read_only: bool = False, foreign_host: Callable[[str], str | None] | None = None) -> None:
        """``foreign_host``: the other registry a repository name belongs to, if any: such a
        repository is not registryd's to change (see ``check_own``); None: every name is."""
        self._client = client
        self._blobs = blobs
        self.naming = naming
        self._read_only = read_only
        self._foreign_host = foreign_host
        self._closures: OrderedDict[Digest, Closure] = OrderedDict()

    # -- helpers ------------------------------------------------------------------

    def _writable(self) -> None:
        if self._read_only:
            raise denied("this registry serves containerd's images read-only ([storage.containerd] read_only)")

    def check_own(self, name: str) -> None:
        """405 DENIED (as for a mirrored repository) for a change to an image named after another registry (``docker.io/library/x``):
        containerd's namespace is the kubelet's too, and an image recorded under that name, not
        pulled from there, would be what a pod of that image runs ([storage.containerd] foreign_names)."""
        host = self._foreign_host(name) if self._foreign_host is not None else None
        if host is not None:
            raise denied(f"{name[:255]} names {host}'s image on this node: registryd pushes and deletes "
                         f"images under its own host name only ([storage.containerd] foreign_names)")

    def _image_repository(self, name: str) -> str | None:
        return self.naming.image_repository(name) if is_repository_name(name) else None

    async def _images(self, name: str) -> list[tuple[ImageName, api.Image, Digest]]:
        """The images of repository ``name`` with their targets' digests (one listing of containerd's
        images); an image whose target registryd cannot name (sha384) is left out."""
        repository = self._image_repository(name)
        if repository is None:
            return []
        found = []
        for image in await self._client.images():
            parsed = parse_image_name(image.name)
            target = digest_or_none(image.target.digest)
            if parsed is not None and parsed.repository == repository and target is not None:
                found.append((parsed, image, target))
        return found

    async def _closure(self, digest: Digest, depth: int = 0) -> Closure:
        cached = self._closures.get(digest)
        if cached is not None:
            self._closures.move_to_end(digest)
            return cached
        data = await self._blobs.read(digest, MANIFEST_LIMIT)
        if data is None:
            return Closure(frozenset(), {})   # not (yet) here: nothing remembered
        named = references(data)
        blobs = set(named.blobs)
        manifests: dict[Digest, str] = {}
        for child, media_type in named.manifests:
            manifests[child] = media_type or _declared_type(await self._blobs.read(child, MANIFEST_LIMIT))
            if depth < MAX_DEPTH:
                below = await self._closure(child, depth + 1)
                blobs |= below.blobs
                manifests.update(below.manifests)
        closure = Closure(frozenset(blobs), manifests)
        self._closures[digest] = closure
        if len(self._closures) > CLOSURES:
            self._closures.popitem(last=False)
        return closure

    async def _descriptor(self, name: str, digest: Digest, media_type: str | None = None) -> api.Descriptor:
        info = await self._client.info(str(digest))
        if info is None:
            raise manifest_invalid(f"manifest {digest} is not in containerd's content store")
        if media_type is None:
            media_type = await self.manifest_media_type(name, digest)
        return api.Descriptor(media_type=media_type or "", digest=str(digest), size=info.size)

    def _checked_repository(self, name: str, tags: list[str] = []) -> str:
        check_name(name)
        for tag in tags:
            check_tag(tag)
        repository = self._image_repository(name)
        assert repository is not None
        return repository

    # -- reads --------------------------------------------------------------------

    async def exists(self, name: str) -> bool:
        return bool(await self._images(name))

    async def has_blob(self, name: str, digest: Digest) -> bool:
        repository = self._image_repository(name)
        if repository is None:
            return False
        info = await self._client.info(str(digest))
        if info is None:
            return False
        key, path = source_label(repository)
        if path in info.labels.get(key, "").split(","):
            return True
        for _, image, target in await self._images(name):
            if target == digest:
                return True
            closure = await self._closure(target)
            if digest in closure.blobs or digest in closure.manifests:
                return True
        return False

    async def manifest_media_type(self, name: str, digest: Digest) -> str | None:
        images = await self._images(name)
        for _, image, target in images:
            if target == digest:
                return image.target.media_type or _declared_type(await self._blobs.read(digest, MANIFEST_LIMIT))
        for _, image, target in images:
            closure = await self._closure(target)
            if digest in closure.manifests and await self._client.info(str(digest)) is not None:
                return closure.manifests[digest] or None
        return None

    async def resolve_tag(self, name: str, tag: str) -> Digest | None:
        repository = self._image_repository(name)
        if repository is None or not is_tag(tag):
            return None
        image = await self._client.image(tag_name(repository, tag))
        return digest_or_none(image.target.digest) if image is not None else None

    async def tag_mtime(self, name: str, tag: str) -> float | None:
        repository = self._image_repository(name)
        if repository is None or not is_tag(tag):
            return None
        image = await self._client.image(tag_name(repository, tag))
        return _seconds(image.updated_at) if image is not None else None

    async def tags(self, name: str) -> list[str] | None:
        images = await self._images(name)
        if not images:
            return None
        return sorted({parsed.tag for parsed, _, _ in images if parsed.tag is not None})

    async def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for _, image, digest in await self._images(name):
            if image.labels.get(SUBJECT_LABEL) != str(subject) or image.target.digest in found:
                continue
            data = await self._blobs.read(digest, MANIFEST_LIMIT)
            if data is None or digest_of(data, digest.algorithm) != digest:
                continue
            try:
                entry = parse_manifest(data, image.target.media_type or None).referrer_entry(digest, len(data))
            except RegistryError:
                continue
            if entry is not None and entry[0] == subject:
                found[image.target.digest] = entry[1]
        return list(found.values())

    async def revisions(self, name: str) -> dict[Digest, float]:
        revisions: dict[Digest, float] = {}
        for _, image, digest in await self._images(name):
            revisions[digest] = max(revisions.get(digest, 0.0), _seconds(image.updated_at))
        return revisions

    async def pulls(self, name: str) -> dict[Digest, float]:
        return {}

    async def catalog(self) -> list[str]:
        names = set()
        for image in await self._client.images():
            parsed = parse_image_name(image.name)
            if parsed is not None:
                name = self.naming.repository(parsed.repository)
                if name is not None:
                    names.add(name)
        return sorted(names)

    # -- writes -------------------------------------------------------------------

    async def link_blob(self, name: str, digest: Digest) -> None:
        self._writable()
        self.check_own(name)
        repository = self._checked_repository(name)
        info = await self._client.info(str(digest))
        if info is None:
            return   # nothing to record it on: a GET finds no blob, as on any store
        key, path = source_label(repository)
        paths = [p for p in info.labels.get(key, "").split(",") if p]
        if path not in paths:
            await self._client.update_labels(str(digest), {key: ",".join([*paths, path])})

    async def unlink_blob(self, name: str, digest: Digest) -> bool:
        self._writable()
        self.check_own(name)
        repository = self._image_repository(name)
        info = await self._client.info(str(digest)) if repository is not None else None
        if repository is None or info is None:
            return False
        key, path = source_label(repository)
        paths = [p for p in info.labels.get(key, "").split(",") if p]
        if path not in paths:
            return False
        # An empty value removes the label.
        await self._client.update_labels(str(digest), {key: ",".join(p for p in paths if p != path)})
        return True

    async def add_manifest(self, name: str, digest: Digest, media_type: str, tags: list[str],
                           referrer: tuple[Digest, dict[str, Any]] | None) -> None:
        """The content's GC labels (its children live as long as it does), its image
        ``<repo>@<digest>``, then its tags: each done before the next starts."""
        self._writable()
        self.check_own(name)
        repository = self._checked_repository(name, tags)
        data = await self._blobs.read(digest, MANIFEST_LIMIT)
        if data is None:
            raise manifest_invalid(f"manifest {digest} is not in containerd's content store")
        labels = gc_labels(data)
        if labels:
            await self._client.update_labels(str(digest), labels)
        image_labels = {SUBJECT_LABEL: str(referrer[0])} if referrer is not None else {}
        target = api.Descriptor(media_type=media_type, digest=str(digest), size=len(data))
        await self._client.put_image(api.Image(name=digest_name(repository, digest), target=target,
                                               labels=image_labels))
        for tag in tags:
            await self._client.put_image(api.Image(name=tag_name(repository, tag), target=target))

    async def set_tags(self, name: str, digest: Digest, tags: list[str]) -> None:
        self._writable()
        self.check_own(name)
        repository = self._checked_repository(name, tags)
        if not tags:
            return
        target = await self._descriptor(name, digest)
        for tag in tags:
            await self._client.put_image(api.Image(name=tag_name(repository, tag), target=target))

    async def delete_manifest(self, name: str, digest: Digest, subject: Digest | None) -> bool:
        """Every image of the repository whose target it is: its tags and its digest name.
        What nothing references any more is then containerd's GC's to reclaim."""
        self._writable()
        self.check_own(name)
        removed = False
        for _, image, target in await self._images(name):
            if target == digest:
                removed = await self._client.delete_image(image.name) or removed
        if removed:
            await self._forget_image_ids(digest)
        return removed

    async def _forget_image_ids(self, digest: Digest) -> None:
        """containerd's CRI names every image it sees in its namespace once more by its image ID
        (``sha256:<config digest>``), as kubelet's pulls are; that name would keep a deleted image's
        content from containerd's GC. Once no other name points at ``digest``, it goes too, as
        the CRI's own RemoveImage does."""
        named = await self._client.images([f"target.digest=={digest}"])
        if all(IMAGE_ID.fullmatch(image.name) for image in named):
            for image in named:
                await self._client.delete_image(image.name)

    async def touch_tag(self, name: str, tag: str, digest: Digest) -> None:
        """Point the tag at ``digest`` (what the upstream just confirmed): its image's updated time is now."""
        repository = self._image_repository(name)
        if repository is None or not is_tag(tag):
            return
        current = await self._client.image(tag_name(repository, tag))
        if current is not None and current.target.digest == str(digest):
            target = current.target
        else:
            target = await self._descriptor(name, digest)
        await self._client.put_image(api.Image(name=tag_name(repository, tag), target=target))

    async def delete_tag(self, name: str, tag: str) -> bool:
        self._writable()
        self.check_own(name)
        repository = self._image_repository(name)
        if repository is None or not is_tag(tag):
            return False
        return await self._client.delete_image(tag_name(repository, tag))

    async def record_pull(self, name: str, digest: Digest, when: float) -> None:
        """Not kept: containerd's images have no place for it (see the module docstring)."""


def _declared_type(data: bytes | None) -> str:
    """The ``mediaType`` a manifest declares about itself, or ""."""
    try:
        document = json.loads(data) if data is not None else None
    except ValueError:
        return ""
    declared = document.get("mediaType") if isinstance(document, dict) else None
    return declared if isinstance(declared, str) else ""
