"""One listening socket per worker on the same TCP address (``SO_REUSEPORT``).

With one accept queue shared by every worker, whichever worker is awake
first takes a burst of connections: under load, the 8 keep-alive
connections of a benchmark all landed on one worker while the other idled.
Here the supervisor binds a group of N sockets to the address with
``SO_REUSEPORT`` and worker i accepts on socket i only: the kernel hashes
each new connection's 4-tuple to one socket of the group (as nginx's
``reuseport``, Go and Envoy do), so every worker gets its share whatever
its timing.

The supervisor keeps every socket of the group open: a worker that dies
leaves its socket listening, the connections hashed to it wait in its
queue, and the worker started in its place accepts them (none is refused
or reset). Unix sockets cannot be balanced so; they stay one socket shared
by every worker.

``SO_REUSEPORT`` would let any socket of the same user join the group, so
before binding a fixed port the address is bound once without it: a port
that another process (another registryd node too) listens on stops
start-up with one line, as with one process.
"""
from __future__ import annotations

import socket
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.tcp import makeBinding


class ListenerGroup:
    """The listening ports of one listen description: one per worker, or one shared by all."""

    def __init__(self, ports: list[Any]) -> None:
        self.ports = ports

    def port_for(self, worker: int) -> Any:
        """The port worker ``worker`` accepts on."""
        return self.ports[worker % len(self.ports)]

    def getHost(self) -> Any:
        return self.ports[0].getHost()

    def stopListening(self) -> None:
        for port in self.ports:
            port.stopListening()


class ReusePortBinder:
    """Stands in for the reactor when a ``tcp:``/``tcp6:`` endpoint listens: its ``listenTCP``
    binds ``count`` sockets with ``SO_REUSEPORT`` (port 0: the others on the port the first got)
    and returns them as one ListenerGroup. The endpoint parses the description as usual."""

    def __init__(self, reactor: Any, count: int) -> None:
        self._reactor = reactor
        self._count = count

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> ListenerGroup:
        if port:
            refuse_if_taken(interface, port)
        ports: list[Any] = []
        try:
            for _ in range(self._count):
                binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
                ports.append(self._reactor.listenTCP(binding, factory, backlog, interface))
                port = ports[0].getHost().port
        except BaseException:
            for made in ports:
                made.stopListening()
            raise
        return ListenerGroup(ports)


def refuse_if_taken(interface: str, port: int) -> None:
    """Raise CannotListenError if something listens on (interface, port) already: bound without
    ``SO_REUSEPORT`` (``SO_REUSEADDR`` only, as Twisted binds), this socket conflicts with any
    listener there, a reuseport group of ours included."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    try:
        address = socket.getaddrinfo(interface or None, port, family, socket.SOCK_STREAM, 0,
                                     socket.AI_PASSIVE | socket.AI_NUMERICHOST)[0][4]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise CannotListenError(interface, port, e) from None
