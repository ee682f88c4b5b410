"""Chunks written into a consumer at the pace it takes them: ``Driver.send`` for bytes a driver reads
itself (a file in its pool, a value in memory), where a bucket's body arrives paced by its connection."""
from __future__ import annotations

from typing import AsyncIterator

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Paced:
    """The push producer of one transfer: ``ready`` waits while the consumer has paused it."""

    def __init__(self) -> None:
        self._resumed: Deferred[None] | None = None
        self._stopped = False

    def pauseProducing(self) -> None:
        if self._resumed is None:
            self._resumed = Deferred()

    def resumeProducing(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.called:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()

    async def ready(self) -> None:
        """Once the consumer takes more; CancelledError once it stopped the transfer (its client left)."""
        while self._resumed is not None:
            await self._resumed
        if self._stopped:
            raise CancelledError()


async def send_paced(consumer: IConsumer, chunks: AsyncIterator[bytes]) -> None:
    """Write ``chunks`` into ``consumer``, registered as its streaming producer: the next chunk is
    read only once the consumer takes more, so a paused transfer holds one chunk at most."""
    paced = Paced()
    consumer.registerProducer(paced, True)
    try:
        while True:
            await paced.ready()
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            consumer.write(chunk)
    finally:
        consumer.unregisterProducer()
