"""What a manifest or index refers to, as containerd's garbage collector and registryd read it.

containerd keeps content alive from its images' targets down, following the
``containerd.io/gc.ref.content.*`` labels on each piece of content: an image
manifest's labels name its config and layers, an index's its manifests. A
manifest registryd stores gets those labels (``gc_labels``), so its children
live as long as it does, exactly as for an image containerd pulled itself.
"""
from __future__ import annotations

import json
from typing import Any

import attrs

from registryd.digest import Digest
from registryd.storage.containerd.names import digest_or_none

GC_REF = "containerd.io/gc.ref.content"


@attrs.frozen
class References:
    """What one manifest document names: blobs (config, layers) and child manifests with their media types."""

    blobs: tuple[Digest, ...] = ()
    manifests: tuple[tuple[Digest, str], ...] = ()


def _digest(descriptor: Any) -> Digest | None:
    if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
        return digest_or_none(descriptor["digest"])
    return None


def references(data: bytes) -> References:
    """What ``data`` (a manifest or an index, possibly not registryd's own) names; nothing if it is no JSON object."""
    try:
        document = json.loads(data)
    except ValueError:
        return References()
    if not isinstance(document, dict):
        return References()
    blobs: list[Digest] = []
    config = _digest(document.get("config"))
    if config is not None:
        blobs.append(config)
    for layer in document.get("layers") or []:
        digest = _digest(layer)
        if digest is not None:
            blobs.append(digest)
    manifests: list[tuple[Digest, str]] = []
    for child in document.get("manifests") or []:
        digest = _digest(child)
        if digest is not None:
            media_type = child.get("mediaType")
            manifests.append((digest, media_type if isinstance(media_type, str) else ""))
    return References(tuple(blobs), tuple(manifests))


def gc_labels(data: bytes) -> dict[str, str]:
    """containerd's GC reference labels for a manifest or index: config, l.<i> per layer, m.<i> per manifest."""
    labels: dict[str, str] = {}
    try:
        document = json.loads(data)
    except ValueError:
        return labels
    if not isinstance(document, dict):
        return labels
    config = _digest(document.get("config"))
    if config is not None:
        labels[f"{GC_REF}.config"] = str(config)
    for index, layer in enumerate(document.get("layers") or []):
        digest = _digest(layer)
        if digest is not None:
            labels[f"{GC_REF}.l.{index}"] = str(digest)
    for index, child in enumerate(document.get("manifests") or []):
        digest = _digest(child)
        if digest is not None:
            labels[f"{GC_REF}.m.{index}"] = str(digest)
    return labels
