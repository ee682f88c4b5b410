"""``registryd export``: images from the data directory to an OCI image layout.

Everything is planned before a byte is written: each reference is resolved
(tag file, manifest revision), each manifest read, checked against its
digest and parsed, and every blob of the closure found with the size its
descriptor gives. Only then are blobs copied, re-hashed on the way, into a
temporary sibling of the output that is renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import attrs

from registryd.admin import EXIT_DAMAGE, EXIT_OK, EXIT_USAGE, AdminError
from registryd.admin.image_list import (
    ImageListError,
    ImageRef,
    Platform,
    describe_platform,
    parse_platform,
    parse_reference,
    read_image_file,
    unique,
)
from registryd.admin.layout import (
    DataDir,
    Repository,
    add_store_arguments,
    open_data_dir,
    os_errors_reported,
    read_file,
    read_tag,
)
from registryd.admin.oci_layout import (
    CONTAINERD_NAME,
    REF_NAME,
    ContentError,
    LayoutError,
    LayoutWriter,
    check_output,
    descriptors_in,
    is_tar,
    open_writer,
)
from registryd.admin.progress import Progress, human_size
from registryd.config import DOCKER_HUB, ConfigError, load_config
from registryd.digest import Digest, digest_of, parse_digest
from registryd.errors import RegistryError
from registryd.manifests import INDEX_TYPES, NON_DISTRIBUTABLE, parse_manifest

HELP = "write images and all their content to an OCI image layout (a directory or a .tar)"

DESCRIPTION = """\
Copy images out of the data directory into an OCI image layout
(oci-layout, index.json, blobs/<alg>/<hex>): a directory, or a tar file when
--output ends in .tar. Images are named one per line in --image-file (blank
lines and # comments are ignored) and with --image, as clients pull them
from registryd: team/app:1.0, docker.io/library/alpine:3.19 (a mirrored
repository: its upstream namespace first), or name@sha256:<hex>; a name
without a tag means :latest.

Each image is copied whole: its manifest; for an image index, its child
manifests (only those matching a --platform, when given: the index itself is
copied unchanged, so its digest stays valid); configs and layers. A manifest's
subject is not copied (export it by name if it is wanted). Every blob is
re-hashed while it is copied. index.json names each image with the
annotations org.opencontainers.image.ref.name and io.containerd.image.name set
to its full reference, so `skopeo copy oci:DIR:docker.io/library/alpine:3.19
...` or `registryd import` find it.

The output is written next to its final place and renamed into it when
complete: a failed export leaves nothing behind. The output must not exist
(a directory may exist if empty). export only reads the data directory, so it
is safe alongside a running server."""

EPILOG = """\
exit status:
  0  exported
  1  an image is unknown, not fully cached (a mirrored image: pull it through
     registryd or run `registryd preload` first), or its content is damaged;
     nothing was written
  2  bad arguments: a bad line in the image file, a bad reference or
     --platform, an output that exists
  3  the export could not be done: missing or unreadable data directory, bad
     config file, permission denied, an I/O error"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--image-file", metavar="FILE",
                        help="the images to export, one reference per line (- for standard input)")
    parser.add_argument("--image", action="append", default=[], metavar="REF",
                        help="an image to export as well (repeatable)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR|TAR",
                        help="the layout to write: a tar file if it ends in .tar, else a directory")
    parser.add_argument("--platform", action="append", default=[], type=parse_platform, metavar="OS/ARCH[/VARIANT]",
                        help="export only these children of an image index (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")


@attrs.frozen
class Blob:
    """One blob to copy: where it lives, the size its descriptor gives, its bytes if a manifest."""

    digest: Digest
    size: int
    path: str
    data: bytes | None = None


@attrs.define
class Planned:
    """One image to export and its whole closure."""

    label: str                     # the reference as given
    ref_name: str                  # the full reference written into index.json
    repository: Repository
    digest: Digest
    media_type: str
    blobs: dict[Digest, Blob] = attrs.field(factory=dict)
    platforms: list[str] = attrs.field(factory=list)

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs.values())

    def descriptor(self) -> dict[str, Any]:
        size = self.blobs[self.digest].size
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": size,
                "annotations": {REF_NAME: self.ref_name, CONTAINERD_NAME: self.ref_name}}


