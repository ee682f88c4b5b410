"""``registryd import``: images from an OCI image layout into the configured store.

Everything goes through the storage interface, so the same code imports
into the data directory and into an S3 bucket. Three phases, so that nothing
changes unless everything is valid:

1. plan: read index.json, turn each ref name into a repository and tag, read
   and parse every manifest reachable from it (checked against its digest
   and size), and find every blob they name in the layout;
2. stage: copy each blob the store lacks into ``import-<random>/`` under the
   store's local ``tmp/``, hashing it on the way (blobs the store has are
   hashed too, not copied);
3. commit: blobs (``commit_file``: a rename on disk, an upload to S3), then
   blob links and manifest revisions, then tags — the order a push follows,
   so a running server never sees a tag before its manifest or a manifest
   before its blobs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from functools import partial
from typing import Any, Awaitable, Callable, TypeVar

import attrs
from twisted.internet.defer import DeferredLock

from registryd.admin import EXIT_DAMAGE, EXIT_OK, EXIT_USAGE, AdminError
from registryd.admin.image_list import ImageListError, describe_platform, parse_reference
from registryd.admin.oci_layout import (
    CONTAINERD_NAME,
    REF_NAME,
    ContentError,
    LayoutError,
    LayoutReader,
    descriptors_in,
    open_layout,
    parse_descriptor,
    read_index,
    verify_stream,
)
from registryd.admin.progress import Progress
from registryd.admin.store_access import (
    add_store_arguments,
    load_admin_config,
    no_empty_dirs_left,
    os_errors_reported,
    run_reactor,
    run_with_store,
    store_errors_reported,
)
from registryd.config import DOCKER_HUB, Config
from registryd.deferreds import bounded_gather
from registryd.digest import Digest, digest_of
from registryd.errors import RegistryError
from registryd.manifests import NON_DISTRIBUTABLE, parse_manifest
from registryd.names import check_name, is_tag
from registryd.storage import layout
from registryd.storage.interface import RepositoryBackend, Store
from registryd.threads import InlinePool
from registryd.units import human_size

T = TypeVar("T")

#: Store calls (a HEAD, an upload) one phase keeps in flight: S3 answers each over the network.
CONCURRENCY = 4


DESCRIPTION = """\
Import the images an OCI image layout lists in its index.json (a directory,
or a tar file as `registryd export` and `skopeo copy ... oci-archive:` write
them) into the store, with their child manifests, configs and layers, so
that registryd serves them. The store is the one the config file (-c) names,
as `twistd registryd` uses it: the data directory, or the S3 bucket of
[storage] driver = "s3" ([storage.s3]); import works the same on either.

Each image goes where its org.opencontainers.image.ref.name annotation
says: team/app:1.0 or team/app@sha256:...
A name whose first component is an upstream namespace of the config file
([[upstream]] namespace, so give -c) goes into that upstream's mirror cache:
127.0.0.1:5000/team/app:1.0 or docker.io/library/alpine:3.19, served as
if pulled through registryd (also with [mirror] offline = true); any other
name is a local repository. A ref name that is only a tag (as `skopeo copy
... oci:DIR:TAG` writes it), or none at all, needs --repository NAME, unless
an io.containerd.image.name annotation gives the whole name (as `docker
save` writes it).

Nothing changes unless everything is valid: every manifest must parse and
every blob must match the digest and size of its descriptor. Each blob the
store lacks is first copied into tmp/import-<random>/ in the data directory
while it is hashed (on S3 too: the data directory is the node's, its tmp/
holds what is on its way to the bucket). Children of an image index that
are absent from the layout altogether are skipped with a warning (a layout
exported with --platform); anything else missing stops the import. On a
problem the staging directory is removed and one line says why.

