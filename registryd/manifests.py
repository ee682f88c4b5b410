"""Parsing and validating pushed manifests (OCI image/index, Docker schema 2)."""
from __future__ import annotations

from typing import Any

import attrs

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError, manifest_invalid
from registryd.json_documents import load_json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES

# Layers a registry is not expected to hold (OCI "non-distributable",
# Docker "foreign" layers): they need not exist in the repository.
NON_DISTRIBUTABLE = (
    "application/vnd.oci.image.layer.nondistributable.",
    "application/vnd.docker.image.rootfs.foreign.",
)


@attrs.frozen
class Manifest:
    """What the registry needs to know about a manifest it accepts."""

    media_type: str
    blobs: tuple[Digest, ...]
    children: tuple[Digest, ...]
    subject: Digest | None
    artifact_type: str | None
    annotations: dict[str, str] | None

    def referrer_entry(self, digest: Digest, size: int,
                       media_type: str | None = None) -> tuple[Digest, dict[str, Any]] | None:
        """The (subject, descriptor) the referrers API lists this manifest by, if it has a subject."""
        if self.subject is None:
            return None
        descriptor: dict[str, Any] = {"mediaType": media_type or self.media_type, "digest": str(digest),
                                      "size": size}
        if self.artifact_type is not None:
            descriptor["artifactType"] = self.artifact_type
        if self.annotations:
            descriptor["annotations"] = self.annotations
        return self.subject, descriptor


def _content_type(header: str | None) -> str | None:
    if header is None:
        return None
    return header.split(";", 1)[0].strip().lower() or None


def _descriptor(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise manifest_invalid(f"{where} is not a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise manifest_invalid(f"{where} has no mediaType")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise manifest_invalid(f"{where} has no valid size")
    digest = value.get("digest")
    if not isinstance(digest, str):
        raise manifest_invalid(f"{where} has no digest")
    try:
        value = dict(value, digest=parse_digest(digest))
    except RegistryError as e:
        raise manifest_invalid(f"{where}: {e.message}") from None
    return value


def _descriptors(document: dict[str, Any], key: str, required: bool) -> list[dict[str, Any]]:
    items = document.get(key)
    if items is None and not required:
        return []
    if not isinstance(items, list):
        raise manifest_invalid(f"'{key}' must be a list of descriptors")
    return [_descriptor(item, f"{key}[{i}]") for i, item in enumerate(items)]


def _annotations(document: dict[str, Any]) -> dict[str, str] | None:
    annotations = document.get("annotations")
    if annotations is None:
        return None
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise manifest_invalid("'annotations' must map strings to strings")
    return annotations


def parse_manifest(data: bytes, content_type: str | None) -> Manifest:
    """Validate ``data`` as a manifest pushed with ``content_type``.

    The media type is the Content-Type, or the document's ``mediaType`` when
    the client sent none; when both are present they must agree.
    """
    try:
        document = load_json(data)
    except ValueError as e:
        raise manifest_invalid(f"not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise manifest_invalid("not a JSON object")
    if document.get("schemaVersion") != 2:
        raise manifest_invalid("schemaVersion must be 2")
    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise manifest_invalid("mediaType must be a string")
    header = _content_type(content_type)
    if header in (None, "application/json", "application/octet-stream"):
        header = None
    media_type = header or declared
    if media_type is None:
        # OCI manifests may omit mediaType; tell them apart by shape.
        media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
    if declared is not None and declared != media_type:
        raise manifest_invalid(f"mediaType {declared!r} does not match Content-Type {media_type!r}")
    if media_type not in MANIFEST_TYPES:
        raise manifest_invalid(f"unsupported manifest media type {media_type!r}")

    artifact_type = document.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise manifest_invalid("artifactType must be a string")
    subject = None
    if document.get("subject") is not None:
        subject = _descriptor(document["subject"], "subject")["digest"]

    blobs: list[Digest] = []
    children: list[Digest] = []
    if media_type in IMAGE_TYPES:
        config = _descriptor(document.get("config"), "config")
        blobs.append(config["digest"])
        for layer in _descriptors(document, "layers", required=False):
            if not layer["mediaType"].startswith(NON_DISTRIBUTABLE):
                blobs.append(layer["digest"])
        if artifact_type is None and media_type == OCI_MANIFEST:
            artifact_type = config["mediaType"]
    else:
        children = [d["digest"] for d in _descriptors(document, "manifests", required=True)]
    return Manifest(media_type, tuple(blobs), tuple(children), subject, artifact_type, _annotations(document))
