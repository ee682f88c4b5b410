"""Repository names and containerd's image names.

containerd names images by full reference: ``registry.example/team/app:1.0``,
``docker.io/library/alpine:3.20``, and ``<repository>@sha256:...`` for an
image known only by digest (as the kubelet records what it pulled). A
``Naming`` maps a repository to the image repository it stands for and back:

* the local repositories (``LocalNaming``): ``team/app`` is
  ``<hostname>/team/app``; a name whose first component is a host
  (``docker.io/library/alpine``) is the node's image of that name as it is;
* one upstream's mirrored repositories (``MirrorNaming``): ``library/alpine``
  under ``docker.io`` is ``docker.io/library/alpine``.

Names of images that fit no repository name (uppercase, odd characters)
map to None and are never served.
"""
from __future__ import annotations

import re
from typing import Protocol

import attrs

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.names import is_tag

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
MAX_NAME_LENGTH = 255
#: What containerd records on content it pulled: the repositories (per host) it came from.
SOURCE_LABEL = "containerd.io/distribution.source"


@attrs.frozen
class ImageName:
    """An image name taken apart: its repository and either a tag or a digest."""

    repository: str
    tag: str | None = None
    digest: Digest | None = None


def digest_or_none(text: str) -> Digest | None:
    """``text`` as a digest registryd can serve, or None (containerd's names and labels are anyone's)."""
    try:
        return parse_digest(text)
    except RegistryError:
        return None


def parse_image_name(name: str) -> ImageName | None:
    """``host/repo:tag`` or ``host/repo@sha256:...`` taken apart; None for any other shape."""
    repository, at, reference = name.partition("@")
    if at:
        digest = digest_or_none(reference)
        return ImageName(repository, digest=digest) if digest is not None else None
    repository, colon, tag = name.rpartition(":")
    if not colon or "/" in tag or not is_tag(tag):
        return None
    return ImageName(repository, tag=tag)


def looks_like_host(component: str) -> bool:
    """Docker's rule for a reference's first component: a registry host, not a path."""
    return "." in component or ":" in component or component == "localhost"


def is_repository_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and bool(_REPOSITORY.match(name))


class Naming(Protocol):
    """How one RepositoryBackend names its repositories in containerd."""

    def image_repository(self, name: str) -> str:
        """The image repository (a reference without tag or digest) of repository ``name``."""

    def repository(self, image_repository: str) -> str | None:
        """The repository an image repository is, or None if it is none of this backend's."""


@attrs.frozen
class LocalNaming:
    """Local repositories: ``<hostname>/<name>``, or the name itself when it starts with a host."""

    hostname: str

    def image_repository(self, name: str) -> str:
        first, slash, _ = name.partition("/")
        if slash and looks_like_host(first):
            return name
        return f"{self.hostname}/{name}"

    def foreign_host(self, name: str) -> str | None:
        """The other registry's host a repository name starts with (``docker.io`` of
        ``docker.io/library/x``), or None for a name this node's images are recorded under."""
        first, slash, _ = name.partition("/")
        return first if slash and looks_like_host(first) and first != self.hostname else None

    def repository(self, image_repository: str) -> str | None:
        own = self.hostname + "/"
        name = image_repository[len(own):] if image_repository.startswith(own) else image_repository
        if name is image_repository and not looks_like_host(name.partition("/")[0]):
            return None
        return name if is_repository_name(name) else None


@attrs.frozen
class MirrorNaming:
    """One upstream's mirrored repositories: ``<namespace>/<name upstream>``."""

    namespace: str

    def image_repository(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def repository(self, image_repository: str) -> str | None:
        own = self.namespace + "/"
        if not image_repository.startswith(own):
            return None
        name = image_repository[len(own):]
        return name if is_repository_name(name) else None


def digest_name(image_repository: str, digest: Digest) -> str:
    return f"{image_repository}@{digest}"


def tag_name(image_repository: str, tag: str) -> str:
    return f"{image_repository}:{tag}"


def source_label(image_repository: str) -> tuple[str, str]:
    """containerd's label saying a blob is in a repository: ``containerd.io/distribution.source.<host>``
    and the repository's path on that host (the value lists such paths, comma-separated)."""
    host, _, path = image_repository.partition("/")
    return f"{SOURCE_LABEL}.{host}", path