Then, in the order a push follows: blobs (on disk: fsync, rename; on S3: an
upload), blob links and manifest revisions (with the referrers entry of a
manifest that has a subject), tags last. So import is safe alongside a
running server, on either driver (on S3, alongside every node sharing the
bucket): a client never sees a tag before its manifest or a manifest before
its blobs. Before the tags are written every blob is checked to be still
there, and one a garbage collection removed meanwhile is stored again from
the layout. An existing tag is moved to the imported image. A data
directory that does not exist yet, or is empty, is created. --dry-run
checks everything and writes nothing."""

EPILOG = """\
exit status:
  0  imported (with --dry-run: the layout is valid; nothing was written)
  1  the layout is invalid: no oci-layout or index.json, a bad ref name, a
     manifest that does not parse, a blob missing or not matching its digest
     or size; nothing was written
  2  bad arguments: no such --input, a bad --repository, a ref name that is
     only a tag and no --repository
  3  the import could not be done: bad config file or data directory, an S3
     bucket that cannot be reached or refuses, permission denied, an I/O
     error (disk full)"""


class Invalid(AdminError):
    """The layout cannot be imported as it is (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_DAMAGE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("-i", "--input", required=True, metavar="DIR|TAR",
                        help="the OCI image layout: a directory or a tar file")
    parser.add_argument("--repository", metavar="NAME",
                        help="the repository of images whose ref name is only a tag, or missing")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="check the layout and report, write nothing")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")


@attrs.frozen
class Target:
    """A repository as clients pull it, and its name in the store."""

    name: str                 # team/app, 127.0.0.1:5000/lib/app
    remote: str               # its name in the local repositories or the upstream's mirror cache
    namespace: str | None     # the upstream namespace of a mirrored repository

    def backend(self, store: Store) -> RepositoryBackend:
        """Its RepositoryBackend in ``store``: the local repositories, or the upstream's mirror cache."""
        return store.repositories if self.namespace is None else store.mirror_repositories(self.namespace)


def resolve_name(name: str, namespaces: set[str]) -> Target:
    """Local or mirrored, as registryd's router takes the name apart; raises ValueError."""
    first, sep, rest = name.partition("/")
    namespace = first.lower()
    try:
        if sep and namespace in namespaces:
            remote = f"library/{rest}" if namespace == DOCKER_HUB and "/" not in rest else rest
            return Target(f"{namespace}/{check_name(remote)}", remote, namespace)
        return Target(check_name(name), name, None)
    except RegistryError:
        hint = ""
        if sep and ":" in first:
            hint = f" (to import into the mirror of {first}, give the config file that lists it as an upstream)"
        raise ValueError(f"{name!r} is not a valid repository name{hint}") from None


@attrs.frozen
class Manifest:
    digest: Digest
    media_type: str
    data: bytes
    links: tuple[Digest, ...]
    referrer: tuple[Digest, dict[str, Any]] | None


@attrs.define
class Image:
    """One index.json entry: where it goes, and everything it brings."""

    where: str
    target: Target
    tag: str | None
    digest: Digest
    media_type: str
    manifests: dict[Digest, Manifest] = attrs.field(factory=dict)   # children before parents
    blobs: dict[Digest, int] = attrs.field(factory=dict)
    skipped: list[str] = attrs.field(factory=list)

    @property
    def label(self) -> str:
        return f"{self.target.name}:{self.tag}" if self.tag else f"{self.target.name}@{self.digest}"

    @property
    def context(self) -> str:
        """How messages name the image: ``team/app:1.0 (index.json manifests[0])``."""
        return f"{self.label} ({self.where})"

    @property
    def size(self) -> int:
        return sum(len(m.data) for m in self.manifests.values()) + sum(self.blobs.values())


