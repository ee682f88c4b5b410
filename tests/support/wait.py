"""Waiting, written once: on the reactor (``sleep``, ``wait_until``) and for a port to open."""
from __future__ import annotations

import socket
import subprocess
import time
from typing import Any, Awaitable, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def sleep(seconds: float) -> None:
    """Let the reactor run for ``seconds`` (a real wait: prefer a clock the test moves)."""
    await deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def wait_until(done: Callable[[], bool | Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.05) -> None:
    """Poll ``done`` (plain or async) on the reactor until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = done()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await sleep(interval)


def wait_for_port(host: str, port: int, process: subprocess.Popen[Any] | None = None, timeout: float = 30) -> None:
    """Block until ``host:port`` accepts a connection; fail at once if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not open within {timeout}s")
