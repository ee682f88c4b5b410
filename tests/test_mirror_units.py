"""Fast unit tests of the mirror's parts: challenges, routing, fills (coalescing: test_deferreds)."""
from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed

from registryd.config import ConfigError, UpstreamConfig, load_config
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.mirror.challenge import parse_challenges
from registryd.mirror.client import UpstreamClient
from registryd.mirror.fill import BlobFill
from registryd.mirror.routing import Router
from registryd.storage.guard import BlobGuard
from registryd.storage.blobs import Blobs
from registryd.storage.s3.driver import S3Driver
from registryd.storage.s3.errors import S3Error


def test_bearer_and_basic_challenges() -> None:
    (bearer,) = parse_challenges('Bearer realm="https://auth.example/token",service="reg",'
                                 'scope="repository:library/alpine:pull"')
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example/token", "service": "reg",
                             "scope": "repository:library/alpine:pull"}
    basic, bearer2 = parse_challenges('Basic realm="a b", Bearer realm="x",error="insufficient_scope"')
    assert (basic.scheme, basic.params) == ("basic", {"realm": "a b"})
    assert bearer2.params["error"] == "insufficient_scope"
    assert parse_challenges('Bearer realm="q\\"uote"')[0].params["realm"] == 'q"uote'


def upstream(namespace: str, default: bool = False) -> UpstreamConfig:
    return UpstreamConfig(namespace=namespace, url=f"https://{namespace}", default=default)


@pytest.mark.parametrize("name, ns, local, expected", [
    ("library/alpine", "docker.io", False, ("docker.io", "library/alpine")),
    ("alpine", "docker.io", False, ("docker.io", "library/alpine")),
    ("docker.io/library/alpine", None, False, ("docker.io", "library/alpine")),
    ("docker.io/alpine", None, False, ("docker.io", "library/alpine")),
    ("ghcr.io/org/tool", None, False, ("ghcr.io", "org/tool")),
    ("registry.local:5000/team/app", None, False, ("registry.local:5000", "team/app")),
    ("alpine", None, False, ("docker.io", "library/alpine")),  # default upstream
    ("team/app", None, True, None),  # pushed here: stays local
])
def test_routes(name, ns, local, expected) -> None:
    router = Router((upstream("docker.io", default=True), upstream("ghcr.io"), upstream("quay.io"),
                     upstream("registry.local:5000")))
    route = router.route(name, ns, lambda _: local)
    assert (route.upstream.namespace, route.remote) == expected if expected else route is None


def test_without_a_default_unknown_names_are_local() -> None:
    router = Router((upstream("ghcr.io"),))
    assert router.route("team/app", None, lambda _: False) is None
    with pytest.raises(RegistryError):
        router.route("ghcr.io/Bad", None, lambda _: False)


def test_no_upstreams_means_no_routing() -> None:
    assert not Router(()).enabled
    assert Router(()).route("docker.io/library/alpine", None, lambda _: False) is None


@pytest.mark.parametrize("upstreams", [(), (upstream("docker.io", default=True), upstream("quay.io"))],
                         ids=["no upstreams", "with a default"])
def test_an_unconfigured_ns_is_unknown_never_another_registry(upstreams) -> None:
    """?ns=ghcr.io asks for ghcr.io's image: neither a local repository nor the default
    upstream's may answer it. ?ns= naming registryd itself (its Host) is no ns at all."""
    router = Router(upstreams)
    for name in ("someorg/tools", "quay.io/x"):
        with pytest.raises(RegistryError) as info:
            router.route(name, "ghcr.io", lambda _: False, host="registry.example:5000")
        assert (info.value.status, info.value.code) == (404, "NAME_UNKNOWN")
        assert "ghcr.io" in info.value.message
    with pytest.raises(RegistryError):
        router.route("team/app", "registry.example", lambda _: True, host="registry.example:5000")
    own = router.route("team/app", "Registry.Example:5000", lambda _: True, host="registry.example:5000")
    assert own is None
    same_as_no_ns = router.route("someorg/tools", "registry.example:5000", lambda _: False,
                                 host="registry.example:5000")
    assert same_as_no_ns == router.route("someorg/tools", None, lambda _: False)


