"""``twistd registryd``: command-line options and the service they build.

This is the only module that touches the global reactor; everything below
it gets the reactor injected.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import IService
from twisted.logger import ILogObserver
from twisted.python import usage

from registryd import __version__
from registryd.config import Config, ConfigError, load_config
from registryd.listeners import HEADER_ENV, WorkerRole, default_workers, role_from_environment
from registryd.logs import text
from registryd.secrets import require_secrets
from registryd.startup import StartupError, check_node
from registryd.supervisor import Supervisor, shareable, watch_parent

if TYPE_CHECKING:
    from registryd.service import RegistryService


class Options(usage.Options):
    """Options of ``twistd registryd``; they override the config file."""

    synopsis = "[--config FILE] [--listen ENDPOINT ...] [--data-dir DIR]"
    longdesc = (
        "Serve an OCI registry. With no options it listens on tcp:5000 and "
        "stores under /var/lib/registryd (root) or "
        "~/.local/share/registryd (other users)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/registryd/registryd.toml)."],
        ["data-dir", "d", None, "Directory that holds blobs, repositories and uploads."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Twisted endpoint to listen on, e.g. tcp:5000 or tcp:5000:interface=::1 (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"registryd {__version__}")
        sys.exit(0)


def default_log_observer(twistd_options: Any) -> ILogObserver | None:
    """registryd.logs.text when twistd would write its own text lines to stdout (``-n``
    without ``--logfile``, ``--syslog`` or ``--logger``): the same lines, cheaper per
    request. None leaves twistd's choice (a log file, syslog, a --logger)."""
    if twistd_options is None:
        return None
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    logfile = twistd_options.get("logfile")
    if logfile == "-" or (twistd_options.get("nodaemon") and not logfile):
        return text()
    return None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    overrides = {
        "listen": tuple(options["listen"]) or None,
        "data_dir": options["data-dir"],
    }
    role = role_from_environment()
    try:
        config = load_config(options["config"], overrides)
        # The server uses every credential the config names: a missing one stops it now, in one line.
        require_secrets(config.secrets())
        workers = 1 if role is not None else _workers(config.workers, shareable(config))
        if workers > 1:
            # Checked like a single process (config, store, htpasswd) without building what the
            # workers serve with: this process only binds the listeners and supervises.
            tmp_dir = check_node(config, reactor)
            return Supervisor(config, reactor, workers, tmp_dir, header=_test_header())
        if role is not None and config.storage.cache_size:
            config = own_hot_cache(config, role)
        from registryd.twistd_service import TwistdRegistryService

        service = TwistdRegistryService(config, reactor, role=role)
        service.log_observer = default_log_observer(getattr(options, "parent", None))
        service.prepare_storage()
    except (ConfigError, StartupError) as e:
        raise SystemExit(f"registryd: {e}") from None
    if role is not None:
        watch_parent(reactor)
        if role.header:
            tag_responses(service, str(role.index))
    return service


def _workers(configured: int, unshared: list[str]) -> int:
    """How many processes serve: ``[server] workers``, or one per CPU when it is 0. A listener
    workers cannot share (ssl:, systemd:) keeps the default to one process, and refuses more."""
    if configured == 1:
        return 1
    if unshared:
        if configured > 1:
            raise ConfigError(f"listen endpoint {unshared[0]!r} cannot be shared by worker processes: "
                              f"use tcp:, tcp6:, unix:, tls: or haproxy:, or set [server] workers = 1")
        return 1
    return configured or default_workers()


def own_hot_cache(config: Config, role: WorkerRole) -> Config:
    """An S3 node's hot blob cache, split between its workers: each keeps its share of
    ``cache_size`` in a folder of its own (one index per folder, as one process has)."""
    base = config.storage.cache_dir or os.path.join(config.data_dir, "cache")
    storage = attrs.evolve(config.storage, cache_dir=os.path.join(base, f"worker-{role.index}"),
                           cache_size=max(1, config.storage.cache_size // max(1, role.count)))
    return attrs.evolve(config, storage=storage)


def _test_header() -> bool:
    return os.environ.get(HEADER_ENV) == "1"


def tag_responses(service: RegistryService, value: str) -> None:
    """Tests only: every response names the worker that answered it."""
    base = service.site.requestFactory

    class Tagged(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.responseHeaders.setRawHeaders(b"x-registryd-worker", [value.encode()])

    service.site.requestFactory = Tagged
