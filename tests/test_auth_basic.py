"""Basic credentials of one request through throttle and checker; [auth] settings."""
from __future__ import annotations

from base64 import b64encode
from typing import Any

import bcrypt
import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from registryd.auth.basic import AuthenticationFailed, BasicAuthenticator, parse_basic
from registryd.auth.errors import AuthConfigError
from registryd.auth.htpasswd import HtpasswdChecker, HtpasswdError
from registryd.auth.policy import Verdict, parse_access_rules
from registryd.auth.settings import AuthSettings, build_auth, parse_auth_table
from registryd.auth.throttle import Throttle
from registryd.threads import InlinePool


def basic(user: str, password: str) -> bytes:
    return b"Basic " + b64encode(f"{user}:{password}".encode())


@pytest.fixture
def path(tmp_path: Any) -> str:
    p = str(tmp_path / "htpasswd")
    with open(p, "w") as f:
        f.write("alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode() + "\n")
    return p


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(path: str, clock: Clock) -> BasicAuthenticator:
    checker = HtpasswdChecker(path, InlinePool(), clock)
    return BasicAuthenticator(checker, Throttle(clock, free_failures=2, max_delay=4), clock)


def start(auth: BasicAuthenticator, header: Any, address: str = "10.0.0.1") -> Deferred[Any]:
    return Deferred.fromCoroutine(auth.authenticate(address, header))


def settled(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "still waiting"
    return results[0]


def test_parse_basic() -> None:
    assert parse_basic(basic("alice", "pa:ss word")) == ("alice", b"pa:ss word")
    assert parse_basic("basic " + b64encode(b"bob:").decode()) == ("bob", b"")
    for header in (b"Bearer abc", b"Basic !!!", b"Basic " + b64encode(b"nocolon"), b"Basic " + b64encode(b":pw"),
                   b"Basic " + b64encode(b"\xff:pw"), b"Basic"):
        with pytest.raises(AuthenticationFailed):
            parse_basic(header)


def test_no_credentials_is_anonymous(auth: BasicAuthenticator) -> None:
    assert settled(start(auth, None)) is None
    assert settled(start(auth, b"")) is None


def test_good_and_bad_credentials(auth: BasicAuthenticator) -> None:
    assert settled(start(auth, basic("alice", "s3cret"))) == "alice"
    for header in (basic("alice", "wrong"), basic("nobody", "s3cret"), b"Bearer xyz"):
        result = settled(start(auth, header, address="10.9.9.9"))
        assert isinstance(result, Failure) and result.check(AuthenticationFailed)
    assert auth.challenge == 'Basic realm="registryd"'


def test_repeated_failures_wait_on_the_clock(auth: BasicAuthenticator, clock: Clock) -> None:
    for _ in range(3):
        settled(start(auth, basic("alice", "wrong"))).trap(AuthenticationFailed)
    # third failure: 1 s backoff; the right password has to wait it out too
    d = start(auth, basic("alice", "s3cret"))
    assert not d.called
    clock.advance(0.9)
    assert not d.called
    clock.advance(0.1)
    assert settled(d) == "alice"
    # success reset the address
    assert settled(start(auth, basic("alice", "s3cret"))) == "alice"
    # another address is not slowed by this one
    for _ in range(5):
        start(auth, basic("alice", "wrong")).addErrback(lambda f: f.trap(AuthenticationFailed))
        clock.advance(10)
    assert settled(start(auth, basic("alice", "s3cret"), address="10.0.0.2")) == "alice"


def test_cancelled_wait(auth: BasicAuthenticator, clock: Clock) -> None:
    for _ in range(3):
        settled(start(auth, basic("alice", "wrong"))).trap(AuthenticationFailed)
    d = start(auth, basic("alice", "s3cret"))
    d.cancel()
    settled(d).trap(CancelledError)
    assert not clock.getDelayedCalls()


def test_authentication_off_ignores_headers(clock: Clock) -> None:
    auth = BasicAuthenticator(None, Throttle(clock), clock)
    assert not auth.enabled
    assert settled(start(auth, basic("alice", "whatever"))) is None


def test_realm_must_be_quotable(clock: Clock) -> None:
    with pytest.raises(ValueError):
        BasicAuthenticator(None, Throttle(clock), clock, realm='a"b')


def test_parse_auth_table() -> None:
    assert parse_auth_table({}) == AuthSettings()
    settings = parse_auth_table({"htpasswd": "/etc/registryd/htpasswd", "realm": "r", "cache_seconds": 0,
                                 "admin_users": ["root", "*"], "failures_before_delay": 5, "max_delay": 60})
    assert settings == AuthSettings("/etc/registryd/htpasswd", "r", 0, ("root", "*"), 5, 60)
    assert parse_auth_table({"admin_users": []}).admin_users == ()


@pytest.mark.parametrize("table,message", [
    ({"htpasswd_file": "x"}, "unknown key 'auth.htpasswd_file'"),
    ({"htpasswd": 1}, "'auth.htpasswd' must be a string, not int 1"),
    ({"cache_seconds": True}, "'auth.cache_seconds' must be an integer, not bool True"),
    ({"cache_seconds": -1}, "'auth.cache_seconds' must not be negative, not -1"),
    ({"max_delay": 0}, "'auth.max_delay' must be greater than zero, not 0"),
    ({"realm": 'a"b'}, "'auth.realm' cannot hold quotes, backslashes or control characters"),
    ({"htpasswd": " "}, "'auth.htpasswd' is empty"),
    ({"admin_users": ["a:b"]}, "'auth.admin_users' has an invalid user name 'a:b'"),
])
def test_parse_auth_table_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(AuthConfigError) as e:
        parse_auth_table(table)
    assert str(e.value) == message


def test_build_auth(path: str, clock: Clock) -> None:
    rules = parse_access_rules([{"users": ["anonymous", "*"], "repositories": ["**"], "actions": ["pull"]}])
    built = build_auth(AuthSettings(htpasswd=path, admin_users=("alice",)), rules, InlinePool(), clock,
                       is_mirrored=lambda name: name.startswith("docker.io/"))
    assert built.authenticator.enabled
    assert settled(start(built.authenticator, basic("alice", "s3cret"))) == "alice"
    assert built.policy.verdict(None, "x", "pull") is Verdict.ALLOW
    assert built.policy.verdict(None, "x", "push") is Verdict.AUTHENTICATE
    assert built.policy.is_admin("alice")
    assert not built.policy.allows("alice", "docker.io/library/alpine", "push")
    built.reload()

    open_node = build_auth(AuthSettings(), (), InlinePool(), clock)
    assert not open_node.authenticator.enabled and open_node.checker is None
    assert open_node.policy.allows(None, "x", "delete")
    open_node.reload()

    with pytest.raises(HtpasswdError):
        build_auth(AuthSettings(htpasswd=path + ".missing"), (), InlinePool(), clock)


# --- anonymous forms, bearer tokens, the cache, limits -------------------------

def test_empty_basic_and_the_anonymous_token_are_anonymous(auth: BasicAuthenticator) -> None:
    """containers/image sends ``Basic Og==`` (":") when it has no credentials."""
    assert settled(start(auth, b"Basic " + b64encode(b":"))) is None
    assert settled(start(auth, b"Bearer anonymous")) is None


def test_bearer_tokens_are_signed_expiring_and_carry_no_password(auth: BasicAuthenticator, path: str,
                                                                  clock: Clock) -> None:
    from registryd.auth import tokens

    key = auth.token_key("alice")
    token = tokens.issue("alice", key, clock.seconds())
    assert "s3cret" not in token and b64encode(b"s3cret").decode().rstrip("=") not in token
    assert settled(start(auth, f"Bearer {token}")) == "alice"
    forged = [tokens.issue("alice", b"guessed key", clock.seconds()),
              tokens.issue("bob", key, clock.seconds()),          # alice's key, another user
              token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
              "rd2.", "rd2.YWxpY2U.1.x", "rd1.YWxpY2U6czNjcmV0", "something-else"]
    for bad in forged:
        settled(start(auth, f"Bearer {bad}", address="10.7.7.7")).trap(AuthenticationFailed)
    # it expires (after its lifetime and a grace for requests in flight)
    clock.advance(tokens.TOKEN_LIFETIME + tokens.TOKEN_GRACE + 1)
    settled(start(auth, f"Bearer {token}")).trap(AuthenticationFailed)
    # a changed password stops the tokens signed before it at once
    fresh = tokens.issue("alice", auth.token_key("alice"), clock.seconds())
    assert settled(start(auth, f"Bearer {fresh}")) == "alice"
    with open(path, "w") as f:
        f.write("alice:" + bcrypt.hashpw(b"changed", bcrypt.gensalt(4)).decode() + "\n")
    clock.advance(5)
    settled(start(auth, f"Bearer {fresh}")).trap(AuthenticationFailed)
    assert tokens.realm(True, "registry.example:5443") == "https://registry.example:5443/v2/token"
    assert tokens.realm(False, "[::1]:5000") == "http://[::1]:5000/v2/token"
    for host in (None, "", 'evil"host', "a b", "host/path"):
        assert tokens.realm(False, host) is None


class CountingChecker:
    """A checker whose checks wait until released: to see what runs at once."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[None]] = []
        self.good: set[tuple[str, bytes]] = set()
        self.ranks: list[int] = []

    def known_good(self, username: str, password: bytes) -> bool:
        return (username, password) in self.good

    def checking(self, username: str, password: bytes) -> bool:
        return False

    async def authenticate(self, username: str, password: str | bytes, rank: int = 0) -> str:
        self.ranks.append(rank)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        await d
        raise UnauthorizedLogin("wrong")


def test_concurrent_checks_per_address_and_cached_passwords(clock: Clock) -> None:
    from registryd.auth.basic import TooManyChecks

    checker = CountingChecker()
    throttle = Throttle(clock, free_failures=0, max_concurrent=2)
    auth = BasicAuthenticator(checker, throttle, clock)
    first = [start(auth, basic("alice", f"guess{i}")) for i in range(2)]
    third = settled(start(auth, basic("alice", "guess3")))
    assert isinstance(third, Failure) and third.check(TooManyChecks)
    assert throttle.failures("10.0.0.1") == 1          # the refusal counts against the address
    # a password known good from the cache: no wait, no check slot, no bcrypt
    checker.good.add(("bob", b"right"))
    assert settled(start(auth, basic("bob", "right"))) == "bob"
    for d in checker.waiting:
        d.callback(None)
    for d in first:
        settled(d).trap(AuthenticationFailed)
    assert checker.ranks == [0, 0]
    # the address now has failures: its next check ranks behind clean addresses
    clock.advance(100)
    start(auth, basic("alice", "guess4")).addErrback(lambda f: None)
    assert checker.ranks[-1] == 1
    start(auth, basic("carol", "x"), address="10.0.0.9").addErrback(lambda f: None)
    assert checker.ranks[-1] == 0


def test_a_full_check_queue_is_too_many_checks(clock: Clock) -> None:
    from registryd.auth.basic import TooManyChecks
    from registryd.threads import PoolBusy

    class BusyChecker(CountingChecker):
        async def authenticate(self, username: str, password: str | bytes, rank: int = 0) -> str:
            raise PoolBusy("full")

    auth = BasicAuthenticator(BusyChecker(), Throttle(clock), clock)
    settled(start(auth, basic("alice", "x"))).trap(TooManyChecks)


def test_identical_credentials_at_once_share_one_check(path: str, clock: Clock) -> None:
    """docker uploads layers in parallel, each request with the same new
    credentials: they join one check instead of hitting the per-address limit."""
    from registryd.threads import BoundedPool

    class Gated(BoundedPool):
        """Runs nothing until released, like a busy bcrypt thread."""

        def __init__(self) -> None:
            self.calls: list[Deferred[None]] = []

        async def run_ranked(self, rank: int, fn: Any, *args: Any) -> Any:
            d: Deferred[None] = Deferred()
            self.calls.append(d)
            await d
            return fn(*args)

    pool = Gated()
    checker = HtpasswdChecker(path, pool, clock)
    auth = BasicAuthenticator(checker, Throttle(clock, max_concurrent=1), clock)
    started = [start(auth, basic("alice", "s3cret")) for _ in range(4)]
    assert len(pool.calls) == 1
    pool.calls[0].callback(None)
    assert [settled(d) for d in started] == ["alice"] * 4
