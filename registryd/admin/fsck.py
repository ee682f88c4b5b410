"""``registryd fsck [--repair]``: re-hash every blob, check every repository.

The rules are the same on both storage drivers and live here (``Checker``):
what is damage and what is information, how each finding reads, which
files a repair moves and what it looks at again right before moving one.
The data directory's side is ``Fsck``; the S3 bucket's is
``registryd.admin.fsck_s3``.

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
import json
import os
import sys
import time
from typing import Any, Coroutine, Iterator, Protocol, TypeVar, Union

import attrs

from registryd.admin import EXIT_DAMAGE, EXIT_OK, AdminError
from registryd.admin.progress import Progress, human_size
from registryd.admin.store_access import add_store_arguments, load_admin_config, open_data_dir, os_errors_reported
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import Manifest, parse_manifest
from registryd.storage.files import fsync_dir
from registryd.storage.scan import BlobFile, DataDir, RepositoryScan, Tag, read_file, read_tag, scan_repository

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

# Order of the moves: what points at something goes before what it points at.
_PHASES = {"tag": 0, "referrer": 1, "revision": 2, "link": 3, "blob": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--repair", action="store_true",
                        help="move damaged files into quarantine/<timestamp>/ of the data directory or "
                             "bucket (renames only; in a bucket: copy, then delete)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")


@attrs.frozen
class Finding:
    """One problem (severity "damage") or one piece of information ("info")."""

    severity: str
    kind: str
    subject: str
    message: str
    path: str | None = None
    repository: str | None = None
    digest: str | None = None
    tag: str | None = None
    digests: tuple[str, ...] = ()

    def line(self) -> str:
        return f"{self.severity}: {self.subject}: {self.message}"

    def document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"severity": self.severity, "kind": self.kind, "message": self.message}
        for key in ("path", "repository", "digest", "tag"):
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        if self.digests:
            document["digests"] = list(self.digests)
        return document


@attrs.frozen
class BlobState:
    path: str
    size: int
    ok: bool
    detail: str          # the digest the content hashes to, or why it cannot be read
    identity: Any        # (st_dev, st_ino) of a file; (ETag, Last-Modified) of an object


# What a repair looks at again right before a move: a running server may
# have mended the damage since it was found.

@attrs.frozen
class BlobUnchanged:
    """Still the blob that was hashed (a good upload of the same digest replaces it)."""

    state: BlobState


@attrs.frozen
class ContentMissing:
    """The content is still not there (a push may have brought it)."""

    digest: Digest


@attrs.frozen
class TagUnchanged:
    """The tag still says what it said when it was checked."""

    tag: Tag


Recheck = Union[BlobUnchanged, ContentMissing, TagUnchanged]


@attrs.frozen
class Move:
    kind: str            # tag, referrer, revision, link, blob
    path: str
    reason: str
    recheck: Recheck | None = None


class StoreView(Protocol):
    """What the rules read beyond a repository's scan.

    The scan may be stale by the time the rules look (a running server
    pushes and deletes): content that appeared since counts as there.
    """

    def rel(self, path: str) -> str:
        """``path`` as reports show it: relative to the data directory, or the key under the prefix."""

    async def appeared(self, digest: Digest) -> bool:
        """Is the content of a blob that was not hashed there now?"""

    async def manifest(self, digest: Digest) -> bytes | None:
        """A manifest's content, or None when it is gone."""

    async def exists(self, path: str) -> bool:
        """Is there a file (object) at ``path`` now?"""