def test_upstream_config(tmp_path, monkeypatch) -> None:
    creds = tmp_path / "creds"
    creds.write_text("robot:s3cret\n")
    monkeypatch.setenv("HUB_TOKEN", "tok")
    config_file = tmp_path / "r.toml"
    config_file.write_text(f"""
[[upstream]]
namespace = "docker.io"
default = true
username = "me"
password_env = "HUB_TOKEN"
[[upstream]]
namespace = "Registry.Local:5000"
url = "http://127.0.0.1:5000/"
credentials_file = "{creds}"
manifest_ttl = 60
""")
    hub, local = load_config(str(config_file)).upstreams
    assert (hub.url, hub.default, hub.username, hub.password) == ("https://registry-1.docker.io", True, "me", "tok")
    assert (local.namespace, local.url, local.username, local.password, local.manifest_ttl) == \
        ("registry.local:5000", "http://127.0.0.1:5000", "robot", "s3cret", 60)
    assert "tok" not in repr(hub)


@pytest.mark.parametrize("text, message", [
    ('[[upstream]]\nurl = "https://x"', "needs a 'namespace'"),
    ('[[upstream]]\nnamespace = "a b"', "must be a registry host"),
    ('[[upstream]]\nnamespace = "x.io"\nurl = "ftp://x"', "must be http(s)://host"),
    ('[[upstream]]\nnamespace = "x.io"\npassword = "p"', "username and password go together"),
    ('[[upstream]]\nnamespace = "x.io"\nmanifest_ttl = 0', "'upstream[0].manifest_ttl' must be greater"),
    ('[[upstream]]\nnamespace = "x.io"\nbogus = 1', "unknown key 'upstream[0].bogus'"),
    ('[[upstream]]\nnamespace = "x.io"\n[[upstream]]\nnamespace = "x.io"', "two upstreams"),
    ('[[upstream]]\nnamespace = "a.io"\ndefault = true\n[[upstream]]\nnamespace = "b.io"\ndefault = true',
     "only one upstream may be the default"),
    ('[[upstream]]\nnamespace = "x.io"\nca_file = "/nonexistent/ca.pem"', "cannot read /nonexistent/ca.pem"),
])
def test_bad_upstream_config(tmp_path, text, message) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert message in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('[[upstream]]\nnamespace = "x.io"\npassword_env = "NOPE_NOT_SET"\nusername = "u"',
     "'upstream[0].password_env': environment variable NOPE_NOT_SET is not set"),
    ('[[upstream]]\nnamespace = "x.io"\ncredentials_file = "/nonexistent/creds"',
     "'upstream[0].credentials_file': cannot read /nonexistent/creds: No such file or directory"),
    ('[[upstream]]\nnamespace = "x.io"\ncredentials_file = "{no_colon}"',
     "must hold one line 'username:password'"),
])
def test_upstream_secrets_are_read_when_used(tmp_path, monkeypatch, text, message) -> None:
    """The config loads (a read-only command needs no upstream login); the login is read when
    the mirror needs it, with the same one line naming the file and the key."""
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    no_colon = tmp_path / "creds"
    no_colon.write_text("just-a-token\n")
    path = tmp_path / "r.toml"
    path.write_text(text.replace("{no_colon}", str(no_colon)))
    (upstream,) = load_config(str(path)).upstreams
    for read in (lambda: upstream.password, lambda: UpstreamClient(upstream, None, None)):
        with pytest.raises(ConfigError) as info:
            read()
        assert message in str(info.value) and f"config file {path}: " in str(info.value)
        assert "\n" not in str(info.value)


class FakeResponse:
    def __init__(self, length: int | None) -> None:
        self.length = length
        self.protocol = None

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def stopProducing(self) -> None:
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("aborted"))])))


async def _commit(path: str, digest: Digest) -> None:
    os.unlink(path)


def make_fill(tmp_path, data: bytes, clock: Clock | None = None) -> BlobFill:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    return BlobFill(digest, str(tmp_path), clock or Clock(), 30, _commit)


