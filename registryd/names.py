"""Repository names and tags, as the distribution spec's grammar has them."""
from __future__ import annotations

import re

from registryd.errors import RegistryError, manifest_invalid, name_invalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
MAX_NAME_LENGTH = 255


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else NAME_INVALID.

    The grammar alone rules out ``..``, empty components (``//``) and
    leading slashes, so a name is always a safe relative path on disk.
    """
    if len(name) > MAX_NAME_LENGTH:
        raise name_invalid(name[:MAX_NAME_LENGTH] + "...", f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.match(name):
        raise name_invalid(name, "invalid repository name: components are lowercase letters and digits "
                                 "separated by '.', '_', '__' or '-', joined by '/'")
    return name


def check_raw_path(path: bytes) -> None:
    """Refuse encoded '/', '.' and '\\' in a request path.

    Routing sees the decoded path, where ``a%2Fb`` would pass as ``a/b``.
    The error names nothing: which part of such a path is a repository is
    exactly what cannot be told.
    """
    raw = path.lower()
    if b"%2f" in raw or b"%2e" in raw or b"%5c" in raw:
        raise RegistryError(400, "NAME_INVALID", "encoded '/', '.' or '\\' in the path")


def is_tag(reference: str) -> bool:
    return bool(_TAG.match(reference))


def check_tag(tag: str) -> str:
    if not is_tag(tag):
        raise manifest_invalid(f"invalid tag {tag[:140]!r}")
    return tag
