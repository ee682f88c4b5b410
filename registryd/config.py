"""One typed configuration, read from a TOML file and the command line.

Every key is declared once in ``SCHEMA`` with its type and default, so an
unknown key or a value of the wrong type is refused with one line that names
it, before anything listens or touches the disk.
"""
from __future__ import annotations

import os
import re
import tomllib
from typing import Any, Mapping
from urllib.parse import urlsplit

import attrs

from registryd import __version__
from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import AccessRule, parse_access_rules
from registryd.auth.settings import AuthSettings, parse_auth_table
from registryd.auth.tls import TLS_LISTEN_KEYS, parse_tls_table
from registryd.credentials import read_credentials_file
from registryd.storage.s3.settings import S3ConfigError, S3Settings


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


DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
# Hosts besides its own that a well-known upstream sends registryd to, when
# its ``allowed_hosts`` is not set: Docker Hub's token service and blob CDN,
# GitHub's blob storage.
WELL_KNOWN_HOSTS: dict[str, tuple[str, ...]] = {
    DOCKER_HUB: ("auth.docker.io", "production.cloudflare.docker.com"),
    "ghcr.io": ("pkg-containers.githubusercontent.com",),
}
_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST_PATTERN = re.compile(rf"^(?:\*\.)?{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]{{1,5}})?$")
_LOCAL_PREFIX = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_NAMESPACE = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[0-9]{1,5})?$")


@attrs.frozen
class UpstreamConfig:
    """One registry to mirror, as the operator listed it."""

    namespace: str
    url: str
    default: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_verify: bool = True
    manifest_ttl: int = 300
    connect_timeout: int = 10
    idle_timeout: int = 60
    user_agent: str = f"registryd/{__version__}"
    offline: bool = False
    # Hosts besides the upstream's own that it may send registryd to: blob
    # redirects (object storage, CDNs) and its token realm. "host", "host:port"
    # or "*.domain".
    allowed_hosts: tuple[str, ...] = ()


STORAGE_DRIVERS = ("filesystem", "s3")


@attrs.frozen
class StorageSettings:
    """``[storage]``: where content and metadata live. The filesystem (data_dir) by default."""

    driver: str = "filesystem"
    redirect: bool = False          # s3: blob GETs answered with a presigned URL
    redirect_expiry: int = 600      # seconds such a URL stays valid
    s3: S3Settings | None = None
    cache_size: int = 0             # s3: bytes of hot blobs kept on local disk; 0: no cache
    cache_dir: str | None = None    # where; None: <data_dir>/cache


def _storage(table: Any) -> StorageSettings:
    if not isinstance(table, dict):
        raise ConfigError("'storage' must be a table ([storage])")
    known = {"driver": str, "redirect": bool, "redirect_expiry": int, "s3": dict, "cache_size": object,
             "cache_dir": str}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown key 'storage.{key}'")
        if key == "s3":
            if not isinstance(value, dict):
                raise ConfigError("'storage.s3' must be a table ([storage.s3])")
            continue
        if known[key] is object:
            continue
        _check_type(f"storage.{key}", value, known[key])
    driver = table.get("driver", "filesystem")
    if driver not in STORAGE_DRIVERS:
        raise ConfigError(f"'storage.driver' must be \"filesystem\" or \"s3\", not {driver!r}")
    expiry = table.get("redirect_expiry", 600)
    if not 1 <= expiry <= 7 * 86400:
        raise ConfigError(f"'storage.redirect_expiry' must be between 1 and 604800 seconds, not {expiry}")
    s3 = None
    if driver == "s3":
        if "s3" not in table:
            raise ConfigError("'storage.driver' is \"s3\" but there is no [storage.s3] table")
        try:
            s3 = S3Settings.from_table(table["s3"])
        except S3ConfigError as e:
            raise ConfigError(str(e)) from None
    elif "s3" in table:
        raise ConfigError("[storage.s3] is only used with storage.driver = \"s3\"")
    if table.get("redirect") and driver != "s3":
        raise ConfigError("'storage.redirect' needs storage.driver = \"s3\" (a filesystem has no URL to hand out)")
    cache_size, cache_dir = _hot_cache(table, driver)
    return StorageSettings(driver, bool(table.get("redirect", False)), expiry, s3, cache_size, cache_dir)


