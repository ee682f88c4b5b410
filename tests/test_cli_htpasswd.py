"""``registryd htpasswd`` through its console script, as an operator runs it."""
from __future__ import annotations

import os
import pty
import select
import signal
import stat
import subprocess
import sys
import termios
import time
from typing import Any

import bcrypt
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from registryd.auth.htpasswd import HtpasswdChecker, parse_htpasswd
from registryd.threads import InlinePool
from support.cli import run_main

REGISTRYD = os.path.join(os.path.dirname(sys.executable), "registryd")


def run(*args: str, stdin: str | bytes | None = None) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run([REGISTRYD, "htpasswd", *args], input=data, capture_output=True, timeout=30)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def add(path: str, user: str, password: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("--password-stdin", "--cost", "4", *extra, path, user, stdin=password + "\n")


def apache_verifies(path: str, user: str, password: str) -> bool:
    """Apache's own htpasswd checks the entry (-v)."""
    return subprocess.run(["htpasswd", "-v", "-b", path, user, password], capture_output=True).returncode == 0


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_help() -> None:
    result = run("--help")
    assert result.returncode == 0
    for word in ("FILE", "USER", "--password-stdin", "--delete", "--cost", "bcrypt", "0640"):
        assert word in result.stdout
    listing = subprocess.run([REGISTRYD, "--help"], capture_output=True, text=True)
    assert "htpasswd" in listing.stdout


def test_create_file_and_add_user(tmp_path: Any) -> None:
    path = str(tmp_path / "htpasswd")
    result = add(path, "alice", "s3cret pass")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"added user alice to {path}\n" and result.stderr == ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    user, hashed = read(path).decode().rstrip("\n").split(":", 1)
    assert user == "alice" and hashed.startswith("$2y$04$")
    assert bcrypt.checkpw(b"s3cret pass", hashed.encode())
    assert apache_verifies(path, "alice", "s3cret pass")
    assert not apache_verifies(path, "alice", "wrong")
    assert sorted(os.listdir(tmp_path)) == ["htpasswd"], "no temporary file left behind"


def test_default_cost_is_10(tmp_path: Any) -> None:
    path = str(tmp_path / "htpasswd")
    assert run("--password-stdin", path, "alice", stdin="pw").returncode == 0
    assert read(path).startswith(b"alice:$2y$10$")


def test_update_keeps_every_other_line(tmp_path: Any) -> None:
    path = str(tmp_path / "htpasswd")
    md5 = subprocess.run(["htpasswd", "-n", "-b", "-m", "legacy", "x"], capture_output=True, text=True).stdout.strip()
    before = f"# team registry\r\nbob:{bcrypt.hashpw(b'b', bcrypt.gensalt(4)).decode()}\r\nalice:old\r\n{md5}\n\n"
    with open(path, "w", newline="") as f:
        f.write(before)
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
    result = add(path, "alice", "n3w")
    assert result.returncode == 0
    assert result.stdout == f"changed the password of user alice in {path}\n"
    # the MD5 entry is kept, with a warning that the server refuses the file
    assert result.stderr == (
        f"registryd htpasswd: warning: {path} line 4: user 'legacy' has an Apache MD5 ($apr1$) hash; "
        f"registryd refuses the file until it is bcrypt\n")
    after = read(path).decode()
    lines_before, lines_after = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(lines_after) == len(lines_before)
    for old, new in zip(lines_before, lines_after):
        if old.startswith("alice:"):
            assert new.startswith("alice:$2y$04$") and new.endswith("\r\n")
        else:
            assert new == old
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "an existing file keeps its mode"
    assert os.stat(path).st_ino != inode, "replaced by rename, not rewritten in place"
    assert apache_verifies(path, "alice", "n3w")


def test_append_to_file_without_final_newline(tmp_path: Any) -> None:
    path = str(tmp_path / "htpasswd")
    h = bcrypt.hashpw(b"b", bcrypt.gensalt(4)).decode()
    with open(path, "w") as f:
        f.write(f"bob:{h}")
    assert add(path, "alice", "a").returncode == 0
    users = parse_htpasswd(read(path), path)
    assert set(users) == {"bob", "alice"} and users["bob"] == h.encode()


def test_delete(tmp_path: Any) -> None:
    path = str(tmp_path / "htpasswd")
    add(path, "alice", "a")
    add(path, "bob", "b")
    result = run("--delete", path, "alice")
    assert result.returncode == 0 and result.stdout == f"deleted user alice from {path}\n"
    assert set(parse_htpasswd(read(path), path)) == {"bob"}
    again = run("-D", path, "alice")
    assert again.returncode == 1
    assert again.stderr == f"registryd htpasswd: user 'alice' is not in {path}\n"
    missing = run("-D", str(tmp_path / "nope"), "alice")
    assert missing.returncode == 3   # the exit-code table: a missing file or directory is 3, as for ls
    assert missing.stderr == f"registryd htpasswd: {tmp_path / 'nope'} does not exist\n"


def test_symlink_edits_the_target(tmp_path: Any) -> None:
    target = tmp_path / "real"
    os.mkdir(target)
    link = str(tmp_path / "htpasswd")
    add(str(target / "htpasswd"), "bob", "b")
    os.symlink(target / "htpasswd", link)
    assert add(link, "alice", "a").returncode == 0
    assert os.path.islink(link)
    assert set(parse_htpasswd(read(str(target / "htpasswd")), "x")) == {"bob", "alice"}


@pytest.mark.parametrize("args,stdin,status,message", [
    (("F", "a:b"), "pw\n", 2, "a user name cannot contain ':'"),
    (("F", "anonymous"), "pw\n", 2, "the user name 'anonymous' is reserved for access rules"),
    (("F", "a b"), "pw\n", 2, "a user name cannot contain spaces or control characters"),
    (("F", "alice"), "\n", 1, "the password is empty"),
    (("F", "alice"), "x" * 73 + "\n", 1, "the password is longer than 72 bytes, bcrypt's limit"),
    (("F", "alice"), "a\0b\n", 1, "the password contains a NUL byte"),
    (("--cost", "3", "F", "alice"), "pw\n", 2, "--cost must be between 4 and 31, not 3"),
    (("NODIR/htpasswd", "alice"), "pw\n", 3, "directory NODIR does not exist"),   # 3 as for ls
])
def test_errors(tmp_path: Any, args: tuple[str, ...], stdin: str, status: int, message: str) -> None:
    args = tuple(a.replace("F", str(tmp_path / "htpasswd")).replace("NODIR", str(tmp_path / "nodir"))
                 for a in args)
    result = run_main("htpasswd", "--password-stdin", *args, stdin=stdin)
    assert result.returncode == status
    assert result.stderr == f"registryd htpasswd: {message.replace('NODIR', str(tmp_path / 'nodir'))}\n"
    assert not os.path.exists(tmp_path / "htpasswd")


def test_no_terminal_and_no_password_stdin(tmp_path: Any) -> None:
    result = run_main("htpasswd", str(tmp_path / "htpasswd"), "alice", stdin="pw\n")
    assert result.returncode == 2
    assert result.stderr == "registryd htpasswd: standard input is not a terminal; use --password-stdin\n"


def test_usage_errors() -> None:
    result = run_main("htpasswd", "--delete", "--password-stdin", "F", "alice")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert run_main("htpasswd", "onlyfile").returncode == 2


def on_terminal(args: list[str], answers: list[bytes]) -> tuple[int, bytes]:
    """Run the console script on a pseudo-terminal, typing ``answers`` at the prompts."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(REGISTRYD, [REGISTRYD, *args])
    output = b""
    deadline = time.monotonic() + 20
    pending = list(answers)
    try:
        while time.monotonic() < deadline:
            if pending and output.rstrip().endswith(b":"):
                # Type only once getpass has turned echo off: what is typed
                # before that is flushed when it switches the terminal mode.
                if termios.tcgetattr(fd)[3] & termios.ECHO:
                    time.sleep(0.01)
                    continue
                os.write(fd, pending.pop(0) + b"\n")
                output += b"\n"
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output


def test_prompts_twice_on_a_terminal(tmp_path: Any) -> None:
    path = str(tmp_path / "htpasswd")
    status, output = on_terminal(["htpasswd", "--cost", "4", path, "alice"], [b"t3rminal", b"t3rminal"])
    assert status == 0, output
    assert b"New password:" in output and b"Re-type new password:" in output
    assert b"t3rminal" not in output, "the password is not echoed"
    assert apache_verifies(path, "alice", "t3rminal")
    status, output = on_terminal(["htpasswd", "--cost", "4", path, "alice"], [b"one", b"two"])
    assert status == 1
    assert b"the passwords do not match" in output
    assert apache_verifies(path, "alice", "t3rminal")


def test_running_checker_picks_up_the_edit(tmp_path: Any) -> None:
    path = str(tmp_path / "htpasswd")
    add(path, "alice", "first")
    clock = Clock()
    checker = HtpasswdChecker(path, InlinePool(), clock)

    def check(user: str, password: str) -> bool:
        results: list[Any] = []
        Deferred.fromCoroutine(checker.check(user, password)).addBoth(results.append)
        return bool(results[0])

    assert check("alice", "first")
    add(path, "alice", "second")
    add(path, "bob", "b")
    clock.advance(1)
    assert check("alice", "second") and not check("alice", "first") and check("bob", "b")
    run("-D", path, "bob")
    clock.advance(1)
    assert not check("bob", "b")
