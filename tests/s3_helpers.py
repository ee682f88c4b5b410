"""What the S3 driver's tests share: a bucket per test, a second node's client, a consumer.

Fixtures here are function-scoped and take the session's ``ceph_s3`` from
conftest.py, so a module may import them (never import tests/ceph.py).
"""
from __future__ import annotations

import hashlib
from typing import Any, AsyncIterator

import attrs
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from registryd.storage.s3 import S3Client
from registryd.storage.layout import repositories_root
from registryd.storage.repositories import Repositories
from registryd.storage.s3.driver import S3Driver


@pytest_twisted.async_yield_fixture
async def s3(ceph_s3: Any) -> AsyncIterator[S3Client]:
    """A fresh bucket, under a key prefix (so listings must strip it)."""
    client = await ceph_s3.new_bucket(prefix="site/")
    yield client
    await client.close()


@pytest_twisted.async_yield_fixture
async def node_b(s3: S3Client) -> AsyncIterator[S3Client]:
    """A second "node": its own client (and connection pool) on the same bucket and prefix."""
    client = S3Client(s3.settings, reactor)
    yield client
    await client.close()


def repos(client: S3Client, namespace: str | None = None) -> Repositories:
    return Repositories(S3Driver(client), repositories_root(namespace))


@implementer(IConsumer)
@attrs.define
class PausingSink:
    """Takes a download as a client socket would: hashes the bytes (and keeps them,
    unless ``keep`` is off), and every ``pause_every`` bytes pauses its producer for
    a moment, counting what still arrives while paused."""

    pause_every: int = 0
    keep: bool = True
    chunks: list[bytes] = attrs.field(factory=list)
    hasher: Any = attrs.field(factory=hashlib.sha256)
    received: int = 0
    producer: Any = None
    registrations: int = 0
    paused: bool = False
    pauses: int = 0
    while_paused: int = 0         # in all pauses together
    max_while_paused: int = 0     # in any one pause
    _this_pause: int = 0
    _since_pause: int = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer
        self.registrations += 1

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.hasher.update(data)
        if self.keep:
            self.chunks.append(data)
        if self.paused:
            self.while_paused += len(data)
            self._this_pause += len(data)
            self.max_while_paused = max(self.max_while_paused, self._this_pause)
            return
        self._since_pause += len(data)
        if self.pause_every and self._since_pause >= self.pause_every:
            self._since_pause = 0
            self.paused = True
            self.pauses += 1
            self.producer.pauseProducing()
            reactor.callLater(0.002, self._resume)

    def _resume(self) -> None:
        self.paused = False
        self._this_pause = 0
        if self.producer is not None:
            self.producer.resumeProducing()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def digest(self) -> str:
        return self.hasher.hexdigest()


async def read(client: S3Client, key: str, byte_range: Any = None) -> bytes:
    """The whole object (or ``byte_range``), kept in memory: for small test objects."""
    sink = PausingSink()
    await client.get_object(key, sink, byte_range)
    return sink.data


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise KeyError("VmRSS")


class PeakRss:
    """This process's RSS, sampled every 5 ms from ``start`` to ``stop``: how far it rose, in MiB."""

    def __init__(self) -> None:
        self.baseline = self.peak = rss_kib()
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = reactor

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_kib())

    def start(self) -> None:
        self._sampler.start(0.005)

    def stop(self) -> None:
        self._sampler.stop()
        self._sample()

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.baseline) / 1024
