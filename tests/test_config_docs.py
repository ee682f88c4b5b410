"""etc/registryd/registryd.toml documents every key the config parser accepts."""
from __future__ import annotations

import os
import re

import attrs

from registryd.auth.policy import _RULE_KEYS
from registryd.auth.settings import _KEYS as AUTH_KEYS
from registryd.auth.tls import TLS_LISTEN_KEYS
from registryd.config import _UPSTREAM_KEYS, SCHEMA, StorageSettings, load_config
from registryd.storage.s3.settings import _KEYS as S3_KEYS

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "registryd",
                       "registryd.toml")
_TABLE = re.compile(r"^[#\s]*\[\[?([a-z0-9_.]+)\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^[#\s]*([a-z0-9_]+)\s*=")


def accepted_keys() -> set[tuple[str, str]]:
    """(table, key) for every key the parser takes; "" is the top level."""
    keys = set()
    for section, table in SCHEMA.items():
        for key in table:
            if not (section == "" and key in ("upstream", "access")):
                keys.add((section, key))
    keys |= {("auth", key) for key in AUTH_KEYS}
    keys |= {("access", key) for key in _RULE_KEYS}
    keys |= {("upstream", key) for key in _UPSTREAM_KEYS}
    keys |= {("listen", key) for key in ["endpoint", *TLS_LISTEN_KEYS]}
    keys |= {("storage", field.name) for field in attrs.fields(StorageSettings) if field.name != "s3"}
    keys |= {("storage.s3", key) for key in S3_KEYS}
    return keys


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
