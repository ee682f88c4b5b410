"""etc/registryd/registryd.toml documents every key the config parser accepts."""
from __future__ import annotations

import os
import re

from registryd.config import accepted_keys as schema_keys
from registryd.config import load_config

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "registryd",
                       "registryd.toml")
_TABLE = re.compile(r"^[#\s]*\[\[?([a-z0-9_.]+)\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^[#\s]*([a-z0-9_]+)\s*=")


def accepted_keys() -> set[tuple[str, str]]:
    """(table, key) for every key the parser takes (the one schema); "" is the top level."""
    return {(table, key) for table, key, _ in schema_keys()}


def documented_keys(path: str = EXAMPLE) -> set[tuple[str, str]]:
    """(table, key) of every ``key =`` line, set or commented out, under its (maybe commented) header."""
    found = set()
    table = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            header = _TABLE.match(line)
            if header:
                table = header[1]
                continue
            key = _KEY.match(line)
            if key:
                found.add((table, key[1]))
    return found


def test_every_accepted_key_is_documented() -> None:
    missing = sorted(accepted_keys() - documented_keys())
    assert not missing, f"etc/registryd/registryd.toml does not document {missing}"


def test_the_documented_keys_are_keys() -> None:
    """A key documented under the wrong table (or misspelt) would teach the wrong thing."""
    extra = sorted(documented_keys() - accepted_keys())
    assert not extra, f"etc/registryd/registryd.toml documents keys the parser refuses: {extra}"


def test_the_example_loads_with_its_defaults() -> None:
    config = load_config(EXAMPLE)
    assert (config.min_free_bytes, config.shutdown_timeout) == (512 << 20, 30)


def test_every_key_says_what_it_is_in_the_schema() -> None:
    """Each key is declared once, with its type, default, check and a line of documentation."""
    undocumented = sorted((table, key) for table, key, declared in schema_keys() if not declared.doc.strip())
    assert not undocumented, f"keys declared without a doc: {undocumented}"