def _hot_cache(table: dict[str, Any], driver: str) -> tuple[int, str | None]:
    """``cache_size`` and ``cache_dir``: a local disk cache of hot blobs, for a node on S3."""
    cache_size = parse_size("storage.cache_size", table.get("cache_size", 0))
    cache_dir = table.get("cache_dir")
    if cache_dir is not None:
        if not cache_dir.strip():
            raise ConfigError("'storage.cache_dir' is empty")
        if "cache_size" not in table:
            raise ConfigError("'storage.cache_dir' needs a storage.cache_size (the cache is off without one)")
        cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    if cache_size or cache_dir is not None:
        if driver != "s3":
            key = "cache_size" if cache_size else "cache_dir"
            raise ConfigError(f"'storage.{key}' needs storage.driver = \"s3\" (on the filesystem every "
                              f"blob is local already)")
        if cache_size and table.get("redirect"):
            raise ConfigError("'storage.cache_size' has no use with storage.redirect = true (clients fetch "
                              "blobs from the object store, not through this node)")
    return cache_size, cache_dir


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
    min_free_bytes: int = 512 * 1024 * 1024
    shutdown_timeout: int = 30
    header_timeout: int = 60                        # seconds for a request's head to arrive
    min_body_rate: int = 1024                       # bytes/s a request body must keep up (0: no floor)
    max_connections: int = 1024
    max_connections_per_client: int = 128
    max_pending_body_bytes: int = 64 * 1024 * 1024  # manifest bodies in memory, all requests together
    max_upload_sessions: int = 5000
    max_upload_sessions_per_client: int = 200
    upstreams: tuple[UpstreamConfig, ...] = ()
    offline: bool = False
    mirror_max_size: int = 0            # bytes; 0: no limit
    # With a default upstream: where local repositories live (pushes go nowhere else).
    local_prefixes: tuple[str, ...] = ()
    usage_interval: int = 300
    gc_interval: int = 86400            # 0: no online collection
    gc_delay: int = 3600
    auth: AuthSettings = AuthSettings()
    access: tuple[AccessRule, ...] = ()
    storage: StorageSettings = attrs.field(factory=lambda: StorageSettings())


# (toml path) -> (Config field, python type, check, description of check)
_Section = Mapping[str, tuple[str, type, Any]]


def _positive(value: int) -> bool:
    return value > 0


