"""Users from an htpasswd file, checked through twisted.cred.

Only bcrypt entries are accepted (``$2y$`` as ``htpasswd -B`` writes them,
``$2b$`` and ``$2a$``). Any other scheme -- Apache MD5 ``$apr1$``, ``{SHA}``,
crypt, plain text -- refuses the whole file with one line naming the file
and line, so a weak hash is never silently accepted. Blank lines and lines
starting with ``#`` are ignored, as Apache does.

bcrypt is slow on purpose, so each check runs in the injected thread pool,
and a success is remembered for ``cache_seconds`` (docker sends Basic
credentials with every request). The cache is keyed on the user and an HMAC
of the password under a key that lives only in this process; the password
itself is never stored. Concurrent checks of the same credentials share one
bcrypt run.

The file is re-read when it changes (device, inode, size, mtime or ctime
differ; looked at no more than once per ``stat_interval`` seconds, on the
request path) and on ``reload()`` (SIGHUP). A re-read that fails keeps the
users already loaded and logs the error once.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
from collections import OrderedDict
from typing import Any, Callable, Protocol, TypeVar

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import RESERVED_USER_NAMES
from registryd.deferreds import Coalescer

log = Logger()
T = TypeVar("T")

#: bcrypt reads no more than this many bytes of a password.
BCRYPT_MAX_PASSWORD = 72
_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_DES_CRYPT = re.compile(r"^[./0-9A-Za-z]{13}$")
_BAD_USER_CHARACTERS = re.compile(r"[\s\x00-\x1f\x7f]")


class HtpasswdError(AuthConfigError):
    """The htpasswd file cannot be used; one line naming file and line."""


class Pool(Protocol):
    """Where blocking work runs (registryd.threads.BlockingPool, InlinePool)."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


def unsupported_scheme(hashed: str) -> str | None:
    """None for a bcrypt hash registryd accepts, else the scheme's name."""
    match = _BCRYPT.match(hashed)
    if match:
        return None if 4 <= int(match.group(1)) <= 31 else "a bcrypt hash with an invalid cost"
    if not hashed:
        return "an empty hash"
    for prefix, name in (("$apr1$", "an Apache MD5 ($apr1$) hash"), ("{SHA}", "a SHA-1 ({SHA}) hash"),
                         ("$1$", "an MD5-crypt ($1$) hash"), ("$5$", "a SHA-256-crypt ($5$) hash"),
                         ("$6$", "a SHA-512-crypt ($6$) hash"), ("$y$", "a yescrypt ($y$) hash")):
        if hashed.startswith(prefix):
            return name
    if hashed.startswith("$2"):
        return "a malformed or unsupported bcrypt hash"
    if _DES_CRYPT.match(hashed):
        return "a DES crypt hash"
    return "a plain-text or unknown-scheme password"


def check_user_name(user: str) -> str | None:
    """None if ``user`` can be an htpasswd user, else why not."""
    if not user:
        return "the user name is empty"
    if ":" in user:
        return "a user name cannot contain ':'"
    if _BAD_USER_CHARACTERS.search(user):
        return "a user name cannot contain spaces or control characters"
    if user in RESERVED_USER_NAMES:
        return f"the user name {user!r} is reserved for access rules"
    return None


def parse_htpasswd(data: bytes, source: str) -> dict[str, bytes]:
    """Parse htpasswd ``data`` into ``{user: bcrypt hash}``.

    Raises HtpasswdError naming ``source`` and the line of the first problem.
    """
    users: dict[str, bytes] = {}
    first_seen: dict[str, int] = {}
    data = data.removeprefix(b"\xef\xbb\xbf")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"htpasswd file {source} line {number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise HtpasswdError(f"{where} is not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep:
            raise HtpasswdError(f"{where}: expected 'user:hash'")
        problem = check_user_name(user)
        if problem:
            raise HtpasswdError(f"{where}: {problem}")
        if user in first_seen:
            raise HtpasswdError(f"{where}: user {user!r} is already defined on line {first_seen[user]}")
        scheme = unsupported_scheme(hashed)
        if scheme:
            raise HtpasswdError(
                f"{where}: user {user!r} has {scheme}; registryd accepts bcrypt only "
                f"(set the password again with 'registryd htpasswd' or 'htpasswd -B')")
        users[user] = hashed.encode("ascii")
        first_seen[user] = number
    return users


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=32)
def _dummy_hash(cost: int) -> bytes:
    return bcrypt.hashpw(b"registryd: no such user", bcrypt.gensalt(rounds=cost))


def _verify(password: bytes, hashed: bytes | None, cost: int) -> bool:
    """Run in the pool: bcrypt, also for an unknown user (with a dummy hash
    of the usual cost) so timing does not tell which users exist."""
    # bcrypt only ever used the first 72 bytes; bcrypt 5 raises rather
    # than truncating, but hashes written by htpasswd -B are truncated.
    password = password[:BCRYPT_MAX_PASSWORD]
    if hashed is None:
        bcrypt.checkpw(password, _dummy_hash(cost))
        return False
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


