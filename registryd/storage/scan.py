"""A repository as a reader sees it: its links, revisions, tags and referrer entries, parsed.

The read model of ``registryd fsck`` (registryd.admin.fsck lists and reads
the keys over the store's driver; the rules in registryd.admin.fsck_rules
judge them). The layout is registryd.storage.layout's, the one the store
writes.
"""
from __future__ import annotations

import json
import os

import attrs

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage import layout


def digest_or_none(algorithm: str, hexpart: str) -> Digest | None:
    try:
        return parse_digest(f"{algorithm}:{hexpart}")
    except RegistryError:
        return None


@attrs.frozen
class Repository:
    """One repository: local, or a mirrored upstream repository."""

    name: str               # as a client pulls it: "team/app", "docker.io/library/alpine"
    remote: str             # its path under ``root``
    upstream: str | None    # the upstream namespace of a mirrored repository
    root: str               # DATA_DIR/repositories or DATA_DIR/mirror/<namespace>

    @property
    def kind(self) -> str:
        return "local" if self.upstream is None else "mirror"

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.remote)

    def revision_path(self, digest: Digest) -> str:
        return layout.local_path(self.path, layout.revision_key(digest))

    def link_path(self, digest: Digest) -> str:
        return layout.local_path(self.path, layout.link_key(digest))

    def pull_path(self, digest: Digest) -> str:
        """The marker whose mtime is when the manifest was last pulled."""
        return layout.local_path(self.path, layout.pull_key(digest))


@attrs.frozen
class Revision:
    digest: Digest
    path: str
    media_type: str | None
    error: str | None = None


@attrs.frozen
class Tag:
    name: str
    path: str
    digest: Digest | None
    error: str | None = None


@attrs.frozen
class Referrer:
    path: str
    subject: Digest | None
    digest: Digest | None
    error: str | None = None


@attrs.define
class RepositoryScan:
    """What one repository's directory holds."""

    repository: Repository
    links: dict[Digest, str] = attrs.field(factory=dict)
    revisions: dict[Digest, Revision] = attrs.field(factory=dict)
    tags: list[Tag] = attrs.field(factory=list)
    referrers: list[Referrer] = attrs.field(factory=list)
    unexpected: list[str] = attrs.field(factory=list)

    def tags_of(self, digest: Digest) -> list[str]:
        return [t.name for t in self.tags if t.digest == digest]


def parse_revision(digest: Digest, where: str, data: bytes) -> Revision:
    """A revision file's content (``{"mediaType": ...}``), from a file or an object at ``where``."""
    try:
        media_type = json.loads(data)["mediaType"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return Revision(digest, where, None, 'the revision file is not JSON {"mediaType": ...}')
    if not isinstance(media_type, str):
        return Revision(digest, where, None, "the revision file's mediaType is not a string")
    return Revision(digest, where, media_type)


def parse_tag(name: str, where: str, data: bytes) -> Tag:
    """A tag file's content: the digest it points at."""
    try:
        return Tag(name, where, parse_digest(data.decode("utf-8").strip()))
    except (UnicodeDecodeError, RegistryError):
        return Tag(name, where, None, f"the tag file does not hold a digest: {data[:80]!r}")


def parse_referrer(subject: Digest | None, where: str, data: bytes | None) -> Referrer:
    """A referrer entry ``.../<subject alg>/<subject hex>/<alg>-<hex>``: the descriptor of its manifest."""
    algorithm, _, hexpart = where.rpartition("/")[2].partition("-")
    digest = digest_or_none(algorithm, hexpart)
    if subject is None or digest is None:
        return Referrer(where, subject, digest, "unexpected entry name")
    try:
        document = json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        document = None
    if not isinstance(document, dict) or document.get("digest") != str(digest):
        return Referrer(where, subject, digest, "the entry is not the descriptor of its manifest")
    return Referrer(where, subject, digest)
