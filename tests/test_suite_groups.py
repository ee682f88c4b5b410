"""The suite's own scheduling: with two workers (run-tests.sh: ``-n 2 --dist loadgroup``) each
module's tests run in one worker, so its module fixtures, the session's one Ceph and the one
package build are set up once (tests/conftest.py puts the groups in the test ids)."""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from typing import Any

from conftest import ROOT


def test_each_modules_tests_run_in_one_worker(tmp_path: Any) -> None:
    modules = ["tests/test_globs.py", "tests/test_retention_config.py"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder", "-v",
         "--basetemp", str(tmp_path / "basetemp"), *modules],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workers: dict[str, set[str]] = collections.defaultdict(set)
    for line in result.stdout.splitlines():
        ran = re.match(r"\[(gw\d+)\] .*\bPASSED (tests/[\w/]+\.py)::", line)
        if ran:
            workers[ran[2]].add(ran[1])
    assert sorted(workers) == modules, result.stdout[-3000:]
    assert all(len(names) == 1 for names in workers.values()), dict(workers)
