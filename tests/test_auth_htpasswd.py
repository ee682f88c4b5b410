"""The htpasswd checker: bcrypt only, cached, re-read on change, off-thread."""
from __future__ import annotations

import os
import subprocess
from typing import Any, Callable, Coroutine, Iterator

import bcrypt
import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from registryd.auth.htpasswd import HtpasswdChecker, HtpasswdError, parse_htpasswd
from registryd.threads import InlinePool


def hashed(password: bytes) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds=4)).decode()


def htpasswd_line(*args: str) -> str:
    """One line from Apache's htpasswd (apache2-utils), e.g. ('-B', 'alice', 'pw')."""
    out = subprocess.run(["htpasswd", "-n", "-b", *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


class CountingPool(InlinePool):
    """Runs inline and counts the bcrypt runs."""

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return fn(*args, **kwargs)


class ManualPool:
    """Holds each job until the test finishes it, like a busy thread pool."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        d: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, d))
        return await d

    def finish(self) -> None:
        fn, args, d = self.jobs.pop(0)
        d.callback(fn(*args))


def outcome(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that completes at once (inline pool, no delays)."""
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "did not complete synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def errors_in(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") is LogLevel.error]


@pytest.fixture
def path(tmp_path: Any) -> str:
    p = str(tmp_path / "htpasswd")
    with open(p, "w") as f:
        f.write(f"alice:{hashed(b's3cret')}\nbob:{hashed(b'hunter2')}\n")
    return p


def replace(path: str, text: str) -> None:
    """Replace the file the way editors and our CLI do: new inode, rename."""
    with open(path + ".new", "w") as f:
        f.write(text)
    os.rename(path + ".new", path)


def test_provides_icredentialschecker(path: str) -> None:
    checker = HtpasswdChecker(path, InlinePool(), Clock())
    assert verifyObject(ICredentialsChecker, checker)
    assert checker.users == {"alice", "bob"}


def test_right_wrong_unknown(path: str) -> None:
    pool = CountingPool()
    checker = HtpasswdChecker(path, pool, Clock())
    assert outcome(checker.check("alice", "s3cret")) is True
    assert outcome(checker.check("alice", b"s3cret")) is True
    assert outcome(checker.check("alice", "S3cret")) is False
    assert outcome(checker.check("bob", "s3cret")) is False
    runs = pool.runs
    assert outcome(checker.check("nobody", "s3cret")) is False
    assert pool.runs == runs + 1, "an unknown user costs a bcrypt run too (timing)"
    assert outcome(checker.authenticate("bob", "hunter2")) == "bob"
    with pytest.raises(UnauthorizedLogin):
        outcome(checker.authenticate("nobody", "x"))
    with pytest.raises(UnauthorizedLogin):
        outcome(checker.authenticate("alice", "x"))


def test_entries_written_by_apache_htpasswd(tmp_path: Any) -> None:
    line = htpasswd_line("-B", "-C", "4", "alice", "pa ss:word")
    assert line.startswith("alice:$2y$04$")
    # and a whole file written by htpasswd -c -B
    p = str(tmp_path / "htpasswd")
    subprocess.run(["htpasswd", "-c", "-b", "-B", "-C", "4", p, "bob", "hunter2"], check=True, capture_output=True)
    with open(p, "a") as f:
        f.write(line + "\n")
    checker = HtpasswdChecker(p, InlinePool(), Clock())
    assert outcome(checker.check("alice", "pa ss:word")) is True
    assert outcome(checker.check("bob", "hunter2")) is True
    assert outcome(checker.check("bob", "hunter3")) is False


def test_long_passwords_match_apache_truncation(tmp_path: Any) -> None:
    password = "p" * 80
    p = str(tmp_path / "htpasswd")
    with open(p, "w") as f:
        f.write(htpasswd_line("-B", "-C", "4", "alice", password) + "\n")
    checker = HtpasswdChecker(p, InlinePool(), Clock())
    assert outcome(checker.check("alice", password)) is True
    assert outcome(checker.check("alice", "p" * 71)) is False


@pytest.mark.parametrize("flag,scheme", [
    ("-m", "an Apache MD5 ($apr1$) hash"),
    ("-s", "a SHA-1 ({SHA}) hash"),
    ("-d", "a DES crypt hash"),
    ("-p", "a plain-text or unknown-scheme password"),
])
def test_other_schemes_refused_with_line_number(tmp_path: Any, flag: str, scheme: str) -> None:
    p = str(tmp_path / "htpasswd")
    with open(p, "w") as f:
        f.write(f"# users\nalice:{hashed(b'x')}\n\n{htpasswd_line(flag, 'bob', 'hunter2')}\n")
    with pytest.raises(HtpasswdError) as e:
        HtpasswdChecker(p, InlinePool(), Clock())
    assert str(e.value) == (
        f"htpasswd file {p} line 4: user 'bob' has {scheme}; registryd accepts bcrypt only "
        f"(set the password again with 'registryd htpasswd' or 'htpasswd -B')")


