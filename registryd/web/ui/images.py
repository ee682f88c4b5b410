"""What the UI shows of one manifest: read from the store, never from an upstream.

A manifest and its config are content-addressed, so what is learned of a
digest stays true: ``ImageReader`` keeps the facts of each digest it read
(bounded, least recently used out), and a tag list of 1,000 tags costs one
tag read per tag once the digests are known. Facts are kept only when
everything they need was in the store (a mirror may hold a manifest whose
config it has not fetched yet).
"""
from __future__ import annotations

import collections
import json
from typing import Any, Callable, Iterable, Protocol

import attrs

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.manifests import IMAGE_TYPES, INDEX_TYPES
from registryd.storage.driver import TooLarge

#: Manifests are capped when pushed; this only bounds a read.
MANIFEST_LIMIT = 64 * 1024 * 1024
#: Image configs are small JSON documents; a larger one is not shown.
CONFIG_LIMIT = 8 * 1024 * 1024
#: Digests whose facts are remembered.
FACTS_KEPT = 20_000


def describe_platform(platform: Any) -> str | None:
    """``{"os": "linux", "architecture": "arm64", "variant": "v8"}`` -> ``linux/arm64/v8``."""
    if not isinstance(platform, dict):
        return None
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    text = "/".join(str(p) for p in parts if isinstance(p, str) and p)
    return text or None


@attrs.frozen
class ImageFacts:
    """One line of a tag list."""

    digest: Digest
    media_type: str | None
    artifact_type: str | None
    platforms: tuple[str, ...]
    size: int | None            # the manifest plus what it names, as declared (compressed layers)
    created: str | None         # the config's ``created`` (for an index: the newest of its images)
    complete: bool              # everything was in the store

    def document(self) -> dict[str, Any]:
        return {"digest": str(self.digest), "media_type": self.media_type, "artifact_type": self.artifact_type,
                "platforms": list(self.platforms), "size": self.size, "created": self.created}


