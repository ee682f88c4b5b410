"""Can this node use its bucket? A small object written and read back, at start-up and for /readyz.

A HEAD of a missing key cannot tell "no such key" from "no such bucket"
(both are a bodiless 404), and a read proves nothing about writes: the
probe PUTs ``_registryd/ready`` and GETs it back. Every node writes the
same key, so the bucket holds one probe object however many nodes ran.

At start-up the reactor is not running yet: ``check_bucket`` makes its
requests with the standard library, blocking, under ``request_timeout``,
on a key of its own that it deletes again: a node that only started has
changed nothing in the bucket.
``ReadyProbe`` does the same over Twisted for /readyz, on a client of its
own (no retries, no queueing behind the node's busy connections), within
``ready_timeout`` for the whole probe; probes asked for at once share one.
Admin commands ask it only to read (a missing probe object is fine then):
they may run with read-only credentials and must change nothing.
"""
from __future__ import annotations

import http.client
import ssl
import uuid
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from registryd.deferreds import Coalescer
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.documents import parse_error
from registryd.storage.s3.errors import S3Error, S3Unavailable
from registryd.storage.layout import READY_PROBE
from registryd.storage.s3.settings import S3Settings
from registryd.storage.s3.signing import Signer
from registryd.storage.s3.urls import object_url

#: Where start-up probes go (one key per check, deleted after it).
START_PROBES = "_registryd/start-"
#: At most this much of the probe object is read back.
PROBE_LIMIT = 4096


class BucketUnusable(Exception):
    """The bucket cannot be used; the message is one line for the operator."""


def explain(error: Exception, settings: S3Settings) -> str:
    """One line saying why ``settings``' bucket cannot be used, for logs, /readyz and start-up."""
    where = f"bucket {settings.bucket!r} at {settings.endpoint}"
    if isinstance(error, S3Error):
        if error.code == "NoSuchBucket":
            return f"object store: {where} does not exist (NoSuchBucket; create it first)"
        if error.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"object store: {error} ({where} refuses these credentials)"
        return f"object store: {error} ({where})"
    return f"object store: {where} is unreachable: {error}"


def check_bucket(settings: S3Settings) -> None:
    """Write, read back and delete a probe object, blocking (start-up); raises BucketUnusable."""
    signer = Signer(settings.access_key_id, settings.secret_access_key, settings.region)
    key = f"{START_PROBES}{uuid.uuid4().hex}"
    url = object_url(settings, key)
    try:
        _blocking(settings, signer, "PUT", url, key, _probe_body())
        _blocking(settings, signer, "GET", url, key, b"")
        _blocking(settings, signer, "DELETE", url, key, b"")
    except (S3Error, S3Unavailable) as e:
        raise BucketUnusable(explain(e, settings)) from None


def _probe_body() -> bytes:
    # The same bytes every time: a probe changes nothing a snapshot of the bucket would see.
    return b"registryd readiness probe\n"


def _blocking(settings: S3Settings, signer: Signer, method: str, url: str, key: str, body: bytes) -> bytes:
    headers = signer.sign(method, url, {}, body)
    parts = urlsplit(url)
    timeout = min(settings.request_timeout, settings.idle_timeout)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=settings.ca_file)
        if not settings.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    what = f"{method} {key}"
    try:
        connection.request(method, target, body=body if method == "PUT" else None, headers=headers)
        response = connection.getresponse()
        data = response.read(PROBE_LIMIT + 1)
    except (OSError, http.client.HTTPException) as e:
        reason = "no answer within {:g}s".format(timeout) if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
        raise S3Unavailable(f"S3 {what}: {reason}") from None
    finally:
        connection.close()
    if response.status not in (200, 204):
        parsed = parse_error(data) if data else None
        code, message = parsed if parsed else (None, "")
        raise S3Error(response.status, code, message, key, method)
    return data


@attrs.define
class ReadyProbe:
    """The /readyz check of one node's bucket (see the module docstring)."""

    settings: S3Settings
    reactor: Any
    _client: S3Client | None = None
    _running: Coalescer[str | None] = attrs.field(factory=Coalescer)

    def check(self, write: bool = True) -> Deferred[str | None]:
        """Fires with why the bucket cannot be used now, or None; never fails.

        ``write``: write the probe object, then read it back; else only read it.
        A waiter that goes away (its client hung up) leaves the probe to the others.
        """
        return self._running.run(write, lambda: self._answer(write))

    async def _answer(self, write: bool) -> str | None:
        try:
            return await self._probe(write)
        except Exception:
            return f"object store probe failed: {Failure().getErrorMessage()}"

    async def _probe(self, write: bool) -> str | None:
        deadline = self.settings.ready_timeout
        if self._client is None:
            # Its own pool and no retries: the probe says how the store is now.
            self._client = S3Client(attrs.evolve(self.settings, max_attempts=1, request_timeout=deadline,
                                                 idle_timeout=deadline), self.reactor)
        attempt = Deferred.fromCoroutine(self._write_and_read(self._client) if write else self._read(self._client))
        timer = self.reactor.callLater(deadline, attempt.cancel)
        try:
            await attempt
        except CancelledError:
            return f"object store: bucket {self.settings.bucket!r} at {self.settings.endpoint} " \
                   f"did not answer within {deadline:g}s"
        except (S3Error, S3Unavailable) as e:
            return explain(e, self.settings)
        finally:
            if timer.active():
                timer.cancel()
        return None

    @staticmethod
    async def _write_and_read(client: S3Client) -> None:
        await client.put_object(READY_PROBE, _probe_body())
        if await client.get_small(READY_PROBE, PROBE_LIMIT) is None:
            raise S3Error(404, "NoSuchKey", "the probe object just written is not there", READY_PROBE, "GET")

    @staticmethod
    async def _read(client: S3Client) -> None:
        await client.get_small(READY_PROBE, PROBE_LIMIT)   # None (no probe yet) is an answer too

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