def _orphaned_check(key: object, failure: Failure) -> None:
    log.failure("password check failed with nobody waiting", failure)


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """An ICredentialsChecker for IUsernamePassword over an htpasswd file.

    The file is read at construction; a missing, unreadable or invalid file
    raises HtpasswdError (one line) so start-up stops.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        path: str,
        pool: Pool,
        clock: IReactorTime,
        *,
        cache_seconds: float = 60.0,
        stat_interval: float = 1.0,
        cache_size: int = 10_000,
    ) -> None:
        self._path = path
        self._pool = pool
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._stat_interval = stat_interval
        self._cache_size = cache_size
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        # One bcrypt run per credentials at a time: a waiter that is cancelled (its client
        # went away) stops waiting; the check goes on for the others and for the cache.
        self._inflight: Coalescer[bool] = Coalescer(_orphaned_check)
        self._users: dict[str, bytes] = {}
        self._cost = 10
        self._loaded: tuple[int, ...] | None = None
        self._failed: tuple[int, ...] | str | None = None
        self._last_stat = float("-inf")
        self._load()

    @property
    def path(self) -> str:
        return self._path

    @property
    def users(self) -> frozenset[str]:
        """The user names currently loaded."""
        return frozenset(self._users)

    def _load(self) -> None:
        """Read and parse the file; replace the users only on success.

        A failure is remembered (by the file's signature, or the error for
        a file that cannot be opened) so ``refresh`` reports it only once.
        """
        try:
            with open(self._path, "rb") as f:
                signature = _signature(os.fstat(f.fileno()))
                data = f.read()
        except OSError as e:
            self._failed = f"cannot read htpasswd file {self._path}: {e.strerror}"
            raise HtpasswdError(self._failed) from None
        try:
            users = parse_htpasswd(data, self._path)
        except HtpasswdError:
            self._failed = signature
            raise
        costs = sorted(int(h[4:6]) for h in users.values())
        self._users = users
        self._cost = costs[len(costs) // 2] if costs else 10
        self._loaded = signature
        self._failed = None
        self._cache.clear()
        log.info("loaded {count} users from {path}", count=len(users), path=self._path)

    def reload(self) -> bool:
        """Re-read the file now (SIGHUP). On failure keep the users already
        loaded, log the error and return False."""
        self._last_stat = self._clock.seconds()
        try:
            self._load()
        except HtpasswdError as e:
            log.error("{error}; keeping the {count} users loaded before", error=str(e), count=len(self._users))
            return False
        return True

    def refresh(self) -> None:
        """Re-read the file if it changed since it was loaded.

        Called before every check, it stats the file at most once per
        ``stat_interval`` seconds; a failure is logged once per change.
        """
        now = self._clock.seconds()
        if now - self._last_stat < self._stat_interval:
            return
        self._last_stat = now
        try:
            current: tuple[int, ...] | str = _signature(os.stat(self._path))
        except OSError as e:
            current = f"cannot read htpasswd file {self._path}: {e.strerror}"
        if current != self._loaded and current != self._failed:
            self.reload()

    def _key(self, username: str, password: bytes) -> tuple[str, bytes]:
        return (username, hmac.new(self._cache_key, password, hashlib.sha256).digest())

    def _cached(self, key: tuple[str, bytes]) -> bool:
        expires = self._cache.get(key)
        if expires is None:
            return False
        if expires <= self._clock.seconds():
            del self._cache[key]
            return False
        return True

    def _remember(self, key: tuple[str, bytes]) -> None:
        if self._cache_seconds <= 0:
            return
        self._cache.pop(key, None)
        self._cache[key] = self._clock.seconds() + self._cache_seconds
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def known_good(self, username: str, password: bytes) -> bool:
        """Was this exact password verified for ``username`` within
        ``cache_seconds`` (and the file not changed since)? No bcrypt."""
        self.refresh()
        return self._cached(self._key(username, password))

    def token_key(self, username: str) -> bytes | None:
        """What ``username``'s bearer tokens are signed with: its line's hash
        (None for an unknown user). A changed password changes it."""
        self.refresh()
        return self._users.get(username)

    def checking(self, username: str, password: bytes) -> bool:
        """Is a check of exactly these credentials running now (one to join)?"""
        return self._inflight.running_for(self._key(username, password))

    async def check(self, username: str, password: str | bytes, rank: int = 0) -> bool:
        """True if ``password`` is ``username``'s password.

        ``rank`` orders the check in a ranked pool (BoundedPool): lower first.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        self.refresh()
        key = self._key(username, password)
        if self._cached(key):
            return True
        return await self._inflight.run(key, lambda: self._bcrypt(key, username, password, rank))

    async def _bcrypt(self, key: tuple[str, bytes], username: str, password: bytes, rank: int) -> bool:
        users = self._users
        run_ranked = getattr(self._pool, "run_ranked", None)
        if run_ranked is not None:
            ok = await run_ranked(rank, _verify, password, users.get(username), self._cost)
        else:
            ok = await self._pool.run(_verify, password, users.get(username), self._cost)
        # A reload while bcrypt ran may have changed this user: cache only
        # what the current file still says.
        if ok and self._users is users:
            self._remember(key)
        return ok

    async def authenticate(self, username: str, password: str | bytes, rank: int = 0) -> str:
        """Return ``username`` if the password is right, else raise
        UnauthorizedLogin (the same for an unknown user and a wrong password)."""
        if await self.check(username, password, rank):
            return username
        raise UnauthorizedLogin("wrong user name or password")

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        """twisted.cred: the avatar ID is the user name as UTF-8 bytes."""

        async def check() -> bytes | tuple[()]:
            raw: bytes | str = credentials.username
            try:
                username = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                raise UnauthorizedLogin("user name is not UTF-8") from None
            password: bytes | str = credentials.password
            return (await self.authenticate(username, password)).encode("utf-8")

        return Deferred.fromCoroutine(check())

