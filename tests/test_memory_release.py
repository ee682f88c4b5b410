"""release_free_memory: the C heap's free pages go back to the system (registryd.memory)."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

PROBE = """
import gc
from registryd.memory import release_free_memory

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

gc.disable()
blocks = [bytes(4096) for _ in range(20000)]     # 80 MiB from malloc (each above pymalloc's 512 bytes)
pins = blocks[::16]                              # holes between pins: nothing at the top to give back
del blocks
before = rss_kib()
assert release_free_memory()
print(before - rss_kib())
"""


def test_free_pages_of_the_c_heap_are_returned() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    returned_kib = int(result.stdout.strip())
    assert returned_kib > 40 * 1024, returned_kib
