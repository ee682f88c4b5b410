"""The S3 client: URL building and settings without a network, fault injection
against small in-process servers, and every operation against a real radosgw."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, AsyncIterator

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from s3_helpers import PausingSink, PeakRss, read
from support.ports import free_port
from registryd.storage.s3 import (
    FileRegion,
    ObjectTooLarge,
    Part,
    S3Client,
    S3ConfigError,
    S3Error,
    S3Settings,
    S3Unavailable,
)
from registryd.storage.s3.documents import parse_error, parse_object_list
from registryd.secrets import SecretUnavailable
from registryd.storage.s3.urls import bucket_url, copy_source, object_url, with_query

MiB = 1024 * 1024
ACCESS = "AKIAEXAMPLE"
SECRET = "secret/EXAMPLE+key"


def settings(**overrides: Any) -> S3Settings:
    values: dict[str, Any] = {"endpoint": "http://127.0.0.1:9000", "bucket": "reg", "access_key_id": ACCESS,
                              "secret_access_key": SECRET}
    values.update(overrides)
    return S3Settings(**values)


# -- URLs ---------------------------------------------------------------------

def test_path_style_urls() -> None:
    s = settings(endpoint="https://rgw.example:7480", prefix="site-a/")
    assert bucket_url(s) == "https://rgw.example:7480/reg"
    assert object_url(s, "blobs/sha256/ab") == "https://rgw.example:7480/reg/site-a/blobs/sha256/ab"
    assert object_url(s, "a b+c/ü~x") == "https://rgw.example:7480/reg/site-a/a%20b%2Bc/%C3%BC~x"
    assert (object_url(s, "k", [("partNumber", "3"), ("uploadId", "2~a/b=c")])
            == "https://rgw.example:7480/reg/site-a/k?partNumber=3&uploadId=2~a%2Fb%3Dc")
    assert with_query(bucket_url(s), [("delete", None)]) == "https://rgw.example:7480/reg?delete"
    assert copy_source(s, "a b") == "/reg/site-a/a%20b"


def test_virtual_host_urls() -> None:
    s = settings(endpoint="https://s3.eu-west-1.amazonaws.com", addressing="virtual")
    assert bucket_url(s) == "https://reg.s3.eu-west-1.amazonaws.com/"
    assert object_url(s, "x/y z") == "https://reg.s3.eu-west-1.amazonaws.com/x/y%20z"
    assert (object_url(s, "k", [("uploads", None)]) == "https://reg.s3.eu-west-1.amazonaws.com/k?uploads")
    # The copy source always names the bucket in the path, whatever the addressing.
    assert copy_source(s, "x/y z") == "/reg/x/y%20z"
    with_port = settings(endpoint="http://minio.local:9000", addressing="virtual", prefix="p/")
    assert object_url(with_port, "k") == "http://reg.minio.local:9000/p/k"


def test_keys_are_checked() -> None:
    s = settings(prefix="p/")
    with pytest.raises(ValueError, match="empty"):
        object_url(s, "")
    with pytest.raises(ValueError, match="1024"):
        object_url(s, "k" * 1023)
    object_url(s, "k" * 1022)


# -- settings -----------------------------------------------------------------

BASE = {"endpoint": "http://127.0.0.1:7480", "bucket": "registry", "access_key_id": "AK",
        "secret_access_key": "SK"}


def test_settings_from_table() -> None:
    s = S3Settings.from_table({**BASE, "endpoint": "https://rgw.example/", "region": "eu-west-1",
                               "addressing": "virtual", "verify_tls": False, "prefix": "/site-a/nodes",
                               "part_size": 8 * MiB, "connect_timeout": 5, "idle_timeout": 20,
                               "request_timeout": 4, "ready_timeout": 2, "max_attempts": 1})
    assert (s.idle_timeout, s.request_timeout, s.ready_timeout) == (20, 4, 2)
    assert s.endpoint == "https://rgw.example"
    assert s.prefix == "site-a/nodes/"
    assert (s.region, s.addressing, s.verify_tls, s.part_size) == ("eu-west-1", "virtual", False, 8 * MiB)
    defaults = S3Settings.from_table(BASE)
    assert (defaults.addressing, defaults.part_size, defaults.prefix, defaults.verify_tls) == ("path", 16 * MiB,
                                                                                            "", True)
    # An answer is awaited for less than a body may pause; /readyz's whole probe is shorter still.
    assert (defaults.idle_timeout, defaults.request_timeout, defaults.ready_timeout) == (60, 10, 3)
    assert "SK" not in repr(defaults)


def test_secret_from_env_and_file(tmp_path: Any, monkeypatch: Any) -> None:
    table = {k: v for k, v in BASE.items() if k != "secret_access_key"}
    monkeypatch.setenv("REGISTRYD_TEST_S3_SECRET", "from-env")
    assert S3Settings.from_table({**table, "secret_access_key_env": "REGISTRYD_TEST_S3_SECRET"}
                                 ).secret_access_key == "from-env"
    creds = tmp_path / "s3-credentials"
    creds.write_text("AKFILE:secret:with:colons\n")
    table.pop("access_key_id")
    s = S3Settings.from_table({**table, "credentials_file": str(creds)})
    assert (s.access_key_id, s.secret_access_key) == ("AKFILE", "secret:with:colons")


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "unknown key 'storage.s3.colour'"),
    ({"bucket": None}, "'storage.s3' needs a 'bucket'"),
    ({"endpoint": None}, "'storage.s3' needs a 'endpoint'"),
    ({"endpoint": "rgw.example"}, "'storage.s3.endpoint' must be http(s)://host[:port]"),
    ({"endpoint": "http://rgw.example/path"}, "'storage.s3.endpoint' must be http(s)://host[:port]"),
    ({"bucket": "Upper_Case"}, "'storage.s3.bucket' must be 3-63 lowercase"),
    ({"bucket": "ab"}, "'storage.s3.bucket' must be 3-63 lowercase"),
    ({"addressing": "dns"}, "'storage.s3.addressing' must be \"path\" or \"virtual\""),
    ({"part_size": 1024}, "'storage.s3.part_size' must be between 5242880 (5 MiB)"),
    ({"part_size": True}, "'storage.s3.part_size' must be an integer, not bool True"),
    ({"verify_tls": "yes"}, "'storage.s3.verify_tls' must be true or false"),
    ({"idle_timeout": 0}, "'storage.s3.idle_timeout' must be greater than zero"),
    ({"request_timeout": -1}, "'storage.s3.request_timeout' must be greater than zero"),
    ({"ready_timeout": "3s"}, "'storage.s3.ready_timeout' must be an integer, not str '3s'"),
    ({"region": "US East"}, "'storage.s3.region' must be a region name"),
    ({"secret_access_key": None}, "give exactly one of secret_access_key, secret_access_key_env"),
    ({"secret_access_key_env": "X"}, "give exactly one of"),
    ({"secret_access_key": None, "credentials_file": "/nonexistent/creds"},
     "access_key_id comes from credentials_file; give only one"),
    ({"access_key_id": None}, "'storage.s3' needs an 'access_key_id'"),
    ({"ca_file": "/nonexistent/ca.pem"}, "'storage.s3.ca_file': cannot read /nonexistent/ca.pem"),
])
def test_settings_errors_are_one_line(change: dict[str, Any], message: str, monkeypatch: Any) -> None:
    monkeypatch.delenv("REGISTRYD_TEST_UNSET_VARIABLE", raising=False)
    table = {**BASE, **change}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(S3ConfigError) as caught:
        S3Settings.from_table(table)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("change, message", [
    ({"secret_access_key": None, "secret_access_key_env": "REGISTRYD_TEST_UNSET_VARIABLE"},
     "'storage.s3.secret_access_key_env': environment variable REGISTRYD_TEST_UNSET_VARIABLE is not set"),
    ({"secret_access_key": None, "access_key_id": None, "credentials_file": "/nonexistent/creds"},
     "'storage.s3.credentials_file': cannot read /nonexistent/creds"),
])
def test_secrets_are_read_when_the_client_is_made(change: dict[str, Any], message: str, monkeypatch: Any) -> None:
    """The table is valid without the secret at hand; the S3 client reads it, or says in one line why not."""
    monkeypatch.delenv("REGISTRYD_TEST_UNSET_VARIABLE", raising=False)
    table = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    settings = S3Settings.from_table(table)
    for read in (lambda: settings.secret_access_key, lambda: S3Client(settings, Clock())):
        with pytest.raises(SecretUnavailable) as caught:
            read()
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_malformed_credentials_file(tmp_path: Any) -> None:
    creds = tmp_path / "creds"
    creds.write_text("only-a-key\n")
    table = {k: v for k, v in BASE.items() if k not in ("secret_access_key", "access_key_id")}
    settings = S3Settings.from_table({**table, "credentials_file": str(creds)})
    with pytest.raises(SecretUnavailable, match="must hold one line 'access_key_id:secret_access_key'"):
        settings.secret_access_key


def test_botocore_is_imported_only_for_a_client() -> None:
    code = ("import sys; import registryd.storage.s3 as s3; import registryd.service; "
            "assert 'botocore' not in sys.modules, 'imported early'; "
            "from twisted.internet import reactor; "
            "s3.S3Client(s3.S3Settings(endpoint='http://127.0.0.1:1', bucket='abc', access_key_id='a', "
            "secret_access_key='b'), reactor); assert 'botocore' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_error_documents() -> None:
    assert parse_error(b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code><Message>gone</Message>'
                       b'<Key>k</Key></Error>') == ("NoSuchKey", "gone")
    assert parse_error(b"<html>proxy error</html>") is None
    assert parse_error(b"not xml") is None
    error = S3Error(404, "NoSuchKey", "The specified\nkey does not exist.", "blobs/x", "GET")
    assert str(error) == "S3 GET blobs/x: 404 NoSuchKey: The specified key does not exist."
    assert str(S3Error(403, None, operation="HEAD", key="k")) == "S3 HEAD k: 403 AccessDenied"
    assert S3Error(503, "SlowDown").retryable and not S3Error(404, "NoSuchKey").retryable


def test_listing_document_strips_the_prefix() -> None:
    page = parse_object_list(
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>true</IsTruncated>'
        b'<Contents><Key>p/a&amp;b</Key><Size>3</Size><LastModified>2024-01-02T03:04:05.500Z</LastModified>'
        b'<ETag>&quot;abc&quot;</ETag></Contents><CommonPrefixes><Prefix>p/d/</Prefix></CommonPrefixes>'
        b'<NextContinuationToken>tok</NextContinuationToken></ListBucketResult>', "p/")
    assert [(e.key, e.size, e.etag, e.is_prefix) for e in page.entries] == [("a&b", 3, "abc", False),
                                                                          ("d/", 0, "", True)]
    assert page.entries[0].last_modified == 1704164645.5
    assert page.next_token == "tok"


# -- fault injection against small local servers --------------------------------

class Scripted(Resource):
    """Answers each request with the next (status, body) of a script, forever the last one."""

    isLeaf = True

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.requests: list[tuple[bytes, bytes]] = []

    def render(self, request: Any) -> bytes:
        self.requests.append((request.method, request.uri))
        status, body = self.answers[min(len(self.requests), len(self.answers)) - 1]
        request.setResponseCode(status)
        return body


@pytest_twisted.async_yield_fixture
async def listen() -> AsyncIterator[Any]:
    """Factory: listen with a twisted.web resource or a protocol factory on a free loopback port."""
    ports: list[Any] = []
    protocols: list[Any] = []

    def make(thing: Any) -> str:
        factory: Any = Site(thing) if isinstance(thing, Resource) else thing
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        if hasattr(thing, "connections"):
            protocols.append(thing)
        return f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]

    yield make
    for factory in protocols:
        for protocol in factory.connections:
            protocol.transport.abortConnection()
    for port in ports:
        await port.stopListening()


class Silent(Factory):
    """Accepts connections and, if told, answers with headers and a few body bytes; then says nothing."""

    def __init__(self, head: bytes = b"") -> None:
        self.head = head
        self.connections: list[Protocol] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        factory = self

        class Quiet(Protocol):
            def connectionMade(self) -> None:
                factory.connections.append(self)

            def dataReceived(self, data: bytes) -> None:
                if factory.head and b"\r\n\r\n" in data and self.transport is not None:
                    self.transport.write(factory.head)

        return Quiet()


def fake_client(endpoint: str, **overrides: Any) -> S3Client:
    return S3Client(settings(endpoint=endpoint, **overrides), reactor)


@pytest_twisted.ensureDeferred
async def test_retries_slow_down_then_succeeds(listen: Any) -> None:
    slow = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    resource = Scripted((503, slow), (500, b""), (200, b""))
    client = fake_client(listen(resource))
    try:
        await client.put_object("k", b"data")
        assert len(resource.requests) == 3
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_gives_up_after_max_attempts(listen: Any) -> None:
    resource = Scripted((503, b"<Error><Code>SlowDown</Code><Message>later</Message></Error>"))
    client = fake_client(listen(resource), max_attempts=2)
    try:
        with pytest.raises(S3Error) as caught:
            await client.get_small("k", 100)
        assert (caught.value.status, caught.value.code) == (503, "SlowDown")
        assert len(resource.requests) == 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_error_inside_a_200_answer(listen: Any) -> None:
    # S3 may start a long copy with 200 and report its failure in the body.
    resource = Scripted((200, b"<Error><Code>InternalError</Code><Message>copy failed</Message></Error>"))
    client = fake_client(listen(resource))
    try:
        with pytest.raises(S3Error) as caught:
            await client.copy_object("a", "b")
        assert caught.value.code == "InternalError"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_unavailable() -> None:
    client = fake_client(f"http://127.0.0.1:{free_port()}", max_attempts=2)
    try:
        with pytest.raises(S3Unavailable) as caught:
            await client.head_object("k")
        assert "refused" in str(caught.value) and "\n" not in str(caught.value)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_no_answer_times_out(listen: Any) -> None:
    client = fake_client(listen(Silent()), idle_timeout=0.5)
    try:
        began = time.monotonic()
        with pytest.raises(S3Unavailable, match=r"no answer within 0.5s"):
            await client.head_object("k")
        assert time.monotonic() - began < 3
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_an_answer_is_awaited_request_timeout_not_idle_timeout(listen: Any) -> None:
    client = fake_client(listen(Silent()), idle_timeout=30, request_timeout=0.5)
    try:
        began = time.monotonic()
        with pytest.raises(S3Unavailable, match=r"no answer within 0.5s"):
            await client.put_object("k", b"data")
        assert time.monotonic() - began < 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_copies_are_awaited_idle_timeout(listen: Any) -> None:
    """A store may answer a server-side copy only once it is done: that wait is idle_timeout's."""
    client = fake_client(listen(Silent()), idle_timeout=1, request_timeout=0.2)
    try:
        began = time.monotonic()
        with pytest.raises(S3Unavailable, match=r"no answer within 1s"):
            await client.copy_object("a", "b")
        assert 0.9 < time.monotonic() - began < 3
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_retries_share_the_operation_deadline(listen: Any) -> None:
    """A store that keeps answering 503 is not asked ten times: the retries stop at the deadline."""
    resource = Scripted((503, b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>"))
    client = fake_client(listen(resource), max_attempts=10, request_timeout=0.4)
    try:
        began = time.monotonic()
        with pytest.raises(S3Error) as caught:
            await client.head_object("k")
        assert caught.value.status == 503 and caught.value.retryable
        assert len(resource.requests) == 2    # backoff 0.1 s, then 0.5 s would pass the deadline
        assert time.monotonic() - began < 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_body_that_stops_times_out(listen: Any) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"x\"\r\n\r\n0123456789"
    client = fake_client(listen(Silent(head)), idle_timeout=0.5)
    try:
        sink = Sink()
        with pytest.raises(S3Unavailable, match=r"no data for 0.5s after 10 bytes"):
            await client.get_object("k", sink)
        assert sink.received == 10
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_body_that_stops_is_given_up_after_request_timeout(listen: Any) -> None:
    """A store frozen mid-body is as unavailable as one that does not answer: the
    short request_timeout applies, not idle_timeout."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"x\"\r\n\r\n0123456789"
    client = fake_client(listen(Silent(head)), idle_timeout=30, request_timeout=0.5)
    try:
        began = time.monotonic()
        with pytest.raises(S3Unavailable, match=r"no data for 0.5s after 10 bytes"):
            await client.get_object("k", Sink())
        assert time.monotonic() - began < 3
    finally:
        await client.close()


class DropsFirst(Factory):
    """A server that drops its first connection mid-body, then takes PUTs and keeps their bodies."""

    def __init__(self) -> None:
        self.connections: list[Protocol] = []
        self.bodies: list[bytes] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        factory = self
        number = len(self.connections)

        class Receiver(Protocol):
            buffer = b""

            def connectionMade(self) -> None:
                factory.connections.append(self)

            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.buffer += data
                head, sep, body = self.buffer.partition(b"\r\n\r\n")
                if not sep:
                    return
                if number == 0 and body:
                    self.transport.abortConnection()
                    return
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                if len(body) == length:
                    factory.bodies.append(body)
                    self.buffer = b""
                    self.transport.write(b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: "e"\r\n\r\n')

        return Receiver()


@pytest_twisted.ensureDeferred
async def test_a_dropped_upload_is_sent_again_from_the_start(listen: Any, tmp_path: Any) -> None:
    path = tmp_path / "body"
    data = bytes(range(256)) * 4096  # 1 MiB: several reads
    path.write_bytes(data)
    server = DropsFirst()
    client = fake_client(listen(server))
    try:
        assert await client.put_object("k", str(path)) == "e"
        assert server.bodies == [data]
        assert len(server.connections) == 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_metadata_must_be_ascii() -> None:
    client = fake_client("http://127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="printable ASCII"):
            await client.put_object("k", b"v", metadata={"name": "caf\u00e9"})
        with pytest.raises(ValueError, match="printable ASCII"):
            await client.create_multipart("k", metadata={"bad": "a\r\nInjected: 1"})
    finally:
        await client.close()


# -- against radosgw --------------------------------------------------------------

@pytest_twisted.async_yield_fixture
async def s3(ceph_s3: Any) -> AsyncIterator[S3Client]:
    """A client on a fresh bucket, with a key prefix so that stripping it is tested too."""
    client = await ceph_s3.new_bucket(prefix="node/")
    yield client
    await client.close()


def write_file(path: str, size: int, seed: bytes = b"") -> str:
    """A file of ``size`` pseudo-random bytes, written 1 MiB at a time; returns its sha256."""
    hasher = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            piece = (i.to_bytes(8, "big") + block[8:])[:min(MiB, size - i)]
            hasher.update(piece)
            f.write(piece)
    return hasher.hexdigest()


@attrs.define
class Sink(PausingSink):
    """Hashes, never keeps: the downloads here may be large."""

    keep: bool = False


@pytest_twisted.ensureDeferred
async def test_put_head_get(s3: S3Client) -> None:
    key = "repositories/lib/app/_manifests/tags/v1 ü+x"
    etag = await s3.put_object(key, b"hello world", content_type="application/json",
                               metadata={"Digest": "sha256:abc"})
    assert etag == hashlib.md5(b"hello world").hexdigest()
    info = await s3.head_object(key)
    assert info is not None
    assert (info.size, info.etag, info.content_type) == (11, etag, "application/json")
    assert info.metadata == {"digest": "sha256:abc"}
    assert info.last_modified is not None and abs(info.last_modified - time.time()) < 300
    assert await s3.get_small(key, 100) == b"hello world"
    assert await read(s3, key) == b"hello world"
    assert await s3.head_object("missing") is None
    assert await s3.get_small("missing", 100) is None
    with pytest.raises(ObjectTooLarge):
        await s3.get_small(key, 5)
    with pytest.raises(S3Error) as caught:
        await read(s3, "missing")
    assert (caught.value.status, caught.value.code) == (404, "NoSuchKey")
    # The prefix is applied: the object sits under node/ in the bucket.
    bare = S3Client(attrs.evolve(s3.settings, prefix=""), reactor)
    try:
        assert await bare.get_small("node/" + key, 100) == b"hello world"
    finally:
        await bare.close()


@pytest_twisted.ensureDeferred
async def test_64_mib_is_streamed_both_ways_in_flat_memory(s3: S3Client, tmp_path: Any) -> None:
    size = 64 * MiB
    path = str(tmp_path / "big")
    digest = write_file(path, size, b"big")
    await s3.put_object("warm-up", b"x")
    rss = PeakRss()
    rss.start()
    try:
        began = time.monotonic()
        etag = await s3.put_object("big", path)
        upload_seconds = time.monotonic() - began
        info = await s3.head_object("big")
        assert info is not None and info.size == size and info.etag == etag
        sink = Sink(pause_every=4 * MiB)
        began = time.monotonic()
        got = await s3.get_object("big", sink)
        download_seconds = time.monotonic() - began
    finally:
        rss.stop()
    assert got.size == size and sink.received == size and sink.digest == digest
    # Backpressure: once paused, at most what one read had already pulled off the socket arrives.
    assert sink.pauses >= 10
    assert sink.max_while_paused <= 256 * 1024, sink.max_while_paused
    rise = rss.rise_mib
    print(f"64 MiB up {upload_seconds:.2f}s, down {download_seconds:.2f}s, RSS rise {rise:.1f} MiB")
    assert rise < 24, f"RSS rose by {rise:.1f} MiB for a 64 MiB object"


@pytest_twisted.ensureDeferred
async def test_ranges(s3: S3Client) -> None:
    data = bytes(range(256)) * 4
    await s3.put_object("r", data)
    assert await read(s3, "r", (0, 9)) == data[:10]
    assert await read(s3, "r", (500, 500)) == data[500:501]
    assert await read(s3, "r", (1000, None)) == data[1000:]
    assert await read(s3, "r", (1000, 5000)) == data[1000:]
    sink = Sink()
    info = await s3.get_object("r", sink, (10, 19))
    assert info.size == len(data) and sink.received == 10
    with pytest.raises(S3Error) as caught:
        await read(s3, "r", (2000, None))
    assert (caught.value.status, caught.value.code) == (416, "InvalidRange")
    with pytest.raises(ValueError):
        await read(s3, "r", (5, 4))


async def put_many(client: S3Client, keys: list[str], concurrency: int = 32) -> None:
    pending = iter(keys)

    async def worker() -> None:
        for key in pending:
            await client.put_object(key, key.encode())

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(concurrency)])


async def listed(client: S3Client, prefix: str = "", **kw: Any) -> list[Any]:
    return [entry async for entry in client.list_objects(prefix, **kw)]


@pytest_twisted.ensureDeferred
async def test_list_pages(s3: S3Client) -> None:
    keys = [f"p/{i:03d}" for i in range(25)] + ["q/a", "q/b/c", "r"]
    await put_many(s3, keys)
    entries = await listed(s3, "p/", page_size=7)
    assert [e.key for e in entries] == keys[:25]
    assert all(e.size == 5 and e.last_modified and e.etag for e in entries)
    assert [e.key for e in await listed(s3, page_size=2)] == sorted(keys)
    rolled = await listed(s3, delimiter="/", page_size=1)
    assert sorted((e.key, e.is_prefix) for e in rolled) == [("p/", True), ("q/", True), ("r", False)]
    assert [e.key for e in await listed(s3, "q/", delimiter="/")] == ["q/a", "q/b/"]
    assert await listed(s3, "nothing/") == []
    with pytest.raises(ValueError):
        await listed(s3, page_size=1001)


@pytest_twisted.ensureDeferred
async def test_more_than_1000_keys_list_and_batch_delete(s3: S3Client) -> None:
    keys = [f"many/{i:05d}" for i in range(1005)]
    await put_many(s3, keys)
    assert [e.key for e in await listed(s3, "many/")] == keys  # two pages of at most 1000
    assert await s3.delete_objects(keys[:10] + ["many/never-existed"]) == []
    assert len(await listed(s3, "many/")) == 995
    assert await s3.delete_objects(keys) == []  # two batches; deleting twice is fine
    assert await listed(s3, "many/") == []


@pytest_twisted.ensureDeferred
async def test_delete_and_copy(s3: S3Client) -> None:
    await s3.put_object("src", b"content")
    etag = await s3.copy_object("src", "dst/copy of src")
    assert etag == hashlib.md5(b"content").hexdigest()
    assert await s3.get_small("dst/copy of src", 100) == b"content"
    await s3.delete_object("src")
    await s3.delete_object("src")  # missing: still fine
    assert await s3.head_object("src") is None
    with pytest.raises(S3Error) as caught:
        await s3.copy_object("src", "again")
    assert caught.value.code == "NoSuchKey"


@pytest_twisted.ensureDeferred
async def test_multipart_three_parts_from_a_file(s3: S3Client, tmp_path: Any) -> None:
    path = str(tmp_path / "parts")
    size = 11 * MiB
    digest = write_file(path, size, b"parts")
    upload_id = await s3.create_multipart("mp/blob", content_type="application/octet-stream")
    uploads = [u async for u in s3.list_multipart_uploads("mp/")]
    assert [(u.key, u.upload_id) for u in uploads] == [("mp/blob", upload_id)]
    regions = [(3, 10 * MiB, MiB), (1, 0, 5 * MiB), (2, 5 * MiB, 5 * MiB)]  # any order
    parts = [Part(n, await s3.upload_part("mp/blob", upload_id, n, path, offset, length))
             for n, offset, length in regions]
    listed_parts = await s3.list_parts("mp/blob", upload_id)
    assert [(p.number, p.size) for p in listed_parts] == [(1, 5 * MiB), (2, 5 * MiB), (3, MiB)]
    etag = await s3.complete_multipart("mp/blob", upload_id, parts)
    assert etag.endswith("-3")
    sink = Sink()
    await s3.get_object("mp/blob", sink)
    assert (sink.received, sink.digest) == (size, digest)
    assert [u async for u in s3.list_multipart_uploads("mp/")] == []


@pytest_twisted.ensureDeferred
async def test_put_from_a_file_region(s3: S3Client, tmp_path: Any) -> None:
    path = tmp_path / "region"
    path.write_bytes(b"0123456789")
    await s3.put_object("region", FileRegion(str(path), 2, 5))
    assert await s3.get_small("region", 100) == b"23456"
    await s3.put_object("empty", FileRegion(str(path), 10, 0))
    assert await s3.get_small("empty", 100) == b""
    with pytest.raises(ValueError, match="no 5 bytes at offset 8"):
        await s3.put_object("bad", FileRegion(str(path), 8, 5))


@pytest_twisted.ensureDeferred
async def test_copy_large_goes_through_part_copies(ceph_s3: Any, tmp_path: Any) -> None:
    client = await ceph_s3.new_bucket(copy_threshold=MiB, part_size=5 * MiB)
    try:
        path = str(tmp_path / "src")
        size = 12 * MiB + 3
        digest = write_file(path, size, b"copy")
        await client.put_object("src", path)
        etag = await client.copy_large("src", "dst", size)
        assert etag.endswith("-3")  # 5 + 5 + 2 MiB, by UploadPartCopy
        sink = Sink()
        await client.get_object("dst", sink)
        assert (sink.received, sink.digest) == (size, digest)
        await client.put_object("small", b"x" * 1000)
        assert "-" not in await client.copy_large("small", "small-copy", 1000)  # CopyObject
        # A failed part copy aborts the upload: nothing is left behind.
        with pytest.raises(S3Error) as caught:
            await client.copy_large("missing", "dst2", size)
        assert caught.value.code == "NoSuchKey"
        assert [u async for u in client.list_multipart_uploads()] == []
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_abort(s3: S3Client, tmp_path: Any) -> None:
    path = tmp_path / "part"
    path.write_bytes(b"p" * 1000)
    upload_id = await s3.create_multipart("ab/x")
    await s3.upload_part("ab/x", upload_id, 1, str(path), 0, 1000)
    assert await s3.abort_multipart("ab/x", upload_id) is True
    assert [u async for u in s3.list_multipart_uploads("ab/")] == []
    with pytest.raises(S3Error) as caught:
        await s3.list_parts("ab/x", upload_id)
    # AWS says NoSuchUpload; Ceph 16 says NoSuchKey.
    assert caught.value.status == 404 and caught.value.code in ("NoSuchUpload", "NoSuchKey")
    assert await s3.abort_multipart("ab/x", upload_id) is False
    assert await s3.head_object("ab/x") is None


def fetch(url: str) -> tuple[int, bytes]:
    """A plain GET from another client (blocking; radosgw is another process)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest_twisted.ensureDeferred
async def test_presigned_get(s3: S3Client) -> None:
    await s3.put_object("pre/signed key", b"for your eyes")
    await s3.put_object("pre/other", b"not for you")
    url = s3.presign_get("pre/signed key", 60)
    assert fetch(url) == (200, b"for your eyes")
    status, body = fetch(url.replace("signed%20key", "other"))
    assert status == 403 and parse_error(body)[0] == "SignatureDoesNotMatch"  # type: ignore[index]
    signature = url.rsplit("=", 1)[1]
    status, body = fetch(url[:-len(signature)] + "0" * len(signature))
    assert status == 403 and parse_error(body)[0] == "SignatureDoesNotMatch"  # type: ignore[index]
    short = s3.presign_get("pre/signed key", 1)
    await deferLater(reactor, 2.1, lambda: None)
    status, body = fetch(short)
    assert status == 403 and parse_error(body)[0] == "AccessDenied", body  # type: ignore[index]
    with pytest.raises(ValueError):
        s3.presign_get("pre/signed key", 8 * 24 * 3600)


@pytest_twisted.ensureDeferred
async def test_conditional_put(s3: S3Client) -> None:
    await s3.put_object("once", b"first", if_none_match=True)
    with pytest.raises(S3Error) as caught:
        await s3.put_object("once", b"second", if_none_match=True)
    assert (caught.value.status, caught.value.code) == (412, "PreconditionFailed")
    assert await s3.get_small("once", 100) == b"first"
    # Racing writers: exactly one wins.
    outcomes = await gatherResults([
        Deferred.fromCoroutine(_try_put(s3, "race", f"writer {i}".encode())) for i in range(12)])
    assert sorted(outcomes) == [False] * 11 + [True]


async def _try_put(client: S3Client, key: str, body: bytes) -> bool:
    try:
        await client.put_object(key, body, if_none_match=True)
        return True
    except S3Error as e:
        assert e.code == "PreconditionFailed"
        return False


@pytest_twisted.ensureDeferred
async def test_error_mapping(ceph_s3: Any, s3: S3Client) -> None:
    await s3.put_object("k", b"v")
    missing = S3Client(ceph_s3.settings("no-such-bucket-here"), reactor)
    bad_secret = S3Client(ceph_s3.settings(s3.settings.bucket, secret_access_key="wrong" * 8), reactor)
    bad_key = S3Client(ceph_s3.settings(s3.settings.bucket, access_key_id="NOSUCHKEY000"), reactor)
    try:
        with pytest.raises(S3Error) as caught:
            await missing.get_small("k", 10)
        assert (caught.value.status, caught.value.code) == (404, "NoSuchBucket")
        with pytest.raises(S3Error) as caught:
            await missing.put_object("k", b"v")
        assert caught.value.code == "NoSuchBucket"
        assert "\n" not in str(caught.value) and "PUT k: 404 NoSuchBucket" in str(caught.value)
        with pytest.raises(S3Error) as caught:
            await bad_secret.get_small("k", 10)
        assert (caught.value.status, caught.value.code) == (403, "SignatureDoesNotMatch")
        with pytest.raises(S3Error) as caught:
            await bad_key.put_object("k", b"x")
        assert (caught.value.status, caught.value.code) == (403, "InvalidAccessKeyId")
        with pytest.raises(S3Error) as caught:  # HEAD has no body: the code comes from the status
            await bad_secret.head_object("k")
        assert caught.value.status == 403
    finally:
        for client in (missing, bad_secret, bad_key):
            await client.close()


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_stops_drops_the_download(s3: S3Client) -> None:
    await s3.put_object("stop", b"s" * (4 * MiB))

    class Stopper(Sink):
        def write(self, data: bytes) -> None:
            super().write(data)
            self.producer.stopProducing()

    sink = Stopper()
    with pytest.raises(CancelledError):
        await s3.get_object("stop", sink)
    assert 0 < sink.received < 4 * MiB
    assert sink.producer is None  # unregistered
    assert await s3.get_small("stop", 4 * MiB) == b"s" * (4 * MiB)  # the pool still works


@pytest_twisted.ensureDeferred
async def test_ceph_started(ceph_s3: Any) -> None:
    print(f"ceph started in {ceph_s3.start_seconds:.1f}s at {ceph_s3.endpoint}")
    assert ceph_s3.endpoint.startswith("http://127.0.0.1:")

