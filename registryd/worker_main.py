"""The entry point of a worker process: twistd, knowing only the registryd plugin.

twistd's own entry point imports every plugin it can find (conch, mail, names,
words...) to list its subcommands: about 1.7 MiB in every worker for nothing.
A worker is always ``twistd ... registryd ...`` (registryd.supervisor.worker_command),
so it is offered that one plugin. Nothing here installs a reactor: twistd
still does, from its options, as for the supervisor.
"""
from __future__ import annotations

from typing import Any, Iterable


def _registryd_only(interface: Any, package: Any = None) -> Iterable[Any]:
    from twisted.plugins.registryd_plugin import registryd

    return [registryd]


def run() -> None:
    """twistd's ``run``, with registryd as its only subcommand."""
    from twisted.application import app
    from twisted.scripts.twistd import ServerOptions, runApp

    class WorkerOptions(ServerOptions):
        _getPlugins = staticmethod(_registryd_only)

    app.run(runApp, WorkerOptions)