class Checker:
    """Findings, the moves a repair would make, and counts, by the rules both drivers share."""

    def __init__(self, view: StoreView) -> None:
        self.view = view
        self.findings: list[Finding] = []
        self.moves: dict[str, Move] = {}
        self.blobs: dict[Digest, BlobState] = {}
        self.counts = {"blobs": 0, "bytes": 0, "repositories": 0, "local": 0, "mirrored": 0,
                       "manifests": 0, "tags": 0}

    # --- bookkeeping ----------------------------------------------------------

    def damage(self, kind: str, subject: str, message: str, path: str | None = None, **where: Any) -> None:
        rel = self.view.rel(path) if path is not None else None
        self.findings.append(Finding("damage", kind, subject, message, rel, **where))

    def info(self, kind: str, subject: str, message: str, path: str | None = None, **where: Any) -> None:
        rel = self.view.rel(path) if path is not None else None
        self.findings.append(Finding("info", kind, subject, message, rel, **where))

    def move(self, kind: str, path: str, reason: str, recheck: Recheck | None = None) -> None:
        if path not in self.moves:
            self.moves[path] = Move(kind, path, reason, recheck)

    def part(self) -> Checker:
        """A checker for one repository, checked alongside others: it sees the blobs hashed
        so far and keeps its findings to itself until ``merge``."""
        part = Checker(self.view)
        part.blobs = self.blobs
        return part

    def merge(self, other: Checker) -> None:
        """Add what a ``part`` found."""
        self.findings.extend(other.findings)
        for path, move in other.moves.items():
            self.moves.setdefault(path, move)
        for key, value in other.counts.items():
            self.counts[key] += value

    @property
    def damaged(self) -> bool:
        return any(f.severity == "damage" for f in self.findings)

    def ordered_moves(self) -> list[Move]:
        return sorted(self.moves.values(), key=lambda m: _PHASES[m.kind])

    # --- blobs ------------------------------------------------------------------

    def unexpected_blob(self, path: str) -> None:
        self.info("unexpected", self.view.rel(path), "not a blob where blobs are stored; left alone", path)

    def blob_checked(self, digest: Digest, state: BlobState) -> None:
        self.blobs[digest] = state
        self.counts["blobs"] += 1
        self.counts["bytes"] += state.size
        if not state.ok:
            self.damage("blob-corrupt", f"blob {digest}", state.detail, state.path, digest=str(digest))
            self.move("blob", state.path, f"corrupted: {state.detail}", BlobUnchanged(state))

    async def content(self, digest: Digest) -> str:
        """"ok", "corrupt" or "missing" (a blob that appeared during the run counts as ok)."""
        state = self.blobs.get(digest)
        if state is None:
            return "ok" if await self.view.appeared(digest) else "missing"
        return "ok" if state.ok else "corrupt"

    # --- repositories -------------------------------------------------------------

    async def check_repository(self, scan: RepositoryScan) -> None:
        view = self.view
        repo = scan.repository
        local = repo.upstream is None
        self.counts["repositories"] += 1
        self.counts["local" if local else "mirrored"] += 1
        self.counts["manifests"] += len(scan.revisions)
        self.counts["tags"] += len(scan.tags)
        for path in scan.unexpected:
            self.info("unexpected", view.rel(path), "not part of the repository layout; left alone", path,
                      repository=repo.name)

        def manifest_subject(digest: Digest) -> str:
            tags = scan.tags_of(digest)
            return f"{repo.name}@{digest}" + (f" (tags: {', '.join(tags)})" if tags else "")

        bad: dict[Digest, str] = {}
        parsed: dict[Digest, Manifest] = {}
        not_cached: set[Digest] = set()
        not_cached_manifests: set[Digest] = set()

        def revision_damage(kind: str, digest: Digest, message: str) -> None:
            self.damage(kind, manifest_subject(digest), message, scan.revisions[digest].path,
                        repository=repo.name, digest=str(digest))
            bad.setdefault(digest, message)

        async def linked(blob: Digest) -> bool:
            return blob in scan.links or await view.exists(repo.link_path(blob))

        for digest, revision in scan.revisions.items():
            if revision.error is not None:
                revision_damage("revision-invalid", digest, revision.error)
                continue
            state = await self.content(digest)
            data = await view.manifest(digest) if state == "ok" else None
            if state == "ok" and data is None:
                state = "missing"
            if state == "missing":
                revision_damage("manifest-missing", digest, "the manifest's content is missing from the blob store")
                continue
            if state == "corrupt" or data is None:
                revision_damage("manifest-corrupt", digest, "the manifest's content is corrupted")
                continue
            try:
                parsed[digest] = parse_manifest(data, revision.media_type)
            except RegistryError as e:
                why = e.message.removeprefix("manifest invalid: ")
                if local:
                    revision_damage("manifest-invalid", digest, f"the manifest does not parse: {why}")
                else:
                    self.info("manifest-unparsed", manifest_subject(digest),
                              f"kept as the upstream sent it, but it does not parse: {why}",
                              revision.path, repository=repo.name, digest=str(digest))

        for digest, manifest in parsed.items():
            for blob in manifest.blobs:
                state = await self.content(blob)
                if not local:
                    if state == "missing" or not await linked(blob):
                        not_cached.add(blob)
                    continue
                if state == "missing":
                    problem = ("manifest-blob-missing", f"references blob {blob}, whose content is missing")
                elif state == "corrupt":
                    problem = ("manifest-blob-corrupt", f"references blob {blob}, whose content is corrupted")
                elif not await linked(blob):
                    problem = ("manifest-blob-unlinked", f"references blob {blob}, which is not linked "
                                                         f"in the repository")
                else:
                    continue
                revision_damage(problem[0], digest, problem[1])
            for child in manifest.children:
                if child in scan.revisions:
                    continue
                if not local:
                    not_cached_manifests.add(child)
                else:
                    revision_damage("child-missing", digest, f"references manifest {child}, which is not "
                                                             f"in the repository")

        # An index over a damaged manifest is damaged too (local: nothing refills it).
        changed = local
        while changed:
            changed = False
            for digest, manifest in parsed.items():
                if digest in bad:
                    continue
                damaged = next((c for c in manifest.children if c in bad), None)
                if damaged is not None:
                    revision_damage("child-damaged", digest, f"references manifest {damaged}, which is damaged")
                    changed = True

        for tag in scan.tags:
            subject = f"{repo.name}:{tag.name}"
            unchanged = TagUnchanged(tag)
            if tag.error is not None or tag.digest is None:
                self.damage("tag-invalid", subject, tag.error or "unreadable", tag.path,
                            repository=repo.name, tag=tag.name)
                self.move("tag", tag.path, tag.error or "unreadable", unchanged)
            elif tag.digest not in scan.revisions and not await view.exists(repo.revision_path(tag.digest)):
                message = f"points at {tag.digest}, which is not in the repository"
                self.damage("tag-dangling", subject, message, tag.path, repository=repo.name, tag=tag.name,
                            digest=str(tag.digest))
                self.move("tag", tag.path, message, unchanged)
            elif tag.digest in bad:
                self.move("tag", tag.path, f"pointed at damaged manifest {tag.digest}", unchanged)

        for referrer in scan.referrers:
            subject = f"{repo.name} referrer entry {view.rel(referrer.path)}"
            if referrer.error is not None or referrer.digest is None:
                self.damage("referrer-invalid", subject, referrer.error or "unreadable", referrer.path,
                            repository=repo.name)
                self.move("referrer", referrer.path, referrer.error or "unreadable")
            elif (referrer.digest not in scan.revisions
                  and not await view.exists(repo.revision_path(referrer.digest))):
                message = f"lists manifest {referrer.digest}, which is not in the repository"
                self.damage("referrer-dangling", subject, message, referrer.path, repository=repo.name,
                            digest=str(referrer.digest))
                self.move("referrer", referrer.path, message)
            elif referrer.digest in bad:
                self.move("referrer", referrer.path, f"listed damaged manifest {referrer.digest}")

        for digest, reason in bad.items():
            missing = await self.content(digest) == "missing"
            self.move("revision", scan.revisions[digest].path, reason, ContentMissing(digest) if missing else None)

        for digest, path in scan.links.items():
            state = await self.content(digest)
            if state == "ok":
                continue
            if not local:
                not_cached.add(digest)
                continue
            if state == "missing":
                message = f"blob {digest} is linked, but its content is missing"
                self.damage("link-dangling", f"{repo.name} blob link {digest}", message, path,
                            repository=repo.name, digest=str(digest))
                self.move("link", path, message, ContentMissing(digest))
            else:
                self.move("link", path, f"its blob {digest} is quarantined as corrupted")

        if not_cached or not_cached_manifests:
            counts = [plural(len(not_cached), "blob"), plural(len(not_cached_manifests), "manifest")]
            what = " and ".join(c for c in counts if not c.startswith("0 "))
            ordered = tuple(sorted(str(d) for d in not_cached | not_cached_manifests))
            self.info("not-cached", repo.name, f"{what} not cached yet (fetched from {repo.upstream} on demand)",
                      repository=repo.name, digests=ordered)

    # --- reports ----------------------------------------------------------------

    def summary(self) -> str:
        c = self.counts
        damage = sum(1 for f in self.findings if f.severity == "damage")
        outcome = plural(damage, "problem") if damage else "clean"
        return (f"{plural(c['blobs'], 'blob')} ({human_size(c['bytes'])}) re-hashed; "
                f"{plural(c['repositories'], 'repository').replace('repositorys', 'repositories')} "
                f"({c['local']} local, {c['mirrored']} mirrored), {plural(c['manifests'], 'manifest')}, "
                f"{plural(c['tags'], 'tag')} checked: {outcome}")

    def quarantine_report(self, moved: list[dict[str, str]]) -> bytes:
        """``quarantine/<timestamp>/fsck.json``: what was moved, and every problem found."""
        document = {"moved": moved, "findings": [x.document() for x in self.findings if x.severity == "damage"]}
        return (json.dumps(document, indent=2) + "\n").encode()


