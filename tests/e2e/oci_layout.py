"""Deterministic OCI image layouts on disk, written with the standard library.

The e2e tests hand these layouts to real clients (``skopeo copy oci:DIR:TAG
docker://...``) and compare what comes back byte for byte, so everything
here is reproducible: tar entries carry fixed owners and mtimes, gzip
streams carry mtime 0, file contents come from a seeded PRNG and JSON is
serialised with fixed separators. The same calls always give the same
digests.

A layout is the directory described by the OCI image-layout spec::

    DIR/oci-layout            {"imageLayoutVersion": "1.0.0"}
    DIR/index.json            the top-level index; tags are ref.name annotations
    DIR/blobs/sha256/<hex>    every blob, manifests and indexes included

:func:`write_docker_dir` writes the other on-disk format skopeo reads, the
``dir:`` transport, which is how a Docker schema 2 manifest reaches a
registry unchanged (the ``oci:`` transport only carries OCI manifests).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"

#: The empty JSON blob of the image-spec (``{}``, 2 bytes) and its digest.
EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def sha256_digest(data: bytes) -> str:
    """The OCI digest string (``sha256:<hex>``) of some bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Compact JSON in insertion order: the bytes are the digest's input."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Blob:
    """Some bytes with the media type they are referenced under."""

    media_type: str
    data: bytes
    annotations: dict[str, str] | None = None
    platform: dict[str, str] | None = None
    artifact_type: str | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        """The OCI descriptor that points at this blob."""
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type is not None:
            desc["artifactType"] = self.artifact_type
        if self.platform is not None:
            desc["platform"] = dict(self.platform)
        if self.annotations:
            desc["annotations"] = dict(self.annotations)
        return desc

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class Layer:
    """A gzipped tar layer and the digest of its uncompressed tar (diff_id)."""

    blob: Blob
    diff_id: str
    path: str
    content: bytes


@dataclass(frozen=True)
class Image:
    """An image manifest with its config and layers."""

    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def blobs(self) -> list[Blob]:
        """Every blob the manifest references (config first, then layers)."""
        return [self.config, *(layer.blob for layer in self.layers)]


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform image index and the images it lists."""

    index: Blob
    images: tuple[Image, ...]

    @property
    def digest(self) -> str:
        return self.index.digest


@dataclass(frozen=True)
class Artifact:
    """An OCI 1.1 artifact: an image manifest with artifactType and subject."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    subject: dict[str, Any]
    artifact_type: str

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]


def file_content(name: str, size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes fixed by ``name`` and ``seed``."""
    rng = random.Random(f"{seed}:{name}")
    return rng.randbytes(size)


def tar_bytes(path: str, content: bytes) -> bytes:
    """An uncompressed tar with one regular file, identical on every run."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = os.path.dirname(path)
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 0
            tar.addfile(info)
        info = tarfile.TarInfo(path)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        # uid, gid, uname and gname default to 0 and "": nothing of the
        # machine that builds the layer leaks into its digest.
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def make_layer(path: str, content: bytes, media_type: str = OCI_LAYER_GZIP) -> Layer:
    """A ``tar+gzip`` layer holding ``path`` with ``content``."""
    raw = tar_bytes(path, content)
    # mtime=0 and no file name in the header: the gzip stream is reproducible.
    compressed = gzip.compress(raw, compresslevel=6, mtime=0)
    return Layer(Blob(media_type, compressed), sha256_digest(raw), path, content)


def make_config(layers: Sequence[Layer], architecture: str = "amd64", os_name: str = "linux",
                media_type: str = OCI_CONFIG, variant: str | None = None) -> Blob:
    """An image config whose rootfs lists the layers' diff_ids."""
    config: dict[str, Any] = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": architecture,
        "os": os_name,
    }
    if variant:
        config["variant"] = variant
    config["config"] = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    config["history"] = [{"created": "1970-01-01T00:00:00Z", "created_by": f"registryd e2e: {layer.path}"}
                         for layer in layers]
    return Blob(media_type, canonical_json(config))


