"""``registryd fsck [--repair]``: re-hash every blob, check every repository.

The rules are the same on both storage drivers and live in
``registryd.admin.fsck_rules`` (``Checker``): what is damage and what is
information, how each finding reads, which files a repair moves and what it
looks at again right before moving one. The data directory's side is
``Fsck`` here; the S3 bucket's is ``registryd.admin.fsck_s3``.

Checking only reads. Repairing only moves damaged files into
``quarantine/<timestamp>/`` (same relative path; a rename on the same
filesystem, a server-side copy and then a delete in a bucket), in an order
that keeps the store consistent for a running server at every step: tags,
then referrer entries, then manifest revisions, then blob links, then blobs.
Nothing is ever deleted that was not copied first.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import sys
from typing import Any, Coroutine, TypeVar

from registryd.admin import AdminError
from registryd.admin.fsck_rules import (
    BlobState,
    BlobUnchanged,
    Checker,
    ContentMissing,
    Recheck,
    TagUnchanged,
    finish,
    quarantine_names,
)
from registryd.admin.progress import Progress
from registryd.admin.store_access import add_store_arguments, load_admin_config, open_data_dir, os_errors_reported
from registryd.digest import Digest
from registryd.storage.files import fsync_dir
from registryd.storage.scan import BlobFile, DataDir, read_file, read_tag, scan_repository

T = TypeVar("T")

HELP = "re-hash every blob and check every repository; --repair quarantines what is damaged"

DESCRIPTION = """\
Check the store the config names (the data directory, or the S3 bucket of
[storage] driver = "s3"): re-hash every blob (streamed, so any size works)
and compare it with the digest it is stored under; check that every manifest
revision's content exists and parses, that every tag points at a manifest the
repository has, that every blob a manifest references is there (linked in the
repository, content present and intact), that an image index's manifests are
in the repository, and that referrer entries and blob links are not dangling.
Each problem is one line on standard output. A progress bar goes to standard
error when it is a terminal.

Non-distributable (foreign) layers need not be there. In mirrored
repositories, blobs and manifests not fetched yet are fine (the cache fills
on demand): they are counted as "not cached", which is information, not
damage; so is a manifest kept exactly as the upstream sent it that does not
parse, and so is anything found where the store keeps its content that is
not part of its layout (it is left alone). In a bucket, upload sessions past
their expiry and blobs a garbage collection set aside in trash/ are
information too: the servers remove those sessions, and a collection puts
back what is still referenced and purges the rest.

With --repair, damaged files are moved into quarantine/<UTC timestamp>/ of
the data directory (or of the bucket, under its prefix), under their path in
the store: corrupted blobs; manifest revisions whose content is gone,
corrupted or unusable (a local image whose blob is missing, a local index
whose manifest is missing), with their tags and referrer entries; dangling
tags, referrer entries and blob links. Nothing is lost (in a bucket an
original is deleted only once its copy is in quarantine/); fsck.json in that
folder says why each file is there. Afterwards the store is consistent and a
second fsck is clean; push a quarantined image again to restore it (mirrored
content is fetched again on demand).

