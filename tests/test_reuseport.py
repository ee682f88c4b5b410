"""The supervisor's listener groups: one SO_REUSEPORT socket per worker on one address
(registryd.reuseport), and a port something listens on already refused as before."""
from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

from registryd.listeners import BACKLOG, plain_endpoint, with_backlog
from registryd.reuseport import ListenerGroup, ReusePortBinder


def _bind(description: str, count: int) -> ListenerGroup:
    from twisted.internet import reactor

    outcome: list[Any] = []
    serverFromString(ReusePortBinder(reactor, count), description).listen(
        Factory.forProtocol(Protocol)).addBoth(outcome.append)
    if not isinstance(outcome[0], ListenerGroup):
        outcome[0].raiseException()
    return outcome[0]


@pytest.fixture
def groups() -> Any:
    made: list[ListenerGroup] = []
    yield made
    for group in made:
        group.stopListening()


@pytest.mark.parametrize("description", ["tcp:0:interface=127.0.0.1", r"tcp6:0:interface=\:\:1"])
def test_port_zero_gives_every_worker_a_socket_of_its_own_on_the_port_the_first_got(
        groups: list[ListenerGroup], description: str) -> None:
    group = _bind(description, 3)
    groups.append(group)
    addresses = {(port.getHost().host, port.getHost().port) for port in group.ports}
    assert len(addresses) == 1 and addresses.pop()[1] != 0
    assert len({port.fileno() for port in group.ports}) == 3
    assert all(port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for port in group.ports)
    assert [group.port_for(i) for i in range(4)] == [*group.ports, group.ports[0]]


def test_a_port_another_group_of_ours_listens_on_is_refused(groups: list[ListenerGroup]) -> None:
    """SO_REUSEPORT alone would let a second node of the same user share the first one's port."""
    first = _bind("tcp:0:interface=127.0.0.1", 2)
    groups.append(first)
    port = first.getHost().port
    with pytest.raises(CannotListenError, match="Address already in use"):
        groups.append(_bind(f"tcp:{port}:interface=127.0.0.1", 2))


def test_a_port_a_plain_socket_listens_on_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(CannotListenError, match="Address already in use"):
            _bind(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1", 2)


def default_queue() -> int:
    """The accept queue a listener gets without ``backlog=``: BACKLOG, as far as net.core.somaxconn allows."""
    with open("/proc/sys/net/core/somaxconn") as f:
        return min(BACKLOG, int(f.read()))


def listen_queue(port: int) -> list[int]:
    """The accept queue length (``ss``'s Send-Q of a listening socket) of each socket on ``port``."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], check=True, capture_output=True, text=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize(("description", "made"), [
    ("tcp:5000", "tcp:5000:backlog=1024"),
    (r"tcp6:5000:interface=\:\:1", r"tcp6:5000:interface=\:\:1:backlog=1024"),
    ("unix:/run/registryd.sock", "unix:/run/registryd.sock:backlog=1024"),
    ("haproxy:tcp:5000", "haproxy:tcp:5000:backlog=1024"),
    ("tcp:5000:backlog=16", "tcp:5000:backlog=16"),
    # An escaped colon is part of its argument: "backlog=" there is not an argument of its own.
    (r"tcp:5000:interface=a\:backlog=3", r"tcp:5000:interface=a\:backlog=3:backlog=1024"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ("ssl:5443", "ssl:5443"),
])
def test_listen_descriptions_get_a_queue_for_bursts_unless_they_set_their_own(description: str, made: str) -> None:
    assert with_backlog(description) == made


def test_every_socket_of_a_group_queues_the_default_backlog(groups: list[ListenerGroup]) -> None:
    from twisted.internet import reactor

    outcome: list[Any] = []
    plain_endpoint(ReusePortBinder(reactor, 2), "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(Protocol)).addBoth(outcome.append)
    groups.append(outcome[0])
    assert listen_queue(outcome[0].getHost().port) == [default_queue()] * 2


def test_a_node_in_one_process_queues_the_default_backlog_or_the_one_its_listener_sets(make_registry: Any) -> None:
    registry = make_registry(listen=("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=16"))
    default, own = registry.service.ports
    assert listen_queue(default.getHost().port) == [default_queue()]
    assert listen_queue(own.getHost().port) == [16]
