"""Uploads yield to pulls (registryd/web/upload_pace.py).

* The pace of one body on a fake clock: no pull, no pause; with pulls, a
  pause as long as the body is ahead of its share, the share split among
  the node's uploads; stop cancels a pending resume.
* The node's counts over the shared counters of two workers.
* ``[server] upload_rate_while_pulling``: "auto", sizes, 0, refusals.
* Through the API: a push while a pull is under way takes at least its
  bytes over the configured rate; the same push alone is not held.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock

from oci_client import Client
from raw_http import RawGet
from registryd.config import ConfigError, load_config
from registryd.web.node_limits import TRAFFIC_SLOT, NodeCounters
from registryd.web.upload_pace import AUTO_RATE_PER_CPU, SLACK, NodeTraffic, UploadPace, node_rate
from support.wait import sleep

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False


def test_without_a_pull_an_upload_is_never_held() -> None:
    clock, producer, traffic = Clock(), Producer(), NodeTraffic()
    pace = UploadPace(producer, MiB, clock, traffic)
    for _ in range(100):
        pace.received(MiB)
    assert producer.pauses == 0 and not pace.holding
    assert traffic.uploads == 1
    pace.stop()
    pace.stop()
    assert traffic.uploads == 0


def test_with_a_pull_an_upload_pauses_while_ahead_of_its_share() -> None:
    clock, producer, traffic = Clock(), Producer(), NodeTraffic()
    traffic.sending(1)
    pace = UploadPace(producer, 4 * MiB, clock, traffic)
    pace.received(MiB // 8)                 # 31 ms of its pace: within the slack
    assert not producer.paused
    pace.received(MiB)                      # 0.28 s ahead in all
    assert producer.paused and pace.holding
    clock.advance(0.25)
    assert producer.paused
    clock.advance(0.05)
    assert not producer.paused and not pace.holding
    # A second upload on the node halves the share: the same bytes hold twice as long.
    other = UploadPace(Producer(), 4 * MiB, clock, traffic)
    pace.received(MiB)
    assert producer.paused
    clock.advance(0.49)
    assert producer.paused
    clock.advance(0.02)
    assert not producer.paused
    other.stop()
    # Stopped (the body is complete or gone): a pending resume is cancelled, the connection is the request's.
    pace.received(MiB)
    assert producer.paused
    pace.stop()
    clock.advance(10)
    assert producer.paused and not clock.getDelayedCalls()
    assert traffic.uploads == 0


def test_a_pull_that_ends_lets_the_upload_run_at_full_speed_again() -> None:
    clock, producer, traffic = Clock(), Producer(), NodeTraffic()
    traffic.sending(1)
    pace = UploadPace(producer, MiB, clock, traffic)
    pace.received(MiB)
    assert producer.paused
    clock.advance(1)
    traffic.sending(-1)
    for _ in range(10):
        pace.received(MiB)
    assert not producer.paused
    # A pull starting again: the pace starts from now, not from a debt of the earlier bytes.
    traffic.sending(1)
    pace.received(int(MiB * SLACK / 2))
    assert not producer.paused


def test_a_rate_of_zero_holds_nothing() -> None:
    clock, producer, traffic = Clock(), Producer(), NodeTraffic()
    traffic.sending(3)
    pace = UploadPace(producer, 0, clock, traffic)
    for _ in range(10):
        pace.received(MiB)
    assert producer.pauses == 0


def test_the_node_counts_over_the_workers_shared_counters(tmp_path: Any) -> None:
    path = str(tmp_path / "limits")
    one = NodeTraffic(NodeCounters(path, 0, 2), TRAFFIC_SLOT)
    two = NodeTraffic(NodeCounters(path, 1, 2), TRAFFIC_SLOT)
    one.sending(1)
    two.receiving(1)
    two.receiving(1)
    assert (one.pulls, one.uploads) == (two.pulls, two.uploads) == (1, 2)
    one.sending(-1)
    assert two.pulls == 0
    # A worker that starts again zeroes its row: what a dead one counted is gone.
    again = NodeTraffic(NodeCounters(path, 1, 2), TRAFFIC_SLOT)
    assert again.uploads == 0


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", None), (0, 0), ("100MiB", 100 * MiB), (52428800, 52428800),
])
def test_the_setting(tmp_path: Any, value: Any, expected: int | None) -> None:
    config_file = tmp_path / "registryd.toml"
    config_file.write_text(f"[server]\nupload_rate_while_pulling = {value!r}\n".replace("'", '"'))
    config = load_config(str(config_file), {"data_dir": str(tmp_path / "data")})
    assert config.upload_rate_while_pulling == expected
    assert node_rate(expected) == (AUTO_RATE_PER_CPU * len(os.sched_getaffinity(0)) if expected is None else expected)


@pytest.mark.parametrize("value", ["fast", -1, "12 parsecs", True])
def test_a_bad_setting_is_one_line(tmp_path: Any, value: Any) -> None:
    config_file = tmp_path / "registryd.toml"
    text = f"upload_rate_while_pulling = {str(value).lower() if isinstance(value, bool) else repr(value)}"
    config_file.write_text("[server]\n" + text.replace("'", '"') + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(config_file), {"data_dir": str(tmp_path / "data")})
    message = str(error.value)
    assert "server.upload_rate_while_pulling" in message and '"auto"' in message and "\n" not in message


class Holds:
    """Counts the chunks after which an upload's pace held its connection."""

    def __init__(self, monkeypatch: Any) -> None:
        self.count = 0
        received = UploadPace.received

        def counted(pace: UploadPace, size: int) -> None:
            received(pace, size)
            self.count += pace.holding

        monkeypatch.setattr(UploadPace, "received", counted)


async def timed_push(client: Client, data: bytes) -> float:
    started = time.monotonic()
    digest = await client.push_blob("team/pushed", data)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    return time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_a_push_during_a_pull_is_read_at_the_configured_rate(make_registry: Any, monkeypatch: Any) -> None:
    rate = 2 * MiB
    registry = make_registry(upload_rate_while_pulling=rate)
    traffic = registry.service.api.traffic
    client = Client(registry.url)
    digest = await client.push_blob("team/pulled", os.urandom(4 * MiB))
    holds = Holds(monkeypatch)

    # Alone: never held.
    await timed_push(client, os.urandom(3 * MiB))
    assert holds.count == 0 and traffic.pulls == 0 and traffic.uploads == 0

    # A pull that stays under way: its client stops reading after the first bytes.
    port = int(registry.host.rsplit(":", 1)[1])
    pull = RawGet("GET", f"/v2/team/pulled/blobs/{digest}", None, hashlib.sha256(), pause_after=1)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), pull)
    await pull.paused
    assert traffic.pulls == 1
    # 3 MiB at 2 MiB/s: at least 1.5 s, less the slack and what the socket buffers took in at once.
    assert await timed_push(client, os.urandom(3 * MiB)) >= 1.2
    assert holds.count > 0 and traffic.uploads == 0

    # The pull gone, pushes run free again.
    pull.transport.abortConnection()
    for _ in range(100):
        if traffic.pulls == 0:
            break
        await sleep(0.02)
    assert traffic.pulls == 0
    held = holds.count
    await timed_push(client, os.urandom(3 * MiB))
    assert holds.count == held