fsck is safe while the server is stopped, and alongside a running server
(with S3: every node that shares the bucket): without --repair it only reads;
--repair only renames (in a bucket: copies each object to quarantine/, then
deletes the original), and leaves alone a tag or blob that changed since it
was checked, or content that reappeared: it looks again right before each
move. Pushes and deletes made during the run can show up as problems that
are gone by the next run: run fsck again before acting on them."""

EPILOG = """\
exit status:
  0  the store is clean (information such as "not cached" does not count)
  1  damage was found (with --repair: and moved to quarantine; run fsck again)
  2  bad arguments
  3  the check could not be done: missing or unreadable data directory, bad
     config file, permission denied, a rename that failed; with S3: the
     bucket cannot be reached, or refuses a listing, a read or a copy"""

CHUNK = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--repair", action="store_true",
                        help="move damaged files into quarantine/<timestamp>/ of the data directory or "
                             "bucket (renames only; in a bucket: copy, then delete)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")


# --- the data directory ---------------------------------------------------------------


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def at_once(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never waits: the filesystem answers the rules at once."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("a check of the data directory waited for something")


class Fsck(Checker):
    """One run over a data directory: findings, and the moves a repair would make."""

    def __init__(self, data: DataDir, stream: Any = None, progress: bool | None = None) -> None:
        super().__init__(self)
        self.data = data
        self.stream = stream if stream is not None else sys.stderr
        self.progress_enabled = progress

    # --- StoreView: files, looked at again where a running server may have changed them

    def rel(self, path: str) -> str:
        return self.data.rel(path)

    async def appeared(self, digest: Digest) -> bool:
        return os.path.isfile(self.data.blob_path(digest))

    async def manifest(self, digest: Digest) -> bytes | None:
        return read_file(self.data.blob_path(digest))

    async def exists(self, path: str) -> bool:
        return os.path.exists(path)

    # --- blobs ------------------------------------------------------------------

    def check_blobs(self) -> None:
        unexpected: list[str] = []
        files = list(self.data.blob_files(unexpected))
        for path in unexpected:
            self.unexpected_blob(path)
        progress = Progress("registryd fsck: re-hashing blobs", len(files), sum(f.size for f in files),
                            self.stream, self.progress_enabled)
        try:
            for blob in files:
                state = self._hash(blob, progress)
                progress.advance(items=1)
                if state is not None:  # else removed while we looked
                    self.blob_checked(blob.digest, state)
        finally:
            progress.close()

    def _hash(self, blob: BlobFile, progress: Progress) -> BlobState | None:
        try:
            f = open(blob.path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            raise
        except OSError as e:
            try:
                identity = _identity(os.stat(blob.path))
            except OSError:
                return None
            return BlobState(blob.path, blob.size, False, f"cannot be read: {e.strerror}", identity)
        with f:
            st = os.fstat(f.fileno())
            hasher = hashlib.new(blob.digest.algorithm)
            size = 0
            try:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    size += len(chunk)
                    progress.advance(size=len(chunk))
            except OSError as e:
                return BlobState(blob.path, st.st_size, False, f"cannot be read: {e.strerror}", _identity(st))
        actual = Digest(blob.digest.algorithm, hasher.hexdigest())
        if actual == blob.digest:
            return BlobState(blob.path, size, True, str(actual), _identity(st))
        return BlobState(blob.path, size, False, f"its content hashes to {actual}", _identity(st))

    # --- repositories -------------------------------------------------------------

    def check_repositories(self) -> None:
        repositories = self.data.repositories()
        progress = Progress("registryd fsck: checking repositories", len(repositories), 0,
                            self.stream, self.progress_enabled)
        try:
            for repository in repositories:
                at_once(self.check_repository(scan_repository(repository)))
                progress.advance(items=1)
        finally:
            progress.close()

    # --- repair -----------------------------------------------------------------

    def still_damaged(self, recheck: Recheck | None) -> bool:
        if isinstance(recheck, BlobUnchanged):
            try:
                return _identity(os.stat(recheck.state.path)) == recheck.state.identity
            except FileNotFoundError:
                return False
        if isinstance(recheck, ContentMissing):
            return not os.path.isfile(self.data.blob_path(recheck.digest))
        if isinstance(recheck, TagUnchanged):
            return read_tag(recheck.tag.name, recheck.tag.path) == recheck.tag
        return True

    def repair(self) -> tuple[str | None, list[dict[str, str]]]:
        """Rename every damaged file into a new quarantine folder; what moved."""
        moves = self.ordered_moves()
        if not moves:
            return None, []
        quarantine = self._quarantine_folder()
        moved: list[dict[str, str]] = []
        for move in moves:
            if not self.still_damaged(move.recheck):
                continue  # repaired or replaced meanwhile (a running server)
            rel = self.data.rel(move.path)
            target = os.path.join(quarantine, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.rename(move.path, target)
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError as e:
                if e.errno == errno.EXDEV:
                    raise AdminError(f"cannot move {rel} into {quarantine}: it is on another filesystem") from None
                raise
            fsync_dir(os.path.dirname(move.path))
            fsync_dir(os.path.dirname(target))
            moved.append({"kind": move.kind, "path": rel, "moved_to": self.data.rel(target), "reason": move.reason})
        report = os.path.join(quarantine, "fsck.json")
        with open(report + ".tmp", "wb") as f:
            f.write(self.quarantine_report(moved))
            f.flush()
            os.fsync(f.fileno())
        os.rename(report + ".tmp", report)
        fsync_dir(quarantine)
        return self.data.rel(quarantine), moved

    def _quarantine_folder(self) -> str:
        parent = os.path.join(self.data.root, "quarantine")
        os.makedirs(parent, exist_ok=True)
        for name in quarantine_names():
            path = os.path.join(parent, name)
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            fsync_dir(parent)
            return path
        raise AdminError(f"cannot create a quarantine folder in {parent}")


def run(args: argparse.Namespace) -> int:
    config = load_admin_config(args)
    if config.storage.driver == "s3":
        from registryd.admin.fsck_s3 import run_s3

        return run_s3(config, args)
    data = open_data_dir(args)
    fsck = Fsck(data)
    with os_errors_reported():
        fsck.check_blobs()
        fsck.check_repositories()
        quarantine, moved = fsck.repair() if args.repair else (None, [])
    return finish(fsck, data.root, args, quarantine, moved)
