"""Content digests (``sha256:<hex>``, ``sha512:<hex>``) and their hashers."""
from __future__ import annotations

import hashlib
import re
from typing import Any

import attrs

from registryd.errors import digest_invalid

# The spec's grammar for a digest; registered algorithms are checked below.
_GRAMMAR = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[a-f0-9]+$")


@attrs.frozen(order=True)
class Digest:
    """A validated digest of a supported algorithm."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)


def parse_digest(text: str) -> Digest:
    """Parse and validate; raises DIGEST_INVALID for anything unusable."""
    if not _GRAMMAR.match(text):
        raise digest_invalid(f"invalid digest: malformed {text[:150]!r}")
    algorithm, _, hexpart = text.partition(":")
    if algorithm not in HEX_LENGTHS:
        raise digest_invalid(f"invalid digest: unsupported algorithm {algorithm[:30]!r} (sha256 and sha512 are)")
    if len(hexpart) != HEX_LENGTHS[algorithm] or not _HEX.match(hexpart):
        raise digest_invalid(f"invalid digest: {algorithm} needs {HEX_LENGTHS[algorithm]} lowercase hex characters")
    return Digest(algorithm, hexpart)


def is_digest(text: str) -> bool:
    """True for anything shaped like a digest (a reference that is no tag)."""
    return ":" in text


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
