"""NodeCounters and the node-wide connection and body limits (registryd.web.node_limits), in
one process: two workers' rows in one file, as two worker processes map it."""
from __future__ import annotations

import os
from typing import Any

import pytest

from registryd.errors import RegistryError
from registryd.shared_cells import PAGE_CELLS, map_cells, zero_cells
from registryd.web.limits import RateLimitedLog
from registryd.web.node_limits import NodeBodyBudget, NodeConnectionLimits, NodeCounters, client_bucket


def _warn() -> RateLimitedLog:
    return RateLimitedLog(lambda: 0.0)


def test_each_worker_writes_its_row_and_judges_by_the_sum(tmp_path: Any) -> None:
    path = str(tmp_path / "run" / "limits")
    first, second = NodeCounters(path, 0, 2), NodeCounters(path, 1, 2)
    limits = [NodeConnectionLimits(c, 3, 100, _warn()) for c in (first, second)]
    assert limits[0].open("127.0.0.1") and limits[0].open("127.0.0.1")
    assert limits[1].open("127.0.0.1")
    assert not limits[1].open("127.0.0.1") and not limits[0].open("127.0.0.1")
    limits[0].close()
    assert limits[1].open("127.0.0.1")
    assert (first.own(0), second.own(0)) == (1, 2)


def test_a_restarted_worker_starts_from_nothing(tmp_path: Any) -> None:
    path = str(tmp_path / "limits")
    budget = NodeBodyBudget(NodeCounters(path, 1, 2), 100, _warn())
    budget.reserve(80)
    other = NodeBodyBudget(NodeCounters(path, 0, 2), 100, _warn())
    with pytest.raises(RegistryError) as refused:
        other.reserve(30)
    assert refused.value.status == 503
    # Worker 1 died with its body; its successor zeroes the row.
    NodeCounters(path, 1, 2)
    other.reserve(30)
    other.release(30)
    other.release(30)       # never below what it holds
    assert other.held == 0


def test_per_client_counts_meet_across_workers(tmp_path: Any) -> None:
    path = str(tmp_path / "limits")
    limits = [NodeConnectionLimits(NodeCounters(path, i, 2), 100, 2, _warn()) for i in range(2)]
    a = limits[0].identify("10.0.0.1")
    b = limits[1].identify("10.0.0.1")
    assert a is not None and b is not None
    assert limits[1].identify("10.0.0.1") is None
    assert limits[0].identify("10.0.0.2") is not None     # another client (another bucket)
    assert client_bucket("10.0.0.1") != client_bucket("10.0.0.2")
    limits[0].forget(a)
    assert limits[1].identify("10.0.0.1") is not None


def test_zeroing_whole_pages_punches_them_out_and_a_partial_range_is_written(tmp_path: Any) -> None:
    path = str(tmp_path / "cells")
    cells = map_cells(path, 3 * PAGE_CELLS)
    cells[0:3 * PAGE_CELLS] = memoryview(bytes(range(1, 9)) * (3 * PAGE_CELLS)).cast("q")
    os.sync()
    before = os.stat(path).st_blocks
    zero_cells(cells, PAGE_CELLS, PAGE_CELLS)            # the middle page: a hole now
    assert set(cells[PAGE_CELLS:2 * PAGE_CELLS]) == {0}
    assert cells[PAGE_CELLS - 1] != 0 and cells[2 * PAGE_CELLS] != 0
    assert os.stat(path).st_blocks < before               # its block is gone, not written as zeros
    zero_cells(cells, 3, 5)                               # not whole pages: zeros written
    assert set(cells[3:8]) == {0} and cells[2] != 0 and cells[8] != 0
    assert set(map_cells(path, 3 * PAGE_CELLS)[PAGE_CELLS:2 * PAGE_CELLS]) == {0}   # as another process sees it
