"""Shared fixtures: a registryd listening on a real loopback port."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from ceph import ceph_s3  # noqa: F401  (one Ceph for the whole session: defined here, not per module)
from registryd.config import Config
from registryd.service import RegistryService
from support.ports import free_port
from support.wait import wait_for_port

# Every test module's tier, in one place. A tier is what the tests need to run:
#   unit         parsers, state machines, the API in-process on a loopback port with
#                the fakes written here; no upstream registry, object store or client
#                tool (under a minute)
#   integration  real processes and longer runs: twistd restarts and signals, the
#                admin command, the reference registry (docker-registry) as an upstream,
#                the conformance matrix
#   s3           the session's one-node Ceph with radosgw (tests/ceph.py)
#   e2e          real clients: skopeo, podman, containerd, dockerd, HAProxy
#   packaging    builds and installs the Debian and RPM packages
#   bench        the benchmarks, in their quick mode
# A test whose fixtures start Ceph (ceph_s3), or a parameter marked s3, is in the
# s3 tier even in a unit or integration module. Run one tier with `-m TIER`
# (`./run-tests.sh -m unit`); `-m fast` is the unit tier under its old name.
TIERS: dict[str, frozenset[str]] = {
    "unit": frozenset({
        "test_blobs", "test_reuseport",
        "test_parsing", "test_config", "test_config_docs", "test_readme_snippets", "test_request",
        "test_auth_basic", "test_auth_htpasswd", "test_auth_policy", "test_auth_throttle", "test_auth_pool",
        "test_auth_proxies", "test_auth_challenge", "test_auth_admin", "test_mirror_units", "test_sendfile",
        "test_hostile_input", "test_local_prefixes", "test_push_by_digest", "test_upstream_hosts",
        "test_probes", "test_status_page", "test_observability", "test_security", "test_mirror_access",
        "test_deferreds", "test_layering", "test_globs", "test_driver_contract", "test_gc_units",
        "test_survey_driver", "test_fsck_driver", "test_retention_units", "test_retention_config",
        "test_sync_units", "test_uploads", "test_pools", "test_logs", "test_manifest_cache", "test_containerd_units",
        "test_body_writer", "test_upload_writer", "test_fill_writer", "test_node_view", "test_upstream_body",
        "test_memory_release", "test_node_limits", "test_shared_manifest", "test_page_templates", "test_tls_blobs",
        "test_store_contract", "test_hot_path", "test_upload_pace",
    }),
    "integration": frozenset({
        "test_auth_flood", "test_auth_tls", "test_cache_stale", "test_cli_export_import", "test_cli_fsck",
        "test_cli_exit_codes", "test_cli_gc", "test_cli_htpasswd", "test_cli_ls", "test_cli_preload", "test_cli_prune",
        "test_cli_retention",
        "test_conformance", "test_durability", "test_limits", "test_memory", "test_mirror", "test_prune_online", "test_shutdown", "test_twistd", "test_upkeep",
        "test_upstream_fixtures", "test_sync", "test_workers", "test_worker_balance", "test_web_ui", "test_workers_pages", "test_light_supervisor",
        "test_workers_shared",
    }),
    "s3": frozenset({
        "test_cli_fsck_s3", "test_s3_client", "test_s3_gc", "test_s3_hot_cache", "test_s3_outage",
        "test_s3_store", "test_s3_survey", "test_s3_uploads",
    }),
    "e2e": frozenset({
        "e2e/test_auth_clients", "e2e/test_containerd", "e2e/test_containerd_store", "e2e/test_dockerd",
        "e2e/test_scale_out", "e2e/test_skopeo", "e2e/test_skopeo_tls", "e2e/test_web_ui_browser",
        "e2e/test_workers_clients",
    }),
    "packaging": frozenset({"test_packaging"}),
    "bench": frozenset({"test_benchmarks"}),
}
TIER_ORDER = ("unit", "integration", "s3", "e2e", "packaging", "bench")   # a test is in its heaviest
HERE = os.path.dirname(os.path.abspath(__file__))


def _test_modules() -> set[str]:
    found = set()
    for directory, _, files in os.walk(HERE):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                found.add(os.path.relpath(os.path.join(directory, name[:-3]), HERE).replace(os.sep, "/"))
    return found


def module_name(path: Any) -> str:
    """``test_x`` or ``e2e/test_y``: the test module at ``path`` as TIERS names it."""
    return os.path.relpath(os.path.splitext(str(path))[0], HERE).replace(os.sep, "/")


def module_tier(path: Any) -> str:
    """The tier TIERS gives the test module at ``path``."""
    name = module_name(path)
    for tier, modules in TIERS.items():
        if name in modules:
            return tier
    raise pytest.UsageError(f"tests/{name}.py has no tier: add it to TIERS in tests/conftest.py")


def pytest_configure(config: Any) -> None:
    assert tuple(TIERS) == TIER_ORDER
    listed = [m for modules in TIERS.values() for m in modules]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    if twice:
        raise pytest.UsageError(f"TIERS names these modules in more than one tier: {', '.join(twice)}")
    present = _test_modules()
    missing = sorted(set(listed) - present)
    if missing:
        raise pytest.UsageError(f"TIERS names modules that do not exist: {', '.join(missing)}")
    untiered = sorted(present - set(listed))
    if untiered:
        raise pytest.UsageError(f"these test modules have no tier in TIERS (tests/conftest.py): {', '.join(untiered)}")


#: The order groups start in, longest first, so that two workers finish together: everything
#: on Ceph (one group: one Ceph), then the package builds, then the rest by tier.
_START_ORDER = ("ceph", "packaging", "e2e", "bench", "integration", "s3", "unit")


# tryfirst: pytest-xdist reads the xdist_group markers in its own collection hook (turning them
# into the "@group" suffix its scheduler splits on); ours must have added them by then.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    rank: dict[Any, int] = {}
    for item in items:
        tier = module_tier(item.path)
        needs_ceph = item.get_closest_marker("s3") is not None or "ceph_s3" in getattr(item, "fixturenames", ())
        if needs_ceph and TIER_ORDER.index(tier) < TIER_ORDER.index("s3"):
            tier = "s3"
        # A parameter marked e2e (the containerd store in the conformance matrix) needs a real daemon.
        if item.get_closest_marker("e2e") is not None and TIER_ORDER.index(tier) < TIER_ORDER.index("e2e"):
            tier = "e2e"
        marked = [t for t in TIER_ORDER if t != tier and item.get_closest_marker(t) is not None]
        if marked:
            raise pytest.UsageError(f"{item.nodeid} is marked {', '.join(marked)} but its tier is {tier}")
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "unit":
            item.add_marker(pytest.mark.fast)
        # With workers (pytest-xdist, --dist loadgroup): a module's tests stay together (its
        # fixtures start once), and every test needing Ceph runs in one worker (one Ceph).
        item.add_marker(pytest.mark.xdist_group("ceph" if needs_ceph else module_name(item.path)))
        rank[item] = _START_ORDER.index("ceph" if needs_ceph else tier)
    items.sort(key=rank.__getitem__)    # stable: a module's tests keep their order


def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Stops the run when pytest-xdist did not turn the groups into its "@group" node-id suffix.

    pytest 9.2 made node ids read-only to pytest-xdist 3.8, which then silently spread every
    module's tests (and two Ceph clusters) over both workers; this says so instead.
    """
    ungrouped = [nodeid for nodeid in ids if "@" not in nodeid.rpartition("]")[2]]
    if node.config.getoption("dist") == "loadgroup" and ungrouped:
        raise pytest.UsageError(f"pytest-xdist ignored the xdist_group of {ungrouped[0]} "
                                "(a pytest/pytest-xdist pair that does not fit: see setup.cfg)")


ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(sys.executable)
# Every registryd the tests start runs in one process unless its config says otherwise
# ([server] workers); tests/test_workers.py and one e2e test run several.
os.environ.setdefault("REGISTRYD_WORKERS", "1")


