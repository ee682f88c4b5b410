"""Login floods: counts a guesser cannot reset, bounded parallel checks, no slowed pushes.

* A good login as another user no longer clears an address's failures.
* Parallel guesses from one address: at most ``checks_per_address`` are
  checked at once, the others get ``429 TOOMANYREQUESTS`` + ``Retry-After``.
* bcrypt has its own pool and bounded queue: past ``check_queue`` waiting
  checks, ``429``; an address without failures goes ahead of the flood.
* A 1 KiB push while 100 wrong logins keep arriving (benchmarks/login_flood.py,
  bcrypt cost 10 as in real htpasswd files) takes well under the seconds it
  took when bcrypt shared the disk threads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from conftest import ROOT
from registryd.auth.policy import parse_access_rules
from test_security import AuthClient, auth_settings, basic, htpasswd_line, raw_request, timed

pytestmark = pytest.mark.timeout(90)

RULES = [{"users": ["*"], "repositories": ["**"], "actions": ["pull", "push"]}]


def write_users(path: str, users: dict[str, tuple[str, int]]) -> str:
    with open(path, "w") as f:
        for user, (password, cost) in users.items():
            f.write(htpasswd_line(user, password, cost))
    return path


@pytest_twisted.ensureDeferred
async def test_another_users_good_login_does_not_clear_the_address(make_registry: Any, tmp_path: Any) -> None:
    """Two wrong passwords for alice impose a wait; a good login as mallory
    (the guesser's own account) from the same address does not lift it."""
    htpasswd = write_users(str(tmp_path / "htpasswd"), {"alice": ("alice-Secret-1", 4),
                                                          "mallory": ("mallory-Secret-2", 4)})
    registry = make_registry(auth=auth_settings(htpasswd, failures_before_delay=1, max_delay=2),
                             access=parse_access_rules(RULES))
    guesser = AuthClient(registry.url, basic("alice", "guess-1"))
    for _ in range(2):
        assert (await guesser.get("/v2/", check=False)).status == 401
    took, reply = await timed(AuthClient(registry.url, basic("mallory", "mallory-Secret-2")).get("/v2/"))
    assert reply.status == 200 and took < 0.5, took       # mallory never failed: no wait
    took, reply = await timed(guesser.get("/v2/", check=False))
    assert reply.status == 401 and took >= 0.9, (took, "mallory's login cleared alice's failures")
    # alice herself, from elsewhere, is not slowed
    took, reply = await timed(raw_request(registry.url, "GET", "/v2/", basic("alice", "alice-Secret-1"),
                                          source="127.0.0.2"))
    assert reply.status == 200 and took < 0.5, (took, str(reply))


@pytest_twisted.ensureDeferred
async def test_parallel_guesses_from_one_address_are_not_all_checked(make_registry: Any, tmp_path: Any) -> None:
    """Ten wrong passwords at once (bcrypt cost 12, ~0.3 s each): two are
    checked, eight answered 429 at once; another address still gets in."""
    htpasswd = write_users(str(tmp_path / "htpasswd"), {"alice": ("alice-Secret-1", 12)})
    registry = make_registry(auth=auth_settings(htpasswd, checks_per_address=2), access=parse_access_rules(RULES))
    replies = await gatherResults([
        ensureDeferred(AuthClient(registry.url, basic("alice", f"guess-{i}")).get("/v2/", check=False))
        for i in range(10)])
    statuses = sorted(reply.status for reply in replies)
    assert statuses == [401] * 2 + [429] * 8, statuses
    for reply in replies:
        if reply.status == 429:
            assert reply.codes == ["TOOMANYREQUESTS"] and reply.header("Retry-After") == "1", str(reply)
    reply = await raw_request(registry.url, "GET", "/v2/", basic("alice", "alice-Secret-1"), source="127.0.0.2")
    assert reply.status == 200, str(reply)


@pytest_twisted.ensureDeferred
async def test_the_check_queue_is_bounded_and_clean_addresses_go_first(make_registry: Any, tmp_path: Any) -> None:
    """One check thread, two waiting places. Six guessers from six addresses
    (each with a failure already): one checked, two queued, three 429. A
    first login from an address without failures then takes a queued
    guess's place and is checked before the other."""
    htpasswd = write_users(str(tmp_path / "htpasswd"), {"alice": ("alice-Secret-1", 12),
                                                          "bob": ("bob-Secret-3", 12)})
    registry = make_registry(auth=auth_settings(htpasswd, check_threads=1, check_queue=2, checks_per_address=9),
                             access=parse_access_rules(RULES))
    sources = [f"127.0.0.{10 + i}" for i in range(6)]
    for source in sources:           # one failure each: the flood's rank
        assert (await raw_request(registry.url, "GET", "/v2/", basic("alice", "warm-up"), source=source)).status \
            == 401
    answered: list[tuple[int, str]] = []     # the order the answers came in

    async def guess(i: int, source: str) -> Any:
        reply = await raw_request(registry.url, "GET", "/v2/", basic("alice", f"guess-{i}"), source=source)
        answered.append((reply.status, "guess"))
        return reply

    flood = [ensureDeferred(guess(i, source)) for i, source in enumerate(sources)]
    bob = await raw_request(registry.url, "GET", "/v2/", basic("bob", "bob-Secret-3"), source="127.0.0.2")
    answered.append((bob.status, "bob"))
    replies = await gatherResults(flood)
    statuses = sorted(reply.status for reply in replies)
    assert bob.status == 200, str(bob)
    assert statuses == [401, 401, 429, 429, 429, 429], statuses
    # The running check, then bob's: not behind the queued guess (whatever the machine's load).
    checked = [who for status, who in answered if status != 429]
    assert checked == ["guess", "bob", "guess"], answered


def test_a_login_flood_does_not_slow_a_push(tmp_path: Any) -> None:
    """benchmarks/login_flood.py: 100 clients at one address keep sending
    wrong passwords (cost 10) while ci pushes 1 KiB and a manifest, and
    while dev logs in for the first time and pushes."""
    script = os.path.join(ROOT, "benchmarks", "login_flood.py")
    done = subprocess.run([sys.executable, script, "--flood", "100", "--warmup", "0.5"], capture_output=True,
                          text=True, timeout=80)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["push_during_flood_s"] < 2.0, result
    assert result["first_login_push_during_flood_s"] < 2.0, result
    assert result["flood_statuses"].get("429", 0) > 0, result
