"""One exit-code table for every ``registryd`` subcommand (registryd/admin/exit_codes.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from registryd.admin.exit_codes import ExitCode, describe
from support.cli import run_main

REGISTRYD = os.path.join(os.path.dirname(sys.executable), "registryd")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([REGISTRYD, *args], capture_output=True, text=True, timeout=60, input=stdin)


def test_the_console_script_and_main_in_process_agree(tmp_path: Any) -> None:
    """The tests below call main() here; the installed command answers the same."""
    args = ("ls", "-d", " ")
    spawned, here = run(*args), run_main(*args)
    assert (spawned.returncode, spawned.stdout, spawned.stderr) == (here.returncode, here.stdout, here.stderr)
    assert spawned.returncode == ExitCode.ERROR


def test_help_and_readme_show_the_table() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert describe() in result.stdout
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    indented = "\n".join(("  " + line).rstrip() for line in describe().splitlines())
    assert indented in readme, "README.md does not show registryd/admin/exit_codes.py's table"


def missing_store_commands(missing: str) -> dict[str, tuple[str, ...]]:
    """Every subcommand, pointed at a data directory (for htpasswd: a file's directory) that is not there."""
    return {
        "ls": ("ls", "-d", missing),
        "fsck": ("fsck", "-d", missing),
        "gc": ("gc", "-d", missing),
        "prune": ("prune", "-d", missing, "--older-than", "1d"),
        "export": ("export", "-d", missing, "--image", "team/app:v1", "-o", os.path.dirname(os.path.dirname(missing)) + "/out.tar"),
        "import": ("import", "-d", missing, "-i", os.path.dirname(os.path.dirname(missing))),
        "preload": ("preload", "-d", missing, "--image", "docker.io/library/alpine:3"),
        "htpasswd": ("htpasswd", "--password-stdin", os.path.join(missing, "htpasswd"), "alice"),
    }


def test_a_missing_directory_is_the_same_status_for_every_command(tmp_path: Any) -> None:
    """It was 1 from htpasswd and 3 from ls (issue 14)."""
    missing = str(tmp_path / "nowhere" / "data")
    for name, args in missing_store_commands(missing).items():
        result = run(*args, stdin="pw\n")
        assert result.returncode == ExitCode.ERROR, (name, result.stderr)
        assert result.stderr.startswith(f"registryd {name}: ") and result.stderr.count("\n") == 1, result.stderr
        assert "does not exist" in result.stderr, result.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", ["ls", "fsck", "gc", "prune", "export", "import", "preload"])
def test_a_bad_config_value_and_a_bad_option_are_the_same_status_for_every_command(tmp_path: Any,
                                                                                   name: str) -> None:
    """A bad value in the file or on the command line (checked as the file's is): 3, one line naming it."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nio_threads = 0\n")
    args = list(missing_store_commands(str(tmp_path / "data"))[name])
    for where, message in ((["-c", str(bad)], f"config file {bad}: 'server.io_threads' must be greater than "
                                                f"zero, not 0"),
                           (["-d", " "], "'--data-dir' is empty")):
        args[1:3] = where
        result = run_main(*args)
        assert result.returncode == ExitCode.ERROR, result.stderr
        assert result.stderr == f"registryd {name}: {message}\n"
    assert run_main(name, "--no-such-option").returncode == ExitCode.USAGE
    assert os.listdir(tmp_path) == ["bad.toml"]