class Planner:
    """Resolves references against the data directory, as the server's router would."""

    def __init__(self, data: DataDir, default: str | None, platforms: list[Platform]) -> None:
        self.data = data
        self.default = default
        self.platforms = platforms
        self.folders = {namespace: namespace.replace(":", "_") for namespace in data.namespaces.values()}
        mirror = os.path.join(data.root, "mirror")
        if os.path.isdir(mirror):
            for folder in sorted(os.listdir(mirror)):
                self.folders.setdefault(data.namespace(folder), folder)

    def _mirrored(self, namespace: str, remote: str) -> Repository:
        if namespace == DOCKER_HUB and "/" not in remote:
            remote = f"library/{remote}"
        root = os.path.join(self.data.root, "mirror", self.folders.get(namespace, namespace.replace(":", "_")))
        return Repository(f"{namespace}/{remote}", remote, namespace, root)

    def repository(self, name: str) -> Repository:
        first, sep, rest = name.partition("/")
        if sep and first.lower() in self.folders:
            return self._mirrored(first.lower(), rest)
        local = Repository(name, name, None, os.path.join(self.data.root, "repositories"))
        if self.default is not None and not os.path.isdir(local.path):
            return self._mirrored(self.default, name)
        return local

    def plan(self, ref: ImageRef) -> Planned:
        label = str(ref)
        repository = self.repository(ref.name)
        if ref.by_digest:
            digest = parse_digest(ref.reference)
            ref_name = f"{repository.name}@{digest}"
        else:
            path = os.path.join(repository.path, "_manifests", "tags", ref.reference)
            if not os.path.isfile(path):
                raise self._unknown(label, repository, f"{repository.name} has no tag {ref.reference}")
            tag = read_tag(ref.reference, path)
            if tag.digest is None:
                raise AdminError(f"{label}: {tag.error} (run `registryd fsck`)", EXIT_DAMAGE)
            digest = tag.digest
            ref_name = f"{repository.name}:{ref.reference}"
        media_type = self._revision(repository, digest)
        if media_type is None:
            raise self._unknown(label, repository, f"{repository.name} has no manifest {digest}")
        planned = Planned(label, ref_name, repository, digest, media_type)
        self._manifest(planned, digest, media_type, None)
        return planned

    def _unknown(self, label: str, repository: Repository, why: str) -> AdminError:
        if repository.upstream is not None:
            why += (f" in the mirror cache (pull it through registryd or run "
                    f"`registryd preload --image {label}` first)")
        elif not os.path.isdir(repository.path):
            why = f"there is no repository {repository.name}"
        return AdminError(f"unknown image {label}: {why}", EXIT_DAMAGE)

    @staticmethod
    def _revision(repository: Repository, digest: Digest) -> str | None:
        data = read_file(repository.revision_path(digest))
        try:
            media_type = json.loads(data)["mediaType"] if data is not None else None
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return None
        return media_type if isinstance(media_type, str) else None

    def _missing(self, planned: Planned, digest: Digest) -> AdminError:
        if planned.repository.upstream is not None:
            return AdminError(f"{planned.label}: blob {digest} is not cached (the mirror holds only what was "
                              f"pulled): pull the image through registryd or run `registryd preload "
                              f"--image {planned.label}` first", EXIT_DAMAGE)
        return AdminError(f"{planned.label}: blob {digest} is missing from the data directory "
                          f"(run `registryd fsck`)", EXIT_DAMAGE)

    def _manifest(self, planned: Planned, digest: Digest, media_type: str, size: int | None) -> None:
        if digest in planned.blobs:
            return
        path = self.data.blob_path(digest)
        data = read_file(path)
        if data is None:
            raise self._missing(planned, digest)
        if digest_of(data, digest.algorithm) != digest:
            raise AdminError(f"{planned.label}: manifest {digest} is damaged: it does not match its digest "
                             f"(run `registryd fsck`)", EXIT_DAMAGE)
        if size is not None and len(data) != size:
            raise AdminError(f"{planned.label}: manifest {digest} has {len(data)} bytes where its descriptor "
                             f"says {size}", EXIT_DAMAGE)
        try:
            parse_manifest(data, media_type)
            document = json.loads(data)
            planned.blobs[digest] = Blob(digest, len(data), path, data)
            selected = 0
            for key, raw, (child_type, child, child_size, _) in descriptors_in(document, f"manifest {digest}"):
                if key == "manifests":
                    if self.platforms and not any(p.matches(raw.get("platform")) for p in self.platforms):
                        continue
                    selected += 1
                    if media_type in INDEX_TYPES and "platform" in raw:
                        planned.platforms.append(describe_platform(raw["platform"]))
                    self._manifest(planned, child, child_type, child_size)
                else:
                    self._blob(planned, child, child_size, child_type)
        except (RegistryError, LayoutError) as e:
            message = e.message if isinstance(e, RegistryError) else str(e)
            raise AdminError(f"{planned.label}: manifest {digest} cannot be exported: {message}", EXIT_DAMAGE) from None
        if media_type in INDEX_TYPES and self.platforms and not selected:
            wanted = ", ".join(str(p) for p in self.platforms)
            raise AdminError(f"{planned.label}: no manifest in index {digest} is for {wanted}", EXIT_DAMAGE)

    def _blob(self, planned: Planned, digest: Digest, size: int, media_type: str) -> None:
        if digest in planned.blobs:
            return
        path = self.data.blob_path(digest)
        try:
            actual = os.stat(path).st_size
        except (FileNotFoundError, NotADirectoryError):
            if media_type.startswith(NON_DISTRIBUTABLE):
                return  # a foreign layer: a registry is not expected to hold it
            raise self._missing(planned, digest) from None
        if actual != size:
            raise AdminError(f"{planned.label}: blob {digest} is damaged: it has {actual} bytes where its "
                             f"descriptor says {size} (run `registryd fsck`)", EXIT_DAMAGE)
        planned.blobs[digest] = Blob(digest, size, path)