class Planner:
    """Reads and checks the layout: phase 1 (everything is in memory but blobs)."""

    def __init__(self, reader: LayoutReader, namespaces: set[str], repository: Target | None,
                 max_manifest_size: int) -> None:
        self.reader = reader
        self.namespaces = namespaces
        self.repository = repository
        self.max_manifest_size = max_manifest_size
        self.sizes: dict[Digest, int] = {}
        self.warnings: list[str] = []

    def plan(self) -> list[Image]:
        images: list[Image] = []
        tags: dict[tuple[str, str], Digest] = {}
        for i, value in enumerate(read_index(self.reader)):
            where = f"index.json manifests[{i}]"
            media_type, digest, size, annotations = parse_descriptor(value, where)
            target, tag = self._target(where, annotations.get(REF_NAME), annotations.get(CONTAINERD_NAME), digest)
            if tag is not None:
                other = tags.setdefault((target.name, tag), digest)
                if other != digest:
                    raise Invalid(f"{where}: {target.name}:{tag} is also the ref name of {other}")
            image = Image(where, target, tag, digest, media_type)
            self._manifest(image, digest, media_type, size, 0)
            images.append(image)
        return images

    def _target(self, where: str, ref: str | None, full: str | None, digest: Digest) -> tuple[Target, str | None]:
        if not ref or is_tag(ref):
            # `docker save` writes the tag as ref.name and the whole name for containerd.
            if self.repository is None and full:
                return self._target(where, full, None, digest)
            if self.repository is None:
                what = f"its ref name {ref!r} is only a tag" if ref else "it has no ref name"
                raise AdminError(f"{where}: {what}: give --repository NAME to say where it goes", EXIT_USAGE)
            return self.repository, ref
        try:
            parsed = parse_reference(ref)
            target = resolve_name(parsed.name, self.namespaces)
        except (ImageListError, ValueError) as e:
            raise Invalid(f"{where}: bad ref name {ref!r}: {e}") from None
        if parsed.by_digest:
            if parsed.reference != str(digest):
                raise Invalid(f"{where}: the ref name {ref!r} names another digest than the descriptor's {digest}")
            return target, None
        return target, parsed.reference

    def _manifest(self, image: Image, digest: Digest, media_type: str, size: int, depth: int) -> None:
        if digest in image.manifests:
            return
        if depth > 8:
            raise Invalid(f"{image.context}: image indexes nested too deep at {digest}")
        if size > self.max_manifest_size:
            raise Invalid(f"{image.context}: manifest {digest} is larger ({size} bytes) than the "
                          f"{self.max_manifest_size} bytes registryd accepts (max_manifest_size)")
        data = self._read(digest, size, image.context)
        try:
            manifest = parse_manifest(data, media_type)
        except RegistryError as e:
            raise Invalid(f"{image.context}: manifest {digest} is invalid: {e.message}") from None
        for key, raw, (child_type, child, child_size, _) in descriptors_in(json.loads(data), f"manifest {digest}"):
            present = self.reader.size(child) is not None
            if key == "manifests":
                if present:
                    self._manifest(image, child, child_type, child_size, depth + 1)
                else:
                    platform = describe_platform(raw.get("platform"))
                    image.skipped.append(str(child))
                    self.warnings.append(f"{image.label}: manifest {child} ({platform}) of index {digest} is not "
                                         f"in the layout: skipped")
            elif present or not child_type.startswith(NON_DISTRIBUTABLE):
                if not present:
                    raise Invalid(f"{image.context}: blob {child} ({key} of manifest {digest}) is missing from "
                                  f"the layout")
                self._blob(image, child, child_size)
        referrer = manifest.referrer_entry(digest, len(data))   # as the server writes it on a push
        links = tuple(blob for blob in manifest.blobs if blob in image.blobs)
        image.manifests[digest] = Manifest(digest, manifest.media_type, data, links, referrer)

    def _read(self, digest: Digest, size: int, where: str) -> bytes:
        if self.reader.size(digest) is None:
            raise Invalid(f"{where}: manifest {digest} is missing from the layout")
        try:
            with self.reader.open(digest) as f:
                data = f.read(size + 1)
        except ContentError as e:
            raise Invalid(f"{where}: manifest {digest} in the layout {e}") from None
        if len(data) != size:
            raise Invalid(f"{where}: manifest {digest} has {len(data)} bytes where its descriptor says {size}")
        if digest_of(data, digest.algorithm) != digest:
            raise Invalid(f"{where}: manifest {digest} does not match its digest")
        return data

    def _blob(self, image: Image, digest: Digest, size: int) -> None:
        known = self.sizes.setdefault(digest, size)
        if known != size:
            raise Invalid(f"{image.context}: blob {digest} has size {size} here and {known} in another descriptor")
        image.blobs[digest] = size


