"""The node view of the status and mirror pages: one worker's view written down, read back and
added up with the others' (registryd.web.ui.node_view, registryd.web.worker_snapshots)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from registryd.mirror.cache import UpstreamHealth
from registryd.web.ui import node_view, traffic
from registryd.web.ui.node_view import NodeView, RecentError, from_document, merge
from registryd.web.worker_snapshots import read_others, _write

NS = ("up.test", "other.test")
NOW = 1_000_000.0


def worker_view(seed: int, clock: Any = lambda: NOW) -> NodeView:
    """A worker's live view after a little traffic: ``seed`` hits and one miss on up.test."""
    ring = traffic.Traffic(NS, clock)
    for _ in range(seed):
        ring.observe("up.test", "hit", 100)
    ring.observe("up.test", "miss", 10)
    errors = [RecentError(NOW - 60 + seed, "upstream", "up.test", None, f"up.test answered 50{seed}")]
    health = {"up.test": UpstreamHealth(last_success=NOW - seed, last_error=NOW - 60 + seed,
                                        last_error_message=f"up.test answered 50{seed}", errors=seed),
              "other.test": UpstreamHealth()}
    return NodeView(ring, {"team/app": seed, f"only/{seed}": 1}, errors,
                    {("up.test", "lib/app", f"sha256:{seed:064x}"), ("up.test", "lib/shared", "sha256:" + "f" * 64)},
                    health)


def test_two_workers_add_up() -> None:
    one, two = worker_view(2), worker_view(3)
    node = merge(one, [two])
    totals = node.traffic.totals["up.test"]
    assert (totals.hits, totals.misses, totals.bytes_cached, totals.bytes_upstream) == (5, 2, 500, 20)
    assert sum(c.requests for _, c in node.traffic.series("up.test")) == 7
    assert node.pulls == {"team/app": 5, "only/2": 1, "only/3": 1}
    assert node.top_repositories(1) == [("team/app", 5)]
    # A fill followed by both workers (lib/shared) is one transfer.
    assert len(node.fills) == 3 and node.fills_of("up.test") == 3 and node.fills_of("other.test") == 0
    # The latest success and error of either worker, every error counted.
    health = node.health["up.test"]
    assert (health.last_success, health.last_error, health.errors) == (NOW - 2, NOW - 57, 5)
    assert health.last_error_message == "up.test answered 503"
    assert node.health["other.test"] == UpstreamHealth()
    assert [e.message for e in node.errors] == ["up.test answered 502", "up.test answered 503"]
    # The live views are left as they were.
    assert one.traffic.totals["up.test"].hits == 2 and one.pulls["team/app"] == 2
    assert one.health["up.test"].errors == 2


def test_a_view_survives_its_json_document() -> None:
    view = worker_view(4)
    text = json.dumps(node_view.document(view, 1234, NOW))
    back = from_document(json.loads(text), view.traffic)
    assert back.traffic.totals == view.traffic.totals
    assert back.traffic.series("up.test") == view.traffic.series("up.test")
    assert back.pulls == view.pulls and list(back.errors) == list(view.errors)
    assert set(back.fills) == set(view.fills) and back.health == view.health


@pytest.mark.parametrize("broken", [
    None, [], {"version": 99}, {"version": 1},
    "traffic", "pulls", "errors", "fills", "health",
])
def test_a_malformed_document_is_a_value_error(broken: Any) -> None:
    view = worker_view(1)
    if isinstance(broken, str):
        found = node_view.document(view, 1, NOW)
        found[broken] = {"up.test": "nonsense"} if broken in ("traffic", "pulls", "health") else [["x"]]
        broken = found
    with pytest.raises(ValueError):
        from_document(broken, view.traffic)


def test_the_merge_is_bounded_whatever_the_workers_saw() -> None:
    views = []
    for worker in range(4):
        ring = traffic.Traffic(NS, lambda: NOW)
        pulls = {f"w{worker}/r{i}": i + 1 for i in range(node_view.MAX_REPOSITORIES)}
        errors = [RecentError(NOW - 1000 + worker * 100 + i, "response", f"/v2/w{worker}", 500, str(i))
                  for i in range(node_view.MAX_ERRORS)]
        views.append(NodeView(ring, pulls, errors, set(), {}))
    node = merge(views[0], views[1:])
    assert len(node.pulls) == node_view.MAX_REPOSITORIES
    assert min(node.pulls.values()) >= node_view.MAX_REPOSITORIES * 3 // 4   # the most pulled kept
    assert len(node.errors) == node_view.MAX_ERRORS
    assert [e.at for e in node.errors] == sorted(e.at for e in node.errors)
    assert {e.where for e in node.errors} == {"/v2/w3"}    # the latest, oldest first


def test_rings_of_different_days_keep_one_day() -> None:
    now = [NOW]
    early = traffic.Traffic(NS, lambda: now[0])
    early.observe("up.test", "hit", 1)          # a day and more before the other worker's
    now[0] += 2 * traffic.DAY
    late = traffic.Traffic(NS, lambda: now[0])
    late.observe("up.test", "miss", 1)
    node = merge(NodeView(late, {}, [], set(), {}), [NodeView(early, {}, [], set(), {})])
    assert node.traffic.totals["up.test"].requests == 2           # since start: both
    assert sum(c.requests for _, c in node.traffic.series("up.test")) == 1    # the last day: one


def test_only_live_workers_are_read(tmp_path: Any) -> None:
    view = worker_view(1)
    directory = str(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    _write(os.path.join(directory, "worker-0.json"), node_view.document(view, os.getpid(), NOW))   # this one
    _write(os.path.join(directory, "worker-1.json"), node_view.document(view, os.getpid(), NOW - 1))  # live
    _write(os.path.join(directory, "worker-2.json"), node_view.document(view, int(gone.stdout), NOW))  # exited
    _write(os.path.join(directory, "worker-3.json"), node_view.document(view, os.getpid(), NOW - 60))  # stale
    (tmp_path / "worker-4.json").write_text("{not json")                                          # torn
    (tmp_path / "worker-5.json.77.tmp").write_text("{}")                                          # being written
    found = read_others(directory, 0, NOW, 10.0, view.traffic)
    assert len(found) == 1 and found[0].pulls == view.pulls
    assert read_others(str(tmp_path / "none"), 0, NOW, 10.0, view.traffic) == []
