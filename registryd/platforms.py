"""``os/arch[/variant]``: which children of an image index a command or a sync job takes."""
from __future__ import annotations

import re
from typing import Any

import attrs

_PART = re.compile(r"^[a-z0-9._-]+$")


@attrs.frozen
class Platform:
    """One platform, as ``--platform`` and ``[[sync]] platforms`` name it."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, platform: Any) -> bool:
        if not isinstance(platform, dict):
            return True  # a child that names no platform (an attestation, say) is for every platform
        if platform.get("os") != self.os or platform.get("architecture") != self.architecture:
            return False
        return self.variant is None or platform.get("variant") == self.variant


def parse_platform(text: str) -> Platform:
    """``linux/arm64/v8`` -> Platform; ValueError with the reason otherwise."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(_PART.match(p) for p in parts):
        raise ValueError(f"{text!r} is not OS/ARCH or OS/ARCH/VARIANT (like linux/arm64/v8)")
    return Platform(*parts)