def make_image(layers: Sequence[Layer], architecture: str = "amd64", os_name: str = "linux",
               annotations: dict[str, str] | None = None, variant: str | None = None) -> Image:
    """An OCI image manifest over ``layers`` with a matching config."""
    config = make_config(layers, architecture, os_name, variant=variant)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    platform = {"architecture": architecture, "os": os_name}
    if variant:
        platform["variant"] = variant
    return Image(Blob(OCI_MANIFEST, canonical_json(manifest), platform=platform), config, tuple(layers))


def make_docker_image(layers: Sequence[Layer], architecture: str = "amd64", os_name: str = "linux") -> Image:
    """A Docker schema 2 manifest (``...distribution.manifest.v2+json``).

    The layers are re-labelled with the Docker layer media type; their bytes
    and digests stay the same as the OCI ones.
    """
    docker_layers = tuple(
        Layer(Blob(DOCKER_LAYER_GZIP, layer.blob.data), layer.diff_id, layer.path, layer.content)
        for layer in layers
    )
    config = make_config(docker_layers, architecture, os_name, media_type=DOCKER_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.blob.descriptor() for layer in docker_layers],
    }
    return Image(Blob(DOCKER_MANIFEST, canonical_json(manifest)), config, docker_layers)


def make_index(images: Iterable[Image], annotations: dict[str, str] | None = None) -> ImageIndex:
    """An OCI image index listing each image with its platform."""
    images = tuple(images)
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [image.manifest.descriptor() for image in images],
    }
    if annotations:
        index["annotations"] = dict(annotations)
    return ImageIndex(Blob(OCI_INDEX, canonical_json(index)), images)


def make_artifact(subject: Blob, artifact_type: str = "application/vnd.registryd.e2e.sbom.v1+json",
                  payload: bytes = b'{"sbom":"registryd e2e"}',
                  payload_media_type: str = "application/vnd.registryd.e2e.sbom.v1+json",
                  annotations: dict[str, str] | None = None) -> Artifact:
    """An artifact manifest per image-spec 1.1 "guidelines for artifact usage".

    An image manifest with ``artifactType`` set, the empty config descriptor
    (``application/vnd.oci.empty.v1+json``, the 2 bytes ``{}``), one payload
    layer and a ``subject`` pointing at ``subject`` (an image manifest).
    """
    config = Blob(OCI_EMPTY, EMPTY_JSON)
    layer = Blob(payload_media_type, payload)
    subject_desc = {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "subject": subject_desc,
        "annotations": dict(annotations or {"org.opencontainers.image.created": "1970-01-01T00:00:00Z"}),
    }
    blob = Blob(OCI_MANIFEST, canonical_json(manifest), artifact_type=artifact_type,
                annotations=manifest["annotations"])
    return Artifact(blob, config, (layer,), subject_desc, artifact_type)


def sample_layers(prefix: str, count: int = 3, seed: int = 0, sizes: Sequence[int] | None = None) -> list[Layer]:
    """``count`` layers, each one file ``<prefix>/fileN`` of deterministic bytes."""
    sizes = list(sizes) if sizes is not None else [1024 * (i + 1) for i in range(count)]
    return [make_layer(f"{prefix}/file{i}", file_content(f"{prefix}/{i}", size, seed))
            for i, size in enumerate(sizes)]