def _references(args: argparse.Namespace) -> list[ImageRef]:
    refs: list[ImageRef] = []
    try:
        if args.image_file is not None:
            refs.extend(read_image_file(args.image_file))
    except ImageListError as e:
        raise AdminError(str(e), EXIT_USAGE) from None
    for text in args.image:
        try:
            refs.append(parse_reference(text.strip()))
        except ImageListError as e:
            raise AdminError(f"--image {text!r}: {e}", EXIT_USAGE) from None
    if not refs:
        raise AdminError("no images to export: give --image-file FILE or --image REF", EXIT_USAGE)
    return unique(refs)


def _default_upstream(args: argparse.Namespace) -> str | None:
    try:
        config = load_config(args.config, {"data_dir": args.data_dir})
    except ConfigError as e:
        raise AdminError(str(e)) from None
    return next((u.namespace for u in config.upstreams if u.default), None)


def _copy(writer: LayoutWriter, plans: list[Planned], progress: Progress) -> None:
    written: set[Digest] = set()
    for planned in plans:
        for blob in planned.blobs.values():
            if blob.digest in written:
                continue
            written.add(blob.digest)
            try:
                if blob.data is not None:
                    writer.add_bytes(blob.digest, blob.data)
                    progress.advance(blob.size)
                else:
                    try:
                        source = open(blob.path, "rb")
                    except FileNotFoundError:
                        raise AdminError(f"{planned.label}: blob {blob.digest} disappeared from the data "
                                         f"directory while it was exported", EXIT_DAMAGE) from None
                    with source:
                        writer.add_blob(blob.digest, blob.size, source, progress.advance)
            except ContentError as e:
                raise AdminError(f"{planned.label}: blob {blob.digest} is damaged: it {e} "
                                 f"(run `registryd fsck`)", EXIT_DAMAGE) from None
            progress.advance(items=1)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run(args: argparse.Namespace) -> int:
    refs = _references(args)
    output = os.path.abspath(args.output)
    try:
        check_output(output)
    except LayoutError as e:
        raise AdminError(str(e), EXIT_USAGE) from None
    data = open_data_dir(args)
    planner = Planner(data, _default_upstream(args), args.platform)
    with os_errors_reported():
        plans = [planner.plan(ref) for ref in refs]
        unique_blobs = {blob.digest: blob for planned in plans for blob in planned.blobs.values()}
        total = sum(blob.size for blob in unique_blobs.values())
        progress = Progress("registryd export: copying blobs", len(unique_blobs), total)
        writer = open_writer(output)
        try:
            _copy(writer, plans, progress)
            writer.commit([planned.descriptor() for planned in plans])
        except BaseException:
            writer.abort()
            raise
        finally:
            progress.close()
    kind = "tar" if is_tar(output) else "directory"
    if args.json:
        document = {
            "data_dir": data.root,
            "output": output,
            "format": kind,
            "images": [{"reference": p.label, "ref_name": p.ref_name, "repository": p.repository.name,
                        "kind": p.repository.kind, "digest": str(p.digest), "media_type": p.media_type,
                        "blobs": len(p.blobs), "size": p.size, "platforms": p.platforms} for p in plans],
            "blobs": len(unique_blobs),
            "size": total,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for p in plans:
        platforms = f", {', '.join(p.platforms)}" if p.platforms else ""
        print(f"exported {p.ref_name} {p.digest} ({_plural(len(p.blobs), 'blob')}, {human_size(p.size)}{platforms})")
    print(f"{_plural(len(plans), 'image')}, {_plural(len(unique_blobs), 'blob')}, {human_size(total)} "
          f"({total} bytes) written to {output} ({kind})")
    return EXIT_OK
