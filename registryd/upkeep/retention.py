"""``[[retention]]`` rules applied to local repositories: the one policy, over the storage interface.

It reads and deletes only through a RepositoryBackend (the store's local
repositories) and reads manifest documents through the BlobBackend, so it
runs the same on a data directory, a bucket and memory: in the server on
its schedule and for ``POST /admin/retention``, and in ``registryd
retention`` beside it. Blobs are never touched: the removed manifests'
blobs leave through the normal garbage collection.

In a repository that rules match (a tag or manifest is kept when any of
them keeps it):

* Tags: each rule keeps the tags matching its ``keep_tags``, and the
  ``keep_latest`` newest of the others by push time (the tag's write time
  in the store; ties by name); without ``keep_latest``, all of them. Tags
  of the distribution spec's tag schema (``sha256-<hex>``, cosign's
  ``sha256-<hex>.sig`` / ``.att`` / ``.sbom``) belong to the manifest they
  name: they count toward no ``keep_latest``, stay while it stays and go
  with it.
* Manifests: kept are the manifests kept tags point at, and everything
  they need: the manifests they name (an index's children; a referrer's
  subject), and their referrers (signatures, SBOMs, attestations),
  recursively. Untagged
  manifests (that no tag reaches at all) stay until they are older than
  ``untagged_after`` (by their write time) in every rule, and keep what
  they need while they stay; a rule without ``untagged_after`` keeps them.
  A referrer follows its subject (a new signature of an old untagged
  image goes with it). Every other manifest is removed, with the referrer
  entry it has as a referrer.

Removals are made tags first, then manifests, each manifest before those
it names and before its subject. Between the scan and the manifest
removals, tags and revisions are read again: a tag pushed (or moved)
meanwhile, and a manifest pushed meanwhile, keep what they need, and a
tag written again since the scan stays.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs

from registryd.deferreds import bounded_gather
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import parse_manifest
from registryd.retention_rules import RetentionRule
from registryd.storage import layout
from registryd.storage.interface import BlobBackend, RepositoryBackend
from registryd.upkeep.marker import referenced_digests

#: Manifest documents are read up to at least this much, whatever max_manifest_size says.
MIN_MANIFEST_LIMIT = 4 * 1024 * 1024
#: Documents and tags read at once (on S3 each is a request).
CONCURRENCY = 8
#: A tag of the tag schema: ``<alg>-<hex>`` of the manifest it belongs to, with cosign's suffixes.
_ATTACHED_TAG = re.compile(r"^(sha256|sha512)-([a-f0-9]{64}|[a-f0-9]{128})(?:\.[A-Za-z0-9._-]*)?$")

UNTAGGED = "untagged"
TAGS_REMOVED = "no kept tag needs it"
SUBJECT_REMOVED = "its subject is removed"

Clock = Callable[[], float]


@attrs.frozen
class Document:
    """What one manifest names (the other manifests it needs, its subject among them), and its subject."""

    names: frozenset[Digest]
    subject: Digest | None


@attrs.frozen
class TagState:
    digest: Digest | None
    written: float


@attrs.define
class Plan:
    """One repository's decisions, before anything is removed."""

    tags: dict[str, TagState]
    revisions: dict[Digest, float]
    documents: dict[Digest, Document]
    kept_tags: set[str]
    kept: set[Digest]
    reasons: dict[Digest, str]

    @property
    def doomed_tags(self) -> list[str]:
        return sorted(set(self.tags) - self.kept_tags)

    def removal_order(self, doomed: Iterable[Digest]) -> list[Digest]:
        """``doomed`` with every manifest before those it names and before its subject."""
        return removal_order(set(doomed), self.documents)


def attached_subject(tag: str) -> Digest | None:
    """The manifest a tag-schema tag (``sha256-<hex>[.sig]``) belongs to, or None."""
    match = _ATTACHED_TAG.match(tag)
    if match is None or len(match[2]) != (64 if match[1] == "sha256" else 128):
        return None
    return Digest(match[1], match[2])


def closure(roots: Iterable[Digest], documents: Mapping[Digest, Document],
            referrers: Mapping[Digest, set[Digest]]) -> set[Digest]:
    """``roots`` (those the repository has) and everything they need: the manifests they name, their referrers."""
    seen: set[Digest] = set()
    stack = [digest for digest in roots if digest in documents]
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        stack.extend(d for d in documents[digest].names if d in documents)
        stack.extend(referrers.get(digest, ()))
    return seen