def finish(checker: Checker, location: str, args: argparse.Namespace, quarantine: str | None,
           moved: list[dict[str, str]], moved_what: str = "files") -> int:
    """Print the findings, moves and summary (or the JSON document); the exit status."""
    status = EXIT_DAMAGE if checker.damaged else EXIT_OK
    if args.json:
        document = {
            "data_dir": location,
            "clean": not checker.damaged,
            "exit_status": status,
            "checked": checker.counts,
            "problems": [f.document() for f in checker.findings if f.severity == "damage"],
            "info": [f.document() for f in checker.findings if f.severity == "info"],
            "repaired": moved,
            "quarantine": quarantine,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return status
    for finding in checker.findings:
        print(finding.line())
    for move in moved:
        print(f"moved: {move['path']} -> {move['moved_to']} ({move['reason']})")
    print(checker.summary())
    if moved:
        print(f"{len(moved)} {moved_what} moved to {quarantine} (see fsck.json there); run fsck again to confirm")
    elif args.repair and checker.damaged:
        print("nothing was moved")
    return status


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def quarantine_names() -> Iterator[str]:
    """Names for a new quarantine folder: the UTC time, then with ``-2``, ``-3``... (when taken)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    yield stamp
    for n in range(2, 1000):
        yield f"{stamp}-{n}"


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
