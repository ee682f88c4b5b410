"""README.md's fenced code blocks, found by the section they stand in.

Tests run what the README tells an operator to type or write, verbatim;
they find a snippet by its section heading (``## Quick start``, ``### ...``)
and its fence language, so new sections elsewhere in the README change
nothing for them.
"""
from __future__ import annotations

import os
import re

import attrs

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_HEADING = re.compile(r"^(#{2,6})\s+(.*?)\s*$")
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@attrs.frozen
class Snippet:
    section: str       # the heading of the innermost section it stands in
    language: str      # the fence's language ("" for none)
    text: str          # the block, with the list indentation it had removed
    line: int          # where it starts in README.md (1-based), for messages


def snippets(path: str = README) -> list[Snippet]:
    """Every fenced block of the README, in order."""
    found: list[Snippet] = []
    section = ""
    block: list[str] | None = None
    indent, language, start = "", "", 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        fence = _FENCE.match(line)
        if block is None:
            heading = _HEADING.match(line)
            if heading:
                section = heading[2]
            elif fence:
                block, indent, language, start = [], fence[1], fence[2], number
            continue
        if fence and fence[1] == indent and not fence[2]:
            found.append(Snippet(section, language, "\n".join(block) + "\n", start))
            block = None
            continue
        block.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
    return found


def in_section(section: str, language: str | None = None, path: str = README) -> list[Snippet]:
    """The blocks under the heading ``section`` (exactly), optionally of one fence language."""
    chosen = [s for s in snippets(path) if s.section == section and (language is None or s.language == language)]
    assert chosen, f"README.md has no {language or ''} block under the heading {section!r}"
    return chosen


def containing(section: str, language: str, needle: str, path: str = README) -> Snippet:
    """The one block of ``section`` and ``language`` that contains ``needle``."""
    chosen = [s for s in in_section(section, language, path) if needle in s.text]
    assert len(chosen) == 1, f"README.md has {len(chosen)} {language} blocks with {needle!r} under {section!r}"
    return chosen[0]
