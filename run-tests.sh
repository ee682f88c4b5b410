#!/usr/bin/env bash
# Install everything the tests need (Debian packages, a venv with the pinned
# dependencies) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# Real clients (skopeo, podman, containerd's ctr, docker), the reference registry,
# load generators, what the package build and install tests use, and a
# one-node Ceph with radosgw as the S3 object store (tests/ceph.py starts it)
# and HAProxy in front of several nodes (tests/e2e/haproxy.py).
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    skopeo docker-registry containerd docker.io wrk hey openssl curl apache2-utils nginx-light \
    dpkg-dev debhelper dh-virtualenv python3-venv rpm debootstrap lintian \
    systemd systemd-container chromium iproute2 \
    ceph-mon ceph-mgr ceph-osd radosgw ceph-common uuid-runtime haproxy podman >/dev/null

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# compat mode puts the source tree on sys.path, so twistd finds the plugin.
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
# Byte code at both levels, as the packages ship it: otherwise, where PYTHONDONTWRITEBYTECODE
# is set, every twistd a test starts compiles the tree, and every -OO worker its dependencies too.
.venv/bin/python -m compileall -q -j0 -o 0 -o 2 .venv/lib registryd twisted >/dev/null

.venv/bin/python -m mypy registryd
scripts/build-packages versions >/dev/null
# Three workers (pytest-xdist) by default, on two cores too: most tests wait on a subprocess
# (twistd, skopeo, containerd, Ceph). TEST_WORKERS=N to change, `-n 0` for one process.
# A module's tests stay in one worker, and everything on Ceph in one (tests/conftest.py).
.venv/bin/python -m pytest -n "${TEST_WORKERS:-3}" --dist loadgroup --no-loadscope-reorder "$@"
