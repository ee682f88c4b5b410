"""read_limited: an upstream body read whole, cut off past its limit (registryd.mirror.client)."""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from registryd.mirror.client import BodyTooLarge, UpstreamUnavailable, read_limited


class Response:
    """An IResponse whose body arrives in ``chunks``, then ends with ``end``."""

    def __init__(self, chunks: list[bytes], end: Exception, length: Any = None) -> None:
        self.chunks = chunks
        self.end = end
        self.length = length
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(self.end))


def outcome(response: Response, limit: int) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(read_limited(response, limit)).addBoth(results.append)
    assert results, "read_limited did not finish"
    return results[0]


def test_the_whole_body_is_returned() -> None:
    assert outcome(Response([b"abc", b"def"], ResponseDone()), 6) == b"abcdef"


def test_a_body_without_a_length_that_ends_with_the_connection_is_whole() -> None:
    assert outcome(Response([b"abc"], PotentialDataLoss()), 10) == b"abc"


def test_a_body_past_the_limit_is_refused_and_its_connection_dropped() -> None:
    response = Response([b"abc", b"defg", b"never read"], ResponseDone())
    result = outcome(response, 6)
    assert isinstance(result, Failure) and result.check(BodyTooLarge)
    assert response.transport.disconnecting


def test_a_declared_length_past_the_limit_is_refused_before_reading() -> None:
    result = outcome(Response([b"x" * 10], ResponseDone(), length=10), 6)
    assert isinstance(result, Failure) and result.check(BodyTooLarge)


def test_a_body_cut_short_is_an_upstream_failure() -> None:
    result = outcome(Response([b"abc"], ConnectionLost("gone")), 10)
    assert isinstance(result, Failure) and result.check(UpstreamUnavailable)
    with pytest.raises(UpstreamUnavailable, match="reading the upstream body failed"):
        result.raiseException()
