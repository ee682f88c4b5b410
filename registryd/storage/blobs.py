"""Immutable, content-addressed blobs shared by every repository.

``blobs/<alg>/<first 2 hex>/<hex>`` — no extension, so nothing maps a name to
a Content-Encoding.
"""
from __future__ import annotations

import os
from typing import BinaryIO

from registryd.digest import Digest
from registryd.storage.guard import BlobGuard
from registryd.storage.files import read_small, remove_file, rename_into, write_atomic


class BlobStore:
    """Where verified blob content lives; files here are never modified."""

    def __init__(self, root: str, tmp_dir: str, guard: BlobGuard | None = None) -> None:
        self.root = root
        self._tmp = tmp_dir
        self.guard = guard or BlobGuard()

    def path(self, digest: Digest) -> str:
        return os.path.join(self.root, digest.algorithm, digest.hex[:2], digest.hex)

    def size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.path(digest)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, digest: Digest) -> bool:
        return os.path.isfile(self.path(digest))

    def open(self, digest: Digest) -> BinaryIO | None:
        try:
            return open(self.path(digest), "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read(self, digest: Digest) -> bytes | None:
        return read_small(self.path(digest))

    def commit_file(self, source: str, digest: Digest) -> None:
        """Move a verified file into place (blocking: fsync and rename).

        Two uploads of the same content both succeed: the second rename
        replaces identical bytes, so one copy remains.
        """
        self.guard.claim([digest])
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        rename_into(source, self.path(digest))

    def put(self, digest: Digest, data: bytes) -> None:
        """Store small verified content such as a manifest (blocking)."""
        self.guard.claim([digest])
        if not self.exists(digest):
            write_atomic(self._tmp, self.path(digest), data)

    def remove(self, digest: Digest) -> bool:
        return remove_file(self.path(digest))
