"""The twistd plugin as an operator meets it: start-up, defaults, mistakes."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, VENV_BIN, free_port, start_twistd, stop_process, wait_for_port
from registryd import __version__
from registryd.tap import Options, makeService
from syncclient import request

TWISTD = os.path.join(VENV_BIN, "twistd")


def run_twistd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWISTD, "-n", "--pidfile=", "registryd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr + result.stdout).strip().splitlines()[-1]


def test_plugin_is_listed() -> None:
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert "registryd" in result.stdout


def test_options_parse_and_override() -> None:
    options = Options()
    options.parseOptions(["--listen", "tcp:1", "-l", "tcp:2", "--data-dir", "/x", "--config", "c.toml"])
    assert options["listen"] == ["tcp:1", "tcp:2"]
    assert options["data-dir"] == "/x"
    assert options["config"] == "c.toml"


def test_make_service_wires_config(tmp_path) -> None:
    options = Options()
    options.parseOptions(["--listen", "tcp:0", "--data-dir", str(tmp_path / "d")])
    service = makeService(options)
    assert service.config.listen == ("tcp:0",)
    assert os.path.isdir(tmp_path / "d" / "blobs")


def test_version() -> None:
    result = run_twistd("--version")
    assert result.stdout.strip() == f"registryd {__version__}"


def test_no_arguments_serves_on_port_5000() -> None:
    """`twistd -n registryd` alone: port 5000, default data dir, log on stdout."""
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", 5000)) != 0, "something already listens on port 5000"
    log = open(os.devnull, "wb")
    process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "registryd"], stdout=subprocess.PIPE,
                               stderr=log, cwd=ROOT)
    try:
        wait_for_port("127.0.0.1", 5000, process)
        response = request("127.0.0.1:5000", "GET", "/v2/")
        assert response.status == 200
        assert response.header("Docker-Distribution-API-Version") == "registry/2.0"
    finally:
        stop_process(process)
    output = process.stdout.read().decode()
    assert "registryd listening on" in output


@pytest.mark.parametrize("text, message", [
    ("foo = 1\n", "unknown key 'foo'"),
    ("[registry]\ndelete_enabled = 'no'\n", "'registry.delete_enabled' must be true or false"),
    ("listen = [\n", "is not valid TOML"),
])
def test_bad_config_stops_with_one_line(tmp_path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_twistd("--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert message in last_line(result)
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "d").exists()


def test_bad_command_line_value_stops_with_one_line(tmp_path) -> None:
    """--listen and --data-dir go through the checks of listen and data_dir in the file."""
    result = run_twistd("--listen", "", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert last_line(result) == "registryd: '--listen' is empty"
    assert not (tmp_path / "d").exists()


def test_port_in_use_stops_with_one_line(tmp_path) -> None:
    process, server = start_twistd(str(tmp_path / "a"))
    try:
        port = server.host.split(":")[1]
        result = run_twistd("--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path / "b"))
        assert result.returncode == 1
        assert f"cannot listen on tcp:{port}" in last_line(result)
        assert "Address already in use" in last_line(result)
        assert "Traceback" not in result.stderr + result.stdout
    finally:
        stop_process(process)


def test_bad_endpoint_stops_with_one_line(tmp_path) -> None:
    result = run_twistd("--listen", "bogus:1", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert "bad listen endpoint 'bogus:1'" in last_line(result)


def test_unwritable_data_dir_stops_with_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_twistd("--listen", f"tcp:{free_port()}", "--data-dir", str(blocker / "data"))
    assert result.returncode == 1
    assert f"data directory {blocker / 'data'} is not usable" in last_line(result)


def test_wheel_contains_the_plugin(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), ROOT], check=True, timeout=120, capture_output=True)
    (wheel,) = tmp_path.glob("registryd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/registryd_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    for init in pathlib.Path(ROOT, "registryd").rglob("__init__.py"):
        module = init.relative_to(ROOT).as_posix()
        assert module in names, f"{module} is missing from the wheel: list its package in setup.cfg"
