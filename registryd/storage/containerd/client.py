"""containerd's gRPC API (content, images, leases, version), awaitable on the Twisted reactor.

grpcio runs its own threads, and ``grpc.aio`` needs an asyncio loop that
Twisted's reactor is not: so unary calls use grpcio's futures, whose
completion is handed to the reactor with ``callFromThread`` (no thread is
held while containerd thinks), and streaming calls (List, Read, Write) run
whole in a small thread pool of their own. Nothing here blocks the reactor.

Every call carries the namespace in the ``containerd-namespace`` metadata
header, and, where given, the lease in ``containerd-lease``: content written
under a lease is kept by containerd's garbage collector while the lease
lives, however unreferenced it is.

The messages are registryd's own minimal copy of containerd's API
(``proto/containerd_api.proto``); the method paths below are containerd's.
"""
from __future__ import annotations

import queue
from typing import Any, Callable, Iterable, Iterator, TypeVar

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from registryd.storage.containerd.errors import ContainerdError, ContainerdUnavailable
from registryd.storage.containerd.proto import containerd_api_pb2 as api
from registryd.threads import BlockingPool

log = Logger()

CONTENT = "/containerd.services.content.v1.Content/"
IMAGES = "/containerd.services.images.v1.Images/"
LEASES = "/containerd.services.leases.v1.Leases/"
VERSION = "/containerd.services.version.v1.Version/Version"
#: The label containerd's GC reads on a lease: it is removed (and what only it held) after this time.
LEASE_EXPIRY_LABEL = "containerd.io/gc.expire"
#: Largest message either way: a Read chunk or a Write chunk, with room to spare.
MAX_MESSAGE = 16 * 1024 * 1024
#: Streaming calls running at once (each holds one thread of the pool).
STREAM_THREADS = 8
#: Seconds a Write may take beyond ``timeout``, per MiB written (a slow disk is not a dead containerd).
WRITE_SECONDS_PER_MIB = 1.0
#: Write messages sent ahead of containerd's answers: it writes one chunk while the next ones are on
#: their way (one round trip per chunk, waited for in turn, made a fill 70 MiB/s); at most this many
#: chunks wait in the stream's queue, so memory stays flat.
WRITE_WINDOW = 4

M = TypeVar("M")


class NotFound(Exception):
    """containerd has no such object (content, image, lease, ingest)."""


class AlreadyExists(Exception):
    """containerd has that object already (content with that digest, an image of that name)."""


class IngestElsewhere(Exception):
    """The ingest is not where the caller thought: ``offset`` bytes long (another writer, a lost body),
    or (``offset`` None) another writer has it open now: containerd locks an ingest's ref while a
    Write stream holds it."""

    def __init__(self, offset: int | None) -> None:
        super().__init__(f"the ingest is {offset} bytes long" if offset is not None
                         else "another writer holds the ingest")
        self.offset = offset


def _locked(error: grpc.RpcError) -> bool:
    """containerd's answer to a Write on a ref another Write holds: UNAVAILABLE, "ref ... locked"."""
    return (isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE
            and " locked" in (error.details() or ""))


