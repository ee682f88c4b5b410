"""Uploads yield to pulls: while the node sends blob bodies, upload bodies are read at a capped rate.

A push and the pulls of a node compete for the same CPUs: every byte pushed
is received, copied, hashed and written, and the pusher's own sending and
the kernel's TCP work come with it. Within one worker process the reactor
shares its turns fairly (one socket read of an upload per turn against a
sendfile per pull), but with several workers the push lands on one of them
and is read as fast as that one can: on a 2-core node 1 GiB pushed during 8
pulls took a third of their throughput. Pods wait on pulls; a push can wait.

So while any worker of the node is sending a blob body (``NodeTraffic``
counts them, and the upload bodies, on the node's shared counters), each
upload body is read at ``[server] upload_rate_while_pulling`` divided
among the upload bodies the node is receiving (by default 50 MiB/s per CPU
the node may use). Reading pauses the upload's connection (TCP then slows the
pusher down), as the upload writer does when the disk is behind; with no
pull under way, uploads run at full speed.
"""
from __future__ import annotations

from typing import Any, Protocol

from registryd.listeners import usable_cpus

#: The node's cap on upload bodies while pulls run, per CPU, when the config says "auto".
AUTO_RATE_PER_CPU = 50 * 1024 * 1024
#: How far (seconds) an upload may run ahead of its pace before its connection pauses.
SLACK = 0.05

_SENDING = 0
_RECEIVING = 1


class Counters(Protocol):
    """registryd.web.node_limits.NodeCounters: a row per worker process."""

    def add(self, slot: int, amount: int) -> None: ...

    def total(self, slot: int) -> int: ...


class NodeTraffic:
    """Blob bodies being sent and upload bodies being received: on the node's shared counters
    (``counters`` and the slot of the first of the two), or in this process alone."""

    def __init__(self, counters: Counters | None = None, first_slot: int = 0) -> None:
        self._counters = counters
        self._first = first_slot
        self._own = [0, 0]

    def _add(self, which: int, amount: int) -> None:
        self._own[which] += amount
        if self._counters is not None:
            self._counters.add(self._first + which, amount)

    def _total(self, which: int) -> int:
        return self._own[which] if self._counters is None else self._counters.total(self._first + which)

    def sending(self, amount: int) -> None:
        self._add(_SENDING, amount)

    def receiving(self, amount: int) -> None:
        self._add(_RECEIVING, amount)

    @property
    def pulls(self) -> int:
        return self._total(_SENDING)

    @property
    def uploads(self) -> int:
        return self._total(_RECEIVING)


def node_rate(configured: int | None) -> int:
    """Bytes/s for all the node's upload bodies while pulls run; 0: no cap."""
    return AUTO_RATE_PER_CPU * usable_cpus() if configured is None else configured


class UploadPace:
    """One upload body's reading while pulls run: a schedule at its share of the node's rate.

    Each chunk moves the time the body may next be read by ``len / share``;
    past ``SLACK`` ahead of the clock, the connection pauses until then.
    Another pauser of the connection (the upload writer) may resume it
    meanwhile: the next chunk pauses it again.
    """

    def __init__(self, producer: Any, rate: int, clock: Any, traffic: NodeTraffic) -> None:
        self._producer = producer
        self._rate = rate
        self._clock = clock
        self._traffic = traffic
        self._ready_at: float | None = None
        self._timer: Any = None
        self._stopped = False
        traffic.receiving(1)

    @property
    def holding(self) -> bool:
        """The connection is paused by this pace (not by its client)."""
        return self._timer is not None and self._timer.active()

    def received(self, size: int) -> None:
        if self._stopped or self._rate <= 0:
            return
        now = self._clock.seconds()
        if self._traffic.pulls <= 0:
            self._ready_at = None
            return
        share = self._rate / max(1, self._traffic.uploads)
        start = now if self._ready_at is None or self._ready_at < now else self._ready_at
        self._ready_at = start + size / share
        ahead = self._ready_at - now
        if ahead > SLACK:
            self._producer.pauseProducing()
            if not self.holding:
                self._timer = self._clock.callLater(ahead, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if not self._stopped:
            self._producer.resumeProducing()

    def stop(self) -> None:
        """The body is complete or abandoned: its connection is the request's again."""
        if self._stopped:
            return
        self._stopped = True
        self._traffic.receiving(-1)
        if self.holding:
            self._timer.cancel()
        self._timer = None
