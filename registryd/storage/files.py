"""Crash-safe file primitives: every write others may read is temp + fsync + rename.

These functions block; callers on the reactor run them in the IO pool.
"""
from __future__ import annotations

import os
import shutil
import uuid


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Tries to make a folder, or put a file in one, that concurrent deletes and collections keep
#: pruning (each of them loses one race).
PLACE_ATTEMPTS = 5


def make_dirs(path: str, durable: bool = True) -> None:
    """Create ``path`` and parents (``durable``: fsyncing each new entry's parent); again from the
    top when a concurrent delete or collection prunes a parent (it had emptied it) between two steps."""
    for attempt in range(PLACE_ATTEMPTS):
        try:
            _make_missing_dirs(path, durable)
            return
        except FileNotFoundError:
            if attempt == PLACE_ATTEMPTS - 1:
                raise


def _make_missing_dirs(path: str, durable: bool) -> None:
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        if durable:
            fsync_dir(os.path.dirname(directory))


def fsync_dir_if_there(path: str) -> None:
    """``fsync_dir``, for a folder a concurrent delete may have pruned since (it emptied it):
    then there is nothing left to make durable."""
    try:
        fsync_dir(path)
    except FileNotFoundError:
        pass


def write_atomic(tmp_dir: str, target: str, data: bytes, durable: bool = True) -> None:
    """Replace ``target`` with ``data``: readers see the old file or the new one."""
    tmp = os.path.join(tmp_dir, uuid.uuid4().hex)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove_file(tmp)  # a full disk must not leave empty files behind
        raise
    os.close(fd)
    try:
        rename_into(tmp, target, durable)
    except BaseException:
        remove_file(tmp)
        raise


def rename_into(source: str, target: str, durable: bool = True, exclusive: bool = False) -> bool:
    """Rename ``source`` to ``target``, making the target's folder first, and again if a
    concurrent delete or a garbage collection pruned that folder (it had emptied it) in
    between; ``durable``: fsync the folders made and the target's folder after.

    ``exclusive``: hard-link instead, only if ``target`` does not exist (False then; the
    caller removes ``source`` either way): one of two racing writers wins.
    """
    parent = os.path.dirname(target)
    for attempt in range(PLACE_ATTEMPTS):
        make_dirs(parent, durable)
        try:
            if exclusive:
                os.link(source, target)
            else:
                os.rename(source, target)
            break
        except FileExistsError:
            if not exclusive:
                raise
            return False
        except FileNotFoundError:
            if attempt == PLACE_ATTEMPTS - 1 or not os.path.lexists(source):
                raise
    if durable:
        fsync_dir_if_there(parent)
    return True


def read_small(path: str, limit: int = -1) -> bytes | None:
    """The whole of a small file (at most ``limit`` bytes), or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except (FileNotFoundError, NotADirectoryError):
        return None


def remove_file(path: str) -> bool:
    """Unlink ``path``; False if it was not there."""
    try:
        os.unlink(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def write_fully(fd: int, data: bytes) -> None:
    """os.write until every byte of ``data`` is in ``fd`` (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def free_bytes(root: str) -> int:
    """Bytes an unprivileged writer may still use on the disk of ``root`` (raises OSError)."""
    stats = os.statvfs(root)
    return stats.f_bavail * stats.f_frsize


def free_space_problem(root: str, min_free_bytes: int, purpose: str = "") -> str | None:
    """Why the disk of ``root`` has too little room (or cannot be asked), or None; for /readyz."""
    free = free_bytes(root)
    if free < min_free_bytes:
        return f"only {free} bytes free in the data directory{purpose} (below {min_free_bytes})"
    return None


def prove_writable(folder: str) -> None:
    """Write and remove a probe file in ``folder``, at start-up (raises OSError)."""
    probe = os.path.join(folder, f"probe-{uuid.uuid4().hex}")
    with open(probe, "wb") as f:
        f.write(b"registryd")
    os.unlink(probe)


def local_readiness_problem(tmp_dir: str, root: str, min_free_bytes: int) -> str | None:
    """Why the local data directory cannot take writes now, or None (cheap: for /readyz): a probe
    file in ``tmp_dir``, and the room left on the disk of ``root``."""
    probe = os.path.join(tmp_dir, f"ready-{uuid.uuid4().hex}")
    try:
        try:
            with open(probe, "wb") as f:
                f.write(b"ready")
        finally:
            remove_file(probe)  # also when the disk is full: no empty probe stays behind
        return free_space_problem(root, min_free_bytes)
    except OSError as e:
        return f"data directory is not writable: {e.strerror}"


def empty_dir(path: str) -> None:
    """Remove everything inside ``path`` (crash leftovers), keeping ``path`` itself."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)