_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def translate(method: str, error: grpc.RpcError) -> Exception:
    """The registryd exception for a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else str(error)) or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(details)
    if code in _UNAVAILABLE:
        return ContainerdUnavailable(f"{method.rsplit('/', 2)[-2].rsplit('.', 1)[-1]}.{method.rsplit('/', 1)[-1]}: "
                                     f"{code.name.lower()}: {details}")
    return ContainerdError(method, code.name, details)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


class ContainerdClient:
    """One channel to containerd's socket, for one namespace."""

    def __init__(self, socket: str, namespace: str, reactor: Any, timeout: float) -> None:
        self.socket = socket
        self.namespace = namespace
        self.timeout = timeout
        self._reactor = reactor
        self._channel = grpc.insecure_channel(
            f"unix://{socket}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE),
                     # containerd's socket is local: retry a reconnect soon after a restart.
                     ("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 2000)])
        self._streams = BlockingPool(reactor, STREAM_THREADS, name="registryd-containerd")
        self._streams.start()

    def close(self) -> None:
        self._streams.stop()
        self._channel.close()

    def _metadata(self, lease: str | None) -> list[tuple[str, str]]:
        metadata = [("containerd-namespace", self.namespace)]
        if lease is not None:
            metadata.append(("containerd-lease", lease))
        return metadata

    # -- the two bridges ---------------------------------------------------------

    async def _unary(self, method: str, request: Any, reply: Callable[[bytes], M],
                     lease: str | None = None, timeout: float | None = None) -> M:
        """One unary call through grpcio's future, its outcome delivered on the reactor."""
        call = self._channel.unary_unary(method, request_serializer=_serialize, response_deserializer=reply)
        future = call.future(request, timeout=timeout or self.timeout, metadata=self._metadata(lease))
        result: Deferred[M] = Deferred(lambda _: future.cancel())

        def deliver(done: Any) -> None:
            if result.called:
                return  # cancelled meanwhile
            try:
                value = done.result()
            except grpc.RpcError as e:
                result.errback(translate(method, e))
            except grpc.FutureCancelledError:
                result.errback(ContainerdUnavailable(f"{method}: cancelled"))
            else:
                result.callback(value)

        future.add_done_callback(lambda done: self._reactor.callFromThread(deliver, done))
        return await result

    async def _in_thread(self, method: str, work: Callable[[], M]) -> M:
        """A streaming call, run whole in the client's pool; its errors translated."""
        def run() -> M:
            try:
                return work()
            except grpc.RpcError as e:
                raise translate(method, e) from None
        return await self._streams.run(run)

    def _stream(self, method: str, request: Any, reply: Callable[[bytes], M],
                timeout: float | None = None) -> Iterator[M]:
        call = self._channel.unary_stream(method, request_serializer=_serialize, response_deserializer=reply)
        return call(request, timeout=timeout or self.timeout, metadata=self._metadata(None))  # type: ignore[no-any-return]

    # -- version -----------------------------------------------------------------

    async def version(self, timeout: float | None = None) -> str:
        """containerd's version: the cheapest call that proves it answers."""
        reply = await self._unary(VERSION, api.Empty(), api.VersionResponse.FromString, timeout=timeout)
        return reply.version

    # -- content -----------------------------------------------------------------

    async def info(self, digest: str) -> api.ContentInfo | None:
        try:
            reply = await self._unary(CONTENT + "Info", api.ContentInfoRequest(digest=digest),
                                      api.ContentInfoResponse.FromString)
        except NotFound:
            return None
        return reply.info

    async def update_labels(self, digest: str, labels: dict[str, str]) -> api.ContentInfo:
        """Set (or, with an empty value, remove) these labels of the content, leaving the others."""
        request = api.ContentUpdateRequest(info=api.ContentInfo(digest=digest, labels=labels),
                                           update_mask=FieldMask(paths=[f"labels.{key}" for key in labels]))
        reply = await self._unary(CONTENT + "Update", request, api.ContentUpdateResponse.FromString)
        return reply.info

    async def list_content(self, filters: Iterable[str] = ()) -> list[api.ContentInfo]:
        method = CONTENT + "List"
        request = api.ContentListRequest(filters=list(filters))
        return await self._in_thread(method, lambda: [
            info for reply in self._stream(method, request, api.ContentListResponse.FromString) for info in reply.info])

    async def delete_content(self, digest: str) -> bool:
        try:
            await self._unary(CONTENT + "Delete", api.ContentDeleteRequest(digest=digest), api.Empty.FromString)
        except NotFound:
            return False
        return True

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the content (NotFound if it is not there)."""
        method = CONTENT + "Read"
        request = api.ContentReadRequest(digest=digest, offset=offset, size=size)
        return await self._in_thread(method, lambda: b"".join(
            reply.data for reply in self._stream(method, request, api.ContentReadResponse.FromString)))

    async def statuses(self, filters: Iterable[str] = ()) -> list[api.ContentStatus]:
        reply = await self._unary(CONTENT + "ListStatuses", api.ContentListStatusesRequest(filters=list(filters)),
                                  api.ContentListStatusesResponse.FromString)
        return list(reply.statuses)

    async def abort(self, ref: str) -> bool:
        try:
            await self._unary(CONTENT + "Abort", api.ContentAbortRequest(ref=ref), api.Empty.FromString)
        except NotFound:
            return False
        return True

    async def write(self, ref: str, chunks: Iterable[bytes], total: int, expected: str,
                    lease: str, labels: dict[str, str] | None = None) -> bool:
        """Ingest ``chunks`` under ``ref`` and commit them as ``expected`` (``total`` bytes), under
        ``lease``; False when containerd had that content already (then it is added to the lease).

        The chunks are read in the pool's thread (a file may be read there), one
        message in flight at a time: each is answered before the next is sent,
        so neither side buffers more than a chunk.
        """
        method = CONTENT + "Write"
        timeout = self.timeout + WRITE_SECONDS_PER_MIB * total / (1024 * 1024)
        try:
            await self._in_thread(method, lambda: self._write_blocking(ref, chunks, total, expected, lease,
                                                                        labels or {}, timeout))
        except AlreadyExists:
            await self.add_to_lease(lease, expected)
            if labels:
                await self.update_labels(expected, labels)
            return False
        return True

    def _write_blocking(self, ref: str, chunks: Iterable[bytes], total: int, expected: str, lease: str,
                        labels: dict[str, str], timeout: float) -> None:
        requests: queue.Queue[api.ContentWriteRequest | None] = queue.Queue()
        call = self._channel.stream_stream(CONTENT + "Write", request_serializer=_serialize,
                                           response_deserializer=api.ContentWriteResponse.FromString)
        replies = call(iter(requests.get, None), timeout=timeout, metadata=self._metadata(lease))
        try:
            # The first message opens the writer: with the expected digest, containerd says at
            # once (ALREADY_EXISTS) when it has the content, before any byte is sent.
            requests.put(api.ContentWriteRequest(action=api.STAT, ref=ref, total=total, expected=expected))
            next(replies)
            offset = _send_chunks(requests, replies, ref, chunks, 0)
            requests.put(api.ContentWriteRequest(action=api.COMMIT, ref=ref, offset=offset, total=total,
                                                 expected=expected, labels=labels))
            next(replies)
        except BaseException:
            replies.cancel()
            raise
        finally:
            requests.put(None)

    async def ingest(self, ref: str, chunks: Iterable[bytes], start: int, lease: str,
                     commit: tuple[int, str, dict[str, str]] | None = None,
                     length: int = 0) -> api.ContentWriteResponse:
        """Append ``chunks`` to the ingest ``ref`` (opened, under ``lease``, if it is new), which
        must be ``start`` bytes long (else IngestElsewhere); with ``commit`` (total, expected
        digest, labels), commit it too: containerd checks size and digest (ContainerdError
        FAILED_PRECONDITION if they differ; AlreadyExists, before any byte is sent, if it has that
        content). Without ``commit`` the ingest stays, for a later call (a Write stream
        cannot outlive a request: one is opened per call, resuming at the ingest's offset).
        Returns containerd's last reply: the offset, and the digest of the ingest so far.
        ``length``: the bytes of ``chunks``, for the call's deadline.
        """
        method = CONTENT + "Write"
        timeout = self.timeout + WRITE_SECONDS_PER_MIB * (length + (commit[0] if commit else 0)) / (1024 * 1024)
        return await self._in_thread(method, lambda: self._ingest_blocking(ref, chunks, start, lease, commit,
                                                                           timeout))

    def _ingest_blocking(self, ref: str, chunks: Iterable[bytes], start: int, lease: str,
                         commit: tuple[int, str, dict[str, str]] | None,
                         timeout: float) -> api.ContentWriteResponse:
        requests: queue.Queue[api.ContentWriteRequest | None] = queue.Queue()
        call = self._channel.stream_stream(CONTENT + "Write", request_serializer=_serialize,
                                           response_deserializer=api.ContentWriteResponse.FromString)
        replies = call(iter(requests.get, None), timeout=timeout, metadata=self._metadata(lease))
        try:
            total, expected = (commit[0], commit[1]) if commit else (0, "")
            requests.put(api.ContentWriteRequest(action=api.STAT, ref=ref, total=total, expected=expected))
            try:
                last = next(replies)
            except grpc.RpcError as e:
                if _locked(e):
                    raise IngestElsewhere(None) from None   # another process writes a body of it now
                raise
            if last.offset != start:
                raise IngestElsewhere(last.offset)
            # (offset 0 on a longer ingest would truncate it: the STAT above rules that out)
            offset = _send_chunks(requests, replies, ref, chunks, start)
            if commit is None:
                # An empty write: containerd answers the digest of the ingest so far.
                requests.put(api.ContentWriteRequest(action=api.WRITE, ref=ref, offset=offset))
                last = next(replies)
            else:
                requests.put(api.ContentWriteRequest(action=api.COMMIT, ref=ref, offset=offset, total=commit[0],
                                                     expected=commit[1], labels=commit[2]))
                last = next(replies)
            requests.put(None)
            for _ in replies:
                pass   # the stream's end: containerd has closed its writer, the ref is unlocked
            return last
        except BaseException:
            replies.cancel()
            raise
        finally:
            requests.put(None)

    # -- images ------------------------------------------------------------------

    async def image(self, name: str) -> api.Image | None:
        try:
            reply = await self._unary(IMAGES + "Get", api.ImageGetRequest(name=name), api.ImageGetResponse.FromString)
        except NotFound:
            return None
        return reply.image

    async def images(self, filters: Iterable[str] = ()) -> list[api.Image]:
        reply = await self._unary(IMAGES + "List", api.ImageListRequest(filters=list(filters)),
                                  api.ImageListResponse.FromString)
        return list(reply.images)

    async def put_image(self, image: api.Image) -> api.Image:
        """Create the image, or point the existing one of that name at ``image.target`` with its labels."""
        try:
            reply = await self._unary(IMAGES + "Create", api.ImageCreateRequest(image=image),
                                      api.ImageCreateResponse.FromString)
            return reply.image
        except AlreadyExists:
            pass
        paths = ["target", *(f"labels.{key}" for key in image.labels)]
        updated = await self._unary(IMAGES + "Update",
                                    api.ImageUpdateRequest(image=image, update_mask=FieldMask(paths=paths)),
                                    api.ImageUpdateResponse.FromString)
        return updated.image

    async def delete_image(self, name: str) -> bool:
        try:
            await self._unary(IMAGES + "Delete", api.ImageDeleteRequest(name=name), api.Empty.FromString)
        except NotFound:
            return False
        return True

    # -- leases ------------------------------------------------------------------

    async def create_lease(self, lease: str, expires: str) -> None:
        """A lease that containerd's GC drops at ``expires`` (RFC 3339) with what only it held."""
        try:
            await self._unary(LEASES + "Create",
                              api.LeaseCreateRequest(id=lease, labels={LEASE_EXPIRY_LABEL: expires}),
                              api.LeaseCreateResponse.FromString)
        except AlreadyExists:
            pass

    async def delete_lease(self, lease: str) -> bool:
        try:
            await self._unary(LEASES + "Delete", api.LeaseDeleteRequest(id=lease), api.Empty.FromString)
        except NotFound:
            return False
        return True

    async def leases(self, filters: Iterable[str] = ()) -> list[api.Lease]:
        reply = await self._unary(LEASES + "List", api.LeaseListRequest(filters=list(filters)),
                                  api.LeaseListResponse.FromString)
        return list(reply.leases)

    async def add_to_lease(self, lease: str, digest: str) -> None:
        resource = api.LeaseResource(id=digest, type="content")
        await self._unary(LEASES + "AddResource", api.LeaseAddResourceRequest(id=lease, resource=resource),
                          api.Empty.FromString)


def _send_chunks(requests: queue.Queue[api.ContentWriteRequest | None], replies: Iterator[api.ContentWriteResponse],
                 ref: str, chunks: Iterable[bytes], offset: int) -> int:
    """Send ``chunks`` as WRITE messages from ``offset``, up to WRITE_WINDOW ahead of containerd's
    answers (each checked in order: an error stops the stream); the end offset."""
    in_flight = 0
    for chunk in chunks:
        if in_flight >= WRITE_WINDOW:
            next(replies)
            in_flight -= 1
        requests.put(api.ContentWriteRequest(action=api.WRITE, ref=ref, offset=offset, data=chunk))
        in_flight += 1
        offset += len(chunk)
    for _ in range(in_flight):
        next(replies)
    return offset
