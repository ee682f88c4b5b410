"""Sizes as people read them, for the command's output and the server's log alike."""
from __future__ import annotations

import re

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def human_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(size)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_duration(text: str) -> float:
    """``90`` or ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds: the one grammar of ages, for
    the command line (``--older-than``) and the config (``untagged_after``); ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text[:100]!r} is not a duration: a number with an optional unit s, m, h, d or w "
                         f"(like 90s, 12h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
