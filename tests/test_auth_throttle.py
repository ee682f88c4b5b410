"""Backoff for client addresses that keep failing, on a fake clock."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from registryd.auth.throttle import Throttle, client_key


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def test_first_failures_are_free_then_delay_doubles_to_the_cap() -> None:
    clock = Clock()
    throttle = Throttle(clock, free_failures=3, base_delay=1, max_delay=8)
    delays = []
    for _ in range(8):
        delays.append(throttle.record_failure("10.0.0.1", "alice"))
    assert delays == [0, 0, 0, 1, 2, 4, 8, 8]
    assert throttle.delay_for("10.0.0.1", "alice") == 8
    clock.advance(5)
    assert throttle.delay_for("10.0.0.1", "alice") == 3
    clock.advance(3)
    assert throttle.delay_for("10.0.0.1", "alice") == 0
    # the count is still there: the next failure waits the cap again
    assert throttle.record_failure("10.0.0.1", "alice") == 8


def test_addresses_are_independent() -> None:
    clock = Clock()
    throttle = Throttle(clock, free_failures=0)
    throttle.record_failure("10.0.0.1", "alice")
    assert throttle.delay_for("10.0.0.1", "alice") == 1
    assert throttle.delay_for("10.0.0.2", "alice") == 0


def test_success_resets_only_that_user_name() -> None:
    clock = Clock()
    throttle = Throttle(clock, free_failures=1)
    for _ in range(4):
        throttle.record_failure("10.0.0.1", "alice")
    assert throttle.delay_for("10.0.0.1", "alice") > 0
    throttle.record_success("10.0.0.1", "alice")
    assert throttle.delay_for("10.0.0.1", "alice") == 0
    assert throttle.failures("10.0.0.1", "alice") == 0
    assert throttle.record_failure("10.0.0.1", "alice") == 0
    # the address keeps its own count
    assert throttle.failures("10.0.0.1") == 5


def test_a_guesser_cannot_reset_its_count_by_logging_in_as_itself() -> None:
    """Guesses at alice's password, each followed by a good login as
    mallory from the same address: alice's count and the address's keep
    growing, and the guesses slow down."""
    clock = Clock()
    throttle = Throttle(clock, free_failures=2, address_free_failures=5, max_delay=64)
    delays = []
    for _ in range(6):
        delays.append(throttle.record_failure("10.0.0.1", "alice"))
        throttle.record_success("10.0.0.1", "mallory")
    assert delays == [0, 0, 1, 2, 4, 8]
    assert throttle.failures("10.0.0.1", "alice") == 6
    assert throttle.delay_for("10.0.0.1", "alice") == 8
    # a fresh name from that address does not escape the address's count
    assert throttle.delay_for("10.0.0.1", "bob") == 1
    assert throttle.delay_for("10.0.0.2", "bob") == 0


def test_one_guess_per_name_is_still_counted_per_address() -> None:
    """Password spraying: one guess for each of many names."""
    clock = Clock()
    throttle = Throttle(clock, free_failures=3, address_free_failures=10, max_delay=30)
    delays = [throttle.record_failure("10.0.0.1", f"user{i}") for i in range(13)]
    assert delays[:10] == [0] * 10 and delays[10:] == [1, 2, 4], delays
    assert throttle.delay_for("10.0.0.1", "someone-else") == 4


def test_concurrent_checks_per_address_are_bounded() -> None:
    throttle = Throttle(Clock(), max_concurrent=2)
    assert throttle.begin_check("10.0.0.1") and throttle.begin_check("10.0.0.1")
    assert not throttle.begin_check("10.0.0.1")
    assert throttle.begin_check("10.0.0.2")          # another address has its own
    throttle.end_check("10.0.0.1")
    assert throttle.begin_check("10.0.0.1")
    for _ in range(3):
        throttle.end_check("10.0.0.1")
    assert throttle.begin_check("10.0.0.1")


def test_entries_expire() -> None:
    clock = Clock()
    throttle = Throttle(clock, free_failures=0, expiry=600)
    for _ in range(5):
        throttle.record_failure("10.0.0.1", "alice")
    clock.advance(599)
    assert throttle.failures("10.0.0.1") == 5
    clock.advance(1)
    assert throttle.failures("10.0.0.1") == 0
    assert throttle.failures("10.0.0.1", "alice") == 0
    assert len(throttle) == 0
    assert throttle.record_failure("10.0.0.1", "alice") == 1


def test_memory_is_bounded_oldest_first() -> None:
    clock = Clock()
    throttle = Throttle(clock, max_entries=6)
    for i in range(5):
        clock.advance(1)
        throttle.record_failure(f"10.0.0.{i}", "x")
    assert len(throttle) == 6       # an address's count and its (address, user) count
    assert throttle.failures("10.0.0.0") == 0 and throttle.failures("10.0.0.1") == 0
    assert throttle.failures("10.0.0.4") == 1


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") != client_key("2001:db8::1")
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert client_key("unix-socket") == "unix-socket"
    clock = Clock()
    throttle = Throttle(clock, free_failures=0)
    throttle.record_failure("2001:db8::1", "alice")
    assert throttle.delay_for("2001:db8::2", "alice") == 1


def test_failure_logged_with_address_and_user(events: list[dict[str, Any]]) -> None:
    throttle = Throttle(Clock(), free_failures=0)
    throttle.record_failure("192.0.2.7", "mallory", "wrong user name or password")
    [event] = [e for e in events if e.get("log_namespace") == "registryd.auth.throttle"]
    assert event["address"] == "192.0.2.7"
    assert event["user"] == "mallory"
    assert event["failures"] == 1 and event["delay"] == 1
    assert formatEvent(event) == (
        "authentication failed for user 'mallory' from 192.0.2.7: wrong user name or password; "
        "1 failures in a row, next attempt delayed 1.0s")


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError):
        Throttle(Clock(), base_delay=10, max_delay=1)
