"""The benchmark scripts still run end to end (quick mode, both registries).

Figures are not judged here (timings on a shared machine are not a test);
a script exits non-zero when any figure could not be measured for both.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("script", ["bench_core.py", "bench_mirror.py"])
def test_benchmark_quick_mode_measures_everything(script: str, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "r.json").exists()
