"""JSON from clients and upstreams, parsed without surprises.

``json.loads`` raises RecursionError (not ValueError) on deeply nested
input such as ``[[[[...]]]]``; a document that deep is never a manifest, a
tag list or a token, so it is refused like any other malformed JSON.
"""
from __future__ import annotations

import json
from typing import Any


def load_json(data: bytes | str) -> Any:
    """``data`` parsed as JSON; ValueError for anything that is not usable JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