@attrs.define
class Outcome:
    """What was (or would be) written."""

    blobs: int = 0
    size: int = 0
    new_blobs: int = 0
    new_size: int = 0
    new: set[Digest] = attrs.field(factory=set)


class Importer:
    """Phases 2 and 3 on the store: stage the blobs, then commit everything."""

    def __init__(self, store: Store, reactor: Any, reader: LayoutReader, images: list[Image], dry_run: bool) -> None:
        self.store = store
        self.reactor = reactor
        self.reader = reader
        self.images = images
        self.dry_run = dry_run
        self.outcome = Outcome()
        self.blobs: dict[Digest, int] = {d: s for image in images for d, s in image.blobs.items()}
        self.manifests: dict[Digest, bytes] = {d: m.data for image in images for d, m in image.manifests.items()}
        # The layout is one reader (a tar file has one position): one thread at a time reads it.
        self._reading = DeferredLock()
        self._staging: str | None = None
        self._created: list[str] = []
        self._shut_down = False

    async def run(self) -> Outcome:
        outcome = self.outcome
        everything = [*self.blobs.items(), *((d, len(data)) for d, data in self.manifests.items())]
        stored = await bounded_gather([digest for digest, _ in everything], self.store.blobs.size, CONCURRENCY)
        for (digest, size), found in zip(everything, stored):
            outcome.blobs += 1
            outcome.size += size
            if found is None:
                outcome.new.add(digest)
                outcome.new_blobs += 1
                outcome.new_size += size
        progress = Progress("registryd import: checking blobs", len(self.blobs), sum(self.blobs.values()))
        # An interrupt stops the reactor with this coroutine suspended (it is only closed at
        # exit): the trigger removes the staging directory, after the IO pool's threads stopped.
        trigger = self.reactor.addSystemEventTrigger("after", "shutdown", self._interrupted)
        try:
            if not self.dry_run:
                self._created = _make_dirs(self.store.tmp_dir)
                self._staging = os.path.join(self.store.tmp_dir, f"import-{uuid.uuid4().hex[:16]}")
                os.mkdir(self._staging)
            staged = await self._stage(progress)
            progress.close()
            if self._staging is not None:
                await self._commit(self._staging, staged)
                self._created = []  # the store's tmp/ stays, as a server would have made it
        finally:
            progress.close()
            if not self._shut_down:
                self.reactor.removeSystemEventTrigger(trigger)
            self._clean_up()
        return outcome

    def _interrupted(self) -> None:
        self._shut_down = True
        self._clean_up()

    def _clean_up(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        for directory in reversed(self._created):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        self._created = []

    def _context(self, digest: Digest) -> str:
        return next(image.context for image in self.images if digest in image.blobs)

    def _copy(self, digest: Digest, size: int, staging: str | None, on_read: Callable[[int], None] | None) -> str | None:
        """Hash the layout's copy of a blob; into ``staging`` too, if given (returns the path). Blocking."""
        try:
            with self.reader.open(digest) as source:
                if staging is None:
                    verify_stream(source, digest, size, None, on_read)
                    return None
                path = os.path.join(staging, f"{digest.algorithm}-{digest.hex}")
                with open(path, "xb") as sink:
                    verify_stream(source, digest, size, sink, on_read)
                return path
        except ContentError as e:
            raise Invalid(f"{self._context(digest)}: blob {digest} in the layout {e}") from None

    async def _copy_in_pool(self, digest: Digest, size: int, staging: str | None,
                            progress: Progress | None) -> str | None:
        # Called in a pool thread: the progress bar is the reactor's.
        on_read = partial(self.reactor.callFromThread, progress.advance) if progress is not None else None
        async with self._reading:
            return await self.store.pool.run(self._copy, digest, size, staging, on_read)

    async def _stage(self, progress: Progress) -> dict[Digest, str]:
        staged: dict[Digest, str] = {}
        for digest, size in self.blobs.items():
            staging = self._staging if digest in self.outcome.new else None
            path = await self._copy_in_pool(digest, size, staging, progress)
            if path is not None:
                staged[digest] = path
            progress.advance(items=1)
        return staged

    async def _commit(self, staging: str, staged: dict[Digest, str]) -> None:
        store = self.store
        # Claimed before they are looked at or written, as the server does on a push:
        # a collection inside this process would keep them from now on.
        store.guard.claim([*self.blobs, *self.manifests])
        progress = Progress("registryd import: storing blobs", len(staged), sum(self.blobs[d] for d in staged))

        async def commit(digest: Digest) -> None:
            path = staged.get(digest)
            if path is None:
                if await store.blobs.size(digest) is not None:
                    return
                # Collected since it was checked: stage it again.
                path = await self._copy_in_pool(digest, self.blobs[digest], staging, None)
                assert path is not None
            os.utime(path)  # its age is the commit's, not the staging's
            await store.blobs.commit_file(path, digest)
            progress.advance(self.blobs[digest], items=1)

        try:
            # Every blob is tried even after a failure (the first is raised then).
            await bounded_gather(self.blobs, commit, CONCURRENCY, keep_going=True)
        finally:
            progress.close()
        await bounded_gather(self.manifests, lambda digest: store.blobs.put(digest, self.manifests[digest]),
                             CONCURRENCY, keep_going=True)
        for image in self.images:
            backend = image.target.backend(store)
            for manifest in image.manifests.values():
                for blob in manifest.links:
                    await backend.link_blob(image.target.remote, blob)
                await backend.add_manifest(image.target.remote, manifest.digest, manifest.media_type, [],
                                           manifest.referrer)
        await self._restore(staging)
        for image in self.images:
            if image.tag is not None:
                await image.target.backend(store).set_tags(image.target.remote, image.digest, [image.tag])

    async def _restore(self, staging: str) -> None:
        """Every blob and manifest is still stored now that the revisions naming them are.

        A garbage collection that judged a blob unused before its revision was
        written may have removed it meanwhile (a server's, on any node sharing an
        S3 bucket): it is stored again from the layout. One that starts later
        sees the revisions. Only then are tags written.
        """
        store = self.store
        everything = [*self.blobs, *self.manifests]
        sizes = await bounded_gather(everything, store.blobs.size, CONCURRENCY)
        for digest, size in zip(everything, sizes):
            if size is not None:
                continue
            if digest in self.manifests:
                await store.blobs.put(digest, self.manifests[digest])
                continue
            path = await self._copy_in_pool(digest, self.blobs[digest], staging, None)
            assert path is not None
            await store.blobs.commit_file(path, digest)


def _make_dirs(path: str) -> list[str]:
    """Create ``path`` and the parents it lacks; the ones created, outermost first."""
    missing: list[str] = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory)
    return list(reversed(missing))


