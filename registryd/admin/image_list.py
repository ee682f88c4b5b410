"""What ``registryd preload`` is asked for: image references and platforms.

A reference is written as a client pulls it from registryd, so its name is
registryd's repository name (``docker.io/library/alpine``,
``127.0.0.1:5000/team/app``, or ``alpine`` for the default upstream) and
the rest is a tag or a digest. Everything is checked before anything is
fetched: one bad line stops the command.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Iterable

import attrs

from registryd import platforms
from registryd.digest import parse_digest
from registryd.platforms import Platform
from registryd.errors import RegistryError
from registryd.names import check_name, is_tag

DEFAULT_TAG = "latest"
# An upstream namespace as the first component: a host, with a port or a dot.
_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[0-9]{1,5})?$")


class ImageListError(ValueError):
    """A reference, platform or image file that cannot be used (one line)."""


@attrs.frozen
class ImageRef:
    """One image to preload: a registryd repository name and a tag or digest."""

    name: str
    reference: str

    @property
    def by_digest(self) -> bool:
        return ":" in self.reference

    def __str__(self) -> str:
        return f"{self.name}{'@' if self.by_digest else ':'}{self.reference}"


def _check_repository(name: str) -> None:
    first, sep, rest = name.partition("/")
    path = name
    if sep and ":" in first:
        # host:port is a namespace only registryd's router takes apart.
        if not _HOST.match(first):
            raise ImageListError(f"{first!r} is not a registry host[:port]")
        path = rest
    try:
        check_name(path)
    except RegistryError:
        raise ImageListError(f"{name!r} is not a valid repository name (lowercase letters and digits "
                             f"separated by '.', '_', '__' or '-', joined by '/')") from None


def parse_reference(text: str) -> ImageRef:
    """``name[:tag][@digest]`` -> ImageRef; raises ImageListError."""
    if not text or any(c.isspace() for c in text):
        raise ImageListError(f"{text!r} is not one image reference")
    name, at, digest = text.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not is_tag(tag):
            raise ImageListError(f"{tag!r} is not a valid tag")
    _check_repository(name)
    if at:
        try:
            return ImageRef(name, str(parse_digest(digest)))  # a tag next to a digest is only a label
        except RegistryError as e:
            raise ImageListError(e.message) from None
    return ImageRef(name, tag or DEFAULT_TAG)


def parse_lines(lines: Iterable[str], where: str) -> list[ImageRef]:
    """References from an image file's lines; ``#`` starts a comment.

    Raises ImageListError naming ``where:LINE`` of the first bad line.
    """
    found: list[ImageRef] = []
    bad: list[str] = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            found.append(parse_reference(text))
        except ImageListError as e:
            bad.append(f"{where}:{number}: {e}")
    if bad:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise ImageListError(bad[0] + more)
    return found


def read_image_file(path: str) -> list[ImageRef]:
    """The references in ``path`` (``-``: standard input)."""
    try:
        if path == "-":
            return parse_lines(sys.stdin, "<stdin>")
        with open(path, encoding="utf-8") as f:
            return parse_lines(f, path)
    except OSError as e:
        raise ImageListError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ImageListError(f"{path} is not UTF-8 text") from None


def unique(refs: Iterable[ImageRef]) -> list[ImageRef]:
    """Each reference once, in the order first given."""
    return list(dict.fromkeys(refs))


def parse_platform(text: str) -> Platform:
    """argparse type for ``--platform``."""
    try:
        return platforms.parse_platform(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def describe_platform(platform: Any) -> str:
    """An index entry's platform as ``os/arch[/variant]`` (for messages)."""
    if not isinstance(platform, dict):
        return "any"
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return "/".join(str(p) for p in parts if p)