class OCILayout:
    """An OCI image layout directory being written.

    Blobs are written as they are added; :meth:`tag` records a ref.name in
    ``index.json``, which is rewritten at once so the directory is always a
    valid layout.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.blob_dir = os.path.join(self.root, "blobs", "sha256")
        os.makedirs(self.blob_dir, exist_ok=True)
        with open(os.path.join(self.root, "oci-layout"), "w") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}).decode())
        self.manifests: list[dict[str, Any]] = []
        self._write_index()

    def add_blob(self, blob: Blob) -> Blob:
        path = os.path.join(self.blob_dir, blob.digest.split(":", 1)[1])
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(blob.data)
        return blob

    def add_image(self, image: Image, tag: str | None = None) -> Image:
        for blob in image.blobs():
            self.add_blob(blob)
        self.add_blob(image.manifest)
        if tag is not None:
            self.tag(image.manifest, tag)
        return image

    def add_index(self, index: ImageIndex, tag: str | None = None) -> ImageIndex:
        for image in index.images:
            self.add_image(image)
        self.add_blob(index.index)
        if tag is not None:
            self.tag(index.index, tag)
        return index

    def add_artifact(self, artifact: Artifact, tag: str | None = None) -> Artifact:
        for blob in artifact.blobs():
            self.add_blob(blob)
        self.add_blob(artifact.manifest)
        if tag is not None:
            self.tag(artifact.manifest, tag)
        return artifact

    def tag(self, manifest: Blob, name: str) -> None:
        """Point ``name`` at ``manifest`` in index.json (replacing any old one)."""
        self.manifests = [m for m in self.manifests if m.get("annotations", {}).get(REF_NAME) != name]
        desc = manifest.descriptor()
        desc.pop("platform", None)
        desc["annotations"] = {**desc.get("annotations", {}), REF_NAME: name}
        self.manifests.append(desc)
        self._write_index()

    def _write_index(self) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.manifests}
        tmp = os.path.join(self.root, "index.json.tmp")
        with open(tmp, "wb") as f:
            f.write(canonical_json(index))
        os.replace(tmp, os.path.join(self.root, "index.json"))


def write_docker_dir(root: str | os.PathLike[str], image: Image) -> None:
    """Write ``image`` in skopeo's ``dir:`` format (manifest.json + blobs by hex).

    This is the way to give skopeo a Docker schema 2 manifest whose bytes it
    pushes unchanged.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "version"), "w") as f:
        f.write("Directory Transport Version: 1.1\n")
    with open(os.path.join(root, "manifest.json"), "wb") as f:
        f.write(image.manifest.data)
    for blob in image.blobs():
        with open(os.path.join(root, blob.digest.split(":", 1)[1]), "wb") as f:
            f.write(blob.data)


# -- reading a layout back ---------------------------------------------------

def read_blob(root: str | os.PathLike[str], digest: str) -> bytes:
    """The bytes of ``digest`` in layout ``root`` (verified against the digest)."""
    algorithm, hexdigest = digest.split(":", 1)
    with open(os.path.join(os.fspath(root), "blobs", algorithm, hexdigest), "rb") as f:
        data = f.read()
    if sha256_digest(data) != digest:
        raise AssertionError(f"blob {digest} in {root} does not match its digest")
    return data


def read_index(root: str | os.PathLike[str]) -> dict[str, Any]:
    with open(os.path.join(os.fspath(root), "index.json"), "rb") as f:
        return json.load(f)


def resolve_tag(root: str | os.PathLike[str], tag: str) -> dict[str, Any]:
    """The descriptor that ``tag`` names in the layout's index.json."""
    for desc in read_index(root).get("manifests", []):
        if desc.get("annotations", {}).get(REF_NAME) == tag:
            return desc
    raise KeyError(f"tag {tag!r} not in {root}/index.json")


def referenced_digests(root: str | os.PathLike[str], digest: str) -> dict[str, bytes]:
    """Every blob reachable from manifest/index ``digest``, by digest, with bytes.

    The bytes of the root itself are included; each blob's bytes are checked
    against its digest on the way.
    """
    found: dict[str, bytes] = {}
    pending = [digest]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        data = read_blob(root, current)
        found[current] = data
        doc = json.loads(data)
        for child in doc.get("manifests", []):
            pending.append(child["digest"])
        if "config" in doc:
            found.setdefault(doc["config"]["digest"], read_blob(root, doc["config"]["digest"]))
        for layer in doc.get("layers", []):
            found.setdefault(layer["digest"], read_blob(root, layer["digest"]))
    return found


def read_docker_dir(root: str | os.PathLike[str]) -> tuple[bytes, dict[str, bytes]]:
    """The manifest bytes and the blobs (by digest) of a ``dir:`` image."""
    root = os.fspath(root)
    with open(os.path.join(root, "manifest.json"), "rb") as f:
        manifest = f.read()
    doc = json.loads(manifest)
    blobs = {}
    for desc in [doc["config"], *doc["layers"]]:
        with open(os.path.join(root, desc["digest"].split(":", 1)[1]), "rb") as f:
            blobs[desc["digest"]] = f.read()
    return manifest, blobs
