"""Counters shared by the worker processes of a node: 64-bit cells in a memory-mapped file.

Each process maps the same file (created, or grown, to the size asked for) and
reads and writes whole cells, which the CPU does atomically: no lock and no
system call per update (the claim table, the node-wide limits).
"""
from __future__ import annotations

import mmap
import os


def map_cells(path: str, cells: int, mode: int = 0o600) -> memoryview:
    """``cells`` signed 64-bit integers backed by the file at ``path`` (zeros where it is new)."""
    size = cells * 8
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        mapped = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return memoryview(mapped).cast("q")
