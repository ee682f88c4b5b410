"""``twistd registryd``: command-line options and the service they build.

This is the only module that touches the global reactor; everything below
it gets the reactor injected.
"""
from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from registryd import __version__
from registryd.config import ConfigError, load_config
from registryd.logs import text
from registryd.secrets import require_secrets
from registryd.service import RegistryService, StartupError


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


class TwistdRegistryService(RegistryService):
    """Turn a start-up failure into one line on stderr and exit status 1.

    twistd would otherwise log a traceback and keep running without a port.
    """

    #: The observer twistd logs to instead of its own (see default_log_observer).
    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd's application: an ILogObserver component on it is what twistd logs to
        # (unless --logger names another).
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as e:
            raise SystemExit(f"registryd: {e}") from None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        # Signals arrive between reactor iterations; do the work in one.
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload))  # type: ignore[attr-defined]


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
    try:
        config = load_config(options["config"], overrides)
        # The server uses every credential the config names: a missing one stops it now, in one line.
        require_secrets(config.secrets())
        service = TwistdRegistryService(config, reactor)
        service.log_observer = default_log_observer(getattr(options, "parent", None))
        service.prepare_storage()
    except (ConfigError, StartupError) as e:
        raise SystemExit(f"registryd: {e}") from None
    return service