def referrers_of(documents: Mapping[Digest, Document]) -> dict[Digest, set[Digest]]:
    """Subject -> the repository's manifests that name it as their subject."""
    found: dict[Digest, set[Digest]] = {}
    for digest, document in documents.items():
        if document.subject is not None and document.subject in documents and document.subject != digest:
            found.setdefault(document.subject, set()).add(digest)
    return found


def removal_order(doomed: set[Digest], documents: Mapping[Digest, Document]) -> list[Digest]:
    """Parents before the manifests they name, referrers before their subject; ties by digest."""
    blockers: dict[Digest, set[Digest]] = {digest: set() for digest in doomed}
    for digest in doomed:
        document = documents.get(digest)
        if document is None:
            continue
        for named in document.names | ({document.subject} if document.subject is not None else set()):
            if named in blockers and named != digest:
                blockers[named].add(digest)
    order: list[Digest] = []
    while blockers:
        ready = sorted((d for d, waiting in blockers.items() if not waiting), key=str)
        if not ready:   # a cycle cannot be hashed into existence; never loop on a broken document
            ready = sorted(blockers, key=str)
        for digest in ready:
            del blockers[digest]
            order.append(digest)
        for waiting in blockers.values():
            waiting.difference_update(ready)
    return order


def plan(rules: Sequence[RetentionRule], tags: dict[str, TagState], revisions: dict[Digest, float],
         documents: dict[Digest, Document], now: float) -> Plan:
    """What ``rules`` keep of one repository (see the module docstring); changes nothing."""
    referrers = referrers_of(documents)
    attached = {tag: subject for tag in tags
                if (subject := attached_subject(tag)) is not None and subject in documents}
    ordinary = [tag for tag in tags if tag not in attached]
    kept_tags: set[str] = set()
    for rule in rules:
        pinned = {tag for tag in tags if rule.always_keeps(tag)}
        others = sorted((tag for tag in ordinary if tag not in pinned),
                        key=lambda tag: (tags[tag].written, tag), reverse=True)
        kept_tags |= pinned | set(others if rule.keep_latest is None else others[:rule.keep_latest])

    reachable = closure((state.digest for state in tags.values() if state.digest is not None), documents, referrers)
    ages = [rule.untagged_after for rule in rules]
    cutoff = None if any(age is None for age in ages) else now - max(a for a in ages if a is not None)
    untagged = [digest for digest in documents if digest not in reachable]
    # A referrer follows its subject; any other untagged manifest stays until it is old.
    roots = {digest for digest in untagged
             if (cutoff is None or revisions.get(digest, now) >= cutoff)
             and (documents[digest].subject is None or documents[digest].subject not in documents)}
    while True:
        pointed = {digest for tag in kept_tags if (digest := tags[tag].digest) is not None}
        kept = closure(roots | pointed, documents, referrers)
        belonging = {tag for tag, subject in attached.items() if subject in kept and tag not in kept_tags}
        if not belonging:
            break
        kept_tags |= belonging
    reasons = {}
    for digest in documents:
        if digest in kept:
            continue
        subject = documents[digest].subject
        reasons[digest] = (SUBJECT_REMOVED if subject is not None and subject in documents and subject not in kept
                           else UNTAGGED if digest not in reachable else TAGS_REMOVED)
    return Plan(tags, revisions, documents, kept_tags, kept, reasons)


