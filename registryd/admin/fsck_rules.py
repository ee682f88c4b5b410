"""The rules of ``registryd fsck``, the same on both storage drivers (``Checker``).

What is damage and what is information, how each finding reads, which
files a repair moves and what it looks at again right before moving one,
and the report the command prints. ``registryd.admin.fsck.StoreFsck``
reads the store for them over its driver (a data directory, a bucket, memory).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Iterator, Protocol, Union

import attrs

from registryd.admin import EXIT_DAMAGE, EXIT_OK
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import Manifest, parse_manifest
from registryd.storage.scan import RepositoryScan, Tag
from registryd.units import human_size

# Order of the moves: what points at something goes before what it points at.
_PHASES = {"tag": 0, "referrer": 1, "revision": 2, "link": 3, "blob": 4}


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
