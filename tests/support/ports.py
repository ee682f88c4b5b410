"""Free loopback ports, written once."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's choice; a race remains until bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_on_both_loopbacks() -> int:
    """A port free on 127.0.0.1 and on ::1 right now (free_port checks one family only)."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET6) as s:
            try:
                s.bind(("::1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free on both loopbacks")
