"""The reference registry (CNCF distribution 2.8, Debian's ``docker-registry``).

A development aid, not part of what the suite asserts about registryd: run
the skopeo tests against the reference to tell a test bug from a registryd
bug::

    REGISTRYD_E2E_REFERENCE=1 .venv/bin/python -m pytest tests/e2e

distribution 2.8 has no referrers API, so the referrers checks fail there
by design. The fixture is only used when that variable is set.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from support.ports import free_port
from support.wait import wait_for_port

DOCKER_REGISTRY = "/usr/bin/docker-registry"

CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


@dataclass
class ReferenceRegistry:
    url: str
    host: str
    data_dir: str
    process: Any = None


@pytest.fixture
def reference_registry(tmp_path: Any) -> Iterator[ReferenceRegistry]:
    """A docker-registry on a free loopback port with deletes enabled."""
    binary = DOCKER_REGISTRY if os.access(DOCKER_REGISTRY, os.X_OK) else shutil.which("docker-registry")
    if not binary:
        pytest.fail("docker-registry (the reference registry) is not installed")
    root = tmp_path / "reference-data"
    root.mkdir()
    port = free_port()
    config = tmp_path / "reference-config.yml"
    config.write_text(CONFIG.format(root=root, port=port))
    log = open(tmp_path / "reference.log", "wb")
    process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, process, timeout=20)
        host = f"127.0.0.1:{port}"
        yield ReferenceRegistry(f"http://{host}", host, str(root), process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
