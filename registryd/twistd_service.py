"""The registry service as ``twistd registryd`` runs it: one line and exit 1 on a failed start,
and the signals (SIGHUP reloads; a worker stops once on SIGTERM or SIGINT).

Apart from registryd.tap so that a supervisor of workers, which never builds the
service, never imports the web stack either.
"""
from __future__ import annotations

import signal
from typing import Any

from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from registryd.memory import release_once_running
from registryd.service import RegistryService, StartupError


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
        release_once_running(reactor)
        if self.role is not None:
            # A worker may get SIGTERM twice (from its supervisor, and from a terminal's or
            # systemd's signal to the whole group): the second must not stop a stopping reactor.
            stopping: list[bool] = []

            def stop(*_: Any) -> None:
                if not stopping:
                    stopping.append(True)
                    reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
