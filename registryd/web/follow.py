"""Stream a blob to a client while its upstream fill is still writing it."""
from __future__ import annotations

from typing import Any, BinaryIO

from registryd.mirror.fill import BlobFill
from registryd.web.sendfile import SMALL_BODY, send_file_range


class FillCommitted(Exception):
    """The fill was committed into the store before this client began: serve it from there."""


async def _open(fill: BlobFill) -> BinaryIO | None:
    """The fill's partial file; raises FillCommitted (or the fill's error) when it is gone."""
    try:
        return open(fill.path, "rb")
    except FileNotFoundError:
        pass
    if fill.verified and not fill.finished:
        await fill.ended()  # moved into the store just now: wait for the commit to end
    if fill.done:
        raise FillCommitted() from None
    if fill.error is not None:
        raise fill.error
    return None


def abort(request: Any) -> None:
    """End the connection so the client sees an incomplete body, never a short complete one."""
    transport = getattr(request, "transport", None) or getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


async def stream_fill(request: Any, fill: BlobFill, *, reactor: Any, stall_timeout: float) -> int:
    """Send the whole blob as the fill writes it; returns bytes sent.

    Raises FillFailed if the fill fails before anything was sent; once the
    response has begun, a failure aborts the connection instead. Raises
    FillCommitted when the partial file was already moved into the store.

    Only ``fill.releasable`` bytes go out before the digest is verified, so
    the blob's last byte waits for the check: a client of a fill that fails
    (wrong bytes of the right length included) never holds a complete body.
    The first bytes go out as soon as they land. After that the client is
    sent more only in batches larger than one small write, which go through
    the backpressured producer: a slow client holds at most one small batch
    in memory and never slows the fill.
    """
    f = await _open(fill)
    if f is None:
        abort(request)
        return 0
    sent = 0
    with f:
        while True:
            if fill.error is not None and not fill.verified:
                if not request.startedWriting:
                    raise fill.error  # nothing sent yet: the client gets an error document
                abort(request)
                return sent
            available = fill.releasable
            if available > sent and (sent == 0 or available - sent > SMALL_BODY or fill.verified):
                await send_file_range(request, f, sent, available - sent, reactor=reactor,
                                      stall_timeout=stall_timeout)
                sent = available
            elif fill.verified and sent >= fill.written:
                if not fill.finished:
                    # The response ends once the blob is stored (or storing it
                    # failed): the client's next request then finds it cached.
                    await fill.ended()
                return sent
            else:
                await fill.progress(sent if sent == 0 else sent + SMALL_BODY)
