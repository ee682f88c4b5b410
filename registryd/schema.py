"""How a settings table is declared and read: once, for every section.

A section is an attrs class whose fields are declared with ``setting()``:
the TOML type, the default, a check (validate and convert) and a line of
documentation, all on the field. ``read_table`` is the one loop that reads
a table against such a class: unknown keys, types, required keys, then each
key's check, each mistake one line naming the key (``'server.io_threads'
must be greater than zero, not 0``). What is not a field (a secret's
``*_env`` or ``*_file`` source) is declared beside the fields, in the
class's ``EXTRA_KEYS``.

This module imports nothing of registryd's: storage, auth and the config
loader all declare their sections with it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs

#: A key's check: ``(key as the operator wrote it, value) -> value to keep``;
#: raises SettingError (or the caller's own error class) with one line.
Check = Callable[[str, Any], Any]

_META = "registryd.schema"
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}


class ConfigError(Exception):
    """A configuration problem, phrased as one line an operator can act on."""


class SettingError(ConfigError):
    """A check's complaint about one value; ``read_table`` raises it as the caller's error class."""


@attrs.frozen
class Key:
    """One config key: its TOML type (``object``: the check decides), check and documentation."""

    kind: type = object
    check: Check | None = None
    doc: str = ""
    required: bool = False
    #: The TOML key, when it is not the field's (init) name.
    name: str | None = None
    #: For a class that holds several tables (Config): the table of the key, "" for the top level.
    section: str | None = None


def setting(default: Any = attrs.NOTHING, kind: type = object, check: Check | None = None, doc: str = "", *,
            factory: Callable[[], Any] | None = None, required: bool = False, name: str | None = None,
            section: str | None = None, repr: bool = True, alias: str | None = None) -> Any:
    """An attrs field that is a config key (see ``Key``)."""
    key = Key(kind, check, doc, required, name, section)
    if factory is not None:
        return attrs.field(factory=factory, repr=repr, alias=alias, metadata={_META: key})
    return attrs.field(default=default, repr=repr, alias=alias, metadata={_META: key})


def keys_of(model: type, section: str | None = None) -> dict[str, tuple[str, Key]]:
    """TOML key -> (init argument, Key) for ``model``'s settings (in ``section``), then its EXTRA_KEYS."""
    keys: dict[str, tuple[str, Key]] = {}
    for field in attrs.fields(model):
        key = field.metadata.get(_META)
        if key is not None and key.section == section:
            keys[key.name or field.alias] = (field.alias, key)
    for name, key in getattr(model, "EXTRA_KEYS", {}).items():
        if key.section == section:
            keys[name] = (name, key)
    return keys


def sections_of(model: type) -> list[str]:
    """The tables a class that holds several (Config) has keys in, in declaration order."""
    found: dict[str, None] = {}
    for field in attrs.fields(model):
        key = field.metadata.get(_META)
        if key is not None and key.section is not None:
            found[key.section] = None
    return list(found)


def check_type(where: str, value: Any, kind: type) -> None:
    """SettingError unless ``value`` has the TOML type ``kind``."""
    # bool is a subclass of int: `expiry = true` must not pass as 1.
    if kind is not object and (kind is int and isinstance(value, bool) or not isinstance(value, kind)):
        raise SettingError(f"'{where}' must be {_TYPE_NAMES[kind]}, not {type(value).__name__} {value!r}")


def read_table(model: type, table: Any, where: str, error: type[Exception] = ConfigError, *,
               section: str | None = None, shape: str | None = None, hint: str = "",
               needs: str = "needs a") -> dict[str, Any]:
    """Check ``table`` against ``model``'s keys: the init arguments for what it sets.

    ``where`` is the table's name in messages (``storage.s3``, ``upstream[0]``;
    "" for the top level); ``shape`` how it is written (``[[upstream]]``);
    ``hint`` follows an unknown key's message; ``needs`` says a missing one.
    Errors are raised as ``error``, one line each; defaults are the model's.
    """
    keys = keys_of(model, section)
    prefix = f"{where}." if where else ""
    try:
        if not isinstance(table, Mapping):
            raise SettingError(f"'{where}' must be a table ({shape or f'[{where}]'})")
        for name, value in table.items():
            if name not in keys:
                raise SettingError(f"unknown key '{prefix}{name}'{hint}")
            check_type(prefix + name, value, keys[name][1].kind)
        for name, (_, key) in keys.items():
            if key.required and name not in table:
                raise SettingError(f"'{where}' {needs} '{name}'")
        values: dict[str, Any] = {}
        for name, value in table.items():
            target, key = keys[name]
            values[target] = key.check(prefix + name, value) if key.check is not None else value
        return values
    except Exception as e:
        if isinstance(e, error) or not isinstance(e, (SettingError, ValueError)):
            raise
        raise error(str(e)) from None


# --- checks shared by the sections -------------------------------------------------------

def positive(where: str, value: int) -> int:
    if value <= 0:
        raise SettingError(f"'{where}' must be greater than zero, not {value!r}")
    return value


def not_negative(where: str, value: int) -> int:
    if value < 0:
        raise SettingError(f"'{where}' must not be negative, not {value!r}")
    return value


def not_empty(where: str, value: str) -> str:
    if not value.strip():
        raise SettingError(f"'{where}' is empty")
    return value


def between(low: int, high: int, unit: str = "") -> Check:
    def check(where: str, value: int) -> int:
        if not low <= value <= high:
            raise SettingError(f"'{where}' must be between {low} and {high}{unit}, not {value}")
        return value
    return check


def one_of(*choices: str) -> Check:
    def check(where: str, value: str) -> str:
        if value not in choices:
            options = " or ".join(f'"{c}"' for c in choices)
            raise SettingError(f"'{where}' must be {options}, not {value!r}")
        return value
    return check
