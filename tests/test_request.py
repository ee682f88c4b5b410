"""The streaming request, driven byte by byte through a real HTTPChannel.

Also pins the Twisted internals it relies on: the request line is still on
the channel (``_command``/``_path``) when ``gotLength`` runs. A Twisted
upgrade that changes this fails here first.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http

from registryd.config import Config
from registryd.storage import FsStore
from registryd.threads import InlinePool
from registryd.web.app import RegistryAPI
from registryd.web.request import RegistryRequest
from registryd.web.site import RegistrySite


def make_site(tmp_path, **settings):
    config = Config(data_dir=str(tmp_path), **settings)
    store = FsStore(config.data_dir, InlinePool())
    store.prepare()
    return RegistrySite(RegistryAPI(store, config, reactor), reactor), store


def feed(site, raw: bytes, one_byte_at_a_time: bool = True) -> bytes:
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    if one_byte_at_a_time:
        for i in range(len(raw)):
            channel.dataReceived(raw[i:i + 1])
    else:
        channel.dataReceived(raw)
    hang_up(channel)
    return transport.value()


def hang_up(channel: Any) -> None:
    """End a channel on a StringTransport, whose timers run on the real reactor:
    left open, its idle timeout would fire in some later test."""
    channel.connectionLost(Failure(ConnectionDone("the test is over")))


def test_request_line_is_on_the_channel_when_gotLength_runs() -> None:
    seen = {}

    class Probe(http.Request):
        def gotLength(self, length):
            seen["command"], seen["path"] = self.channel._command, self.channel._path
            seen["length"] = length
            seen["header"] = self.requestHeaders.getRawHeaders(b"x-probe")
            super().gotLength(length)

        def process(self):
            self.finish()

    channel = http.HTTPChannel()
    channel.requestFactory = Probe
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"PATCH /v2/a/b?x=1 HTTP/1.1\r\nHost: h\r\nX-Probe: yes\r\nContent-Length: 3\r\n\r\nabc")
    hang_up(channel)
    assert seen == {"command": b"PATCH", "path": b"/v2/a/b?x=1", "length": 3, "header": [b"yes"]}


def test_patch_body_goes_to_the_session_file_not_memory(tmp_path) -> None:
    site, store = make_site(tmp_path)
    upload = Deferred.fromCoroutine(store.uploads.create("a/b")).result  # no real wait on disk
    data = os.urandom(3000)
    captured = []
    original = RegistryRequest.handleContentChunk

    def spy(self, chunk):
        original(self, chunk)
        captured.append(self.content.tell())

    RegistryRequest.handleContentChunk = spy
    try:
        response = feed(site, f"PATCH {upload.location()} HTTP/1.1\r\nHost: h\r\n"
                              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    finally:
        RegistryRequest.handleContentChunk = original
    assert response.startswith(b"HTTP/1.1 202 ")
    assert set(captured) == {0}, "the body was buffered in request.content"
    with open(os.path.join(str(tmp_path), "uploads", upload.id, "data"), "rb") as f:
        assert f.read() == data
    assert upload.size == len(data)
    assert upload.hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_oversized_manifest_is_refused_before_reading_it(tmp_path) -> None:
    site, store = make_site(tmp_path, max_manifest_size=100)
    body = b"{" + b" " * 200 + b"}"
    response = feed(site, b"PUT /v2/a/manifests/t HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body, one_byte_at_a_time=False)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b'"SIZE_INVALID"' in response
    assert os.listdir(os.path.join(str(tmp_path), "repositories")) == []


def test_chunked_manifest_past_the_limit_is_refused(tmp_path) -> None:
    site, _ = make_site(tmp_path, max_manifest_size=100)
    chunk = b" " * 80
    raw = (b"PUT /v2/a/manifests/t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n")
    assert feed(site, raw).startswith(b"HTTP/1.1 413 ")


def test_every_response_names_the_api_version(tmp_path) -> None:
    site, _ = make_site(tmp_path)
    for raw in (b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n", b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n",
                b"GET /v2/A/tags/list HTTP/1.1\r\nHost: h\r\n\r\n"):
        response = feed(site, raw, one_byte_at_a_time=False)
        assert b"Docker-Distribution-Api-Version: registry/2.0" in response


def test_tls_handshake_on_the_plain_port_is_answered_at_once(tmp_path) -> None:
    """Clients of "insecure" registries try TLS first; they must not wait for a timeout."""
    site, _ = make_site(tmp_path)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert transport.disconnecting
    hang_up(channel)
