"""The supervisor's listener groups: one SO_REUSEPORT socket per worker on one address
(registryd.reuseport), and a port something listens on already refused as before."""
from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

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
