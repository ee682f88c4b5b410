"""One signed S3 request over Twisted's Agent: pooling, retries, timeouts.

Every request is signed afresh per attempt (the signature carries the
time). Attempts are repeated, with a short backoff, when the connection
failed before an answer came (a pooled connection the store had closed,
a refused connect) or when the store answered 500/502/503/504 or 429
(S3's "slow down"): S3 operations are idempotent, and each attempt gets a
new body producer. Every operation has one deadline for its answer,
``request_timeout`` (at most ``idle_timeout``), which its retries and
backoff share; a request body the store keeps taking in pushes it back.
Timeouts are not retried: a frozen store costs a caller one deadline, and
the caller (a client's request) hears "unavailable" within it.

Twisted's Agent is used directly, not treq: nothing here wants treq's
gzip negotiation or buffering.
"""
from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from registryd.storage.s3.bodies import RequestBody, read_body
from registryd.storage.s3.documents import parse_error
from registryd.storage.s3.errors import S3Error, S3Unavailable
from registryd.storage.s3.settings import S3Settings
from registryd.storage.s3.signing import Signer
from registryd.storage.s3.tls import S3TLSPolicy

log = Logger()

#: Statuses worth another attempt.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Seconds before the second, third... attempt.
BACKOFF = (0.1, 0.5, 1.0, 2.0)
#: Error documents are small; anything bigger is cut off.
ERROR_BODY_LIMIT = 64 * 1024
# Failures that mean "no answer came": the request may be sent again.
_NO_ANSWER = (ConnectError, DNSLookupError, RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)


