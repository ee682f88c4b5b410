"""The supervisor of a multi-worker node is light (issue 15: memory): it checks the config, the
credentials, the htpasswd file and the store as one process does, and binds the listeners,
without importing or building what the workers serve with (the web stack, the mirror, the pools).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from conftest import ROOT, VENV_BIN
from support.ports import free_port

#: What only a worker needs: none of it in the supervisor.
WORKERS_ONLY = ("klein", "jinja2", "treq", "registryd.service", "registryd.web.app", "registryd.mirror.cache",
                "registryd.sync.scheduler", "registryd.upkeep.scheduler", "registryd.web.site", "prometheus_client")

PROBE = """
import json, sys
from registryd.tap import Options, makeService
options = Options()
options.parseOptions(["--config", sys.argv[1]])
service = makeService(options)
print(json.dumps([type(service).__name__, [m for m in sys.argv[2:] if m in sys.modules]]))
"""


def _config(tmp_path: Any, extra: str = "", workers: int = 2) -> str:
    config = tmp_path / "registryd.toml"
    config.write_text(f'listen = ["tcp:{free_port()}:interface=127.0.0.1"]\ndata_dir = "{tmp_path / "data"}"\n'
                      f"{extra}[server]\nworkers = {workers}\n")
    return str(config)


def _built(config: str, modules: tuple[str, ...]) -> tuple[str, list[str]]:
    """The kind of service ``makeService`` builds from ``config``, and which of ``modules`` it loaded."""
    result = subprocess.run([sys.executable, "-c", PROBE, config, *modules],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    kind, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    return kind, loaded


def _twistd(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd", "-c", config],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_supervisor_is_built_without_what_the_workers_serve_with(tmp_path: Any) -> None:
    kind, loaded = _built(_config(tmp_path), WORKERS_ONLY)
    assert kind == "Supervisor"
    assert loaded == []
    assert (tmp_path / "data" / "tmp").is_dir(), "the store was not prepared"


def test_one_process_still_builds_the_whole_service(tmp_path: Any) -> None:
    kind, loaded = _built(_config(tmp_path, workers=1), WORKERS_ONLY)
    assert kind == "TwistdRegistryService"
    assert "registryd.web.app" in loaded


#: What a worker loads only on demand: the UI's templates at a first page, the sync jobs' code
#: only with [[sync]] jobs (issue 15: each worker <= 60 MiB RSS idle).
ON_DEMAND = ("jinja2", "registryd.sync.scheduler", "registryd.sync.job")


def test_a_worker_is_built_without_jinja2_or_the_sync_jobs_code(tmp_path: Any) -> None:
    kind, loaded = _built(_config(tmp_path, workers=1), ON_DEMAND)
    assert kind == "TwistdRegistryService"
    assert loaded == []


def test_a_worker_with_sync_jobs_builds_their_scheduler(tmp_path: Any) -> None:
    extra = ('[[upstream]]\nnamespace = "up.test"\nurl = "http://127.0.0.1:1"\n'
             '[[sync]]\nname = "base"\nupstream = "up.test"\nrepositories = ["library/alpine"]\n')
    kind, loaded = _built(_config(tmp_path, extra, workers=1), ON_DEMAND)
    assert "registryd.sync.scheduler" in loaded and "jinja2" not in loaded


def test_a_bad_htpasswd_file_stops_the_supervisor_with_one_line_before_any_worker(tmp_path: Any) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:{SHA}not-bcrypt\n")
    result = _twistd(_config(tmp_path, f'[auth]\nhtpasswd = "{htpasswd}"\n'))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert "registryd: " in last and str(htpasswd) in last, output
    assert "started worker" not in output


def test_a_data_dir_that_cannot_be_used_stops_the_supervisor_with_one_line(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "registryd.toml"
    config.write_text(f'listen = ["tcp:{free_port()}:interface=127.0.0.1"]\ndata_dir = "{blocker / "data"}"\n'
                      "[server]\nworkers = 2\n")
    result = _twistd(str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert f"registryd: data directory {blocker / 'data'} is not usable" in output.strip().splitlines()[-1]
    assert "started worker" not in output


def test_a_worker_runs_twistd_offering_only_the_registryd_plugin() -> None:
    """twistd's entry point would import every plugin it finds (conch, mail, words...) in every worker."""
    from registryd.supervisor import worker_command

    command = worker_command(["twistd", "-n", "registryd", "-c", "x.toml"])
    result = subprocess.run([*command[:command.index("-n")], "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:", 1)[1].split()
    assert commands[0] == "registryd"
    assert "conch" not in commands and "web" not in commands
