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

from registryd.storage.driver import Pool
from registryd.web.limits import RateLimitedLog, SessionQuota


def _owner_key(owner: str) -> str:
    return hashlib.blake2b(owner.encode(), digest_size=8).hexdigest()


class SharedSessionQuota(SessionQuota):
    """A SessionQuota whose counts are the node's (the ledger folder is shared by its workers).

    The ledger is listed, read and written in ``pool``, never on the reactor: a disk that
    throttles writes must not stall every request of the worker.
    """

    def __init__(self, directory: str, total: int, per_owner: int, alive: Callable[[str, str], bool],
                 warn: RateLimitedLog, pool: Pool | None = None) -> None:
        super().__init__(total, per_owner, alive, warn, pool)
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def _ledger(self) -> list[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []

    def _pending(self, owner: str | None = None) -> int:
        """Claims of this process not in the ledger yet (their POST is creating the session)."""
        return sum(1 for session, who in self._owner_of.items()
                   if not isinstance(session, tuple) and (owner is None or who == owner))

    def _count(self, owner_key: str) -> tuple[int, int]:
        """In the pool: the ledger's entries of one owner, and all of them (one listing)."""
        names = self._ledger()
        return sum(1 for name in names if name.startswith(owner_key + ".")), len(names)

    def _prune_ledger(self, owner_key: str | None) -> None:
        """In the pool: remove the entries (of one owner) whose session the store no longer has."""
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

    def _enter(self, name: str, repo: str) -> None:
        """In the pool: the ledger entry of a session that started."""
        with open(os.path.join(self.directory, name), "w") as f:
            f.write(repo)

    async def _open(self, owner: str) -> tuple[int, int]:
        owned, total = await self._pool.run(self._count, _owner_key(owner))
        return owned + self._pending(owner), total + self._pending()

    async def _prune(self, owner: str | None = None) -> None:
        await self._pool.run(self._prune_ledger, None if owner is None else _owner_key(owner))

    async def bind(self, ticket: object, repo: str, upload_id: str) -> None:
        # The claim counts until its entry is in the ledger, and goes even if the write fails.
        owner = self._owner_of.get(ticket)
        try:
            if owner is not None:
                await self._pool.run(self._enter, f"{_owner_key(owner)}.{upload_id}", repo)
        finally:
            self._drop(ticket)
