"""One typed configuration, read from a TOML file and the command line.

Every key is declared once in ``SCHEMA`` with its type and default, so an
unknown key or a value of the wrong type is refused with one line that names
it, before anything listens or touches the disk.
"""
from __future__ import annotations

import os
import tomllib
from typing import Any, Mapping

import attrs


class ConfigError(Exception):
    """A configuration problem, phrased as one line an operator can act on."""


def default_data_dir() -> str:
    """Where data lives when neither the file nor the command line says.

    Root (the packaged service) gets the FHS location; anyone else gets a
    folder in their home so that a first ``twistd -n registryd`` just works.
    """
    if os.geteuid() == 0:
        return "/var/lib/registryd"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "registryd")


@attrs.frozen
class Config:
    """The whole configuration, after defaults, file and command line."""

    listen: tuple[str, ...] = ("tcp:5000",)
    data_dir: str = attrs.field(factory=default_data_dir)
    delete_enabled: bool = True
    max_manifest_size: int = 4 * 1024 * 1024
    upload_expiry: int = 24 * 3600
    upload_reap_interval: int = 600
    stall_timeout: int = 300
    io_threads: int = 4


# (toml path) -> (Config field, python type, check, description of check)
_Section = Mapping[str, tuple[str, type, Any]]


def _positive(value: int) -> bool:
    return value > 0


SCHEMA: dict[str, _Section] = {
    "": {
        "listen": ("listen", list, None),
        "data_dir": ("data_dir", str, None),
    },
    "registry": {
        "delete_enabled": ("delete_enabled", bool, None),
        "max_manifest_size": ("max_manifest_size", int, _positive),
    },
    "uploads": {
        "expiry": ("upload_expiry", int, _positive),
        "reap_interval": ("upload_reap_interval", int, _positive),
    },
    "server": {
        "stall_timeout": ("stall_timeout", int, _positive),
        "io_threads": ("io_threads", int, _positive),
    },
}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


def _check_type(key: str, value: Any, kind: type) -> None:
    # bool is a subclass of int: `expiry = true` must not pass as 1.
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(
            f"'{key}' must be {_TYPE_NAMES[kind]}, not {type(value).__name__} {value!r}"
        )


def _listen_entries(key: str, value: list[Any]) -> tuple[str, ...]:
    """``listen`` holds endpoint strings or ``{endpoint = "..."}`` tables."""
    entries = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"endpoint"})
            if unknown:
                raise ConfigError(f"unknown key '{where}.{unknown[0]}'")
            if "endpoint" not in item:
                raise ConfigError(f"'{where}' needs an 'endpoint'")
            item = item["endpoint"]
        _check_type(where, item, str)
        if not item.strip():
            raise ConfigError(f"'{where}' is empty")
        entries.append(item)
    if not entries:
        raise ConfigError(f"'{key}' must name at least one endpoint")
    return tuple(entries)


def parse_settings(document: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a parsed TOML document into Config keyword arguments."""
    settings: dict[str, Any] = {}
    for key, value in document.items():
        items: list[tuple[str, Any]]
        if key in SCHEMA and key != "":
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be a table ([{key}])")
            section, prefix, items = SCHEMA[key], key + ".", list(value.items())
        elif key in SCHEMA[""]:
            section, prefix, items = SCHEMA[""], "", [(key, value)]
        else:
            raise ConfigError(f"unknown key '{key}'")
        for name, item in items:
            full = prefix + name
            if name not in section:
                raise ConfigError(f"unknown key '{full}'")
            field, kind, check = section[name]
            _check_type(full, item, kind)
            if field == "listen":
                item = _listen_entries(full, item)
            elif check is not None and not check(item):
                raise ConfigError(f"'{full}' must be greater than zero, not {item!r}")
            settings[field] = item
    return settings


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``path`` (if any), apply command-line ``overrides``, validate.

    Raises ConfigError with a one-line message naming the file and key.
    """
    settings: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        try:
            settings = parse_settings(document)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            settings[key] = value
    if "data_dir" in settings:
        settings["data_dir"] = os.path.abspath(os.path.expanduser(settings["data_dir"]))
    return Config(**settings)