class S3Transport:
    """Sends signed requests to one endpoint through one connection pool."""

    def __init__(self, settings: S3Settings, reactor: Any, pool: HTTPConnectionPool | None = None) -> None:
        self._settings = settings
        self._reactor = reactor
        self._own_pool = pool is None
        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 8
        self._pool = pool
        self._agent = Agent(reactor, contextFactory=S3TLSPolicy(settings.ca_file, settings.verify_tls),
                            connectTimeout=settings.connect_timeout, pool=pool)
        self._signer = Signer(settings.access_key_id, settings.secret_access_key, settings.region)
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self.reactor = reactor

    @property
    def signer(self) -> Signer:
        return self._signer

    async def close(self) -> None:
        """Close idle pooled connections (if the pool is ours) and stop reading files."""
        self._cooperator.stop()
        if self._own_pool:
            await self._pool.closeCachedConnections()

    async def send(self, method: str, url: str, what: str, headers: Mapping[str, str] | None = None,
                   body: RequestBody | None = None, patient: bool = False) -> IResponse:
        """The response to ``method url``, after retries; its body is the caller's to read.

        ``what`` names the operation and key in error messages. Raises
        S3Unavailable when no answer came before the operation's deadline
        (``request_timeout``, retries and backoff included; ``idle_timeout``
        when ``patient``: server-side copies and multipart completions,
        which some stores answer only once the work is done).
        """
        attempts = self._settings.max_attempts
        wait = self._settings.idle_timeout if patient else min(self._settings.request_timeout,
                                                                self._settings.idle_timeout)
        deadline = _Deadline(self._reactor, wait)
        failures: list[str] = []
        for attempt in range(1, attempts + 1):
            backoff = BACKOFF[min(attempt, len(BACKOFF)) - 1]
            last = attempt == attempts
            try:
                response = await self._attempt(method, url, what, headers or {}, body, deadline)
            except _NO_ANSWER as e:
                failures.append(_describe(e))
                if last or deadline.remaining() <= backoff:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise S3Unavailable(f"S3 {what}: {_describe(e)}{tries} ({self._settings.endpoint})") from None
            else:
                if response.code not in RETRY_STATUSES or last or deadline.remaining() <= backoff:
                    if failures:
                        # One line for a hiccup the retries covered (an outage is the caller's one line).
                        log.info("S3 {what}: answered on attempt {attempt} (before: {errors})", what=what,
                                 attempt=attempt, errors="; ".join(failures))
                    return response
                await self.discard(response)
                failures.append(f"status {response.code}")
            await deferLater(self._reactor, backoff, lambda: None)
        raise AssertionError("unreachable")

    async def _attempt(self, method: str, url: str, what: str, headers: Mapping[str, str],
                       body: RequestBody | None, deadline: _Deadline) -> IResponse:
        signed = self._signer.sign(method, url, headers, body.signed_payload if body is not None else b"")
        raw = Headers({name.encode("latin-1"): [value.encode("latin-1")] for name, value in signed.items()})
        if deadline.remaining() <= 0:
            raise S3Unavailable(f"S3 {what}: no answer within {deadline.wait:g}s ({self._settings.endpoint})")
        timer: Any = None

        def progress() -> None:
            # The body is still going out: the store is taking it, so it is not (yet) silent.
            deadline.extend()
            if timer is not None and timer.active():
                timer.reset(deadline.remaining())

        producer = body.producer(self._cooperator, progress) if body is not None else None
        d = self._agent.request(method.encode("ascii"), url.encode("ascii"), raw, producer)
        timer = self._reactor.callLater(deadline.remaining(), d.cancel)
        try:
            return await d
        except Exception as e:
            if not timer.active():
                # Our timer cancelled the request (Agent may wrap that in ResponseNeverReceived).
                raise S3Unavailable(f"S3 {what}: no answer within {deadline.wait:g}s "
                                    f"({self._settings.endpoint})") from None
            if _cancelled(e):
                raise CancelledError() from None  # our caller's: never retried
            if isinstance(e, TimeoutError):
                raise S3Unavailable(f"S3 {what}: connecting timed out after {self._settings.connect_timeout:g}s "
                                    f"({self._settings.endpoint})") from None
            if isinstance(e, ResponseFailed) and not isinstance(e, ResponseNeverReceived):
                raise S3Unavailable(f"S3 {what}: {_describe(e)} ({self._settings.endpoint})") from None
            raise  # retried by send() if it is a "no answer"
        finally:
            if timer.active():
                timer.cancel()

    async def read(self, response: IResponse, what: str, limit: int) -> bytes:
        """A bounded response body (documents, small objects)."""
        def too_large() -> Exception:
            return S3Unavailable(f"S3 {what}: response larger than {limit} bytes")
        return await read_body(response, self._reactor, self._settings.stall_timeout, f"S3 {what}", limit,
                               too_large)

    async def discard(self, response: IResponse) -> None:
        try:
            await self.read(response, "discard", ERROR_BODY_LIMIT)
        except Exception:
            pass

    async def error(self, response: IResponse, operation: str, key: str | None) -> S3Error:
        """The S3Error for an unwanted answer, its code read from the error document."""
        try:
            body = await self.read(response, operation, ERROR_BODY_LIMIT)
        except S3Unavailable:
            body = b""
        parsed = parse_error(body) if body else None
        code, message = parsed if parsed else (None, "")
        return S3Error(response.code, code, message, key, operation)


class _Deadline:
    """When one operation stops waiting for the store: ``wait`` seconds from its start,
    pushed back while a request body is still being taken in."""

    def __init__(self, reactor: Any, wait: float) -> None:
        self._reactor = reactor
        self.wait = wait
        self._at = reactor.seconds() + wait

    def remaining(self) -> float:
        return self._at - self._reactor.seconds()

    def extend(self) -> None:
        self._at = max(self._at, self._reactor.seconds() + self.wait)


def _describe(error: Exception) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(f.getErrorMessage() for f in reasons) or type(error).__name__
    return str(error) or type(error).__name__


def _cancelled(error: Exception) -> bool:
    """Was this request cancelled (Agent wraps a cancellation in its own errors)?"""
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return True
    return any(f.check(CancelledError) for f in getattr(error, "reasons", None) or ())