@attrs.define
class RunningRegistry:
    """A registryd the test talks to: its URL, host:port and data directory."""

    url: str
    host: str
    data_dir: str
    service: Any = None
    process: Any = None
    bucket: Any = None      # the S3Client of its bucket, with storage.driver = "s3"


def _start_in_process(config: Config) -> RegistryService:
    from twisted.internet import reactor

    service = RegistryService(config, reactor)
    service.prepare_storage()
    service.privilegedStartService()
    service.startService()
    return service


@pytest.fixture(scope="module")
def module_containerd() -> Iterator[Any]:
    """One private containerd (tests/e2e/containerd_daemon.py) for a module's containerd-store runs
    (the conformance matrix, the store contract): each test takes a namespace of its own in it."""
    from e2e.containerd_daemon import ContainerdDaemon
    from support.daemons import running_daemon

    with running_daemon(ContainerdDaemon, "ctrd-") as daemon:
        yield daemon


@pytest.fixture
def make_registry(tmp_path: Any) -> Iterator[Any]:
    """Factory: start an in-process registryd with Config overrides."""
    started: list[RegistryService] = []

    def make(**overrides: Any) -> RunningRegistry:
        settings: dict[str, Any] = {
            "listen": ("tcp:0:interface=127.0.0.1",),
            "data_dir": str(tmp_path / f"data{len(started)}"),
        }
        settings.update(overrides)
        service = _start_in_process(Config(**settings))
        started.append(service)
        port = service.ports[0].getHost().port
        host = f"127.0.0.1:{port}"
        return RunningRegistry(f"http://{host}", host, settings["data_dir"], service=service)

    yield make
    for service in started:
        pytest_twisted.blockon(service.stopService())


@pytest.fixture
def registry(make_registry: Any) -> RunningRegistry:
    """An in-process registryd with the default configuration."""
    return make_registry()


def start_twistd(data_dir: str, *extra: str, port: int | None = None) -> tuple[subprocess.Popen[Any], RunningRegistry]:
    """Run ``twistd -n registryd`` as its own process (restarts, RSS, CLI)."""
    port = port or free_port()
    cmd = [
        os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", data_dir, *extra,
    ]
    log = open(os.path.join(os.path.dirname(data_dir), f"twistd-{port}.log"), "ab")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for_port("127.0.0.1", port, process)
    host = f"127.0.0.1:{port}"
    return process, RunningRegistry(f"http://{host}", host, data_dir, process=process)


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def twistd_registry(tmp_path: Any) -> Iterator[RunningRegistry]:
    """registryd as a separate ``twistd -n registryd`` process."""
    process, running = start_twistd(str(tmp_path / "data"))
    yield running
    stop_process(process)


@pytest.fixture(autouse=True)
def fail_on_errors_in_twistd_logs(tmp_path: Any) -> Iterator[None]:
    """A registryd run as its own process must not log a traceback either."""
    yield
    for log_file in tmp_path.rglob("twistd-*.log"):
        text = log_file.read_text(errors="replace")
        if "Traceback" in text or "Unhandled error" in text:
            pytest.fail(f"{log_file} holds an error:\n{text[-4000:]}")


@pytest.fixture(autouse=True)
def fail_on_logged_errors() -> Iterator[None]:
    """Any unhandled error logged during a test fails that test."""
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    yield
    globalLogPublisher.removeObserver(observe)
    if errors:
        from twisted.logger import formatEvent

        details = []
        for event in errors:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            details.append(text)
        pytest.fail("errors were logged:\n" + "\n".join(details))