def test_fill_wakes_readers_and_commits(tmp_path) -> None:
    data = os.urandom(1000)
    fill = make_fill(tmp_path, data)
    response = FakeResponse(len(data))
    fill.begin(response)
    waits = [fill.progress(0), fill.progress(500)]
    cancelled = fill.progress(0)
    cancelled.cancel()
    cancelled.addErrback(lambda f: f.trap(CancelledError))
    response.protocol.dataReceived(data[:400])
    assert waits[0].called and not waits[1].called
    assert open(fill.path, "rb").read() == data[:400]
    response.protocol.dataReceived(data[400:])
    assert waits[1].called
    finished: list[str] = []
    fill.on_finished(lambda: finished.append("yes"))
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert fill.done and fill.error is None and finished == ["yes"]


@pytest.mark.parametrize("fault", ["wrong bytes", "short", "dropped", "stall"])
def test_fill_failures_remove_the_partial_file(tmp_path, fault: str) -> None:
    data = os.urandom(1000)
    clock = Clock()
    fill = make_fill(tmp_path, data, clock)
    response = FakeResponse(len(data))
    fill.begin(response)
    waiter = fill.progress(999)
    if fault == "wrong bytes":
        response.protocol.dataReceived(os.urandom(1000))
        response.protocol.connectionLost(Failure(ResponseDone()))
    elif fault == "short":
        response.protocol.dataReceived(data[:10])
        response.protocol.connectionLost(Failure(ResponseDone()))
    elif fault == "dropped":
        response.protocol.dataReceived(data[:10])
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("reset"))])))
    else:
        response.protocol.dataReceived(data[:10])
        clock.advance(31)
    assert fill.error is not None and not fill.done
    assert waiter.called
    assert not os.path.exists(fill.path)


class ConflictingBucket:
    """An S3Client whose conditional PUTs answer, in turn, as ``answers`` say (None: stored)."""

    settings = SimpleNamespace(part_size=8 << 20)

    def __init__(self, answers: list[tuple[int, str] | None]) -> None:
        self.answers = answers
        self.puts = 0

    async def head_object(self, key: str) -> None:
        return None

    async def put_object(self, key: str, body: object, *, if_none_match: bool = False) -> None:
        assert if_none_match
        self.puts += 1
        answer = self.answers.pop(0)
        if answer is not None:
            raise S3Error(*answer)


@pytest.mark.parametrize("answers, puts, stored", [
    ([None], 1, True),
    ([(412, "PreconditionFailed")], 1, True),     # the other fill's commit came first
    ([(409, "ConditionalRequestConflict"), (412, "PreconditionFailed")], 2, True),   # AWS: it was under way
    ([(409, "ConditionalRequestConflict")] * 3, 3, False),
    ([(500, "InternalError")], 1, False),
])
@pytest_twisted.ensureDeferred
async def test_two_fills_of_one_digest_commit_safely_on_s3(tmp_path, answers, puts, stored) -> None:
    path = tmp_path / "fill"
    path.write_bytes(b"layer")
    bucket = ConflictingBucket(list(answers))
    blobs = Blobs(S3Driver(bucket), BlobGuard())  # type: ignore[arg-type]
    digest = Digest("sha256", hashlib.sha256(b"layer").hexdigest())
    if stored:
        await blobs.commit_file(str(path), digest)
        assert not path.exists()
    else:
        with pytest.raises(S3Error):
            await blobs.commit_file(str(path), digest)
    assert bucket.puts == puts


@pytest.mark.parametrize("length", [1000, None], ids=["known size", "unknown size"])
@pytest.mark.parametrize("right", [True, False], ids=["right bytes", "wrong bytes"])
def test_a_fill_releases_its_last_byte_only_once_verified(tmp_path, length, right) -> None:
    data = os.urandom(1000)
    fill = make_fill(tmp_path, data)
    response = FakeResponse(length)
    fill.begin(response)
    response.protocol.dataReceived(data[:400])
    assert fill.releasable == (400 if length else 399)
    everything = fill.progress(999)
    response.protocol.dataReceived(data[400:] if right else os.urandom(600))
    assert fill.releasable == 999 and not everything.called
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert everything.called
    assert (fill.verified, fill.done, fill.releasable) == ((True, True, 1000) if right else (False, False, 999))
