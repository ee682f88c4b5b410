"""The benchmark scripts still run end to end (quick mode, both registries).

Figures are not judged here (timings on a shared machine are not a test);
a script exits non-zero when any figure could not be measured for both.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from conftest import ROOT


@pytest.mark.parametrize("script", ["bench_core.py", "bench_mirror.py"])
def test_benchmark_quick_mode_measures_everything(script: str, tmp_path) -> None:
    result = subprocess.run(
        # One second per wrk/hey run (quick mode's least, as bench_s3.py's): what is tested is that
        # every figure is measured, not the figures.
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--seconds", "1",
         "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "r.json").exists()


def test_mirror_benchmark_reports_the_whole_process_tree_of_a_multi_worker_node(tmp_path) -> None:
    """bench_mirror.py --workers 2: the supervisor and both workers, idle and during the cold clients."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_mirror.py"), "--quick", "--only", "cold",
         "--workers", "2", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    registryd = report["proxies"]["registryd"]
    roles = sorted(p["role"] for p in registryd["memory_tree"]["idle"]["processes"])
    assert roles == ["supervisor", "worker", "worker"]
    assert len(registryd["memory_tree"]["cold"]) == 3
    for figure in ("pss_idle_MiB", "rss_idle_largest_MiB", "rss_cold_peak_MiB", "rss_cold_rise_MiB"):
        assert registryd["figures"][figure]["value"] is not None, figure
        assert report["proxies"]["reference"]["figures"][figure]["value"] is not None, figure
    assert len(report["host"]["loadavg_start"]) == 3 and "load average" in result.stdout
    for name in ("registryd", "reference"):     # the clients' own floor, on the blob once cached
        floor = report["proxies"][name]["figures"]["cached_32M_c8_wall_s"]
        assert floor["value"] is not None and floor["ok"] == 8, (name, floor)


def test_push_pull_benchmark_measures_pulls_during_a_push_and_each_workers_reactor_lag(tmp_path) -> None:
    """bench_push_pull.py: cached pulls alone and during a big push, both servers; registryd's lag per worker."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_push_pull.py"), "--quick", "--seconds", "1",
         "--workers", "2", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    for name in ("registryd", "reference"):
        figures = report["servers"][name]["figures"]
        for figure in ("pull_alone_c8_MBps", "pull_during_push_c8_MBps", "pull_drop_pct", "push_during_pulls_MBps"):
            assert figures[figure]["value"] is not None, (name, figure)
    assert len(report["servers"]["registryd"]["extra"]["reactor_lag_p99_ms_per_process"]) == 2
def test_node_disk_benchmark_quick_mode_finds_one_copy_on_containerd(tmp_path) -> None:
    """bench_node_disk.py: a 16 MiB image mirrored and pulled into the node's containerd takes one
    copy's room with registryd on containerd, two with registryd on its filesystem store."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_node_disk.py"), "--quick", "--output",
         str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["copies_containerd"] < 1.5 < figures["copies_filesystem"], figures


def test_sync_benchmark_quick_mode_measures_everything(tmp_path) -> None:
    """bench_sync.py: a registryd [[sync]] job and skopeo sync of the same tags, both measured."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_sync.py"), "--quick", "--output",
         str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["registryd"]["cold_upstream_requests"] > 0 and figures["skopeo"]["cold_upstream_requests"] > 0


def test_s3_benchmark_quick_mode_measures_everything(ceph_s3: Any, tmp_path) -> None:
    """bench_s3.py on the session's radosgw: its own buckets, deleted at the end."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_s3.py"), "--quick", "--output",
         str(tmp_path / "r.json"), "--s3-endpoint", ceph_s3.endpoint, "--s3-access-key", ceph_s3.access_key,
         "--s3-region", ceph_s3.region],
        env={**os.environ, "BENCH_S3_SECRET_KEY": ceph_s3.secret_key},
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.md").exists()


def test_s3_benchmark_writes_outside_the_checkout_unless_told() -> None:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_s3
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    output = os.path.abspath(bench_s3.default_output("20260101T000000Z"))
    assert not output.startswith(os.path.abspath(ROOT) + os.sep), output


def test_ui_benchmark_quick_mode_measures_every_page(tmp_path) -> None:
    """bench_ui.py: every page of the web UI answers 200 over a store it fills (no reference: it has no UI)."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ui.py"), "--quick", "--repositories", "500",
         "--tags", "100", "--requests", "2", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "r.json").read_text())["figures"]
    assert len([k for k in figures if k.endswith("_median_ms")]) == 10


def test_tls_benchmark_measures_every_phase_on_every_server(tmp_path) -> None:
    """bench_tls.py, every phase on every server in one run: registryd on its filesystem store and
    on containerd (2 workers each), the reference, nginx; both ratios for containerd, and beside
    MB/s the CPU seconds per GB of every server's processes (registryd's supervisor and workers,
    the reference's TLS process, nginx's master and workers), and plain GETs by the lean client."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_tls.py"), "--quick", "--seconds", "1",
         "--servers", "registryd,registryd-containerd,reference,nginx", "--only", "tls,plain,manifest,push",
         "--workers", "2", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {row["figure"]: row for row in report["comparison"]}
    for figure in ("tls_blob_get_32M_c1_MBps", "tls_blob_get_32M_c8_MBps", "blob_get_32M_c1_MBps",
                   "blob_get_32M_c8_MBps", "push_big_s", "push_many_s"):
        assert rows[figure]["containerd_vs_reference"] is not None, rows[figure]
        assert rows[figure]["containerd_vs_filesystem"] is not None, rows[figure]
    assert "ctrd vs fs" in result.stdout
    for name in ("registryd", "reference", "nginx"):
        for c in (1, 8):
            for figure in (f"tls_blob_get_32M_c{c}_cpu_s_per_GB", f"blob_get_32M_c{c}_cpu_s_per_GB",
                           f"blob_get_32M_c{c}_lean_MBps"):
                value = report["servers"][name]["figures"][figure]["value"]
                assert value is not None and value > 0, (name, figure, value)
    assert "s/GB" in result.stdout