def _check_data_dir(root: str, dry_run: bool) -> None:
    """An existing registryd data directory, an empty directory, or one that can be created.

    On S3 too: the data directory holds the node's ``tmp/``, where blobs are staged.
    """
    if os.path.isdir(root):
        if os.listdir(root) and not any(os.path.isdir(layout.local_path(root, sub)) for sub in layout.TOP_LEVEL):
            raise AdminError(f"{root} is not a registryd data directory (it has no blobs/, repositories/ or "
                             f"mirror/) and is not empty")
        if not dry_run and not os.access(root, os.W_OK | os.X_OK):
            raise AdminError(f"cannot write to the data directory {root}: permission denied (run as the user "
                             f"registryd runs as, or root)")
    elif os.path.lexists(root):
        raise AdminError(f"the data directory {root} is not a directory")
    elif not os.path.isdir(os.path.dirname(root)):
        raise AdminError(f"the data directory {root} does not exist, nor does its parent")


def _with_store(config: Config, main: Callable[[Any, Any], Awaitable[T]], dry_run: bool) -> T:
    """Run ``main(store, reactor)`` on the configured store; a new data directory is created first.

    A dry run creates nothing: a data directory that does not exist yet is
    opened as it is (on the filesystem the store is then empty; on S3 it
    only holds ``tmp/``, which a dry run does not use). A data directory that
    did not exist is gone again after a dry run or a failure.
    """
    from registryd.storage import open_store

    root = config.data_dir
    with no_empty_dirs_left(root, keep=not dry_run):
        if dry_run and not os.path.exists(root):
            async def unchecked(reactor: Any) -> T:
                store = open_store(config, InlinePool(), reactor)
                try:
                    return await main(store, reactor)
                finally:
                    await store.close()
            return run_reactor(unchecked)
        if not os.path.exists(root) and not dry_run:
            with os_errors_reported():
                os.mkdir(root)
        return run_with_store(config, main, allow_empty=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@attrs.frozen
class Imported:
    location: str
    images: list[Image]
    outcome: Outcome


def _report(args: argparse.Namespace, config: Config, done: Imported, warnings: list[str]) -> None:
    images, outcome = done.images, done.outcome

    def new_in(image: Image) -> int:
        return len(outcome.new & {*image.blobs, *image.manifests})

    if args.json:
        document = {
            "input": os.path.abspath(args.input),
            "data_dir": config.data_dir,
            "store": done.location,
            "dry_run": args.dry_run,
            "images": [{"reference": i.label, "repository": i.target.name,
                        "kind": "local" if i.target.namespace is None else "mirror",
                        "upstream": i.target.namespace, "tag": i.tag, "digest": str(i.digest),
                        "media_type": i.media_type, "manifests": len(i.manifests),
                        "blobs": len(i.blobs) + len(i.manifests), "size": i.size, "new_blobs": new_in(i),
                        "skipped": i.skipped} for i in images],
            "blobs": outcome.blobs,
            "size": outcome.size,
            "new_blobs": outcome.new_blobs,
            "new_size": outcome.new_size,
            "warnings": warnings,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for warning in warnings:
        print(f"registryd import: warning: {warning}", file=sys.stderr)
    verb = "would import" if args.dry_run else "imported"
    for i in images:
        print(f"{verb} {i.label} {i.digest} ({_plural(len(i.blobs) + len(i.manifests), 'blob')}, "
              f"{human_size(i.size)}, {new_in(i)} new)")
    done_word = "would be imported" if args.dry_run else "imported"
    print(f"{_plural(len(images), 'image')}, {_plural(outcome.blobs, 'blob')}, {human_size(outcome.size)} "
          f"({outcome.size} bytes) {done_word} into {done.location}; {_plural(outcome.new_blobs, 'blob')} "
          f"({outcome.new_size} bytes) new to it")


def run(args: argparse.Namespace) -> int:
    source = os.path.abspath(args.input)
    if not os.path.exists(source):
        raise AdminError(f"{source} does not exist", EXIT_USAGE)
    config = load_admin_config(args)
    namespaces = {u.namespace for u in config.upstreams}
    repository = None
    if args.repository is not None:
        try:
            repository = resolve_name(args.repository, namespaces)
        except ValueError as e:
            raise AdminError(f"--repository: {e}", EXIT_USAGE) from None
    _check_data_dir(config.data_dir, args.dry_run)
    with os_errors_reported():
        try:
            reader = open_layout(source)
        except LayoutError as e:
            raise Invalid(str(e)) from None
        try:
            # The layout is read and checked before the store is opened: a bad one
            # is found without a store, and leaves nothing in it.
            try:
                planner = Planner(reader, namespaces, repository, config.max_manifest_size)
                images = planner.plan()
            except LayoutError as e:
                raise Invalid(str(e)) from None

            async def main(store: Store, reactor: Any) -> Imported:
                with store_errors_reported(store.location()):
                    outcome = await Importer(store, reactor, reader, images, args.dry_run).run()
                return Imported(store.location(), images, outcome)

            done = _with_store(config, main, args.dry_run)
        finally:
            reader.close()
    _report(args, config, done, planner.warnings)
    return EXIT_OK