@pytest.mark.parametrize("text,message", [
    ("alice\n", "line 1: expected 'user:hash'"),
    (":{h}\n", "line 1: the user name is empty"),
    ("a b:{h}\n", "line 1: a user name cannot contain spaces or control characters"),
    ("anonymous:{h}\n", "line 1: the user name 'anonymous' is reserved for access rules"),
    ("*:{h}\n", "line 1: the user name '*' is reserved for access rules"),
    ("alice:{h}\n\nalice:{h}\n", "line 3: user 'alice' is already defined on line 1"),
    ("alice:$2y$04$short\n", "line 1: user 'alice' has a malformed or unsupported bcrypt hash"),
    ("alice:$2x$04$" + "a" * 53 + "\n", "line 1: user 'alice' has a malformed or unsupported bcrypt hash"),
    ("alice:$2y$03$" + "a" * 53 + "\n", "line 1: user 'alice' has a bcrypt hash with an invalid cost"),
    ("alice:\n", "line 1: user 'alice' has an empty hash"),
    ("alice:$6$salt$abc\n", "line 1: user 'alice' has a SHA-512-crypt ($6$) hash"),
    ("al\xffice:{h}\n", "line 1 is not UTF-8 text"),
])
def test_malformed_files(text: str, message: str) -> None:
    data = text.replace("{h}", hashed(b"x")).encode("latin-1" if "\xff" in text else "utf-8")
    with pytest.raises(HtpasswdError) as e:
        parse_htpasswd(data, "F")
    assert str(e.value).startswith(f"htpasswd file F {message}")
    assert "\n" not in str(e.value)


def test_comments_blank_lines_crlf_bom() -> None:
    h = hashed(b"x")
    users = parse_htpasswd(f"\ufeff# comment\r\n\r\nalice:{h}\r\n  \nbob:{h}".encode(), "F")
    assert users == {"alice": h.encode(), "bob": h.encode()}
    assert parse_htpasswd(b"", "F") == {}


def test_missing_or_unreadable_file(tmp_path: Any) -> None:
    with pytest.raises(HtpasswdError) as e:
        HtpasswdChecker(str(tmp_path / "nope"), InlinePool(), Clock())
    assert str(e.value) == f"cannot read htpasswd file {tmp_path / 'nope'}: No such file or directory"
    with pytest.raises(HtpasswdError) as e:
        HtpasswdChecker(str(tmp_path), InlinePool(), Clock())
    assert str(e.value) == f"cannot read htpasswd file {tmp_path}: Is a directory"


def test_cache_hit_avoids_bcrypt_and_expires(path: str) -> None:
    pool, clock = CountingPool(), Clock()
    checker = HtpasswdChecker(path, pool, clock, cache_seconds=30)
    assert outcome(checker.check("alice", "s3cret"))
    assert pool.runs == 1
    for _ in range(5):
        assert outcome(checker.check("alice", "s3cret"))
    assert pool.runs == 1
    # a wrong password is never cached, nor confused with the right one
    assert not outcome(checker.check("alice", "wrong"))
    assert not outcome(checker.check("alice", "wrong"))
    assert pool.runs == 3
    clock.advance(29.9)
    assert outcome(checker.check("alice", "s3cret")) and pool.runs == 3
    clock.advance(0.1)
    assert outcome(checker.check("alice", "s3cret")) and pool.runs == 4


def test_cache_disabled(path: str) -> None:
    pool = CountingPool()
    checker = HtpasswdChecker(path, pool, Clock(), cache_seconds=0)
    for _ in range(3):
        assert outcome(checker.check("alice", "s3cret"))
    assert pool.runs == 3


def test_cache_holds_no_password(path: str) -> None:
    checker = HtpasswdChecker(path, InlinePool(), Clock())
    assert outcome(checker.check("alice", "s3cret"))
    state = repr(vars(checker))
    assert "s3cret" not in state and b"s3cret".hex() not in state


def test_file_change_picked_up_and_cache_invalidated(path: str) -> None:
    pool, clock = CountingPool(), Clock()
    checker = HtpasswdChecker(path, pool, clock, cache_seconds=300, stat_interval=1)
    assert outcome(checker.check("alice", "s3cret"))
    replace(path, f"alice:{hashed(b'n3w')}\ncarol:{hashed(b'c')}\n")
    # within the stat interval the old file still rules
    assert outcome(checker.check("alice", "s3cret"))
    clock.advance(1)
    assert not outcome(checker.check("alice", "s3cret")), "the cached success must not survive the change"
    assert outcome(checker.check("alice", "n3w"))
    assert outcome(checker.check("carol", "c"))
    assert not outcome(checker.check("bob", "hunter2"))
    assert checker.users == {"alice", "carol"}