@attrs.define
class _Repository:
    """One repository's run, through its backend."""

    backend: RepositoryBackend
    blobs: BlobBackend
    manifest_limit: int
    name: str
    rules: Sequence[RetentionRule]
    now: float
    dry_run: bool
    removed: list[dict[str, Any]]

    async def run(self) -> dict[str, Any]:
        tags = await self._tags()
        revisions = await self.backend.revisions(self.name)
        documents = await self._documents(revisions)
        decided = plan(self.rules, tags, revisions, documents, self.now)
        removed_tags = await self._remove_tags(decided)
        doomed = set(decided.reasons)
        if not self.dry_run and doomed:
            doomed -= await self._needed_now(decided)
        removed_manifests = await self._remove_manifests(decided, decided.removal_order(doomed))
        return {"repository": self.name, "tags_removed": removed_tags, "manifests_removed": removed_manifests,
                "tags_kept": len(tags) - removed_tags, "manifests_kept": len(revisions) - removed_manifests}

    async def _tags(self) -> dict[str, TagState]:
        names = await self.backend.tags(self.name) or []
        states = await bounded_gather(names, self._tag, CONCURRENCY)
        return {tag: state for tag, state in zip(names, states) if state is not None}

    async def _tag(self, tag: str) -> TagState | None:
        written = await self.backend.tag_mtime(self.name, tag)
        if written is None:
            return None     # gone since the listing
        try:
            digest = await self.backend.resolve_tag(self.name, tag)
        except RegistryError:
            digest = None   # a tag that holds no digest needs nothing
        return TagState(digest, written)

    async def _documents(self, digests: Iterable[Digest]) -> dict[Digest, Document]:
        listed = list(digests)
        found = await bounded_gather(listed, self._document, CONCURRENCY)
        return dict(zip(listed, found))

    async def _document(self, digest: Digest) -> Document:
        content = await self.blobs.read(digest, self.manifest_limit)
        if content is None:
            return Document(frozenset(), None)
        subject: Digest | None = None
        try:
            media_type = await self.backend.manifest_media_type(self.name, digest)
            subject = parse_manifest(content, media_type).subject
        except (RegistryError, ValueError, KeyError, TypeError):
            pass    # not a manifest this registry parses: no referrer entry was made for it
        # Every digest it names counts (a wider net than the parser's children), its subject too:
        # a kept referrer (a tagged SBOM) keeps its image. An untagged one is no root (see plan).
        return Document(frozenset(referenced_digests(content)), subject)

    def _report(self, kind: str, key: str, digest: Digest | None, **extra: Any) -> None:
        entry: dict[str, Any] = {"kind": kind, "repository": self.name,
                                 "path": f"{layout.REPOSITORIES}{self.name}/{key}", **extra}
        if digest is not None:
            entry["digest"] = str(digest)
        self.removed.append(entry)

    async def _remove_tags(self, decided: Plan) -> int:
        count = 0
        for tag in decided.doomed_tags:
            state = decided.tags[tag]
            if not self.dry_run:
                # Pushed again since the scan (the same digest or another): a new tag, it stays.
                if (await self.backend.tag_mtime(self.name, tag) != state.written
                        or not await self.backend.delete_tag(self.name, tag)):
                    continue
            self._report("tag", layout.tag_key(tag), state.digest, tag=tag)
            count += 1
        return count

    async def _needed_now(self, decided: Plan) -> set[Digest]:
        """What the tags and revisions written since the scan need (read again now)."""
        tags = await self._tags()
        revisions = await self.backend.revisions(self.name)
        documents = dict(decided.documents)
        documents.update(await self._documents(d for d in revisions if d not in documents))
        roots = {state.digest for state in tags.values() if state.digest is not None}
        roots |= {digest for digest in revisions if digest not in decided.revisions}
        return closure(roots, documents, referrers_of(documents))

    async def _remove_manifests(self, decided: Plan, order: list[Digest]) -> int:
        count = 0
        for digest in order:
            document = decided.documents[digest]
            if not self.dry_run and not await self.backend.delete_manifest(self.name, digest, document.subject):
                continue
            extra: dict[str, Any] = {"reason": decided.reasons[digest]}
            if document.subject is not None:
                extra["subject"] = str(document.subject)
            self._report("manifest", layout.revision_key(digest), digest, **extra)
            count += 1
        return count


class Retention:
    """Applies ``rules`` to the local repositories of one store (its RepositoryBackend and blobs)."""

    def __init__(self, repositories: RepositoryBackend, blobs: BlobBackend, rules: Sequence[RetentionRule],
                 where: str, manifest_limit: int = MIN_MANIFEST_LIMIT, clock: Clock = time.time) -> None:
        self._repositories = repositories
        self._blobs = blobs
        self.rules = tuple(rules)
        self._where = where
        self._limit = max(manifest_limit, MIN_MANIFEST_LIMIT)
        self._clock = clock

    async def run(self, dry_run: bool = False, due: Sequence[RetentionRule] | None = None) -> dict[str, Any]:
        """Apply the rules, to the repositories ``due`` rules match (all: every rule's); the report
        ``registryd retention --json`` prints. A repository gets every rule that matches it."""
        now = self._clock()
        selecting = self.rules if due is None else tuple(due)
        removed: list[dict[str, Any]] = []
        repositories = []
        for name in await self._repositories.catalog():
            if not any(rule.applies_to(name) for rule in selecting):
                continue
            rules = [rule for rule in self.rules if rule.applies_to(name)]
            repositories.append(await _Repository(self._repositories, self._blobs, self._limit, name, rules, now,
                                                  dry_run, removed).run())
        counts = {kind: sum(1 for entry in removed if entry["kind"] == kind) for kind in ("tag", "manifest")}
        return {"data_dir": self._where, "dry_run": dry_run, "now": now,
                "rules": [rule.describe() for rule in selecting], "repositories_matched": len(repositories),
                "repositories": repositories, "removed": removed, "counts": counts}