def _not_negative(value: int) -> bool:
    return value >= 0


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(key: str, value: Any) -> int:
    """Bytes from an integer or a string like ``"50GiB"``, ``"500MB"``, ``"2G"``.

    ``KiB``, ``K`` and ``k`` are 1024; ``KB`` is 1000 (likewise M, G, T, P).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"'{key}' must not be negative, not {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or (match[2] == "" and match[3]):
        raise ConfigError(f"'{key}' must be a size in bytes or a string like \"50GiB\" or \"500MB\", "
                          f"not {value!r}")
    number, unit, binary, b = match.groups()
    power = "kmgtp".index(unit.lower()) + 1 if unit else 0
    base = 1000 if unit and b and not binary else 1024
    return int(float(number) * base ** power)


SCHEMA: dict[str, _Section] = {
    "": {
        "listen": ("listen", list, None),
        "data_dir": ("data_dir", str, None),
        "upstream": ("upstreams", list, None),
        "access": ("access", list, None),
    },
    "mirror": {
        "offline": ("offline", bool, None),
        "max_size": ("mirror_max_size", object, None),
        "local_prefixes": ("local_prefixes", list, None),
    },
    "gc": {
        "interval": ("gc_interval", int, _not_negative),
        "delay": ("gc_delay", int, _not_negative),
    },
    "registry": {
        "delete_enabled": ("delete_enabled", bool, None),
        "max_manifest_size": ("max_manifest_size", int, _positive),
    },
    "uploads": {
        "expiry": ("upload_expiry", int, _positive),
        "reap_interval": ("upload_reap_interval", int, _positive),
        "max_sessions": ("max_upload_sessions", int, _positive),
        "max_sessions_per_client": ("max_upload_sessions_per_client", int, _positive),
    },
    "server": {
        "stall_timeout": ("stall_timeout", int, _positive),
        "io_threads": ("io_threads", int, _positive),
        "min_free_bytes": ("min_free_bytes", object, _positive),
        "shutdown_timeout": ("shutdown_timeout", int, _positive),
        "usage_interval": ("usage_interval", int, _positive),
        "header_timeout": ("header_timeout", int, _positive),
        "min_body_rate": ("min_body_rate", int, _not_negative),
        "max_connections": ("max_connections", int, _positive),
        "max_connections_per_client": ("max_connections_per_client", int, _positive),
        "max_pending_body_bytes": ("max_pending_body_bytes", int, _positive),
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
        tls = None
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"endpoint"} - set(TLS_LISTEN_KEYS))
            if unknown:
                raise ConfigError(f"unknown key '{where}.{unknown[0]}'")
            if "endpoint" not in item:
                raise ConfigError(f"'{where}' needs an 'endpoint'")
            tls = parse_tls_table(item, where)
            item = item["endpoint"]
        _check_type(where, item, str)
        if not item.strip():
            raise ConfigError(f"'{where}' is empty")
        if tls is not None:
            item = _tls_description(where, item, tls)
        entries.append(item)
    if not entries:
        raise ConfigError(f"'{key}' must name at least one endpoint")
    return tuple(entries)


# key -> (type, required)
_UPSTREAM_KEYS: dict[str, tuple[type, bool]] = {
    "namespace": (str, True), "url": (str, False), "default": (bool, False),
    "username": (str, False), "password": (str, False), "password_env": (str, False),
    "credentials_file": (str, False), "ca_file": (str, False), "client_cert": (str, False),
    "client_key": (str, False), "tls_verify": (bool, False), "manifest_ttl": (int, False),
    "connect_timeout": (int, False), "idle_timeout": (int, False), "user_agent": (str, False),
    "offline": (bool, False), "allowed_hosts": (list, False),
}


def _read_secret_file(where: str, path: str) -> tuple[str, str]:
    """A credentials file holds one line ``username:password``."""
    try:
        return read_credentials_file(path, ("username", "password"), secret_required=False)
    except ValueError as e:
        raise ConfigError(f"'{where}': {e}") from None


def _upstream(where: str, table: Any) -> UpstreamConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"'{where}' must be a table ([[upstream]])")
    for key, value in table.items():
        if key not in _UPSTREAM_KEYS:
            raise ConfigError(f"unknown key '{where}.{key}'")
        _check_type(f"{where}.{key}", value, _UPSTREAM_KEYS[key][0])
    for key, (_, required) in _UPSTREAM_KEYS.items():
        if required and key not in table:
            raise ConfigError(f"'{where}' needs a '{key}'")
    settings = dict(table)
    namespace = settings["namespace"].lower()
    if not _NAMESPACE.match(namespace):
        raise ConfigError(f"'{where}.namespace' must be a registry host such as docker.io or "
                          f"registry.local:5000, not {settings['namespace']!r}")
    settings["namespace"] = namespace
    url = settings.get("url") or (DOCKER_HUB_URL if namespace == DOCKER_HUB else f"https://{namespace}")
    if not re.match(r"^https?://[^/\s@]+/?$", url) or not _valid_host_and_port(url):
        raise ConfigError(f"'{where}.url' must be http(s)://host[:port], not {url!r}")
    settings["url"] = url.rstrip("/")
    sources = [k for k in ("password", "password_env", "credentials_file") if k in settings]
    if len(sources) > 1:
        raise ConfigError(f"'{where}': give only one of password, password_env, credentials_file")
    if "password_env" in settings:
        variable = settings.pop("password_env")
        if variable not in os.environ:
            raise ConfigError(f"'{where}.password_env': environment variable {variable} is not set")
        settings["password"] = os.environ[variable]
    if "credentials_file" in settings:
        settings["username"], settings["password"] = _read_secret_file(
            f"{where}.credentials_file", settings.pop("credentials_file"))
    if ("password" in settings) != ("username" in settings):
        raise ConfigError(f"'{where}': username and password go together")
    for key in ("manifest_ttl", "connect_timeout", "idle_timeout"):
        if key in settings and settings[key] <= 0:
            raise ConfigError(f"'{where}.{key}' must be greater than zero, not {settings[key]!r}")
    if ("client_cert" in settings) != ("client_key" in settings):
        raise ConfigError(f"'{where}': client_cert and client_key go together")
    for key in ("ca_file", "client_cert", "client_key"):
        if key in settings and not os.access(settings[key], os.R_OK):
            raise ConfigError(f"'{where}.{key}': cannot read {settings[key]}")
    settings["allowed_hosts"] = _allowed_hosts(f"{where}.allowed_hosts", settings.get("allowed_hosts"), namespace)
    return UpstreamConfig(**settings)


def _valid_host_and_port(url: str) -> bool:
    try:
        return bool(urlsplit(url).hostname) and urlsplit(url).port != 0
    except ValueError:   # a port out of range
        return False


def _allowed_hosts(key: str, value: list[Any] | None, namespace: str) -> tuple[str, ...]:
    """``allowed_hosts``: host names, ``host:port`` or ``*.domain``; a well-known
    upstream's own list when the key is absent."""
    if value is None:
        return WELL_KNOWN_HOSTS.get(namespace, ())
    hosts = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not _HOST_PATTERN.match(item.lower()):
            raise ConfigError(f"'{key}[{index}]' must be a host such as cdn.example.com, cdn.example.com:8443 "
                              f"or *.example.com, not {item!r}")
        hosts.append(item.lower())
    return tuple(hosts)


