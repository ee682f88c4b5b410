"""Admin subcommands that work on the data directory itself.

- ``layout``: the data directory as these commands read it (repositories,
  local and mirrored, their links, revisions, tags and referrers; blobs).
- ``inventory``: ``registryd ls``.
- ``fsck``: ``registryd fsck [--repair]``.
- ``progress``: a progress bar on stderr, only when it is a terminal.

They never need the server: they read files, and the only writes are
``fsck --repair``'s renames into ``quarantine/``. Problems that stop a
command raise AdminError (one line, exit status 3).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_DAMAGE = 1
EXIT_USAGE = 2
EXIT_ERROR = 3


class AdminError(Exception):
    """A problem that stops an admin command: one line, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


__all__ = ["AdminError", "EXIT_OK", "EXIT_DAMAGE", "EXIT_USAGE", "EXIT_ERROR"]
