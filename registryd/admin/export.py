"""``registryd export``: images from the configured store to an OCI image layout.

Everything goes through the storage interface, so the same code exports
from the data directory and from an S3 bucket. Everything is planned before
a byte is written: each reference is resolved (tag, manifest revision), each
manifest read, checked against its digest and parsed, and every blob of the
closure found with the size its descriptor gives. Only then are blobs
copied, re-hashed on the way, into a temporary sibling of the output that is
renamed into place at the end.

A blob is never held in memory: a local file is copied in the IO pool; a
blob that is elsewhere is streamed into the layout, the download paused
while the disk catches up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred

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
from registryd.admin.oci_layout import (
    CONTAINERD_NAME,
    REF_NAME,
    BlobWriter,
    ContentError,
    LayoutError,
    LayoutWriter,
    check_output,
    descriptors_in,
    is_tar,
    open_writer,
)
from registryd.admin.progress import Progress
from registryd.admin.store_access import (
    add_store_arguments,
    load_admin_config,
    no_empty_dirs_left,
    run_with_store,
    store_errors_reported,
)
from registryd.config import DOCKER_HUB
from registryd.digest import Digest, digest_of, parse_digest
from registryd.errors import RegistryError
from registryd.manifests import INDEX_TYPES, NON_DISTRIBUTABLE, parse_manifest
from registryd.storage import layout
from registryd.storage.interface import Store
from registryd.storage.sink import Sink
from registryd.units import human_size


DESCRIPTION = """\
Copy images out of the store into an OCI image layout (oci-layout,
index.json, blobs/<alg>/<hex>): a directory, or a tar file when --output
ends in .tar. The store is the one the config file (-c) names, as `twistd
registryd` uses it: the data directory, or the S3 bucket of [storage]
driver = "s3" ([storage.s3]); export works the same on either. Images are
named one per line in --image-file (blank lines and # comments are ignored)
and with --image, as clients pull them from registryd: team/app:1.0,
docker.io/library/alpine:3.19 (a mirrored repository: its upstream namespace
first), or name@sha256:<hex>; a name without a tag means :latest.

Each image is copied whole: its manifest; for an image index, its child
manifests (only those matching a --platform, when given: the index itself is
copied unchanged, so its digest stays valid); configs and layers. A manifest's
subject is not copied (export it by name if it is wanted). Every blob is
re-hashed while it is copied, and streamed: none is held in memory.
index.json names each image with the annotations
org.opencontainers.image.ref.name and io.containerd.image.name set to its
full reference, so `skopeo copy oci:DIR:docker.io/library/alpine:3.19 ...`
or `registryd import` find it.

The output is written next to its final place and renamed into it when
complete: a failed export leaves nothing behind. The output must not exist
(a directory may exist if empty). export only reads the store (it records
no pulls either), so it is safe alongside a running server, on either
driver; on S3 it needs no data directory of its own."""

EPILOG = """\
exit status:
  0  exported
  1  an image is unknown, not fully cached (a mirrored image: pull it through
     registryd or run `registryd preload` first), or its content is damaged;
     nothing was written
  2  bad arguments: a bad line in the image file, a bad reference or
     --platform, an output that exists
  3  the export could not be done: missing or unreadable data directory, an
     S3 bucket that cannot be reached or refuses, bad config file, permission
     denied, an I/O error"""


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


#: The largest manifest read: what the API serves (registryd.web.app.MANIFEST_READ_LIMIT).
MANIFEST_LIMIT = 64 * 1024 * 1024
#: Bytes of a streamed blob that may wait for the disk before the download is paused,
#: and the level it is resumed at.
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024


@attrs.frozen
class Blob:
    """One blob to copy: the size its descriptor gives, its bytes if a manifest."""

    digest: Digest
    size: int
    data: bytes | None = None


@attrs.frozen
class Repository:
    """A repository as clients pull it, and the store's metadata of it."""

    name: str               # "team/app", "docker.io/library/alpine"
    remote: str             # its name in ``backend``
    upstream: str | None    # the upstream namespace of a mirrored repository
    backend: Any            # registryd.storage.interface.RepositoryBackend

    @property
    def kind(self) -> str:
        return "local" if self.upstream is None else "mirror"


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
    """Resolves references against the store, as the server's router would."""

    def __init__(self, store: Store, folders: dict[str, str], default: str | None, platforms: list[Platform]) -> None:
        self.store = store
        self.location = store.location()
        self.default = default
        self.platforms = platforms
        self._folders = folders            # folder under mirror/ -> namespace, from the config
        self.namespaces = set(folders.values())

    async def find_mirrors(self) -> None:
        """Add the namespaces the store caches: a folder no upstream names is ``host_port``."""
        for folder in await self.store.mirror_folders():
            self.namespaces.add(self._folders.get(folder) or folder.replace("_", ":"))

    def _mirrored(self, namespace: str, remote: str) -> Repository:
        if namespace == DOCKER_HUB and "/" not in remote:
            remote = f"library/{remote}"
        return Repository(f"{namespace}/{remote}", remote, namespace, self.store.mirror_repositories(namespace))

    async def repository(self, name: str) -> Repository:
        first, sep, rest = name.partition("/")
        if sep and first.lower() in self.namespaces:
            return self._mirrored(first.lower(), rest)
        local = Repository(name, name, None, self.store.repositories)
        if await local.backend.exists(name):
            return local
        if self.default is not None:
            return self._mirrored(self.default, name)
        # No config says which upstream is the default (``-d`` alone): the
        # mirror cache that holds the name is the one a config would have named.
        holders = [namespace for namespace in sorted(self.namespaces)
                   if await self._holds(self._mirrored(namespace, name))]
        if len(holders) > 1:
            raise AdminError(f"{name} is cached from {' and '.join(holders)}: name the upstream "
                             f"({holders[0]}/{name}) or give the config (-c) that says which is the default",
                             EXIT_USAGE)
        return self._mirrored(holders[0], name) if holders else local

    @staticmethod
    async def _holds(repository: Repository) -> bool:
        return bool(await repository.backend.exists(repository.remote))

    async def plan(self, ref: ImageRef) -> Planned:
        label = str(ref)
        repository = await self.repository(ref.name)
        if ref.by_digest:
            digest = parse_digest(ref.reference)
            ref_name = f"{repository.name}@{digest}"
        else:
            try:
                found = await repository.backend.resolve_tag(repository.remote, ref.reference)
            except (RegistryError, ValueError):
                raise AdminError(f"{label}: the tag {ref.reference} of {repository.name} does not hold a digest "
                                 f"(run `registryd fsck`)", EXIT_DAMAGE) from None
            if found is None:
                raise await self._unknown(label, repository, f"{repository.name} has no tag {ref.reference}")
            digest = found
            ref_name = f"{repository.name}:{ref.reference}"
        media_type = await self._revision(repository, digest)
        if media_type is None:
            raise await self._unknown(label, repository, f"{repository.name} has no manifest {digest}")
        planned = Planned(label, ref_name, repository, digest, media_type)
        await self._manifest(planned, digest, media_type, None)
        return planned

    async def _unknown(self, label: str, repository: Repository, why: str) -> AdminError:
        if repository.upstream is not None:
            why += (f" in the mirror cache (pull it through registryd or run "
                    f"`registryd preload --image {label}` first)")
        elif not await repository.backend.exists(repository.remote):
            why = f"there is no repository {repository.name}"
        return AdminError(f"unknown image {label}: {why}", EXIT_DAMAGE)

    @staticmethod
    async def _revision(repository: Repository, digest: Digest) -> str | None:
        """The revision's media type; None for none, or one that is no ``{"mediaType": ...}``."""
        try:
            media_type = await repository.backend.manifest_media_type(repository.remote, digest)
        except (ValueError, KeyError, TypeError):
            return None
        return media_type if isinstance(media_type, str) else None

    def missing(self, planned: Planned, digest: Digest) -> AdminError:
        if planned.repository.upstream is not None:
            return AdminError(f"{planned.label}: blob {digest} is not cached (the mirror holds only what was "
                              f"pulled): pull the image through registryd or run `registryd preload "
                              f"--image {planned.label}` first", EXIT_DAMAGE)
        return AdminError(f"{planned.label}: blob {digest} is missing from {self.location} "
                          f"(run `registryd fsck`)", EXIT_DAMAGE)

    async def _manifest(self, planned: Planned, digest: Digest, media_type: str, size: int | None) -> None:
        if digest in planned.blobs:
            return
        data = await self.store.blobs.read(digest, MANIFEST_LIMIT + 1)
        if data is None:
            raise self.missing(planned, digest)
        if len(data) > MANIFEST_LIMIT:
            raise AdminError(f"{planned.label}: manifest {digest} is larger than the {MANIFEST_LIMIT} bytes "
                             f"registryd serves", EXIT_DAMAGE)
        if digest_of(data, digest.algorithm) != digest:
            raise AdminError(f"{planned.label}: manifest {digest} is damaged: it does not match its digest "
                             f"(run `registryd fsck`)", EXIT_DAMAGE)
        if size is not None and len(data) != size:
            raise AdminError(f"{planned.label}: manifest {digest} has {len(data)} bytes where its descriptor "
                             f"says {size}", EXIT_DAMAGE)
        try:
            parse_manifest(data, media_type)
            document = json.loads(data)
            planned.blobs[digest] = Blob(digest, len(data), data)
            selected = 0
            for key, raw, (child_type, child, child_size, _) in descriptors_in(document, f"manifest {digest}"):
                if key == "manifests":
                    if self.platforms and not any(p.matches(raw.get("platform")) for p in self.platforms):
                        continue
                    selected += 1
                    if media_type in INDEX_TYPES and "platform" in raw:
                        planned.platforms.append(describe_platform(raw["platform"]))
                    await self._manifest(planned, child, child_type, child_size)
                else:
                    await self._blob(planned, child, child_size, child_type)
        except (RegistryError, LayoutError) as e:
            message = e.message if isinstance(e, RegistryError) else str(e)
            raise AdminError(f"{planned.label}: manifest {digest} cannot be exported: {message}", EXIT_DAMAGE) from None
        if media_type in INDEX_TYPES and self.platforms and not selected:
            wanted = ", ".join(str(p) for p in self.platforms)
            raise AdminError(f"{planned.label}: no manifest in index {digest} is for {wanted}", EXIT_DAMAGE)

    async def _blob(self, planned: Planned, digest: Digest, size: int, media_type: str) -> None:
        if digest in planned.blobs:
            return
        actual = await self.store.blobs.size(digest)
        if actual is None:
            if media_type.startswith(NON_DISTRIBUTABLE):
                return  # a foreign layer: a registry is not expected to hold it
            raise self.missing(planned, digest)
        if actual != size:
            raise _damaged(planned, digest, f"it has {actual} bytes where its descriptor says {size}")
        planned.blobs[digest] = Blob(digest, size)


def _damaged(planned: Planned, digest: Digest, why: str) -> AdminError:
    return AdminError(f"{planned.label}: blob {digest} is damaged: {why} (run `registryd fsck`)", EXIT_DAMAGE)


class BlobConsumer(Sink):
    """Takes a blob as ``BlobSource.send`` pushes it and writes it into the layout in the IO pool.

    Chunks wait in memory only while the pool writes (and hashes) the ones
    before them: past HIGH_WATER the producer is paused, and it is resumed
    once less than LOW_WATER waits, so a slow disk slows the download
    instead of filling memory. A write that fails (disk full, a blob longer
    than its descriptor) stops the producer; ``finish`` raises that error.
    """

    def __init__(self, blob: BlobWriter, pool: Any, on_written: Callable[[int], None]) -> None:
        super().__init__()
        self._blob = blob
        self._pool = pool
        self._on_written = on_written
        self._paused = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._writing: Deferred[None] | None = None
        self._error: Exception | None = None

    def write(self, data: bytes) -> None:
        if self._error is not None:
            return  # the producer was stopped: what still arrives is dropped
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= HIGH_WATER and not self._paused:
            self._paused = True
            if self.producer is not None:
                self.producer.pauseProducing()
        if self._writing is None:
            writing = Deferred.fromCoroutine(self._drain())
            if not writing.called:  # a pool that runs inline is done already
                self._writing = writing

    async def _drain(self) -> None:
        """Write what waits, batch after batch, until nothing does (one writer at a time)."""
        try:
            while self._pending:
                batch, size = self._pending, self._pending_size
                self._pending, self._pending_size = [], 0
                await self._pool.run(_write_batch, self._blob, batch)
                self._on_written(size)
                if self._paused and self._pending_size < LOW_WATER:
                    self._paused = False
                    if self.producer is not None:
                        self.producer.resumeProducing()
        except Exception as e:
            self._error = e
            self._pending, self._pending_size = [], 0
            if self.producer is not None:
                self.producer.stopProducing()
        finally:
            self._writing = None

    async def settle(self) -> None:
        """Wait for the writes under way; raise the error one of them had."""
        while self._writing is not None:
            await self._writing
        if self._error is not None:
            raise self._error

    async def finish(self) -> None:
        """After ``send`` returned: the last chunks written, the blob checked (ContentError)."""
        await self.settle()
        await self._pool.run(self._blob.finish)


def _write_batch(blob: BlobWriter, batch: list[bytes]) -> None:
    for chunk in batch:
        blob.write(chunk)


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


async def _copy_blob(store: Store, reactor: Any, writer: LayoutWriter, planned: Planned, blob: Blob,
                     progress: Progress) -> None:
    source = await store.blobs.open(blob.digest)
    if source is None:
        raise AdminError(f"{planned.label}: blob {blob.digest} disappeared from {store.location()} while it "
                         f"was exported", EXIT_DAMAGE)
    try:
        if source.size != blob.size:
            raise ContentError(f"has {source.size} bytes where its descriptor says {blob.size}")
        local = source.local_file()
        if local is not None:
            # A local file is copied in the IO pool; the progress bar is the reactor's.
            on_read = partial(reactor.callFromThread, progress.advance)
            await store.pool.run(writer.add_blob, blob.digest, blob.size, local, on_read)
            return
        consumer = BlobConsumer(await store.pool.run(writer.open_blob, blob.digest, blob.size), store.pool,
                                progress.advance)
        try:
            await source.send(consumer, 0, blob.size)
        except Exception:
            await consumer.settle()  # a failed write stopped the transfer: that is the error to report
            raise
        await consumer.finish()
    finally:
        source.close()


async def _copy(store: Store, reactor: Any, writer: LayoutWriter, plans: list[Planned], progress: Progress) -> None:
    written: set[Digest] = set()
    for planned in plans:
        for blob in planned.blobs.values():
            if blob.digest in written:
                continue
            written.add(blob.digest)
            try:
                if blob.data is not None:
                    await store.pool.run(writer.add_bytes, blob.digest, blob.data)
                    progress.advance(blob.size)
                else:
                    await _copy_blob(store, reactor, writer, planned, blob, progress)
            except ContentError as e:
                raise _damaged(planned, blob.digest, f"it {e}") from None
            progress.advance(items=1)


@attrs.frozen
class Exported:
    location: str
    plans: list[Planned]
    blobs: int
    size: int


async def _export(store: Store, reactor: Any, args: argparse.Namespace, refs: list[ImageRef], output: str,
                  folders: dict[str, str], default: str | None) -> Exported:
    location = store.location()
    with store_errors_reported(location):
        planner = Planner(store, folders, default, args.platform)
        await planner.find_mirrors()
        plans = [await planner.plan(ref) for ref in refs]
        unique_blobs = {blob.digest: blob for planned in plans for blob in planned.blobs.values()}
        total = sum(blob.size for blob in unique_blobs.values())
        progress = Progress("registryd export: copying blobs", len(unique_blobs), total)
        writer = await store.pool.run(open_writer, output)   # it writes (and fsyncs) oci-layout
        # An interrupt stops the reactor with this coroutine suspended (it is only closed at
        # exit): the trigger removes the partial output, after the IO pool's threads stopped.
        interrupted: list[bool] = []

        def abort_at_shutdown() -> None:
            interrupted.append(True)
            writer.abort()

        trigger = reactor.addSystemEventTrigger("after", "shutdown", abort_at_shutdown)
        try:
            await _copy(store, reactor, writer, plans, progress)
            await store.pool.run(writer.commit, [planned.descriptor() for planned in plans])
        except Exception:
            await store.pool.run(writer.abort)
            raise
        finally:
            if not interrupted:
                reactor.removeSystemEventTrigger(trigger)
            progress.close()
    return Exported(location, plans, len(unique_blobs), total)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run(args: argparse.Namespace) -> int:
    refs = _references(args)
    output = os.path.abspath(args.output)
    try:
        check_output(output)
    except LayoutError as e:
        raise AdminError(str(e), EXIT_USAGE) from None
    config = load_admin_config(args)
    folders = layout.namespace_folders(u.namespace for u in config.upstreams)
    default = next((u.namespace for u in config.upstreams if u.default), None)

    async def main(store: Store, reactor: Any) -> Exported:
        return await _export(store, reactor, args, refs, output, folders, default)

    # Opening a store may make local directories (tmp/ on S3): none is left where there was none.
    with no_empty_dirs_left(config.data_dir):
        done = run_with_store(config, main)
    plans, total = done.plans, done.size
    kind = "tar" if is_tar(output) else "directory"
    if args.json:
        document = {
            "data_dir": config.data_dir,
            "store": done.location,
            "output": output,
            "format": kind,
            "images": [{"reference": p.label, "ref_name": p.ref_name, "repository": p.repository.name,
                        "kind": p.repository.kind, "digest": str(p.digest), "media_type": p.media_type,
                        "blobs": len(p.blobs), "size": p.size, "platforms": p.platforms} for p in plans],
            "blobs": done.blobs,
            "size": total,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for p in plans:
        platforms = f", {', '.join(p.platforms)}" if p.platforms else ""
        print(f"exported {p.ref_name} {p.digest} ({_plural(len(p.blobs), 'blob')}, {human_size(p.size)}{platforms})")
    print(f"{_plural(len(plans), 'image')}, {_plural(done.blobs, 'blob')}, {human_size(total)} "
          f"({total} bytes) written to {output} ({kind})")
    return EXIT_OK