def _local_prefixes(key: str, value: list[Any]) -> tuple[str, ...]:
    """``[mirror] local_prefixes``: repository names, each the root of a local namespace."""
    prefixes = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not _LOCAL_PREFIX.match(item):
            raise ConfigError(f"'{key}[{index}]' must be a repository path such as \"team\" or \"ci/builds\", "
                              f"not {item!r}")
        prefixes.append(item)
    return tuple(prefixes)


def _check_local_prefixes(settings: Mapping[str, Any]) -> None:
    """A local prefix must not be how clients name an upstream's repositories."""
    upstreams: tuple[UpstreamConfig, ...] = settings.get("upstreams", ())
    namespaces = {u.namespace for u in upstreams}
    default = next((u for u in upstreams if u.default), None)
    for prefix in settings.get("local_prefixes", ()):
        first = prefix.split("/", 1)[0]
        if first in namespaces:
            raise ConfigError(f"'mirror.local_prefixes': {prefix!r} is the namespace of an upstream")
        if default is not None and default.namespace == DOCKER_HUB and first == "library":
            raise ConfigError(f"'mirror.local_prefixes': {prefix!r} would shadow Docker Hub's official images "
                              f"(docker clients ask for library/<name>)")


def _upstreams(key: str, value: list[Any]) -> tuple[UpstreamConfig, ...]:
    upstreams = tuple(_upstream(f"{key}[{i}]", table) for i, table in enumerate(value))
    seen: set[str] = set()
    for upstream in upstreams:
        if upstream.namespace in seen:
            raise ConfigError(f"two upstreams have the namespace {upstream.namespace}")
        seen.add(upstream.namespace)
    if sum(u.default for u in upstreams) > 1:
        raise ConfigError("only one upstream may be the default")
    return upstreams


def _escape_endpoint_value(value: str) -> str:
    return re.sub(r"([:=\\])", r"\\\1", value)


def _tls_description(where: str, endpoint: str, tls: Any) -> str:
    """A ``[[listen]]`` table with TLS files as one ``tls:`` description
    (the form ``--listen`` takes too)."""
    kind, sep, rest = endpoint.partition(":")
    if kind != "tcp" or not sep:
        raise ConfigError(f"'{where}': TLS needs a tcp: endpoint, not {endpoint!r}")
    files = {"cert": tls.cert, "key": tls.key, "chain": tls.chain, "client_ca": tls.client_ca}
    extra = "".join(f":{key}={_escape_endpoint_value(value)}" for key, value in files.items() if value)
    return f"tls:{rest}{extra}"


def parse_settings(document: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a parsed TOML document into Config keyword arguments."""
    settings: dict[str, Any] = {}
    for key, value in document.items():
        items: list[tuple[str, Any]]
        if key == "auth":
            try:
                settings["auth"] = parse_auth_table(value)
            except AuthConfigError as e:
                raise ConfigError(str(e)) from None
            continue
        if key == "storage":
            settings["storage"] = _storage(value)
            continue
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
            if kind is not object:
                _check_type(full, item, kind)
            if field == "mirror_max_size":
                item = parse_size(full, item)
            elif field == "min_free_bytes":
                item = parse_size(full, item)
                if not item:
                    raise ConfigError(f"'{full}' must be greater than zero, not {item!r}")
            elif field == "listen":
                try:
                    item = _listen_entries(full, item)
                except AuthConfigError as e:
                    raise ConfigError(str(e)) from None
            elif field == "upstreams":
                item = _upstreams(full, item)
            elif field == "local_prefixes":
                item = _local_prefixes(full, item)
            elif field == "access":
                try:
                    item = parse_access_rules(item, full)
                except AuthConfigError as e:
                    raise ConfigError(str(e)) from None
            elif check is _not_negative and not check(item):
                raise ConfigError(f"'{full}' must not be negative, not {item!r}")
            elif check is not None and not check(item):
                raise ConfigError(f"'{full}' must be greater than zero, not {item!r}")
            settings[field] = item
    _check_local_prefixes(settings)
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
    config = Config(**settings)
    if config.max_pending_body_bytes < config.max_manifest_size:
        raise ConfigError(f"'server.max_pending_body_bytes' ({config.max_pending_body_bytes}) must be at least "
                          f"'registry.max_manifest_size' ({config.max_manifest_size}), or no manifest fits")
    return config
