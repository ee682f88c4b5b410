"""``registryd fsck [--repair]``: re-hash every blob, check every repository.

Checking only reads. Repairing only renames damaged files into
``DATA_DIR/quarantine/<timestamp>/`` (same relative path; same filesystem),
in an order that keeps the store consistent for a running server at every
step: tags, then referrer entries, then manifest revisions, then blob links,
then blobs. Nothing is ever deleted.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable

import attrs

from registryd.admin import EXIT_DAMAGE, EXIT_OK, AdminError
from registryd.admin.layout import (
    BlobFile,
    DataDir,
    RepositoryScan,
    add_store_arguments,
    open_data_dir,
    os_errors_reported,
    read_file,
    read_tag,
    scan_repository,
)
from registryd.admin.progress import Progress, human_size
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import Manifest, parse_manifest
from registryd.storage.files import fsync_dir

HELP = "re-hash every blob and check every repository; --repair quarantines what is damaged"

DESCRIPTION = """\
Check the data directory: re-hash every blob (streamed, so any size works)
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
parse.

With --repair, damaged files are renamed into
DATA_DIR/quarantine/<UTC timestamp>/ under their path in the data directory:
corrupted blobs; manifest revisions whose content is gone, corrupted or
unusable (a local image whose blob is missing, a local index whose manifest
is missing), with their tags and referrer entries; dangling tags, referrer
entries and blob links. Nothing is deleted; quarantine/<timestamp>/fsck.json
says why each file is there. Afterwards the store is consistent and a second
fsck is clean; push a quarantined image again to restore it (mirrored content
is fetched again on demand).

