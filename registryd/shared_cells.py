"""Counters shared by the worker processes of a node: 64-bit cells in a memory-mapped file.

Each process maps the same file (created, or grown, to the size asked for) and
reads and writes whole cells, which the CPU does atomically: no lock and no
system call per update (the claim table, the node-wide limits).
"""
from __future__ import annotations

import mmap
import os

#: Cells per page: a range of cells zeroed by ``zero_cells`` should start and end on one.
PAGE_CELLS = mmap.PAGESIZE // 8


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


def zero_cells(cells: memoryview, start: int, count: int) -> None:
    """Set ``count`` cells from ``start`` to zero. On whole pages the file's blocks are punched
    out (MADV_REMOVE) instead of written, so pages nobody uses again stay out of memory."""
    mapped = cells.obj
    whole_pages = start % PAGE_CELLS == 0 and count % PAGE_CELLS == 0
    if whole_pages and isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_REMOVE"):
        try:
            mapped.madvise(mmap.MADV_REMOVE, start * 8, count * 8)
            return
        except OSError:   # a file system that cannot punch holes: write the zeros
            pass
    cells[start:start + count] = memoryview(bytes(count * 8)).cast("q")
