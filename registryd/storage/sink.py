"""The base of the consumers a store's bodies are streamed into, whichever driver sends them."""
from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IConsumer
from zope.interface import implementer


@implementer(IConsumer)
class Sink:
    """A consumer for ``BlobSource.send`` and ``pipe_body``: keeps the producer it is given (to pause or stop
    it); subclasses say what ``write`` does with each chunk."""

    def __init__(self) -> None:
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        raise NotImplementedError
