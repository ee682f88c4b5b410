"""Upload-session limits counted per node, over its worker processes (registryd.web.limits).

``SessionQuota`` counts the sessions this process started. The workers of a
node keep one ledger instead: a file per open session under
``<data_dir>/run/sessions/`` (``<owner hash>.<upload id>``, holding the
repository), written when a session starts in any worker. A session's end
(a commit, a cancel, the reaper; in any worker) is noticed as in one
process, only when a limit is reached: each entry of the owner (or every
entry, for ``max_sessions``) is checked against the store, and the ended
ones go before the limit is judged again. So a limit refuses only sessions
the store still has, whichever worker started them.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

from registryd.web.limits import RateLimitedLog, SessionQuota


def _owner_key(owner: str) -> str:
    return hashlib.blake2b(owner.encode(), digest_size=8).hexdigest()


class SharedSessionQuota(SessionQuota):
    """A SessionQuota whose counts are the node's (the ledger folder is shared by its workers)."""

    def __init__(self, directory: str, total: int, per_owner: int, alive: Callable[[str, str], bool],
                 warn: RateLimitedLog) -> None:
        super().__init__(total, per_owner, alive, warn)
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def _ledger(self) -> list[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []

    def _pending(self, owner: str | None = None) -> int:
        """Claims of this process not bound to a session yet (their POST is creating it)."""
        return sum(1 for session, who in self._owner_of.items()
                   if not isinstance(session, tuple) and (owner is None or who == owner))

    def _count(self, owner_key: str | None) -> int:
        names = self._ledger()
        if owner_key is None:
            return len(names)
        return sum(1 for name in names if name.startswith(owner_key + "."))

    def _prune_ledger(self, owner_key: str | None) -> None:
        for name in self._ledger():
            if owner_key is not None and not name.startswith(owner_key + "."):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path) as f:
                    repo = f.read()
            except FileNotFoundError:
                continue
            upload_id = name.partition(".")[2]
            if not self._alive(repo, upload_id):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _open(self, owner: str | None) -> int:
        return self._count(None if owner is None else _owner_key(owner)) + self._pending(owner)

    def _prune(self, owner: str | None = None) -> None:
        self._prune_ledger(None if owner is None else _owner_key(owner))

    def bind(self, ticket: object, repo: str, upload_id: str) -> None:
        owner = self._owner_of.get(ticket)
        self._drop(ticket)
        if owner is not None:
            path = os.path.join(self.directory, f"{_owner_key(owner)}.{upload_id}")
            with open(path, "w") as f:
                f.write(repo)

