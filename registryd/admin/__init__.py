"""Admin subcommands: ls, fsck, gc, prune, retention, preload, export, import.

- ``store_access``: the configured store (the data directory, or the S3
  bucket of ``[storage] driver = "s3"``) opened through the storage
  interface, as the server opens it; ls, prune, preload, export and import
  work through it on either driver. Also the ``--config``/``--data-dir``
  options and the context managers that turn I/O and store errors into one
  line. fsck and gc work on the store's driver (``store.objects``), so on
  a data directory and a bucket alike.
- ``remote``: ``--url``, for commands that ask a running server to do the work.
- ``progress``: a progress bar on stderr, only when it is a terminal.

Problems that stop a command raise AdminError (one line, exit status 3);
every status comes from the one table, ``exit_codes``.
"""
from __future__ import annotations

from registryd.admin.exit_codes import EXIT_DAMAGE, EXIT_ERROR, EXIT_OK, EXIT_USAGE, ExitCode


class AdminError(Exception):
    """A problem that stops an admin command: one line, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


__all__ = ["AdminError", "ExitCode", "EXIT_OK", "EXIT_DAMAGE", "EXIT_USAGE", "EXIT_ERROR"]