fsck is safe while the server is stopped, and alongside a running server:
without --repair it only reads; --repair only renames, and leaves alone a tag
or blob that changed since it was checked, or content that reappeared. Pushes
and deletes made during the run can show up as problems that are gone by the
next run: run fsck again before acting on them."""

EPILOG = """\
exit status:
  0  the store is clean (information such as "not cached" does not count)
  1  damage was found (with --repair: and moved to quarantine; run fsck again)
  2  bad arguments
  3  the check could not be done: missing or unreadable data directory, bad
     config file, permission denied, a rename that failed"""

CHUNK = 1024 * 1024

# Order of the moves: what points at something goes before what it points at.
_PHASES = {"tag": 0, "referrer": 1, "revision": 2, "link": 3, "blob": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--repair", action="store_true",
                        help="move damaged files into DATA_DIR/quarantine/<timestamp>/ (renames only)")
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
    identity: tuple[int, int]


@attrs.frozen
class Move:
    kind: str            # tag, referrer, revision, link, blob
    path: str
    reason: str
    still_damaged: Callable[[], bool] | None = None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


class Fsck:
    """One run over a data directory: findings, and the moves a repair would make."""

    def __init__(self, data: DataDir, stream: Any = None, progress: bool | None = None) -> None:
        self.data = data
        self.stream = stream if stream is not None else sys.stderr
        self.progress_enabled = progress
        self.findings: list[Finding] = []
        self.moves: dict[str, Move] = {}
        self.blobs: dict[Digest, BlobState] = {}
        self.counts = {"blobs": 0, "bytes": 0, "repositories": 0, "local": 0, "mirrored": 0,
                       "manifests": 0, "tags": 0}

    # --- bookkeeping ----------------------------------------------------------

    def damage(self, kind: str, subject: str, message: str, path: str | None = None, **where: Any) -> None:
        rel = self.data.rel(path) if path is not None else None
        self.findings.append(Finding("damage", kind, subject, message, rel, **where))

    def info(self, kind: str, subject: str, message: str, path: str | None = None, **where: Any) -> None:
        rel = self.data.rel(path) if path is not None else None
        self.findings.append(Finding("info", kind, subject, message, rel, **where))

    def move(self, kind: str, path: str, reason: str, still_damaged: Callable[[], bool] | None = None) -> None:
        if path not in self.moves:
            self.moves[path] = Move(kind, path, reason, still_damaged)

    @property
    def damaged(self) -> bool:
        return any(f.severity == "damage" for f in self.findings)

    # --- blobs ------------------------------------------------------------------

    def check_blobs(self) -> None:
        unexpected: list[str] = []
        files = list(self.data.blob_files(unexpected))
        for path in unexpected:
            self.info("unexpected", self.data.rel(path), "not a blob where blobs are stored; left alone", path)
        progress = Progress("registryd fsck: re-hashing blobs", len(files), sum(f.size for f in files),
                            self.stream, self.progress_enabled)
        try:
            for blob in files:
                state = self._hash(blob, progress)
                progress.advance(items=1)
                if state is None:
                    continue  # removed while we looked
                self.blobs[blob.digest] = state
                self.counts["blobs"] += 1
                self.counts["bytes"] += state.size
                if not state.ok:
                    self.damage("blob-corrupt", f"blob {blob.digest}", state.detail, blob.path,
                                digest=str(blob.digest))
                    self.move("blob", blob.path, f"corrupted: {state.detail}", self._blob_unchanged(blob.path, state))
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

    @staticmethod
    def _blob_unchanged(path: str, state: BlobState) -> Callable[[], bool]:
        """Still the file we hashed (a good upload of the same digest replaces it)?"""
        def check() -> bool:
            try:
                return _identity(os.stat(path)) == state.identity
            except FileNotFoundError:
                return False
        return check

    def content(self, digest: Digest) -> str:
        """"ok", "corrupt" or "missing" (a blob that appeared during the run counts as ok)."""
        state = self.blobs.get(digest)
        if state is None:
            return "ok" if os.path.isfile(self.data.blob_path(digest)) else "missing"
        return "ok" if state.ok else "corrupt"

    def _content_missing(self, digest: Digest) -> Callable[[], bool]:
        return lambda: not os.path.isfile(self.data.blob_path(digest))

    # --- repositories -------------------------------------------------------------

    def check_repositories(self) -> None:
        repositories = self.data.repositories()
        progress = Progress("registryd fsck: checking repositories", len(repositories), 0,
                            self.stream, self.progress_enabled)
        try:
            for repository in repositories:
                self.check_repository(scan_repository(repository))
                progress.advance(items=1)
        finally:
            progress.close()

    def check_repository(self, scan: RepositoryScan) -> None:
        repo = scan.repository
        local = repo.upstream is None
        self.counts["repositories"] += 1
        self.counts["local" if local else "mirrored"] += 1
        self.counts["manifests"] += len(scan.revisions)
        self.counts["tags"] += len(scan.tags)
        for path in scan.unexpected:
            self.info("unexpected", self.data.rel(path), "not part of the repository layout; left alone", path,
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

        for digest, revision in scan.revisions.items():
            if revision.error is not None:
                revision_damage("revision-invalid", digest, revision.error)
                continue
            state = self.content(digest)
            data = read_file(self.data.blob_path(digest)) if state == "ok" else None
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
                state = self.content(blob)
                linked = blob in scan.links or os.path.exists(repo.link_path(blob))
                if not local:
                    if state == "missing" or not linked:
                        not_cached.add(blob)
                    continue
                if state == "missing":
                    problem = ("manifest-blob-missing", f"references blob {blob}, whose content is missing")
                elif state == "corrupt":
                    problem = ("manifest-blob-corrupt", f"references blob {blob}, whose content is corrupted")
                elif not linked:
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
            unchanged = self._tag_unchanged(tag.name, tag.path, tag)
            if tag.error is not None or tag.digest is None:
                self.damage("tag-invalid", subject, tag.error or "unreadable", tag.path,
                            repository=repo.name, tag=tag.name)
                self.move("tag", tag.path, tag.error or "unreadable", unchanged)
            elif tag.digest not in scan.revisions and not os.path.exists(repo.revision_path(tag.digest)):
                message = f"points at {tag.digest}, which is not in the repository"
                self.damage("tag-dangling", subject, message, tag.path, repository=repo.name, tag=tag.name,
                            digest=str(tag.digest))
                self.move("tag", tag.path, message, unchanged)
            elif tag.digest in bad:
                self.move("tag", tag.path, f"pointed at damaged manifest {tag.digest}", unchanged)

        for referrer in scan.referrers:
            subject = f"{repo.name} referrer entry {self.data.rel(referrer.path)}"
            if referrer.error is not None or referrer.digest is None:
                self.damage("referrer-invalid", subject, referrer.error or "unreadable", referrer.path,
                            repository=repo.name)
                self.move("referrer", referrer.path, referrer.error or "unreadable")
            elif referrer.digest not in scan.revisions and not os.path.exists(repo.revision_path(referrer.digest)):
                message = f"lists manifest {referrer.digest}, which is not in the repository"
                self.damage("referrer-dangling", subject, message, referrer.path, repository=repo.name,
                            digest=str(referrer.digest))
                self.move("referrer", referrer.path, message)
            elif referrer.digest in bad:
                self.move("referrer", referrer.path, f"listed damaged manifest {referrer.digest}")

        for digest, reason in bad.items():
            check = self._content_missing(digest) if self.content(digest) == "missing" else None
            self.move("revision", scan.revisions[digest].path, reason, check)

        for digest, path in scan.links.items():
            state = self.content(digest)
            if state == "ok":
                continue
            if not local:
                not_cached.add(digest)
                continue
            if state == "missing":
                message = f"blob {digest} is linked, but its content is missing"
                self.damage("link-dangling", f"{repo.name} blob link {digest}", message, path,
                            repository=repo.name, digest=str(digest))
                self.move("link", path, message, self._content_missing(digest))
            else:
                self.move("link", path, f"its blob {digest} is quarantined as corrupted")

        if not_cached or not_cached_manifests:
            counts = [_plural(len(not_cached), "blob"), _plural(len(not_cached_manifests), "manifest")]
            what = " and ".join(c for c in counts if not c.startswith("0 "))
            ordered = tuple(sorted(str(d) for d in not_cached | not_cached_manifests))
            self.info("not-cached", repo.name, f"{what} not cached yet (fetched from {repo.upstream} on demand)",
                      repository=repo.name, digests=ordered)

    def _tag_unchanged(self, name: str, path: str, seen: Any) -> Callable[[], bool]:
        return lambda: read_tag(name, path) == seen

    # --- repair -----------------------------------------------------------------

    def repair(self) -> tuple[str | None, list[dict[str, str]]]:
        """Rename every damaged file into a new quarantine folder; what moved."""
        moves = sorted(self.moves.values(), key=lambda m: _PHASES[m.kind])
        if not moves:
            return None, []
        quarantine = self._quarantine_folder()
        moved: list[dict[str, str]] = []
        for move in moves:
            if move.still_damaged is not None and not move.still_damaged():
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
        with open(report + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"moved": moved, "findings": [x.document() for x in self.findings if x.severity == "damage"]},
                      f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(report + ".tmp", report)
        fsync_dir(quarantine)
        return self.data.rel(quarantine), moved

    def _quarantine_folder(self) -> str:
        parent = os.path.join(self.data.root, "quarantine")
        os.makedirs(parent, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1, 1000):
            path = os.path.join(parent, stamp if n == 1 else f"{stamp}-{n}")
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            fsync_dir(parent)
            return path
        raise AdminError(f"cannot create a quarantine folder in {parent}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _summary(fsck: Fsck) -> str:
    c = fsck.counts
    damage = sum(1 for f in fsck.findings if f.severity == "damage")
    outcome = _plural(damage, "problem") if damage else "clean"
    return (f"{_plural(c['blobs'], 'blob')} ({human_size(c['bytes'])}) re-hashed; "
            f"{_plural(c['repositories'], 'repository').replace('repositorys', 'repositories')} "
            f"({c['local']} local, {c['mirrored']} mirrored), {_plural(c['manifests'], 'manifest')}, "
            f"{_plural(c['tags'], 'tag')} checked: {outcome}")


def run(args: argparse.Namespace) -> int:
    data = open_data_dir(args)
    fsck = Fsck(data)
    with os_errors_reported():
        fsck.check_blobs()
        fsck.check_repositories()
        quarantine, moved = fsck.repair() if args.repair else (None, [])
    status = EXIT_DAMAGE if fsck.damaged else EXIT_OK
    if args.json:
        document = {
            "data_dir": data.root,
            "clean": not fsck.damaged,
            "exit_status": status,
            "checked": fsck.counts,
            "problems": [f.document() for f in fsck.findings if f.severity == "damage"],
            "info": [f.document() for f in fsck.findings if f.severity == "info"],
            "repaired": moved,
            "quarantine": quarantine,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return status
    for finding in fsck.findings:
        print(finding.line())
    for move in moved:
        print(f"moved: {move['path']} -> {move['moved_to']} ({move['reason']})")
    print(_summary(fsck))
    if moved:
        print(f"{len(moved)} files moved to {quarantine} (see fsck.json there); run fsck again to confirm")
    elif args.repair and fsck.damaged:
        print("nothing was moved")
    return status
