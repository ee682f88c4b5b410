"""Run a command with its standard error on a pseudo-terminal (progress bars draw only there)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
from typing import Sequence


def run_with_terminal_stderr(args: Sequence[str], env: dict[str, str] | None = None,
                             timeout: float = 60) -> tuple[int, str, bytes]:
    """(exit status, standard output, every byte written to the terminal)."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=slave, text=True, env=env)
        os.close(slave)
        out, _ = process.communicate(timeout=timeout)
        seen = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break   # the other side is closed: everything was read
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    return process.returncode, out, seen
