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


def make_dirs(path: str) -> None:
    """Create ``path`` and parents, fsyncing each new entry's parent."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        fsync_dir(os.path.dirname(directory))


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
    parent = os.path.dirname(target)
    try:
        rename_into(tmp, target, durable)
    except BaseException:
        remove_file(tmp)
        raise
    if durable:
        fsync_dir(parent)


def rename_into(source: str, target: str, durable: bool = True) -> None:
    """Rename ``source`` to ``target``, making the target's folder first, and again if a
    garbage collection removed that folder (it had emptied it) in between."""
    parent = os.path.dirname(target)
    for attempt in range(5):
        if durable:
            make_dirs(parent)
        else:
            os.makedirs(parent, exist_ok=True)
        try:
            os.rename(source, target)
            return
        except FileNotFoundError:
            if attempt == 4 or not os.path.lexists(source):
                raise


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


def empty_dir(path: str) -> None:
    """Remove everything inside ``path`` (crash leftovers), keeping ``path`` itself."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def unlink_durably(path: str) -> bool:
    """Unlink ``path`` and make the removal durable; False if it was not there."""
    if not remove_file(path):
        return False
    fsync_dir(os.path.dirname(path))
    return True


def mtime_of(path: str) -> float | None:
    """The modification time of ``path`` itself, or None if it is gone."""
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None

