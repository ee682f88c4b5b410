"""Connections spread evenly over the workers of a node ([server] workers = 2, real ports).

Each worker accepts on a listening socket of its own, bound by the supervisor
with SO_REUSEPORT on the same address: the kernel hashes each connection's
4-tuple to one of them. With one shared accept queue, whichever worker was
awake first took every connection of a burst (wrk's 8 keep-alive connections
all on one worker, the other idle).

The bounds below are about chance, so they are chosen not to flake: with the
source ports of n connections hashed independently to 2 sockets, a worker's
share is Binomial(n, 1/2). P(either worker gets fewer than 16 of 64) =
2 * sum_{k<=15} C(64, k) / 2^64 = 2.4e-5; P(fewer than 5 of 32) = 1.9e-5.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from typing import Any

from test_workers import WORKER, Node, node, seen_workers, until  # noqa: F401  (node: the fixture)


def _open(node: Node, count: int) -> list[socket.socket]:
    """``count`` connections at once: every handshake is done before any request is sent."""
    return [socket.create_connection(("127.0.0.1", node.port), timeout=30) for _ in range(count)]


def _send_requests(conns: list[socket.socket]) -> None:
    for conn in conns:
        conn.sendall(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n")    # keep-alive: the connection stays


def _answering_worker(conn: socket.socket) -> str:
    """The worker named by the response on ``conn`` (its headers read; the body is empty JSON)."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = conn.recv(65536)
        assert chunk, f"the connection was closed without an answer: {answer!r}"
        answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    assert head[0].startswith("HTTP/1.1 200"), head
    return next(line.split(":", 1)[1].strip() for line in head[1:] if line.lower().startswith(WORKER + ":"))


def _shares(conns: list[socket.socket]) -> Counter[str]:
    shares = Counter(_answering_worker(conn) for conn in conns)
    for conn in conns:
        conn.close()
    return shares


def _worker_index(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return env[b"REGISTRYD_WORKER"].decode()


def test_keep_alive_connections_opened_at_once_are_spread_over_both_workers(node: Node) -> None:
    conns = _open(node, 64)
    _send_requests(conns)
    shares = _shares(conns)
    assert set(shares) == {"0", "1"} and min(shares.values()) >= 16, shares


def test_a_worker_not_awake_when_connections_come_still_gets_its_share(node: Node) -> None:
    """One worker stopped (SIGSTOP) while 32 connections are made and send their requests:
    its share waits in its own socket's queue and it answers them once it runs again. With a
    shared queue the awake worker took every one (the burst of a benchmark, on a busy machine)."""
    sleeper = node.workers()[0]
    os.kill(sleeper, signal.SIGSTOP)
    try:
        conns = _open(node, 32)
        _send_requests(conns)
        time.sleep(0.5)     # time for the awake worker to take what it can
    finally:
        os.kill(sleeper, signal.SIGCONT)
    shares = _shares(conns)
    assert set(shares) == {"0", "1"} and min(shares.values()) >= 5, shares


def test_connections_queued_for_a_killed_worker_are_served_by_its_successor(node: Node) -> None:
    """kill -9 of a worker, and the supervisor held still (SIGSTOP) so the worker stays down
    while 32 connections come: none is refused or reset; those queued on the dead worker's
    socket (the supervisor keeps it open) are answered by the worker started in its place."""
    victim = node.workers()[0]
    victim_index = _worker_index(victim)
    node.process.send_signal(signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGKILL)
        until(lambda: not os.path.exists(f"/proc/{victim}/environ") or _is_zombie(victim), 10, "still alive")
        conns = _open(node, 32)
        _send_requests(conns)
    finally:
        node.process.send_signal(signal.SIGCONT)
    shares = _shares(conns)
    assert sum(shares.values()) == 32
    assert shares[victim_index] >= 5, shares    # queued while it was down, served by its successor
    assert victim not in node.workers()
    assert seen_workers(node, 2) == {"0", "1"}


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_second_node_on_the_same_port_stops_with_one_line(node: Node, tmp_path: Any) -> None:
    """SO_REUSEPORT would let a second node of the same user join the first one's port and take
    half its connections: the supervisor checks that the address is free before it binds."""
    other = tmp_path / "other"
    other.mkdir()
    config = other / "registryd.toml"
    config.write_text(f'listen = ["tcp:{node.port}:interface=127.0.0.1"]\ndata_dir = "{other / "data"}"\n'
                      "[server]\nworkers = 2\n")
    import subprocess

    from conftest import ROOT, VENV_BIN

    result = subprocess.run([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert f"registryd: cannot listen on tcp:{node.port}:interface=127.0.0.1" in output