def test_in_place_edit_of_same_size_picked_up(path: str) -> None:
    clock = Clock()
    checker = HtpasswdChecker(path, InlinePool(), clock, stat_interval=0)
    with open(path) as f:
        text = f.read()
    st = os.stat(path)
    with open(path, "w") as f:  # same inode, same size; mtime/ctime change
        f.write(text.replace("alice:", "alicx:"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert outcome(checker.check("alicx", "s3cret"))
    assert not outcome(checker.check("alice", "s3cret"))


def test_broken_change_keeps_old_users_and_logs_once(path: str, events: list[dict[str, Any]]) -> None:
    clock = Clock()
    checker = HtpasswdChecker(path, InlinePool(), clock, stat_interval=0)
    with open(path, "a") as f:
        f.write(htpasswd_line("-m", "mallory", "x") + "\n")
    for _ in range(3):
        assert outcome(checker.check("alice", "s3cret"))
    errors = errors_in(events)
    assert errors == [
        f"htpasswd file {path} line 3: user 'mallory' has an Apache MD5 ($apr1$) hash; registryd accepts "
        f"bcrypt only (set the password again with 'registryd htpasswd' or 'htpasswd -B'); "
        f"keeping the 2 users loaded before"]
    # fixing the file is picked up
    replace(path, f"alice:{hashed(b'fixed')}\n")
    assert outcome(checker.check("alice", "fixed"))


def test_deleted_file_keeps_old_users(path: str, events: list[dict[str, Any]]) -> None:
    checker = HtpasswdChecker(path, InlinePool(), Clock(), stat_interval=0)
    os.unlink(path)
    assert outcome(checker.check("alice", "s3cret"))
    assert outcome(checker.check("bob", "hunter2"))
    assert errors_in(events) == [
        f"cannot read htpasswd file {path}: No such file or directory; keeping the 2 users loaded before"]


def test_explicit_reload(path: str, events: list[dict[str, Any]]) -> None:
    # a long stat interval: only reload() can notice the change
    checker = HtpasswdChecker(path, InlinePool(), Clock(), stat_interval=3600)
    outcome(checker.check("alice", "s3cret"))
    replace(path, f"dave:{hashed(b'd')}\n")
    assert not outcome(checker.check("dave", "d"))
    assert checker.reload() is True
    assert outcome(checker.check("dave", "d"))
    replace(path, "dave:plain\n")
    assert checker.reload() is False
    assert outcome(checker.check("dave", "d"))
    assert len(errors_in(events)) == 1


def test_concurrent_checks_share_one_bcrypt_run(path: str) -> None:
    pool = ManualPool()
    checker = HtpasswdChecker(path, pool, Clock())
    first = Deferred.fromCoroutine(checker.check("alice", "s3cret"))
    second = Deferred.fromCoroutine(checker.check("alice", "s3cret"))
    other = Deferred.fromCoroutine(checker.check("alice", "wrong"))
    assert len(pool.jobs) == 2
    # the first requester goes away: the check goes on for the second
    first.cancel()
    assert isinstance(first.result, Failure) and first.result.check(CancelledError)
    first.addErrback(lambda f: None)
    pool.finish()
    assert second.result is True
    pool.finish()
    assert other.result is False
    # and the shared success was cached
    third = Deferred.fromCoroutine(checker.check("alice", "s3cret"))
    assert third.result is True and not pool.jobs


def test_reload_during_check_is_not_cached(path: str) -> None:
    pool = ManualPool()
    checker = HtpasswdChecker(path, pool, Clock(), stat_interval=3600)
    d = Deferred.fromCoroutine(checker.check("alice", "s3cret"))
    replace(path, f"alice:{hashed(b'n3w')}\n")
    checker.reload()
    pool.finish()
    assert d.result is True  # it was right when asked
    Deferred.fromCoroutine(checker.check("alice", "s3cret"))
    assert len(pool.jobs) == 1, "the success under the old file must not be cached"
    pool.finish()


def test_twisted_cred_portal(path: str) -> None:
    class IUser(Interface):
        pass

    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatarId: bytes, mind: object, *interfaces: Any) -> Any:
            return (IUser, avatarId, lambda: None)

    portal = Portal(Realm(), [HtpasswdChecker(path, InlinePool(), Clock())])
    results: list[Any] = []
    portal.login(UsernamePassword(b"alice", b"s3cret"), None, IUser).addBoth(results.append)
    assert results[0][1] == b"alice"
    portal.login(UsernamePassword(b"alice", b"nope"), None, IUser).addBoth(results.append)
    assert isinstance(results[1], Failure) and results[1].check(UnauthorizedLogin)
    portal.login(UsernamePassword(b"\xff", b"nope"), None, IUser).addBoth(results.append)
    assert isinstance(results[2], Failure) and results[2].check(UnauthorizedLogin)
