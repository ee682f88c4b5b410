"""Edit an htpasswd file safely: add, update or delete one user.

Every other line (comments, other users, even entries registryd refuses)
is kept byte for byte. The new content goes to a temporary file in the same
directory, is fsynced and renamed over the old one, and the directory is
fsynced, so a crash leaves either the old or the new file, never half of
one. An existing file keeps its mode and, where permitted, its owner; a new
one is created with mode 0640. Concurrent edits of files in one directory
are serialised with a lock on the directory.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from typing import Iterator

import bcrypt

from registryd.auth.htpasswd import BCRYPT_MAX_PASSWORD, check_user_name, unsupported_scheme

NEW_FILE_MODE = 0o640
DEFAULT_COST = 10


class HtpasswdFileError(Exception):
    """The edit cannot be made; the message is one line."""


class HtpasswdFileUnusable(HtpasswdFileError):
    """The file or its directory is missing, or cannot be read or written (not the input's fault)."""


def hash_password(password: bytes, cost: int = DEFAULT_COST) -> str:
    """A bcrypt hash with the ``$2y$`` prefix ``htpasswd -B`` writes."""
    if not password:
        raise HtpasswdFileError("the password is empty")
    if len(password) > BCRYPT_MAX_PASSWORD:
        raise HtpasswdFileError(f"the password is longer than {BCRYPT_MAX_PASSWORD} bytes, bcrypt's limit")
    if not 4 <= cost <= 31:
        raise HtpasswdFileError(f"the bcrypt cost must be between 4 and 31, not {cost}")
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds=cost)).decode("ascii")
    # $2b$ and $2y$ are the same algorithm; $2y$ is what Apache tools expect.
    return "$2y$" + hashed[4:]


def _entry_user(line: bytes) -> bytes | None:
    stripped = line.strip()
    if not stripped or stripped.startswith(b"#") or b":" not in stripped:
        return None
    return stripped.split(b":", 1)[0]


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HtpasswdFileUnusable(f"cannot read {path}: {e.strerror}") from None


class _DirectoryLock:
    def __init__(self, directory: str) -> None:
        try:
            self._fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise HtpasswdFileUnusable(f"cannot open directory {directory}: {e.strerror}") from None
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _write_atomically(path: str, data: bytes, lock: _DirectoryLock) -> None:
    directory = os.path.dirname(path)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        current = None
    except OSError as e:
        raise HtpasswdFileUnusable(f"cannot stat {path}: {e.strerror}") from None
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    except OSError as e:
        raise HtpasswdFileUnusable(f"cannot write in {directory}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if current is not None:
                os.fchmod(f.fileno(), current.st_mode & 0o7777)
                try:
                    os.fchown(f.fileno(), current.st_uid, current.st_gid)
                except PermissionError:
                    pass
            else:
                os.fchmod(f.fileno(), NEW_FILE_MODE)
            os.fsync(f.fileno())
        os.rename(temporary, path)
        lock.fsync()
    except OSError as e:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise HtpasswdFileUnusable(f"cannot write {path}: {e.strerror}") from None


def _edit(path: str, user: str, new_line: bytes | None, must_exist: bool) -> tuple[str, bytes]:
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise HtpasswdFileUnusable(f"directory {directory} does not exist")
    lock = _DirectoryLock(directory)
    try:
        data = _read(target)
        if data is None and must_exist:
            raise HtpasswdFileUnusable(f"{path} does not exist")
        lines = (data or b"").splitlines(keepends=True)
        name = user.encode("utf-8")
        out: list[bytes] = []
        found = False
        for line in lines:
            if _entry_user(line) != name:
                out.append(line)
            elif not found:
                found = True
                if new_line is not None:
                    ending = line[len(line.rstrip(b"\r\n")):] or b"\n"
                    out.append(new_line + ending)
            # a later duplicate of the user is dropped: it would be ambiguous
        if not found:
            if new_line is None:
                raise HtpasswdFileError(f"user {user!r} is not in {path}")
            if out and not out[-1].endswith(b"\n"):
                out[-1] += b"\n"
            out.append(new_line + b"\n")
        result = b"".join(out)
        _write_atomically(target, result, lock)
    finally:
        lock.close()
    if new_line is None:
        return "deleted", result
    return ("updated" if found else "added"), result


def set_password(path: str, user: str, password: bytes, cost: int = DEFAULT_COST) -> str:
    """Add ``user`` or change their password; return "added" or "updated"."""
    problem = check_user_name(user)
    if problem:
        raise HtpasswdFileError(problem)
    line = f"{user}:{hash_password(password, cost)}".encode("utf-8")
    outcome, _ = _edit(path, user, line, must_exist=False)
    return outcome


def delete_user(path: str, user: str) -> None:
    """Remove ``user``; HtpasswdFileError if the file or the user is missing."""
    _edit(path, user, None, must_exist=True)


def refused_entries(path: str) -> Iterator[str]:
    """One message per line of ``path`` the server would refuse to load."""
    data = _read(path) or b""
    for number, line in enumerate(data.split(b"\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        user, sep, hashed = stripped.partition(b":")
        if not sep:
            yield f"line {number}: expected 'user:hash'"
            continue
        scheme = unsupported_scheme(hashed.decode("utf-8", "replace"))
        if scheme:
            yield f"line {number}: user {user.decode('utf-8', 'replace')!r} has {scheme}"
