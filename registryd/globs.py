"""Repository globs: the one dialect of ``[[access]]`` rules and ``registryd prune --pattern``.

A glob is matched against a whole repository name as clients pull it
(``team/app``, ``docker.io/library/alpine``, ``registry.local:5000/team/app``),
one ``/``-separated component at a time:

* ``*`` matches any run of characters within one component (never a ``/``),
  ``?`` one such character;
* ``**`` as a whole component matches zero or more components: ``team/**``
  matches ``team``, ``team/app`` and ``team/app/web``; ``**/cache`` matches
  ``cache`` and ``a/b/cache``; ``a/**/b`` matches ``a/b`` and ``a/x/y/b``;
  ``**`` alone matches every name;
* anything else matches itself: lowercase letters, digits, ``.``, ``_`` and
  ``-`` (repository names are lowercase), and ``:`` once in the first
  component, for an upstream namespace's port (``registry.local:5000/**``).

Anything else is refused with the reason (``ValueError``): an empty glob or
one longer than 512 characters, an empty component (a leading, trailing or
double ``/``), ``**`` inside a component (``team**``), any other character.
"""
from __future__ import annotations

import re

import attrs

MAX_LENGTH = 512
_COMPONENT = re.compile(r"[a-z0-9._:*?-]+")


@attrs.frozen
class Glob:
    """One parsed glob; ``matches`` says whether a repository name is one it selects."""

    text: str
    _regex: re.Pattern[str] = attrs.field(repr=False, eq=False)

    @classmethod
    def parse(cls, text: str) -> Glob:
        """The glob ``text``, or ValueError with a short reason (``"is empty"``) to put after it."""
        return cls(text, re.compile(_translate(_components(text))))

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None


def _components(text: str) -> list[str]:
    """The components of a valid glob, consecutive ``**`` collapsed into one."""
    if not text:
        raise ValueError("is empty")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"is longer than {MAX_LENGTH} characters")
    components: list[str] = []
    for index, component in enumerate(text.split("/")):
        if not component:
            raise ValueError("has an empty path component (leading, trailing or double '/')")
        if not _COMPONENT.fullmatch(component):
            raise ValueError("may hold only lowercase letters, digits, '.', '_', '-', '/', '*' and '?'")
        if "**" in component and component != "**":
            raise ValueError("uses '**' inside a component; '**' must be a whole component")
        if ":" in component and (index > 0 or component.count(":") > 1):
            raise ValueError("uses ':' other than once in its first component (an upstream's host:port)")
        if component == "**" and components and components[-1] == "**":
            continue
        components.append(component)
    return components


def _translate(components: list[str]) -> str:
    regex = ""
    last = len(components) - 1
    for index, component in enumerate(components):
        if component == "**":
            if index == 0 and index == last:
                regex += r"[^/]+(?:/[^/]+)*"
            elif index == last:
                # "a/**": drop the separator already written so "a" matches too.
                regex = regex[:-1] + r"(?:/[^/]+)*"
            else:
                regex += r"(?:[^/]+/)*"
            continue
        for character in component:
            if character == "*":
                regex += r"[^/]*"
            elif character == "?":
                regex += r"[^/]"
            else:
                regex += re.escape(character)
        if index != last:
            regex += "/"
    return regex
