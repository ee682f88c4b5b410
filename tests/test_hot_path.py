"""The manifest GET's hot path (registryd/web/hot_path.py) answers exactly as Klein's route does.

Every request is sent twice to one registry: once as it is served (the hot
path takes plain manifest GETs and HEADs) and once with the hot path's
pattern matching nothing (all through Klein); status, headers (but Date)
and body must be the same. A counter on the hot path shows which requests
it took, so a pattern that silently never matches fails too.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from oci_client import Client, Reply
from raw_http import RawGet
from registryd.auth.policy import parse_access_rules
from registryd.web import hot_path
from support.wait import sleep
from test_security import AuthClient, auth_settings, basic, write_htpasswd

pytestmark = pytest.mark.timeout(60)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NOTHING = re.compile(rb"(?!)")


USERS = {"alice": "alice-Secret-1", "reader": "reader-Secret-2"}


def comparable(reply: Reply) -> tuple[int, list[tuple[str, list[str]]], bytes]:
    headers = sorted((k.lower(), v) for k, v in reply.headers.items() if k.lower() != "date")
    return reply.status, headers, reply.body


class Taken:
    """Counts the requests the hot path ran."""

    def __init__(self, monkeypatch: Any) -> None:
        self.count = 0
        run = hot_path.HotPath._run

        def counted(path: Any, request: Any, coroutine: Any) -> None:
            self.count += 1
            run(path, request, coroutine)

        monkeypatch.setattr(hot_path.HotPath, "_run", counted)


async def both_ways(client: Client, monkeypatch: Any, taken: Taken, method: str, path: str,
                    headers: dict[str, str] | None = None) -> tuple[Reply, bool]:
    """(the reply, whether the hot path took it); fails unless Klein answers the same."""
    before = taken.count
    hot = await client.request(method, path, headers=headers, check=False)
    took = taken.count > before
    with monkeypatch.context() as m:
        m.setattr(hot_path, "MANIFEST_PATH", NOTHING)
        cold = await client.request(method, path, headers=headers, check=False)
    assert taken.count == before + took
    assert comparable(hot) == comparable(cold), (method, path, str(hot), str(cold))
    return hot, took


@pytest_twisted.ensureDeferred
async def test_manifest_gets_answer_as_through_klein(registry: Any, monkeypatch: Any) -> None:
    client = Client(registry.url)
    image = await client.push_image("team/app", "v1", seed="hot")
    digest = image.digest
    taken = Taken(monkeypatch)
    accept = {"Accept": OCI_MANIFEST}
    hot_cases = [
        ("GET", "/v2/team/app/manifests/v1", accept),
        ("GET", "/v2/team/app/manifests/v1", None),
        ("HEAD", "/v2/team/app/manifests/v1", accept),
        ("GET", f"/v2/team/app/manifests/{digest}", accept),
        ("HEAD", f"/v2/team/app/manifests/{digest}", None),
        ("GET", "/v2/team/app/manifests/nope", accept),              # unknown tag
        ("HEAD", "/v2/team/app/manifests/nope", accept),
        ("GET", "/v2/team/other/manifests/v1", accept),             # unknown repository
        ("GET", "/v2/Team/App/manifests/v1", accept),               # invalid name
        ("GET", "/v2/team/app/manifests/.v1", accept),              # invalid tag
        ("GET", "/v2/team/app/manifests/sha256:abc", accept),       # invalid digest
        ("GET", "/v2/team/app/manifests/sha256:" + "0" * 64, accept),
        ("GET", "/v2/registry.example:5000/team/app/manifests/v1", accept),
        ("GET", "/v2/team/app/manifests/v1?ns=docker.io", accept),
        ("GET", "/v2/a/tags/list/manifests/v1", accept),
    ]
    for method, path, headers in hot_cases:
        reply, took = await both_ways(client, monkeypatch, taken, method, path, headers)
        assert took, (method, path)
    assert (await client.get("/v2/team/app/manifests/v1", headers=accept)).body == image.body

    klein_cases = [
        ("GET", "/v2/team%2Fapp/manifests/v1", accept),             # percent-encoded
        ("GET", "/v2/team//app/manifests/v1", accept),              # an empty segment
        ("GET", "/v2//team/app/manifests/v1", accept),
        ("GET", "/v2/team/app/manifests/v1/", accept),              # trailing slash
        ("GET", "/v2/team/app/manifests/", accept),
        ("GET", "/v2/t%C3%A9am/app/manifests/v1", accept),          # not ASCII once decoded
        ("PUT", "/v2/team/app/manifests/v1", accept),
        ("DELETE", "/v2/team/app/manifests/nope", accept),
        ("POST", "/v2/team/app/manifests/v1", accept),
        ("GET", "/v2/team/app/tags/list", None),
    ]
    for method, path, headers in klein_cases:
        reply, took = await both_ways(client, monkeypatch, taken, method, path, headers)
        assert not took, (method, path)


@pytest_twisted.ensureDeferred
async def test_credentials_and_policy_answer_as_through_klein(make_registry: Any, tmp_path: Any,
                                                             monkeypatch: Any) -> None:
    rules = [{"users": ["anonymous", "*"], "repositories": ["public/**"], "actions": ["pull"]},
             {"users": ["alice"], "repositories": ["**"], "actions": ["pull", "push", "delete"]}]
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), USERS)
    registry = make_registry(auth=auth_settings(htpasswd), access=parse_access_rules(rules))
    pusher = AuthClient(registry.url, basic("alice", USERS["alice"]))
    for repository in ("public/app", "team/app"):
        assert (await pusher.push_image(repository, "v1", seed=repository)).reply.status == 201
    client = Client(registry.url)
    taken = Taken(monkeypatch)
    alice = {**basic("alice", USERS["alice"]), "Accept": OCI_MANIFEST}
    wrong = {**basic("alice", "not-her-password"), "Accept": OCI_MANIFEST}
    reader = {**basic("reader", USERS["reader"]), "Accept": OCI_MANIFEST}
    for path in ("/v2/public/app/manifests/v1", "/v2/team/app/manifests/v1", "/v2/team/none/manifests/v1"):
        for headers in ({"Accept": OCI_MANIFEST}, alice, wrong, reader):
            reply, took = await both_ways(client, monkeypatch, taken, "GET", path, headers)
            assert took
    assert (await client.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})).status == 401
    assert (await client.get("/v2/team/app/manifests/v1", headers=alice)).status == 200


@pytest_twisted.ensureDeferred
async def test_a_handler_that_waits_or_fails_answers_as_through_klein(registry: Any, monkeypatch: Any) -> None:
    client = Client(registry.url)
    await client.push_image("team/app", "v1", seed="waits")
    taken = Taken(monkeypatch)
    repositories = registry.service.api.store.repositories
    accept = {"Accept": OCI_MANIFEST}
    real = repositories.resolve_tag

    async def late(name: str, tag: str) -> Any:
        """Answers on a later turn of the reactor: the coroutine is left waiting."""
        waited: Deferred[None] = Deferred()
        reactor.callLater(0.01, waited.callback, None)
        await waited
        return await real(name, tag)

    monkeypatch.setattr(repositories, "resolve_tag", late)
    for path in ("/v2/team/app/manifests/v1", "/v2/team/app/manifests/nope"):
        for method in ("GET", "HEAD"):
            assert (await both_ways(client, monkeypatch, taken, method, path, accept))[1]

    async def late_failure(name: str, tag: str) -> Any:
        waited: Deferred[None] = Deferred()
        reactor.callLater(0.01, waited.callback, None)
        await waited
        raise OSError(28, "No space left on device")   # 507, as any handler's ENOSPC

    monkeypatch.setattr(repositories, "resolve_tag", late_failure)
    reply, took = await both_ways(client, monkeypatch, taken, "GET", "/v2/team/app/manifests/v1", accept)
    assert took and reply.status == 507, str(reply)


@pytest_twisted.ensureDeferred
async def test_a_client_gone_while_the_handler_waits_cancels_it(registry: Any, monkeypatch: Any) -> None:
    client = Client(registry.url)
    await client.push_image("team/app", "v1", seed="gone")
    repositories = registry.service.api.store.repositories
    waiting: list[Deferred[None]] = []

    async def never(name: str, tag: str) -> Any:
        blocked: Deferred[None] = Deferred()
        waiting.append(blocked)
        await blocked

    monkeypatch.setattr(repositories, "resolve_tag", never)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", int(registry.host.rsplit(":", 1)[1]))
    raw = RawGet("GET", "/v2/team/app/manifests/v1", {"Accept": OCI_MANIFEST}, hashlib.sha256(), None)
    await connectProtocol(endpoint, raw)
    for _ in range(200):
        if waiting:
            break
        await sleep(0.01)
    assert waiting, "the handler never ran"
    raw.transport.abortConnection()      # the client hangs up while the handler waits
    for _ in range(200):
        if waiting[0].called:
            break
        await sleep(0.01)
    # The handler's wait was cancelled with its request, and nothing was logged as an error
    # (conftest fails the test on any); the registry still answers.
    assert waiting[0].called
    monkeypatch.undo()
    assert (await client.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})).status == 200
