"""``WWW-Authenticate`` challenges (RFC 7235) as registries send them."""
from __future__ import annotations

import re

import attrs

_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*")
_PARAM = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@attrs.frozen
class Challenge:
    """One challenge: its scheme (lower case) and its parameters."""

    scheme: str
    params: dict[str, str] = attrs.field(factory=dict, hash=False)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse every challenge in one header value.

    ``Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:x:pull"``
    """
    challenges: list[Challenge] = []
    position = 0
    text = header.strip()
    while position < len(text):
        scheme_match = _SCHEME.match(text, position)
        if scheme_match is None:
            break
        scheme = scheme_match[1].lower()
        position = scheme_match.end()
        params: dict[str, str] = {}
        while position < len(text):
            param = _PARAM.match(text, position)
            if param is None:
                break
            # A token followed by a space (and no '=') starts the next challenge.
            params[param[1].lower()] = re.sub(r"\\(.)", r"\1", param[2]) if param[2] is not None else param[3]
            position = param.end()
        challenges.append(Challenge(scheme, params))
        if position < len(text) and text[position] == ",":
            position += 1
    return challenges
