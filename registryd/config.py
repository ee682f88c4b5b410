"""One typed configuration, read from a TOML file and the command line.

Every key is declared once, on the class of its section, with its type,
default, check and documentation (``registryd.schema``): ``Config`` holds
the top level and the ``[server]``, ``[registry]``, ``[uploads]``, ``[gc]``
and ``[mirror]`` tables; ``[auth]`` is ``AuthSettings``, ``[[access]]``
``AccessRule``, ``[storage]`` ``StorageSettings``, ``[storage.s3]``
``S3Settings``, ``[[upstream]]`` ``UpstreamConfig``, a ``[[listen]]`` table
``ListenTable``, ``[[retention]]`` ``RetentionRule``. One loop reads them all, and the command line's values go
through the same checks, so an unknown key or a bad value is refused with
one line that names it, before anything listens or touches the disk.

Secrets (``password_env``, ``credentials_file``, ``secret_access_key_env``)
are kept as references and read where they are used (``registryd.secrets``).
"""
from __future__ import annotations

import os
import re
import tomllib
from typing import Any, ClassVar, Iterator, Mapping
from urllib.parse import urlsplit

import attrs

from registryd import __version__
from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import AccessRule, parse_access_rules
from registryd.auth.settings import AuthSettings
from registryd.auth.tls import TLSSettings, parse_tls_table
from registryd.retention_rules import RetentionRule, parse_retention_rules
from registryd.schema import (
    ConfigError,
    Key,
    SettingError,
    between,
    check_type,
    keys_of,
    not_empty,
    not_negative,
    one_of,
    positive,
    read_table,
    sections_of,
    setting,
)
from registryd.secrets import Secret, in_file, reveal
from registryd.storage.containerd.settings import ContainerdSettings
from registryd.storage.s3.settings import S3Settings
from registryd.sync_settings import SyncJob, check_sync_upstreams
from registryd.sync_settings import sync_jobs as _sync_jobs

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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(key: str, value: Any) -> int:
    """Bytes from an integer or a string like ``"50GiB"``, ``"500MB"``, ``"2G"``.

    ``KiB``, ``K`` and ``k`` are 1024; ``KB`` is 1000 (likewise M, G, T, P).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise SettingError(f"'{key}' must not be negative, not {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or (match[2] == "" and match[3]):
        raise SettingError(f"'{key}' must be a size in bytes or a string like \"50GiB\" or \"500MB\", "
                           f"not {value!r}")
    number, unit, binary, b = match.groups()
    power = "kmgtp".index(unit.lower()) + 1 if unit else 0
    base = 1000 if unit and b and not binary else 1024
    return int(float(number) * base ** power)


def _positive_size(key: str, value: Any) -> int:
    return positive(key, parse_size(key, value))


def _rate_or_auto(key: str, value: Any) -> int | None:
    """Bytes per second (a size, per second), or "auto" (None: the code's default)."""
    if value == "auto":
        return None
    try:
        return parse_size(key, value)
    except SettingError:
        raise SettingError(f"'{key}' must be \"auto\", 0, or bytes per second (a number or a string like "
                           f"\"100MiB\"), not {value!r}") from None


def _directory(key: str, value: str) -> str:
    return os.path.abspath(os.path.expanduser(not_empty(key, value)))


def _readable(key: str, value: str) -> str:
    if not os.access(value, os.R_OK):
        raise SettingError(f"'{key}': cannot read {value}")
    return value


# --- [[upstream]] ---------------------------------------------------------------------------

def _namespace(key: str, value: str) -> str:
    if not _NAMESPACE.match(value.lower()):
        raise SettingError(f"'{key}' must be a registry host such as docker.io or registry.local:5000, "
                           f"not {value!r}")
    return value.lower()


def _url(key: str, url: str) -> str:
    if not re.match(r"^https?://[^/\s@]+/?$", url) or not _valid_host_and_port(url):
        raise SettingError(f"'{key}' must be http(s)://host[:port], not {url!r}")
    return url.rstrip("/")


def _valid_host_and_port(url: str) -> bool:
    try:
        return bool(urlsplit(url).hostname) and urlsplit(url).port != 0
    except ValueError:   # a port out of range
        return False


def _allowed_hosts(key: str, value: list[Any]) -> tuple[str, ...]:
    """``allowed_hosts``: host names, ``host:port`` or ``*.domain``."""
    hosts = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not _HOST_PATTERN.match(item.lower()):
            raise SettingError(f"'{key}[{index}]' must be a host such as cdn.example.com, cdn.example.com:8443 "
                               f"or *.example.com, not {item!r}")
        hosts.append(item.lower())
    return tuple(hosts)


@attrs.frozen
class UpstreamConfig:
    """One registry to mirror, as the operator listed it (``[[upstream]]``).

    ``username`` and ``password`` may come from ``password_env`` or
    ``credentials_file``: then they are read on access (``registryd.secrets``).
    """

    namespace: str = setting(kind=str, check=_namespace, required=True, doc="docker.io, registry.local:5000")
    url: str = setting(kind=str, check=_url, doc="http(s)://host[:port]; https://<namespace> if unset")
    default: bool = setting(False, bool, doc="serve repository names without a namespace from it")
    _username: str | Secret | None = setting(None, str, doc="the login, with a password", alias="username")
    _password: str | Secret | None = setting(None, str, doc="in this file itself", repr=False, alias="password")
    ca_file: str | None = setting(None, str, _readable, "trust this CA instead of the system's")
    client_cert: str | None = setting(None, str, _readable, "client certificate (with client_key)")
    client_key: str | None = setting(None, str, _readable, "its key")
    tls_verify: bool = setting(True, bool, doc="check the upstream's certificate")
    manifest_ttl: int = setting(300, int, positive, "seconds a tag is served from the cache before asking again")
    connect_timeout: int = setting(10, int, positive, "seconds")
    idle_timeout: int = setting(60, int, positive, "seconds without a byte")
    user_agent: str = setting(f"registryd/{__version__}", str, doc="sent with every request")
    offline: bool = setting(False, bool, doc="serve from the cache only")
    sync_jobs: int = setting(1, int, positive, "its [[sync]] jobs that run at once")
    # Hosts besides the upstream's own that it may send registryd to: blob
    # redirects (object storage, CDNs) and its token realm. "host", "host:port"
    # or "*.domain"; a well-known upstream's own list when unset.
    allowed_hosts: tuple[str, ...] = setting((), list, _allowed_hosts, "other hosts it may send registryd to")

    #: The password's other sources (at most one of password, password_env, credentials_file).
    EXTRA_KEYS: ClassVar[dict[str, Key]] = {
        "password_env": Key(str, doc="the environment variable holding the password (or token)"),
        "credentials_file": Key(str, doc="a file with one line username:password"),
    }

    @property
    def username(self) -> str | None:
        return reveal(self._username)

    @property
    def password(self) -> str | None:
        """Read from its variable or file now, if the config named one (SecretUnavailable otherwise)."""
        return reveal(self._password)

    def secrets(self) -> tuple[str | Secret | None, ...]:
        return (self._username, self._password)

    def in_file(self, origin: str | None) -> UpstreamConfig:
        """The same, with secret errors naming the config file ``origin``."""
        return attrs.evolve(self, username=in_file(self._username, origin),
                            password=in_file(self._password, origin))


def _upstream(where: str, table: Any) -> UpstreamConfig:
    settings = read_table(UpstreamConfig, table, where, shape="[[upstream]]")
    namespace = settings["namespace"]
    if "url" not in settings:
        default_url = DOCKER_HUB_URL if namespace == DOCKER_HUB else f"https://{namespace}"
        settings["url"] = _url(f"{where}.url", default_url)
    sources = [k for k in ("password", "password_env", "credentials_file") if k in settings]
    if len(sources) > 1:
        raise ConfigError(f"'{where}': give only one of password, password_env, credentials_file")
    if "password_env" in settings:
        settings["password"] = Secret(f"{where}.password_env", variable=settings.pop("password_env"))
    if "credentials_file" in settings:
        path = settings.pop("credentials_file")
        settings["username"], settings["password"] = (
            Secret(f"{where}.credentials_file", path=path, half=half, secret_required=False) for half in (0, 1))
    if ("password" in settings) != ("username" in settings):
        raise ConfigError(f"'{where}': username and password go together")
    if ("client_cert" in settings) != ("client_key" in settings):
        raise ConfigError(f"'{where}': client_cert and client_key go together")
    if "allowed_hosts" not in settings:
        settings["allowed_hosts"] = WELL_KNOWN_HOSTS.get(namespace, ())
    return UpstreamConfig(**settings)


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


# --- [storage] ------------------------------------------------------------------------------

STORAGE_DRIVERS = ("filesystem", "s3", "containerd")


@attrs.frozen
class StorageSettings:
    """``[storage]``: where content and metadata live. The filesystem (data_dir) by default."""

    driver: str = setting("filesystem", str, one_of(*STORAGE_DRIVERS), "filesystem (data_dir), s3 or containerd")
    redirect: bool = setting(False, bool, doc="s3: blob GETs answered with a presigned URL")
    redirect_expiry: int = setting(600, int, between(1, 7 * 86400, " seconds"), "seconds such a URL stays valid")
    # Read after the driver is known: [storage.s3] (S3Settings).
    s3: S3Settings | None = setting(None, object, doc="[storage.s3]")
    # Read after the driver is known: [storage.containerd] (ContainerdSettings); its defaults without one.
    containerd: ContainerdSettings | None = setting(None, object, doc="[storage.containerd]")
    cache_size: int = setting(0, object, parse_size, "s3: bytes of hot blobs kept on local disk; 0: no cache")
    cache_dir: str | None = setting(None, str, _directory, "where; None: <data_dir>/cache")


def _storage(where: str, table: Any) -> StorageSettings:
    settings = read_table(StorageSettings, table, where)
    driver = settings.get("driver", "filesystem")
    if driver == "s3":
        if "s3" not in settings:
            raise ConfigError("'storage.driver' is \"s3\" but there is no [storage.s3] table")
        settings["s3"] = _s3_table(settings["s3"])
    elif "s3" in settings:
        raise ConfigError("[storage.s3] is only used with storage.driver = \"s3\"")
    if driver == "containerd":
        settings["containerd"] = ContainerdSettings(**read_table(ContainerdSettings, settings.get("containerd", {}),
                                                                 "storage.containerd"))
    elif "containerd" in settings:
        raise ConfigError("[storage.containerd] is only used with storage.driver = \"containerd\"")
    if settings.get("redirect") and driver != "s3":
        raise ConfigError("'storage.redirect' needs storage.driver = \"s3\" (a filesystem has no URL to hand out)")
    cache_size, cache_dir = settings.get("cache_size", 0), settings.get("cache_dir")
    if cache_dir is not None and "cache_size" not in settings:
        raise ConfigError("'storage.cache_dir' needs a storage.cache_size (the cache is off without one)")
    if cache_size or cache_dir is not None:
        if driver != "s3":
            key = "cache_size" if cache_size else "cache_dir"
            raise ConfigError(f"'storage.{key}' needs storage.driver = \"s3\" (on the filesystem every "
                              f"blob is local already)")
        if cache_size and settings.get("redirect"):
            raise ConfigError("'storage.cache_size' has no use with storage.redirect = true (clients fetch "
                              "blobs from the object store, not through this node)")
    return StorageSettings(**settings)


def _s3_table(table: Any) -> S3Settings:
    try:
        return S3Settings.from_table(table)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --- listen ---------------------------------------------------------------------------------

@attrs.frozen
class ListenTable:
    """A ``[[listen]]`` table: an endpoint, and TLS files for it (``registryd.auth.tls``)."""

    endpoint: str = setting(kind=str, check=not_empty, required=True, doc="a Twisted endpoint: tcp:5000")

    #: The TLS files, as TLSSettings declares them (``tls_cert``, ``tls_key``...).
    EXTRA_KEYS: ClassVar[dict[str, Key]] = {name: key for name, (_, key) in keys_of(TLSSettings).items()}


def _listen_entries(key: str, value: list[Any]) -> tuple[str, ...]:
    """``listen`` holds endpoint strings or ``{endpoint = "..."}`` tables.

    On the command line (``key`` is ``--listen``) the message names the option.
    """
    entries = []
    for index, item in enumerate(value):
        where = key if key.startswith("--") else f"{key}[{index}]"
        if isinstance(item, dict):
            table = read_table(ListenTable, item, where, needs="needs an")
            try:
                tls = parse_tls_table(item, where)
            except AuthConfigError as e:   # tls_cert without tls_key
                raise ConfigError(str(e)) from None
            item = table["endpoint"] if tls is None else _tls_description(where, table["endpoint"], tls)
        elif not isinstance(item, str):
            raise ConfigError(f"'{where}' must be a string, not {type(item).__name__} {item!r}")
        entries.append(not_empty(where, item))
    if not entries:
        raise ConfigError(f"'{key}' must name at least one endpoint")
    return tuple(entries)


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


# --- [mirror] -------------------------------------------------------------------------------

def _local_prefixes(key: str, value: list[Any]) -> tuple[str, ...]:
    """``[mirror] local_prefixes``: repository names, each the root of a local namespace."""
    prefixes = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not _LOCAL_PREFIX.match(item):
            raise SettingError(f"'{key}[{index}]' must be a repository path such as \"team\" or \"ci/builds\", "
                               f"not {item!r}")
        prefixes.append(item)
    return tuple(prefixes)


def _access(key: str, value: Any) -> tuple[AccessRule, ...]:
    return parse_access_rules(value, key)


def _auth(key: str, value: Any) -> AuthSettings:
    return AuthSettings(**read_table(AuthSettings, value, key))


# --- the whole ------------------------------------------------------------------------------

def _top(default: Any = attrs.NOTHING, kind: type = object, check: Any = None, doc: str = "", **kw: Any) -> Any:
    return setting(default, kind, check, doc, section="", **kw)


def _server(default: Any, kind: type, check: Any, doc: str, name: str | None = None) -> Any:
    return setting(default, kind, check, doc, section="server", name=name)


@attrs.frozen
class Config:
    """The whole configuration, after defaults, file and command line.

    The attributes keep flat names (``upload_expiry`` is ``[uploads] expiry``);
    each field says its table and key.
    """

    listen: tuple[str, ...] = _top(("tcp:5000",), list, _listen_entries,
                                   "Twisted endpoints, or [[listen]] tables with TLS files")
    data_dir: str = _top(kind=str, check=_directory, doc="blobs, repositories, uploads", factory=default_data_dir)
    delete_enabled: bool = setting(True, bool, None, "DELETE of manifests, tags and blobs", section="registry")
    max_manifest_size: int = setting(4 * 1024 * 1024, int, positive, "bytes", section="registry")
    manifest_cache_size: int = setting(16 * 1024 * 1024, object, parse_size,
                                       "bytes of manifests kept in memory by digest; 0: none", section="registry")
    upload_expiry: int = setting(24 * 3600, int, positive, "seconds an idle upload session lives",
                                 section="uploads", name="expiry")
    upload_reap_interval: int = setting(600, int, positive, "seconds between sweeps of expired uploads",
                                        section="uploads", name="reap_interval")
    stall_timeout: int = _server(300, int, positive, "seconds a transfer may go without a byte")
    io_threads: int = _server(4, int, positive, "threads for disk work")
    workers: int = _server(0, int, not_negative, "worker processes sharing the listeners; 0: one per CPU")
    min_free_bytes: int = _server(512 * 1024 * 1024, object, _positive_size, "uploads refused below this")
    shutdown_timeout: int = _server(30, int, positive, "seconds open requests get on stop")
    header_timeout: int = _server(60, int, positive, "seconds for a request's head to arrive")
    min_body_rate: int = _server(1024, int, not_negative, "bytes/s a request body must keep up (0: no floor)")
    upload_rate_while_pulling: int | None = _server(
        None, object, _rate_or_auto,
        "bytes/s of upload bodies, for the node, while it sends blob bodies; \"auto\": 50MiB per CPU; 0: no cap")
    max_connections: int = _server(1024, int, positive, "client connections at once")
    max_connections_per_client: int = _server(128, int, positive, "from one address")
    max_pending_body_bytes: int = _server(64 * 1024 * 1024, int, positive,
                                          "manifest bodies in memory, all requests together")
    max_upload_sessions: int = setting(5000, int, positive, "open upload sessions", section="uploads",
                                       name="max_sessions")
    max_upload_sessions_per_client: int = setting(200, int, positive, "from one address", section="uploads",
                                                  name="max_sessions_per_client")
    upstreams: tuple[UpstreamConfig, ...] = _top((), list, _upstreams, "[[upstream]] tables", name="upstream")
    offline: bool = setting(False, bool, None, "serve mirrored content from the cache only", section="mirror")
    mirror_max_size: int = setting(0, object, parse_size, "bytes; 0: no limit", section="mirror", name="max_size")
    # With a default upstream: where local repositories live (pushes go nowhere else).
    local_prefixes: tuple[str, ...] = setting((), list, _local_prefixes, "repository paths that stay local",
                                              section="mirror")
    usage_interval: int = _server(300, int, positive, "seconds between disk usage surveys")
    gc_interval: int = setting(86400, int, not_negative, "seconds between online collections (0: none)",
                               section="gc", name="interval")
    gc_delay: int = setting(3600, int, not_negative, "seconds unreferenced content is kept", section="gc",
                            name="delay")
    auth: AuthSettings = _top(AuthSettings(), object, _auth, "[auth]")
    access: tuple[AccessRule, ...] = _top((), object, _access, "[[access]] tables")
    storage: StorageSettings = _top(kind=object, check=_storage, doc="[storage]", factory=StorageSettings)
    retention: tuple[RetentionRule, ...] = _top((), object, parse_retention_rules, "[[retention]] tables")
    syncs: tuple[SyncJob, ...] = _top((), list, _sync_jobs, "[[sync]] tables", name="sync")

    def secrets(self) -> Iterator[str | Secret | None]:
        """Every credential the server uses: each upstream's login, the object store's keys."""
        for upstream in self.upstreams:
            yield from upstream.secrets()
        if self.storage.s3 is not None:
            yield from self.storage.s3.secrets()


#: Every table a config file may hold -> the class that declares its keys (and the section in it).
TABLES: dict[str, tuple[type, str | None]] = {
    **{name: (Config, name) for name in sections_of(Config)},
    "listen": (ListenTable, None),
    "upstream": (UpstreamConfig, None),
    "access": (AccessRule, None),
    "auth": (AuthSettings, None),
    "storage": (StorageSettings, None),
    "storage.s3": (S3Settings, None),
    "retention": (RetentionRule, None),
    "sync": (SyncJob, None),
    "storage.containerd": (ContainerdSettings, None),
}


def accepted_keys() -> Iterator[tuple[str, str, Key]]:
    """(table, key, Key) for every key a config file may set; "" is the top level."""
    for table, (model, section) in TABLES.items():
        for name, (_, key) in keys_of(model, section).items():
            # A key that holds a table is documented by its keys; ``listen`` takes plain endpoints too.
            if f"{table}.{name}".lstrip(".") not in TABLES or name == "listen":
                yield table, name, key


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


def parse_settings(document: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a parsed TOML document into Config keyword arguments."""
    tables = [name for name in sections_of(Config) if name]
    settings = read_table(Config, {k: v for k, v in document.items() if k not in tables}, "", section="")
    for name in tables:
        if name in document:
            settings.update(read_table(Config, document[name], name, section=name))
    _check_local_prefixes(settings)
    check_sync_upstreams(settings.get("syncs", ()), {u.namespace for u in settings.get("upstreams", ())})
    return settings


#: Command-line options that override top-level keys: Config field -> (option, key).
_OPTIONS = {"listen": "--listen", "data_dir": "--data-dir"}


def parse_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line values (None: not given), through the checks of their config keys: ``--data-dir ""``
    is refused as ``data_dir = ""`` is, in one line that names the option."""
    keys = {field: key for field, key in keys_of(Config, "").values()}
    settings: dict[str, Any] = {}
    for field, value in overrides.items():
        if value is None:
            continue
        key, option = keys[field], _OPTIONS.get(field, field)
        value = list(value) if isinstance(value, tuple) else value
        try:
            check_type(option, value, key.kind)
            settings[field] = key.check(option, value) if key.check is not None else value
        except ValueError as e:   # a check's AuthConfigError
            raise ConfigError(str(e)) from None
    return settings


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``path`` (if any), apply command-line ``overrides``, validate.

    Raises ConfigError with a one-line message naming the file and key.
    Secrets the file names are not read here (``Config.secrets``).
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
        settings = _secrets_in_file(settings, path)
    settings.update(parse_overrides(overrides or {}))
    config = Config(**settings)
    if config.max_pending_body_bytes < config.max_manifest_size:
        raise ConfigError(f"'server.max_pending_body_bytes' ({config.max_pending_body_bytes}) must be at least "
                          f"'registry.max_manifest_size' ({config.max_manifest_size}), or no manifest fits")
    return config


def _secrets_in_file(settings: dict[str, Any], path: str) -> dict[str, Any]:
    """A secret that cannot be read says which config file named it."""
    if "upstreams" in settings:
        settings["upstreams"] = tuple(u.in_file(path) for u in settings["upstreams"])
    storage = settings.get("storage")
    if storage is not None and storage.s3 is not None:
        settings["storage"] = attrs.evolve(storage, s3=storage.s3.in_file(path))
    return settings