def _load(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _size(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _digest(value: Any) -> Digest | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_digest(value)
    except RegistryError:
        return None


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _string_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def media_type_of(document: dict[str, Any]) -> str:
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    return "application/vnd.oci.image.index.v1+json" if "manifests" in document else \
        "application/vnd.oci.image.manifest.v1+json"


class BlobReads(Protocol):
    """What the reader needs of a blob store (a BlobBackend, or registryd.web.ui.offload.TwinBlobs)."""

    async def read(self, digest: Digest, limit: int) -> bytes | None: ...


class ImageReader:
    """Manifests and configs of the shared blob store, as the UI describes them."""

    def __init__(self, blobs: BlobReads, kept: int = FACTS_KEPT,
                 known: Callable[[Digest], ImageFacts | None] | None = None) -> None:
        """``blobs``: anything with ``read`` (registryd.web.ui.offload.TwinBlobs in a worker thread);
        ``known``: another reader's ``peek``, asked before a read (a batch in a thread learns
        into its own reader, and the reactor's keeps what it learned: ``remember``)."""
        self._blobs = blobs
        self._kept = kept
        self._known = known
        self._facts: collections.OrderedDict[Digest, ImageFacts] = collections.OrderedDict()

    def peek(self, digest: Digest) -> ImageFacts | None:
        """What is known of ``digest``, without touching the order (safe from another thread)."""
        return self._facts.get(digest)

    def learned(self) -> list[ImageFacts]:
        return list(self._facts.values())

    def remember(self, facts: Iterable[ImageFacts]) -> None:
        for one in facts:
            if one.complete:
                self._facts[one.digest] = one
                self._facts.move_to_end(one.digest)
        while len(self._facts) > self._kept:
            self._facts.popitem(last=False)

    async def manifest(self, digest: Digest) -> tuple[bytes, dict[str, Any]] | None:
        data = await self._blobs.read(digest, MANIFEST_LIMIT)
        document = _load(data)
        return (data, document) if data is not None and document is not None else None

    async def config(self, descriptor: Any) -> dict[str, Any] | None:
        digest = _digest(descriptor.get("digest")) if isinstance(descriptor, dict) else None
        if digest is None:
            return None
        try:
            return _load(await self._blobs.read(digest, CONFIG_LIMIT))
        except TooLarge:   # a config too large to show is simply not shown
            return None

    async def facts(self, digest: Digest, depth: int = 0) -> ImageFacts:
        known = self._facts.get(digest)
        if known is not None:
            self._facts.move_to_end(digest)
            return known
        known = self._known(digest) if self._known is not None else None
        if known is not None:
            return known
        facts = await self._read_facts(digest, depth)
        if facts.complete:
            self._facts[digest] = facts
            while len(self._facts) > self._kept:
                self._facts.popitem(last=False)
        return facts

    async def _read_facts(self, digest: Digest, depth: int) -> ImageFacts:
        found = await self.manifest(digest)
        if found is None:
            return ImageFacts(digest, None, None, (), None, None, False)
        data, document = found
        media_type = media_type_of(document)
        artifact_type = document.get("artifactType") if isinstance(document.get("artifactType"), str) else None
        if media_type in INDEX_TYPES or "manifests" in document:
            return await self._index_facts(digest, data, document, media_type, artifact_type, depth)
        config_descriptor = document.get("config")
        found_layers = document.get("layers")
        layers: list[Any] = found_layers if isinstance(found_layers, list) else []
        size = len(data) + _size(config_descriptor.get("size") if isinstance(config_descriptor, dict) else 0)
        size += sum(_size(layer.get("size")) for layer in layers if isinstance(layer, dict))
        if artifact_type is None and isinstance(config_descriptor, dict) and media_type in IMAGE_TYPES:
            config_type = config_descriptor.get("mediaType")
            if isinstance(config_type, str) and "image.config" not in config_type \
                    and "container.image" not in config_type:
                artifact_type = config_type
        config = await self.config(config_descriptor)
        platform = describe_platform(config) if config is not None else None
        created = config.get("created") if config is not None and isinstance(config.get("created"), str) else None
        return ImageFacts(digest, media_type, artifact_type, (platform,) if platform else (), size, created,
                          config is not None or artifact_type is not None)

    async def _index_facts(self, digest: Digest, data: bytes, document: dict[str, Any], media_type: str,
                           artifact_type: str | None, depth: int) -> ImageFacts:
        entries = [m for m in document.get("manifests") or [] if isinstance(m, dict)]
        platforms = tuple(p for p in (describe_platform(m.get("platform")) for m in entries) if p)
        size, created, complete = len(data), None, True
        for entry in entries:
            child = _digest(entry.get("digest"))
            if child is None or depth > 0:
                size += _size(entry.get("size"))
                continue
            facts = await self.facts(child, depth + 1)
            if facts.size is None:
                size += _size(entry.get("size"))
                complete = False
            else:
                size += facts.size
            if facts.created and (created is None or facts.created > created):
                created = facts.created
            complete = complete and facts.complete
        return ImageFacts(digest, media_type, artifact_type, platforms, size, created, complete)


# --- the image page ------------------------------------------------------------------------

@attrs.frozen
class Layer:
    media_type: str
    size: int
    digest: str
    annotations: dict[str, str]


@attrs.frozen
class Child:
    """One manifest of an index."""

    platform: str | None
    media_type: str
    size: int
    digest: str
    annotations: dict[str, str]


@attrs.frozen
class HistoryStep:
    created: str | None
    created_by: str
    comment: str | None
    empty_layer: bool


@attrs.frozen
class ImageConfig:
    platform: str | None
    created: str | None
    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    exposed_ports: list[str]
    labels: dict[str, str]
    user: str | None
    working_dir: str | None
    history: list[HistoryStep]

    def document(self) -> dict[str, Any]:
        return {"platform": self.platform, "created": self.created, "entrypoint": self.entrypoint,
                "cmd": self.cmd, "env": self.env, "exposed_ports": self.exposed_ports, "labels": self.labels,
                "user": self.user, "working_dir": self.working_dir,
                "history": [attrs.asdict(step) for step in self.history]}


def read_config(config: dict[str, Any]) -> ImageConfig:
    """The fields of an image config a person asks about (the OCI image spec's names)."""
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    assert isinstance(inner, dict)
    history = []
    for step in config.get("history") or []:
        if isinstance(step, dict):
            history.append(HistoryStep(
                step.get("created") if isinstance(step.get("created"), str) else None,
                str(step.get("created_by") or ""),
                step.get("comment") if isinstance(step.get("comment"), str) else None,
                bool(step.get("empty_layer"))))
    ports = inner.get("ExposedPorts")
    return ImageConfig(
        platform=describe_platform(config),
        created=config.get("created") if isinstance(config.get("created"), str) else None,
        entrypoint=_strings(inner.get("Entrypoint")),
        cmd=_strings(inner.get("Cmd")),
        env=_strings(inner.get("Env")),
        exposed_ports=sorted(str(p) for p in ports) if isinstance(ports, dict) else [],
        labels=_string_map(inner.get("Labels")),
        user=str(inner["User"]) if inner.get("User") else None,
        working_dir=str(inner["WorkingDir"]) if inner.get("WorkingDir") else None,
        history=history,
    )


@attrs.frozen
class ImageDetail:
    """Everything the image page shows of one manifest."""

    digest: Digest
    media_type: str
    artifact_type: str | None
    size: int                         # of the manifest document itself
    annotations: dict[str, str]
    children: list[Child]             # an index's manifests
    layers: list[Layer]               # an image's layers
    config_descriptor: Layer | None
    config: ImageConfig | None        # None: not an image, or its config is not in the store
    subject: str | None
    raw: str                          # the manifest as stored, for the page's raw view

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def document(self) -> dict[str, Any]:
        return {
            "digest": str(self.digest), "media_type": self.media_type, "artifact_type": self.artifact_type,
            "size": self.size, "annotations": self.annotations, "subject": self.subject,
            "manifests": [attrs.asdict(child) for child in self.children] if self.is_index else None,
            "layers": None if self.is_index else [attrs.asdict(layer) for layer in self.layers],
            "config": None if self.config_descriptor is None else dict(
                attrs.asdict(self.config_descriptor), **(self.config.document() if self.config else {})),
        }


def _layer(value: Any) -> Layer | None:
    if not isinstance(value, dict):
        return None
    return Layer(str(value.get("mediaType") or ""), _size(value.get("size")), str(value.get("digest") or ""),
                 _string_map(value.get("annotations")))


async def read_detail(reader: ImageReader, digest: Digest) -> ImageDetail | None:
    found = await reader.manifest(digest)
    if found is None:
        return None
    data, document = found
    media_type = media_type_of(document)
    artifact_type = document.get("artifactType") if isinstance(document.get("artifactType"), str) else None
    subject = document.get("subject")
    children: list[Child] = []
    layers: list[Layer] = []
    config_descriptor = config = None
    if media_type in INDEX_TYPES or "manifests" in document:
        for entry in document.get("manifests") or []:
            if isinstance(entry, dict):
                children.append(Child(describe_platform(entry.get("platform")), str(entry.get("mediaType") or ""),
                                      _size(entry.get("size")), str(entry.get("digest") or ""),
                                      _string_map(entry.get("annotations"))))
    else:
        layers = [layer for layer in map(_layer, document.get("layers") or []) if layer is not None]
        config_descriptor = _layer(document.get("config"))
        raw_config = await reader.config(document.get("config"))
        if raw_config is not None and ("config" in raw_config or "rootfs" in raw_config):
            config = read_config(raw_config)
    try:
        raw = json.dumps(document, indent=2, sort_keys=False)
    except ValueError:
        raw = data.decode("utf-8", "replace")
    return ImageDetail(digest, media_type, artifact_type, len(data), _string_map(document.get("annotations")),
                       children, layers, config_descriptor, config,
                       str(subject.get("digest")) if isinstance(subject, dict) and subject.get("digest") else None,
                       raw)
