"""Listening sockets shared by worker processes.

With ``[server] workers`` > 1 the supervisor binds every listener's plain
socket (so a port in use stops start-up with one line, as with one process)
and hands the descriptors to the workers, which accept on them through
``AdoptedStreamServerEndpoint``. A ``tcp:``/``tcp6:`` listener is one socket
per worker on the same address (registryd.reuseport: the kernel spreads the
connections evenly); a ``unix:`` one is one socket every worker accepts on.

A listen description is split into the wrapping a worker adds (TLS, the
PROXY protocol) and the plain endpoint the supervisor binds (``tcp:``,
``tcp6:``, ``unix:``). Anything else (Twisted's ``ssl:``, ``systemd:``) is
not shared: ``shareable`` says so, and the node then runs one process.
"""
from __future__ import annotations

import os
import re
import socket
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

#: The environment a worker is started with: its index, and its listening descriptors.
WORKER_ENV = "REGISTRYD_WORKER"
COUNT_ENV = "REGISTRYD_WORKER_COUNT"
FDS_ENV = "REGISTRYD_LISTEN_FDS"
#: prometheus_client's multiprocess folder, where every worker keeps its metrics (registryd.metrics).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Tests only: every response names the worker that answered it (X-Registryd-Worker).
HEADER_ENV = "REGISTRYD_WORKER_HEADER"
#: The default of ``[server] workers`` when the config does not set it (the test launcher sets 1).
DEFAULT_ENV = "REGISTRYD_WORKERS"

#: The folder of the data directory where the workers of a node share state (claims).
RUN = "run"
#: The file under RUN of the node's connection and body counters (registryd.web.node_limits).
LIMITS = "limits"

_PLAIN = ("tcp", "tcp6", "unix")
HAPROXY = "haproxy:"
FIRST_FD = 3

#: Connections the kernel holds per listening socket until a worker accepts them, unless the
#: description sets ``backlog=``. Twisted's default is 50: a burst of clients (a CI farm's
#: runners pulling at once) overflowed it, and every SYN dropped so costs its client a second
#: or more. The kernel caps it at net.core.somaxconn (4096 on current kernels; nginx asks 511).
BACKLOG = 1024


def with_backlog(description: str) -> str:
    """A ``tcp:``, ``tcp6:`` or ``unix:`` description (``haproxy:`` in front or not) with
    ``backlog=BACKLOG`` added unless it sets its own; any other kind as it is."""
    plain = description[len(HAPROXY):] if description.startswith(HAPROXY) else description
    arguments = re.split(r"(?<!\\):", plain)     # an escaped colon (\:) is part of its argument
    if arguments[0] not in _PLAIN or any(a.startswith("backlog=") for a in arguments[1:]):
        return description
    return f"{description}:backlog={BACKLOG}"


def plain_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """Twisted's endpoint for ``description``, with registryd's default backlog."""
    return serverFromString(reactor, with_backlog(description))


@attrs.frozen
class Inherited:
    """A listening socket a worker got from its supervisor."""

    fd: int
    family: int

    def endpoint(self, reactor: Any) -> IStreamServerEndpoint:
        # The endpoint adopts (duplicates) the socket and closes this descriptor.
        return AdoptedStreamServerEndpoint(reactor, self.fd, self.family)


def plain_part(description: str) -> str | None:
    """The plain socket under a listen description (probes: already split off), or None
    if it cannot be shared between processes. ``tls:`` descriptions give their ``tcp:`` part
    (registryd.auth.tls), ``haproxy:X`` gives X."""
    if description.startswith(HAPROXY):
        description = description[len(HAPROXY):]
    kind = description.partition(":")[0]
    return description if kind in _PLAIN else None


@attrs.frozen
class WorkerRole:
    """This process is worker ``index`` of a node: it accepts on ``sockets`` (in listen order)."""

    index: int
    sockets: tuple[Inherited, ...]
    header: bool = False
    count: int = 1

    @property
    def runs_upkeep(self) -> bool:
        """Worker 0 runs the node's timers (collections, surveys, eviction, reaping)."""
        return self.index == 0

    def environment(self) -> dict[str, str]:
        env = {WORKER_ENV: str(self.index), COUNT_ENV: str(self.count),
               FDS_ENV: ",".join(f"{s.fd}:{s.family}" for s in self.sockets)}
        if self.header:
            env[HEADER_ENV] = "1"
        return env


def role_from_environment(environ: dict[str, str] | None = None) -> WorkerRole | None:
    """The worker role the supervisor gave this process, or None (a whole node in one process)."""
    environ = dict(os.environ) if environ is None else environ
    index = environ.get(WORKER_ENV)
    if index is None:
        return None
    sockets = []
    for item in filter(None, environ.get(FDS_ENV, "").split(",")):
        fd, _, family = item.partition(":")
        sockets.append(Inherited(int(fd), int(family)))
    return WorkerRole(int(index), tuple(sockets), header=environ.get(HEADER_ENV) == "1",
                      count=int(environ.get(COUNT_ENV, "1")))


def default_workers(environ: dict[str, str] | None = None) -> int:
    """How many workers a node runs when ``[server] workers`` is 0: REGISTRYD_WORKERS, else one per CPU."""
    environ = dict(os.environ) if environ is None else environ
    value = environ.get(DEFAULT_ENV, "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return usable_cpus()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def family_of(port: Any) -> int:
    """The address family of a listening port's socket."""
    sock = getattr(port, "socket", None)
    if isinstance(sock, socket.socket):
        return int(sock.family)
    raise TypeError(f"{port!r} has no socket to share")


class _OneAcceptPort(tcp.Port):
    """A port that takes one connection per readiness event, never a burst of them."""

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


def accept_one_at_a_time(port: Any) -> None:
    """Twisted accepts up to 100 waiting connections at once (more under load): on a socket shared
    with other workers that would take a whole burst of clients from them. One at a time, every
    idle worker gets its share, and a busy one leaves them to the others. A socket of this worker's
    own (``SO_REUSEPORT``: registryd.reuseport) keeps Twisted's bursts: nobody else accepts there."""
    if type(port) is tcp.Port and not port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        port.__class__ = _OneAcceptPort
