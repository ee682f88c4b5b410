"""Tag globs: which tags a rule names (``[[retention]] keep_tags``).

A tag has no ``/`` (``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``), so its glob is
one component of registryd.globs' dialect, case kept (tags are not
lowercase): ``*`` matches any run of characters, ``?`` one; everything
else matches itself, and must be a character a tag may hold. ``latest``,
``v1.*``, ``release-*``, ``*-rc?``. A glob matches the whole tag.

Anything else is refused with the reason (``ValueError``): an empty glob,
one longer than 128 characters, any other character (``/``, ``[``, a space).
"""
from __future__ import annotations

import re

import attrs

MAX_LENGTH = 128
_CHARACTERS = re.compile(r"[A-Za-z0-9_.*?-]+")


@attrs.frozen
class TagGlob:
    """One parsed tag glob; ``matches`` says whether a tag is one it names."""

    text: str
    _regex: re.Pattern[str] = attrs.field(repr=False, eq=False)

    @classmethod
    def parse(cls, text: str) -> TagGlob:
        """The glob ``text``, or ValueError with a short reason (``"is empty"``) to put after it."""
        if not text:
            raise ValueError("is empty")
        if len(text) > MAX_LENGTH:
            raise ValueError(f"is longer than {MAX_LENGTH} characters")
        if not _CHARACTERS.fullmatch(text):
            raise ValueError("may hold only letters, digits, '_', '.', '-', '*' and '?' (a tag has no '/')")
        regex = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in text)
        return cls(text, re.compile(regex))

    def matches(self, tag: str) -> bool:
        return self._regex.fullmatch(tag) is not None
