"""Security of a whole registryd: users, access rules, backoff, reload, TLS.

Everything here runs against a real registryd: in-process on a loopback
port (``make_registry``) for the HTTP-level checks, or as a ``twistd``
subprocess where a real signal, a real start-up failure or a certificate
served to a separate process matters.

* The route walk sends every route of the API (every method) with no
  credentials, a wrong password, an unknown user and a user who lacks the
  action, plus path tricks (``%2F``, ``//``, ``..``, mixed case, ``HEAD``,
  ``?ns=``, trailing slashes), and checks each is refused with the right
  status and code and that nothing changed on disk, request by request.
* Positive cases: pull-only users, pushers, anonymous pull next to
  authenticated push, filtered ``_catalog``, hidden repositories.
* Backoff of repeated failures and what the log says about them.
* htpasswd changes without restart; ``reload()`` (SIGHUP) in-process and a
  real SIGHUP to a twistd.
* TLS next to plain HTTP (``openssl s_client``: versions, ALPN); a
  certificate swap plus SIGHUP while a slow download over TLS goes on.
* Start-up failures: one readable line and exit status 1.

Every external tool (openssl, twistd) is looked up inside the test that
needs it: missing means a failure, never a skip.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from typing import Any, Callable, Iterator, Mapping

import attrs
import bcrypt
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from conftest import ROOT, VENV_BIN, free_port, stop_process, wait_for_port
from fake_upstream import fake_upstream  # noqa: F401  (fixture)
from oci_client import OCI_MANIFEST, Client, Reply, digest_of, encode, snapshot
from registryd.auth.policy import parse_access_rules
from registryd.auth.settings import AuthSettings
from support.pki import issue, make_ca
from registryd.config import UpstreamConfig
from support.wait import sleep, wait_until

pytestmark = pytest.mark.timeout(60)

TWISTD = os.path.join(VENV_BIN, "twistd")
CHALLENGE = 'Basic realm="registryd"'
ACCEPT = f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json"

#: Users of every registry below; bcrypt cost 4 keeps each check ~1 ms.
PASSWORDS = {
    "alice": "alice-Secret-1",      # pull, push, delete on team/** and public/**
    "reader": "reader-Secret-2",    # pull on team/**
    "pusher": "pusher-Secret-3",    # pull and push on team/**
    "outsider": "outsider-Secret-4",  # pull and push on elsewhere/** only
}
RULES = [
    {"users": ["anonymous", "*"], "repositories": ["public/**"], "actions": ["pull"]},
    {"users": ["alice"], "repositories": ["team/**", "public/**"], "actions": ["pull", "push", "delete"]},
    {"users": ["reader"], "repositories": ["team/**"], "actions": ["pull"]},
    {"users": ["pusher"], "repositories": ["team/**"], "actions": ["pull", "push"]},
    {"users": ["outsider"], "repositories": ["elsewhere/**"], "actions": ["pull", "push"]},
]


# --- helpers -------------------------------------------------------------------

def htpasswd_line(user: str, password: str, cost: int = 4) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
    return f"{user}:$2y${hashed[4:]}\n"


def write_htpasswd(path: str, users: Mapping[str, str]) -> str:
    text = "".join(htpasswd_line(user, password) for user, password in users.items())
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def auth_settings(htpasswd: str, **overrides: Any) -> AuthSettings:
    settings: dict[str, Any] = {"htpasswd": htpasswd, "failures_before_delay": 1_000_000, "max_delay": 1}
    settings.update(overrides)
    return AuthSettings(**settings)


class AuthClient(Client):
    """A Client that sends fixed headers (credentials) with every request."""

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(base_url)
        self.extra = dict(headers or {})

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None, check: bool = True) -> Reply:
        merged = {**self.extra, **(headers or {})}
        return await super().request(method, path, body=body, headers=merged, check=check)


def as_user(url: str, user: str | None, password: str | None = None) -> AuthClient:
    if user is None:
        return AuthClient(url)
    return AuthClient(url, basic(user, PASSWORDS[user] if password is None else password))


def disk(data_dir: str) -> dict[str, str]:
    """What is stored, ignoring tmp/ (files in the middle of being written)."""
    return snapshot(data_dir)


def diff(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    changes = []
    for path in sorted(set(before) | set(after)):
        if path not in after:
            changes.append(f"removed {path}")
        elif path not in before:
            changes.append(f"added {path}")
        elif before[path] != after[path]:
            changes.append(f"changed {path}")
    return changes


async def quiet_disk(data_dir: str, wait: float = 2.0) -> dict[str, str]:
    """What is stored once the background writes of earlier requests (a
    manifest GET's last-pull mark) have landed: two looks alike."""
    deadline = time.monotonic() + wait
    last = disk(data_dir)
    while time.monotonic() < deadline:
        await sleep(0.1)
        current = disk(data_dir)
        if current == last:
            break
        last = current
    return last


async def settled_diff(data_dir: str, before: Mapping[str, str], wait: float = 0.5) -> list[str]:
    """Changes on disk, giving a refused request's asynchronous clean-up
    (e.g. removing an abandoned session in the thread pool) ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        changes = diff(before, disk(data_dir))
        if not changes or time.monotonic() >= deadline:
            return changes
        await sleep(0.05)


def error_code(reply: Reply) -> str | None:
    if reply.method == "HEAD" or not reply.body:
        return None
    try:
        return reply.json()["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "<not an OCI error document>"


# --- the registry under attack ---------------------------------------------------

@attrs.define
class Fixture:
    """A registryd with users and rules, holding content to attack."""

    registry: Any
    htpasswd: str
    manifest: str           # digest of team/app:v1
    manifest_body: bytes
    layer: str              # a blob of team/app
    public_layer: str       # a blob of public/app
    session: str            # an open upload session of team/app (path)
    new_blob: bytes
    new_manifest: bytes

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def data_dir(self) -> str:
        return self.registry.data_dir


async def secured_registry(make_registry: Any, tmp_path: Any, **auth: Any) -> Fixture:
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    registry = make_registry(auth=auth_settings(htpasswd, **auth), access=parse_access_rules(RULES))
    alice = as_user(registry.url, "alice")
    image = await alice.push_image("team/app", "v1", seed="team")
    public = await alice.push_image("public/app", "v1", seed="public")
    # a referrer, so the referrers answer has something to leak
    await alice.push_image("team/app", subject=image.descriptor(), seed="sig",
                           artifact_type="application/vnd.example.sig")
    session = await alice.start_upload("team/app")
    reply = await alice.patch(session, b"first chunk", headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 202, str(reply)
    document = json.loads(image.body)
    document["annotations"] = {"evil": "yes"}
    return Fixture(
        registry=registry, htpasswd=htpasswd, manifest=image.digest, manifest_body=image.body,
        layer=document["layers"][0]["digest"], public_layer=json.loads(public.body)["layers"][0]["digest"],
        session=alice.path_of(reply.location), new_blob=b"bytes nobody may store",
        new_manifest=encode(document),
    )


@attrs.frozen
class Route:
    """One request of the API; ``action`` is what the policy must demand."""

    label: str
    method: str
    path: str
    action: str                     # pull | push | delete | base | catalog
    body: bytes | str | None = None     # "<blob>" / "<manifest>": the fixture's new content
    content_type: str | None = None

    def render(self, f: Fixture) -> str:
        return self.path.format(
            manifest=f.manifest, layer=f.layer, public_layer=f.public_layer, session=f.session,
            new_blob=digest_of(f.new_blob), new_manifest=digest_of(f.new_manifest))

    def data(self, f: Fixture) -> bytes | None:
        if isinstance(self.body, str):
            return {"<blob>": f.new_blob, "<manifest>": f.new_manifest}[self.body]
        return self.body


OCTET = "application/octet-stream"
ROUTES = [
    Route("base", "GET", "/v2/", "base"),
    Route("base HEAD", "HEAD", "/v2/", "base"),
    Route("catalog", "GET", "/v2/_catalog", "catalog"),
    Route("catalog HEAD", "HEAD", "/v2/_catalog", "catalog"),
    Route("blob GET", "GET", "/v2/team/app/blobs/{layer}", "pull"),
    Route("blob HEAD", "HEAD", "/v2/team/app/blobs/{layer}", "pull"),
    Route("blob GET with Range", "GET", "/v2/team/app/blobs/{layer}", "pull"),
    Route("blob DELETE", "DELETE", "/v2/team/app/blobs/{layer}", "delete"),
    Route("upload POST", "POST", "/v2/team/app/blobs/uploads/", "push", b""),
    Route("upload POST ?digest=", "POST", "/v2/team/app/blobs/uploads/?digest={new_blob}", "push", "<blob>", OCTET),
    Route("upload POST ?mount=&from=", "POST",
          "/v2/team/app/blobs/uploads/?mount={public_layer}&from=public/app", "push", b""),
    Route("upload POST ?mount= without from", "POST", "/v2/team/app/blobs/uploads/?mount={public_layer}", "push", b""),
    Route("upload PATCH", "PATCH", "{session}", "push", "<blob>", OCTET),
    Route("upload PUT", "PUT", "{session}?digest={new_blob}", "push", "<blob>", OCTET),
    Route("upload PUT without body", "PUT", "{session}?digest={new_blob}", "push", b""),
    Route("upload GET", "GET", "{session}", "push"),
    Route("upload HEAD", "HEAD", "{session}", "push"),
    Route("upload DELETE", "DELETE", "{session}", "push"),
    Route("manifest GET by tag", "GET", "/v2/team/app/manifests/v1", "pull"),
    Route("manifest HEAD by tag", "HEAD", "/v2/team/app/manifests/v1", "pull"),
    Route("manifest GET by digest", "GET", "/v2/team/app/manifests/{manifest}", "pull"),
    Route("manifest HEAD by digest", "HEAD", "/v2/team/app/manifests/{manifest}", "pull"),
    Route("manifest PUT by tag", "PUT", "/v2/team/app/manifests/v2", "push", "<manifest>", OCI_MANIFEST),
    Route("manifest PUT over a tag", "PUT", "/v2/team/app/manifests/v1", "push", "<manifest>", OCI_MANIFEST),
    Route("manifest PUT by digest", "PUT", "/v2/team/app/manifests/{new_manifest}?tag=v3", "push", "<manifest>",
          OCI_MANIFEST),
    Route("manifest DELETE by tag", "DELETE", "/v2/team/app/manifests/v1", "delete"),
    Route("manifest DELETE by digest", "DELETE", "/v2/team/app/manifests/{manifest}", "delete"),
    Route("tags list", "GET", "/v2/team/app/tags/list", "pull"),
    Route("tags list HEAD", "HEAD", "/v2/team/app/tags/list", "pull"),
    Route("tags list paginated", "GET", "/v2/team/app/tags/list?n=1&last=a", "pull"),
    Route("referrers", "GET", "/v2/team/app/referrers/{manifest}", "pull"),
    Route("referrers filtered", "GET", "/v2/team/app/referrers/{manifest}?artifactType=application/vnd.example.sig",
          "pull"),
    Route("referrers HEAD", "HEAD", "/v2/team/app/referrers/{manifest}", "pull"),
]

#: (user, status, code) of users who lack each action on team/app.
LACKING = {
    "pull": [("outsider", 404, "NAME_UNKNOWN")],
    "push": [("reader", 403, "DENIED"), ("outsider", 403, "DENIED")],
    "delete": [("reader", 403, "DENIED"), ("pusher", 403, "DENIED"), ("outsider", 403, "DENIED")],
}


async def send(client: Client, route: Route, f: Fixture, extra: Mapping[str, str] | None = None) -> Reply:
    headers = dict(extra or {})
    if route.content_type:
        headers["Content-Type"] = route.content_type
    if route.label.endswith("Range"):
        headers["Range"] = "bytes=0-9"
    if route.action in ("pull", "catalog"):
        headers.setdefault("Accept", ACCEPT)
    return await client.request(route.method, route.render(f), body=route.data(f), headers=headers,
                                check=False)


def check_refused(reply: Reply, status: int, code: str | None, why: str) -> list[str]:
    """Problems with a refusal (an empty list when it is right)."""
    problems = []
    if reply.status != status:
        problems.append(f"status {reply.status}, expected {status}")
    got = error_code(reply)
    if code is not None and reply.method != "HEAD" and got != code:
        problems.append(f"code {got}, expected {code}")
    challenge = reply.header("WWW-Authenticate")
    if status == 401 and challenge != CHALLENGE:
        problems.append(f"WWW-Authenticate {challenge!r}, expected {CHALLENGE!r}")
    if status != 401 and challenge is not None:
        problems.append(f"unexpected WWW-Authenticate {challenge!r}")
    if reply.header("Docker-Distribution-API-Version") != "registry/2.0":
        problems.append("no Docker-Distribution-API-Version")
    return [f"{why}: {p}\n    {reply.method} {reply.url} -> {reply.status} {reply.body[:200]!r}" for p in problems]


CREDENTIAL_CASES: dict[str, dict[str, str]] = {
    "no credentials": {},
    "wrong password": basic("alice", "not-alices-password"),
    "unknown user": basic("mallory", PASSWORDS["alice"]),
    "malformed header": {"Authorization": "Basic !!!not-base64!!!"},
}


def headers_for(case: str) -> dict[str, str]:
    return dict(CREDENTIAL_CASES[case])


@pytest.mark.parametrize("case", list(CREDENTIAL_CASES))
@pytest_twisted.ensureDeferred
async def test_every_route_refuses_bad_credentials(make_registry: Any, tmp_path: Any, case: str) -> None:
    """No credentials, a wrong password, an unknown user or a malformed
    header: every route that touches a private repository answers 401
    UNAUTHORIZED with the Basic challenge, and nothing changes on disk.
    ``_catalog`` lets the anonymous request through (a rule grants
    anonymous pull on public/**), but not bad credentials; ``/v2/`` asks
    anonymous requests to authenticate (Bearer, to the token endpoint)."""
    f = await secured_registry(make_registry, tmp_path)
    client = AuthClient(f.url, headers_for(case))
    problems: list[str] = []
    for route in ROUTES:
        before = disk(f.data_dir)
        reply = await send(client, route, f)
        if route.action == "base" and case == "no credentials":
            # clients decide here to send credentials: challenged, with a token
            # endpoint since anonymous requests may pull public/**
            bearer = f'Bearer realm="{f.url}/v2/token",service="registryd"'
            if reply.status != 401 or reply.header("WWW-Authenticate") != bearer:
                problems.append(f"{route.label}: anonymous got {reply.status} "
                                f"{reply.header('WWW-Authenticate')!r}, expected 401 {bearer!r}")
        elif route.action == "catalog" and case == "no credentials":
            if reply.status != 200:
                problems.append(f"{route.label}: anonymous got {reply.status}, expected 200")
            elif route.action == "catalog" and route.method == "GET":
                listed = reply.json()["repositories"]
                if listed != ["public/app"]:
                    problems.append(f"{route.label}: anonymous sees {listed}, expected only public/app")
        else:
            problems += check_refused(reply, 401, "UNAUTHORIZED", route.label)
        changes = await settled_diff(f.data_dir, before)
        if changes:
            problems.append(f"{route.label}: the refused request changed the disk: {changes}")
    assert not problems, "\n".join(problems)


@pytest_twisted.ensureDeferred
async def test_every_route_refuses_users_without_the_action(make_registry: Any, tmp_path: Any) -> None:
    """A user who may not pull team/app is told it does not exist (404
    NAME_UNKNOWN); one who may not push or delete gets 403 DENIED; nothing
    changes on disk."""
    f = await secured_registry(make_registry, tmp_path)
    problems: list[str] = []
    for route in ROUTES:
        for user, status, code in LACKING.get(route.action, []):
            before = disk(f.data_dir)
            reply = await send(as_user(f.url, user), route, f)
            problems += check_refused(reply, status, code, f"{route.label} as {user}")
            changes = await settled_diff(f.data_dir, before)
            if changes:
                problems.append(f"{route.label} as {user}: the refused request changed the disk: {changes}")
    assert not problems, "\n".join(problems)


# --- path tricks ------------------------------------------------------------------

async def raw_request(url: str, method: str, target: str, headers: Mapping[str, str] | None = None,
                      body: bytes | None = None, source: str | None = None) -> Reply:
    """Send ``target`` exactly as written (no normalisation at all)."""
    from urllib.parse import urlsplit

    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from oci_client import _Exchange, _parse_response

    parts = urlsplit(url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None or method in ("PUT", "POST", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    raw = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")
    assert parts.hostname and parts.port
    endpoint = TCP4ClientEndpoint(reactor, parts.hostname, parts.port, timeout=10,
                                  bindAddress=(source, 0) if source else None)
    protocol = await connectProtocol(endpoint, _Exchange(raw))
    data = await protocol.finished
    return _parse_response(method, target, data)


PULL_TRICKS = [
    "/v2/team%2Fapp/manifests/v1",
    "/v2/team%2fapp/blobs/{layer}",
    "/v2/team%2Fapp/tags/list",
    "/v2/team%2Fapp/referrers/{manifest}",
    "/v2//team/app/manifests/v1",
    "/v2/team//app/manifests/v1",
    "//v2/team/app/manifests/v1",
    "/v2/./team/app/manifests/v1",
    "/v2/public/../team/app/manifests/v1",
    "/v2/public/app/../../team/app/manifests/v1",
    "/v2/public/app/../../team/app/blobs/{layer}",
    "/v2/public/%2e%2e/team/app/manifests/v1",
    "/v2/public/%2E%2E/team/app/tags/list",
    "/v2/public/app%2F..%2F..%2Fteam/app/manifests/v1",
    "/v2/public/app/..%5C..%5Cteam/app/manifests/v1",
    "/v2/Team/app/manifests/v1",
    "/v2/TEAM/APP/manifests/v1",
    "/v2/team/App/tags/list",
    "/v2/team/app/manifests/{manifest_upper}",
    "/v2/%74eam/app/manifests/v1",
    "/v2/%74eam/app/tags/list",
    "/v2/team/app/manifests/v1?ns=public",
    "/v2/team/app/manifests/v1?ns=docker.io",
    "/v2/team/app/manifests/v1?ns=",
    "/v2/team/app/tags/list?ns=public/app",
    "/v2/team/app/manifests/v1/",
    "/v2/team/app/tags/list/",
    "/v2/team/app/blobs/{layer}/",
    "/v2/team/app/referrers/{manifest}/",
    "/v2/team/app/manifests/v1%00",
    "/v2/team/app%00/manifests/v1",
    "/v2/team/app/manifests/v1#fragment",
    "/v2/team/app/manifests/v1;x=y",
    "/V2/team/app/manifests/v1",
    "/v2/team/app/Manifests/v1",
    "http://example.test/v2/team/app/manifests/v1",
    # a private blob or manifest asked for through a public repository
    "/v2/public/app/blobs/{layer}",
    "/v2/public/app/manifests/{manifest}",
]

PUSH_TRICKS = [
    ("POST", "/v2/team%2Fapp/blobs/uploads/"),
    ("POST", "/v2/Team/app/blobs/uploads/"),
    ("POST", "/v2/team//app/blobs/uploads/"),
    ("POST", "/v2/public/../team/app/blobs/uploads/"),
    ("POST", "/v2/team/app/blobs/uploads/?ns=elsewhere"),
    ("POST", "/v2/%74eam/app/blobs/uploads/?digest={new_blob}"),
    ("PATCH", "{session}/"),
    ("PATCH", "{session_upper}"),
    ("PUT", "/v2/team/app/manifests/v1/"),
    ("PUT", "/v2/Team/app/manifests/v1"),
    ("PUT", "/v2/team%2Fapp/manifests/v1"),
    ("PUT", "/v2/team/app/manifests/v1?ns=elsewhere"),
    ("DELETE", "/v2/team/app/manifests/v1/"),
    ("DELETE", "/v2/team//app/manifests/v1"),
    ("DELETE", "/v2/%74eam/app/manifests/v1"),
    ("DELETE", "/v2/team/app/blobs/{layer}?ns=elsewhere"),
    ("DELETE", "{session}/"),
]


def render_trick(target: str, f: Fixture) -> str:
    return target.format(
        layer=f.layer, manifest=f.manifest, manifest_upper=f.manifest.upper(), session=f.session,
        session_upper=f.session.replace("/team/app/", "/TEAM/APP/"), new_blob=digest_of(f.new_blob))


REFUSALS = {400, 401, 403, 404, 405}


async def check_trick(f: Fixture, method: str, target: str, who: str | None, problems: list[str],
                      leaks: list[bytes], body: bytes | None = None, content_type: str | None = None) -> Reply:
    headers = {} if who is None else basic(who, PASSWORDS[who])
    if content_type:
        headers["Content-Type"] = content_type
    headers["Accept"] = ACCEPT
    before = disk(f.data_dir)
    reply = await raw_request(f.url, method, target, headers, body)
    label = f"{method} {target} as {who or 'anonymous'}"
    if reply.status not in REFUSALS:
        problems.append(f"{label}: {reply.status}, expected a refusal\n    {reply.body[:300]!r}")
    for secret in leaks:
        if secret and secret in reply.body:
            problems.append(f"{label}: the answer holds private content\n    {reply.body[:300]!r}")
    changes = await settled_diff(f.data_dir, before)
    if changes:
        problems.append(f"{label}: changed the disk: {changes}")
    return reply


@pytest_twisted.ensureDeferred
async def test_path_tricks_do_not_bypass_the_policy(make_registry: Any, tmp_path: Any) -> None:
    """Encoded slashes and dots, empty and dot segments, mixed case, odd
    suffixes, ``?ns=``, trailing slashes, HEAD for GET, absolute-form
    targets, and private content asked for through a public repository:
    all refused (4xx), no private byte in any answer, nothing on disk."""
    f = await secured_registry(make_registry, tmp_path)
    layer = await as_user(f.url, "alice").get(f"/v2/team/app/blobs/{f.layer}")
    leaks = [f.manifest_body, layer.body, b'"tags"', b'"manifests"']
    problems: list[str] = []
    for target in PULL_TRICKS:
        rendered = render_trick(target, f)
        for who in (None, "outsider"):
            for method in ("GET", "HEAD"):
                await check_trick(f, method, rendered, who, problems, leaks)
    for method, target in PUSH_TRICKS:
        rendered = render_trick(target, f)
        body = f.new_manifest if "/manifests/" in target and method == "PUT" else f.new_blob
        body = b"" if method in ("POST", "DELETE") and "digest=" not in target else body
        content_type = OCI_MANIFEST if "/manifests/" in target else OCTET
        for who in (None, "reader", "outsider"):
            await check_trick(f, method, rendered, who, problems, [f.manifest_body, layer.body], body, content_type)
    assert not problems, "\n".join(problems)


@pytest_twisted.ensureDeferred
async def test_upload_sessions_cannot_be_used_through_another_repository(make_registry: Any, tmp_path: Any) -> None:
    """outsider may push to elsewhere/**: naming alice's team/app session
    under elsewhere/x must not reach it (404 BLOB_UPLOAD_UNKNOWN), nor
    may a blob of team/app be mounted without pull access on team/app."""
    f = await secured_registry(make_registry, tmp_path)
    outsider = as_user(f.url, "outsider")
    session_id = f.session.rsplit("/", 1)[1]
    stolen = f"/v2/elsewhere/x/blobs/uploads/{session_id}"
    problems: list[str] = []
    for method, path, body in (("GET", stolen, None), ("PATCH", stolen, f.new_blob),
                               ("PUT", f"{stolen}?digest={digest_of(f.new_blob)}", f.new_blob),
                               ("PUT", f"{stolen}?digest={digest_of(b'first chunk')}", b""),
                               ("DELETE", stolen, None)):
        before = disk(f.data_dir)
        reply = await outsider.request(method, path, body=body, headers={"Content-Type": OCTET}, check=False)
        problems += check_refused(reply, 404, "BLOB_UPLOAD_UNKNOWN", f"{method} {path}")
        changes = await settled_diff(f.data_dir, before)
        if changes:
            problems.append(f"{method} {path}: changed the disk: {changes}")
    # alice's session is intact
    status = await as_user(f.url, "alice").get(f.session)
    assert status.status == 204 and status.header("Range") == f"0-{len(b'first chunk') - 1}", str(status)

    # mount from a repository outsider may not pull: a plain session, no link
    reply = await outsider.post(f"/v2/elsewhere/x/blobs/uploads/?mount={f.layer}&from=team/app", b"")
    assert reply.status == 202, str(reply)
    probe = await outsider.head(f"/v2/elsewhere/x/blobs/{f.layer}")
    assert probe.status == 404, str(probe)
    # ... and a mount without from (any repository's blob) is not honoured either
    reply = await outsider.post(f"/v2/elsewhere/x/blobs/uploads/?mount={f.layer}", b"")
    assert reply.status == 202, str(reply)
    probe = await outsider.head(f"/v2/elsewhere/x/blobs/{f.layer}")
    assert probe.status == 404, str(probe)
    assert not problems, "\n".join(problems)


@pytest_twisted.ensureDeferred
async def test_referrers_through_a_public_repository_list_nothing(make_registry: Any, tmp_path: Any) -> None:
    """The referrers of a private manifest, asked for through public/app:
    the spec's answer for an unknown subject (200, empty index), never the
    private referrer."""
    f = await secured_registry(make_registry, tmp_path)
    private = await as_user(f.url, "alice").get(f"/v2/team/app/referrers/{f.manifest}")
    assert private.status == 200 and len(private.json()["manifests"]) == 1, str(private)
    for who in (None, "outsider"):
        reply = await as_user(f.url, who).get(f"/v2/public/app/referrers/{f.manifest}")
        assert reply.status == 200 and reply.json()["manifests"] == [], str(reply)


@pytest.mark.parametrize("method, target", [
    ("POST", "/v2/team/app/blobs/uploads"),
    ("GET", "/v2"),
    ("HEAD", "/v2"),
])
@pytest_twisted.ensureDeferred
async def test_missing_trailing_slash_is_refused_cleanly(make_registry: Any, tmp_path: Any, method: str,
                                                          target: str) -> None:
    """A route that ends in '/' asked for without it: a redirect or an OCI
    error, never a 500 with a traceback in the log (the autouse fixture
    fails the test on a logged traceback), and nothing on disk."""
    f = await secured_registry(make_registry, tmp_path)
    for who in (None, "reader"):
        before = disk(f.data_dir)
        headers = {} if who is None else basic(who, PASSWORDS[who])
        reply = await raw_request(f.url, method, target, headers, b"" if method == "POST" else None)
        assert reply.status in (301, 307, 308, 401, 403, 404), str(reply)
        assert not await settled_diff(f.data_dir, before)


# --- mirrored repositories: one name under the rules, however it is asked for ------

MIRROR_NS = "upstream.test"


@pytest.mark.parametrize("default", [False, True], ids=["ns-parameter", "default-upstream"])
@pytest_twisted.ensureDeferred
async def test_mirrored_repository_gets_one_verdict_however_it_is_addressed(
        fake_upstream: Any, make_registry: Any, tmp_path: Any, default: bool) -> None:
    """The same upstream repository asked for as ``/v2/upstream.test/lib/app``
    (cri-o), ``/v2/lib/app?ns=upstream.test`` (containerd) or, through the
    default upstream, ``/v2/lib/app`` (docker) must get the same answer from
    the rules. A rule on the local name ``public/**`` must not open
    upstream content to anonymous requests, and alice's rule on
    ``upstream.test/**`` must let her pull however her client asks."""
    fake_upstream.add_image("public/secret", "v1")
    fake_upstream.add_image("lib/app", "v1")
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    rules = [
        {"users": ["anonymous", "*"], "repositories": ["public/**"], "actions": ["pull"]},
        {"users": ["alice"], "repositories": [f"{MIRROR_NS}/**"], "actions": ["pull"]},
    ]
    upstream = UpstreamConfig(namespace=MIRROR_NS, url=fake_upstream.url, default=default)
    registry = make_registry(auth=auth_settings(htpasswd), access=parse_access_rules(rules), upstreams=(upstream,))
    suffix = "" if default else f"?ns={MIRROR_NS}"
    outcomes = {}
    for who, repo in ((None, "public/secret"), ("alice", "lib/app")):
        client = as_user(registry.url, who)
        path_style = await client.get(f"/v2/{MIRROR_NS}/{repo}/manifests/v1", headers={"Accept": ACCEPT})
        other = await client.get(f"/v2/{repo}/manifests/v1{suffix}", headers={"Accept": ACCEPT})
        outcomes[who or "anonymous", repo] = (path_style.status, other.status)
    assert outcomes == {
        ("anonymous", "public/secret"): (401, 401),
        ("alice", "lib/app"): (200, 200),
    }, f"(path style, {'default upstream' if default else '?ns='}) statuses differ: {outcomes}"


# --- what users may do ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_pull_only_user_pulls_but_cannot_push(make_registry: Any, tmp_path: Any) -> None:
    f = await secured_registry(make_registry, tmp_path)
    reader = as_user(f.url, "reader")
    manifest = await reader.get("/v2/team/app/manifests/v1", headers={"Accept": ACCEPT})
    assert manifest.status == 200 and manifest.body == f.manifest_body
    blob = await reader.get(f"/v2/team/app/blobs/{f.layer}")
    assert blob.status == 200 and digest_of(blob.body) == f.layer
    tags = await reader.get("/v2/team/app/tags/list")
    assert tags.json() == {"name": "team/app", "tags": ["v1"]}
    before = await quiet_disk(f.data_dir)
    for method, path, body in (("POST", "/v2/team/app/blobs/uploads/", b""),
                               ("PUT", "/v2/team/app/manifests/v9", f.new_manifest),
                               ("DELETE", "/v2/team/app/manifests/v1", None)):
        reply = await reader.request(method, path, body=body, headers={"Content-Type": OCI_MANIFEST})
        assert reply.status == 403 and reply.codes == ["DENIED"], str(reply)
    assert not await settled_diff(f.data_dir, before)


@pytest_twisted.ensureDeferred
async def test_pusher_pushes_and_pulls_but_cannot_delete(make_registry: Any, tmp_path: Any) -> None:
    f = await secured_registry(make_registry, tmp_path)
    pusher = as_user(f.url, "pusher")
    image = await pusher.push_image("team/new", "v1", seed="pusher")
    assert image.reply.status == 201
    got = await pusher.get("/v2/team/new/manifests/v1", headers={"Accept": ACCEPT})
    assert got.status == 200 and got.body == image.body
    reply = await pusher.delete(f"/v2/team/new/manifests/{image.digest}")
    assert reply.status == 403 and reply.codes == ["DENIED"], str(reply)
    # alice (delete) may
    reply = await as_user(f.url, "alice").delete(f"/v2/team/new/manifests/{image.digest}")
    assert reply.status == 202, str(reply)


@pytest_twisted.ensureDeferred
async def test_anonymous_pull_allowed_while_push_needs_a_user(make_registry: Any, tmp_path: Any) -> None:
    f = await secured_registry(make_registry, tmp_path)
    anonymous = AuthClient(f.url)
    base = await anonymous.get("/v2/")
    assert base.status == 401, str(base)
    assert base.header("WWW-Authenticate") == f'Bearer realm="{f.url}/v2/token",service="registryd"'
    manifest = await anonymous.get("/v2/public/app/manifests/v1", headers={"Accept": ACCEPT})
    assert manifest.status == 200, str(manifest)
    # what docker does after that challenge without credentials: an anonymous token
    token = (await anonymous.get("/v2/token?service=registryd&scope=repository:public/app:pull")).json()["token"]
    with_token = AuthClient(f.url, {"Authorization": f"Bearer {token}"})
    assert (await with_token.get("/v2/public/app/manifests/v1", headers={"Accept": ACCEPT})).status == 200
    assert (await with_token.get("/v2/team/app/tags/list")).status == 401
    # The pulls above record a pull time without waiting for it: let it land before the snapshot.
    await wait_until(lambda: any("/_pulls/" in path for path in disk(f.data_dir)), 10, "the pull time")
    before = disk(f.data_dir)
    for method, path in (("POST", "/v2/public/app/blobs/uploads/"), ("PUT", "/v2/public/app/manifests/v2"),
                         ("DELETE", "/v2/public/app/manifests/v1")):
        reply = await anonymous.request(method, path, body=f.new_manifest if method == "PUT" else None,
                                        headers={"Content-Type": OCI_MANIFEST})
        assert reply.status == 401 and reply.codes == ["UNAUTHORIZED"], str(reply)
        assert reply.header("WWW-Authenticate") == CHALLENGE
    assert not await settled_diff(f.data_dir, before)
    # the same push with alice's credentials goes through
    image = await as_user(f.url, "alice").push_image("public/app", "v2", seed="again")
    assert image.reply.status == 201


@pytest_twisted.ensureDeferred
async def test_catalog_and_tags_show_only_what_the_user_may_pull(make_registry: Any, tmp_path: Any) -> None:
    f = await secured_registry(make_registry, tmp_path)
    await as_user(f.url, "outsider").push_image("elsewhere/tool", "t1", seed="outsider")
    await as_user(f.url, "alice").push_image("team/other", "t2", seed="other")
    expected = {
        None: ["public/app"],
        "outsider": ["elsewhere/tool", "public/app"],
        "reader": ["public/app", "team/app", "team/other"],
        "alice": ["public/app", "team/app", "team/other"],
    }
    for who, repositories in expected.items():
        client = as_user(f.url, who)
        catalog = await client.get("/v2/_catalog")
        assert catalog.status == 200 and catalog.json()["repositories"] == repositories, (who, str(catalog))
        # paginated too: the Link header walks the visible names only
        seen, path = [], "/v2/_catalog?n=1"
        while path:
            page = await client.get(path)
            seen += page.json()["repositories"]
            path = page.next_link  # type: ignore[assignment]
        assert seen == repositories, who
        for repo in ("public/app", "team/app", "team/other", "elsewhere/tool"):
            tags = await client.get(f"/v2/{repo}/tags/list")
            if repo in repositories:
                assert tags.status == 200, (who, repo, str(tags))
            else:
                assert tags.status in (401, 404), (who, repo, str(tags))
                assert "tags" not in tags.json(), str(tags)


@pytest_twisted.ensureDeferred
async def test_hidden_repository_answers_like_a_missing_one(make_registry: Any, tmp_path: Any) -> None:
    """outsider cannot tell team/app (exists, hidden) from team/ghost (does
    not exist): same status, code and message for every read."""
    f = await secured_registry(make_registry, tmp_path)
    outsider = as_user(f.url, "outsider")
    for template in ("/v2/{repo}/manifests/v1", "/v2/{repo}/manifests/{manifest}", "/v2/{repo}/blobs/{layer}",
                     "/v2/{repo}/tags/list", "/v2/{repo}/referrers/{manifest}"):
        answers = []
        for repo in ("team/app", "team/ghost"):
            reply = await outsider.get(template.format(repo=repo, manifest=f.manifest, layer=f.layer))
            document = reply.json()["errors"][0]
            answers.append((reply.status, document["code"], document["message"],
                            json.dumps(document.get("detail")).replace(repo, "<repo>")))
        assert answers[0] == answers[1], (template, answers)
        assert answers[0][:2] == (404, "NAME_UNKNOWN"), (template, answers)
        head = await outsider.head(template.format(repo="team/app", manifest=f.manifest, layer=f.layer))
        assert head.status == 404, str(head)


# --- refused upload bodies -----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_refused_patch_does_not_grow_someone_elses_session(make_registry: Any, tmp_path: Any) -> None:
    """A PATCH with a wrong password into alice's session is refused (401);
    its bytes must not stay in the session: after a restart (where the
    data file's size is the session's size) alice's upload must go on from
    her own last acknowledged byte and finish with her digest."""
    f = await secured_registry(make_registry, tmp_path)
    session_path = os.path.join(f.data_dir, "uploads", f.session.rsplit("/", 1)[1], "data")
    with open(session_path, "rb") as fh:
        before = fh.read()
    attacker = as_user(f.url, "alice", "a wrong password")
    reply = await attacker.patch(f.session, b"INJECTED" * 1000, headers={"Content-Type": OCTET})
    assert reply.status == 401, str(reply)
    with open(session_path, "rb") as fh:
        after = fh.read()
    # restart the node on the same data directory
    await f.registry.service.stopService()
    restarted = make_registry(data_dir=f.data_dir, auth=auth_settings(f.htpasswd),
                              access=parse_access_rules(RULES))
    alice = as_user(restarted.url, "alice")
    status = await alice.get(f.session)
    rest = b" and the rest"
    finish = await alice.put(f"{f.session}?digest={digest_of(b'first chunk' + rest)}", rest,
                             headers={"Content-Type": OCTET})
    outcome = {"data file bytes": len(after), "Range after restart": status.header("Range"),
               "alice's final PUT": finish.status}
    assert outcome == {"data file bytes": len(before), "Range after restart": f"0-{len(before) - 1}",
                       "alice's final PUT": 201}, f"the refused body stayed in the session: {outcome}\n{finish}"


@pytest_twisted.ensureDeferred
async def test_refused_slow_patch_does_not_lock_someone_elses_session(make_registry: Any, tmp_path: Any) -> None:
    """While a PATCH with a wrong password trickles its body into alice's
    session, alice's own PATCH must not be turned away (416) because the
    session is busy with a request that will be refused anyway."""
    f = await secured_registry(make_registry, tmp_path)
    attacker = as_user(f.url, "alice", "a wrong password")
    # 1 MiB announced, 1 KiB sent, then the connection dies
    trickle = Deferred.fromCoroutine(attacker.send_truncated(
        "PATCH", f.session, b"x" * 1024, 1 << 20,
        headers={"Content-Type": OCTET, **basic("alice", "a wrong password")}))
    await sleep(0.05)
    alice = as_user(f.url, "alice")
    reply = await alice.patch(f.session, b" second chunk", headers={"Content-Type": OCTET})
    await trickle
    assert reply.status == 202, str(reply)


# --- backoff and what is logged --------------------------------------------------

@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every twisted.logger event emitted during the test."""
    seen: list[dict[str, Any]] = []
    observer = seen.append
    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    yield seen
    globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


async def timed(coroutine: Any) -> tuple[float, Reply]:
    start = time.monotonic()
    reply = await coroutine
    return time.monotonic() - start, reply


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_slowed_down_and_logged_without_the_password(
        make_registry: Any, tmp_path: Any, events: list[dict[str, Any]]) -> None:
    """With ``failures_before_delay = 2`` and ``max_delay = 1``: three wrong
    passwords answer at once, the fourth and fifth wait about a second (the
    cap); another address is not slowed; a right password (after the wait)
    resets the count. Each failure is logged with address and user name;
    neither the password nor the Authorization value appears in any event."""
    wrong = "Wr0ng-Pa55word-xyzzy"
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    registry = make_registry(auth=auth_settings(htpasswd, failures_before_delay=2, max_delay=1),
                             access=parse_access_rules(RULES))
    attacker = as_user(registry.url, "alice", wrong)
    durations = []
    for _ in range(5):
        took, reply = await timed(attacker.get("/v2/team/app/tags/list"))
        assert reply.status == 401 and reply.header("WWW-Authenticate") == CHALLENGE, str(reply)
        durations.append(took)
    assert all(d < 0.5 for d in durations[:3]), durations
    assert all(0.9 <= d < 3.0 for d in durations[3:]), durations

    # another client address (127.0.0.2 -> 127.0.0.1) is not slowed down
    took, reply = await timed(raw_request(registry.url, "GET", "/v2/team/app/tags/list",
                                          basic("mallory", wrong), source="127.0.0.2"))
    assert reply.status == 401 and took < 0.5, (took, str(reply))

    # the right password still gets in (after the wait) and resets the count
    took, reply = await timed(as_user(registry.url, "alice").get("/v2/team/app/tags/list"))
    assert reply.status == 404 and reply.codes == ["NAME_UNKNOWN"], str(reply)
    took, reply = await timed(attacker.get("/v2/"))
    assert reply.status == 401 and took < 0.5, took

    failures = [e for e in events if "authentication failed" in (e.get("log_format") or "")]
    assert len(failures) == 7, [formatEvent(e) for e in failures]
    assert {(e.get("address"), e.get("user")) for e in failures} == {
        ("127.0.0.1", "alice"), ("127.0.0.2", "mallory")}
    text = formatEvent(failures[0])
    assert "alice" in text and "127.0.0.1" in text, text
    secrets = [wrong, PASSWORDS["alice"], basic("alice", wrong)["Authorization"].split()[1],
               basic("alice", PASSWORDS["alice"])["Authorization"].split()[1]]
    for event in events:
        dump = repr(event) + (formatEvent(event) or "")
        for secret in secrets:
            assert secret not in dump, f"a secret reached the log: {dump[:500]}"


# --- htpasswd changes and reload ------------------------------------------------

async def run_registryd_htpasswd(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [os.path.join(VENV_BIN, "registryd"), "htpasswd", "--cost", "4", *args]
    if password is not None:
        command.insert(2, "--password-stdin")
    return await deferToThread(subprocess.run, command, input=(password or "") + "\n", capture_output=True,
                               text=True, timeout=30)


async def eventually(check: Callable[[], Any], timeout: float = 4.0) -> Any:
    """Await ``check()`` until it returns something truthy (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() >= deadline:
            return result
        await sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_htpasswd_changes_are_picked_up_without_restart(make_registry: Any, tmp_path: Any) -> None:
    """``registryd htpasswd`` adds carol, changes alice's password and
    removes carol while the registry runs: each change takes effect within
    seconds, even for a password that is cached as good."""
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    rules = RULES + [{"users": ["carol"], "repositories": ["public/**"], "actions": ["pull", "push"]}]
    registry = make_registry(auth=auth_settings(htpasswd), access=parse_access_rules(rules))
    carol = as_user(registry.url, "carol", "carol-Secret-5")
    alice = as_user(registry.url, "alice")
    assert (await carol.get("/v2/")).status == 401
    assert (await alice.get("/v2/")).status == 200   # now cached as good

    result = await run_registryd_htpasswd(htpasswd, "carol", password="carol-Secret-5")
    assert result.returncode == 0, result.stderr

    async def carol_in() -> bool:
        return (await carol.get("/v2/")).status == 200
    assert await eventually(carol_in), "a user added to the file was not picked up"

    result = await run_registryd_htpasswd(htpasswd, "alice", password="alice-New-6")
    assert result.returncode == 0, result.stderr

    async def old_password_out() -> bool:
        return (await alice.get("/v2/")).status == 401
    assert await eventually(old_password_out), "a changed (cached) password still works"
    assert (await as_user(registry.url, "alice", "alice-New-6").get("/v2/")).status == 200

    result = await run_registryd_htpasswd(htpasswd, "carol", "--delete")
    assert result.returncode == 0, result.stderr

    async def carol_out() -> bool:
        return (await carol.get("/v2/")).status == 401
    assert await eventually(carol_out), "a deleted user still gets in"


@pytest_twisted.ensureDeferred
async def test_reload_reads_htpasswd_at_once_and_keeps_users_on_a_bad_file(
        make_registry: Any, tmp_path: Any, events: list[dict[str, Any]]) -> None:
    """``service.reload()`` (what SIGHUP calls) re-reads the file at once,
    without waiting for the change check; a file that became invalid (an
    Apache MD5 line) keeps the users loaded before and logs the line."""
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    registry = make_registry(auth=auth_settings(htpasswd), access=parse_access_rules(RULES))
    dave = as_user(registry.url, "dave", "dave-Secret-7")
    assert (await dave.get("/v2/")).status == 401        # the file was just looked at
    write_htpasswd(htpasswd, {**PASSWORDS, "dave": "dave-Secret-7"})
    registry.service.reload()
    assert (await dave.get("/v2/")).status == 200        # well within the 1 s between looks

    with open(htpasswd, "a") as f:
        f.write("eve:$apr1$abcdefgh$0123456789abcdefghijkl\n")
    registry.service.reload()
    assert (await dave.get("/v2/")).status == 200
    assert (await as_user(registry.url, "alice").get("/v2/team/app/tags/list")).status == 404
    errors = [formatEvent(e) for e in events if "eve" in (formatEvent(e) or "") and "line" in formatEvent(e)]
    assert errors and "line 6" in errors[0] and "$apr1$" in errors[0], errors


# --- TLS ------------------------------------------------------------------------

@attrs.frozen
class ServerPKI:
    dir: str
    ca: str                       # the CA certificate clients trust
    cert: str                     # what the listener is configured with
    key: str
    second: tuple[str, str]       # another certificate + key of the same CA, for the swap
    other_key: str                # a key that belongs to no certificate here


def write_bytes(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_server_pki(directory: str) -> ServerPKI:
    ca = make_ca("security test CA")
    first = issue(ca, "first", hosts=["localhost", "127.0.0.1"])
    second = issue(ca, "second", hosts=["localhost", "127.0.0.1"])
    stray = issue(ca, "stray", hosts=["localhost"])
    cert, key = first.write(directory, "server")
    second_files = second.write(directory, "second")
    _, other_key = stray.write(directory, "stray")
    return ServerPKI(directory, write_bytes(os.path.join(directory, "ca.crt"), ca.cert_pem()), cert, key,
                     second_files, other_key)


def find_openssl() -> str:
    path = shutil.which("openssl")
    assert path, "Debian's openssl is needed for these tests (apt-get install openssl)"
    return path


def s_client(port: int, ca: str, *args: str, send: str | None = None) -> subprocess.CompletedProcess[str]:
    """Blocking ``openssl s_client``: run it in a thread when the server is
    on this reactor."""
    extra = ["-ign_eof"] if send is not None else []
    return subprocess.run([find_openssl(), "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                           "-CAfile", ca, "-verify_return_error", *extra, *args],
                          input=send or "", capture_output=True, text=True, timeout=20)


def tls_listen(port: int | str, pki: ServerPKI) -> str:
    return f"tls:{port}:interface=127.0.0.1:cert={pki.cert}:key={pki.key}"


@pytest_twisted.ensureDeferred
async def test_tls_and_plain_listeners_side_by_side(make_registry: Any, tmp_path: Any) -> None:
    """One registryd, a plain and a TLS listener. ``openssl s_client``:
    TLS 1.0 and 1.1 refused by the server (protocol version alert), 1.2
    and 1.3 accepted with a verified chain, ALPN http/1.1, and an HTTP
    request through it answered by registryd with the same policy as on
    the plain port."""
    pki = make_server_pki(str(tmp_path))
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    registry = make_registry(listen=("tcp:0:interface=127.0.0.1", tls_listen(0, pki)),
                             auth=auth_settings(htpasswd), access=parse_access_rules(RULES))
    tls_port = registry.service.ports[1].getHost().port
    for flag in ("-tls1", "-tls1_1"):
        result = await deferToThread(s_client, tls_port, pki.ca, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "alert protocol version" in output, output
    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        result = await deferToThread(s_client, tls_port, pki.ca, flag, "-alpn", "http/1.1")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert f"Protocol  : {version}" in output or f"New, {version}" in output, output
        assert "Verify return code: 0 (ok)" in output, output
        assert "ALPN protocol: http/1.1" in output, output

    request = f"GET /v2/team/app/tags/list HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    anonymous = await deferToThread(s_client, tls_port, pki.ca, "-quiet", send=request + "\r\n")
    assert "HTTP/1.1 401" in anonymous.stdout and CHALLENGE in anonymous.stdout, anonymous.stdout
    assert "docker-distribution-api-version: registry/2.0" in anonymous.stdout.lower()
    credentials = basic("reader", PASSWORDS["reader"])["Authorization"]
    reader = await deferToThread(s_client, tls_port, pki.ca, "-quiet",
                                 send=request + f"Authorization: {credentials}\r\n\r\n")
    assert "HTTP/1.1 404" in reader.stdout and "NAME_UNKNOWN" in reader.stdout, reader.stdout

    # the plain port speaks plain HTTP only, with the same policy
    plain = await as_user(registry.url, None).get("/v2/team/app/tags/list")
    assert plain.status == 401, str(plain)
    handshake = await deferToThread(s_client, registry.service.ports[0].getHost().port, pki.ca, "-tls1_2")
    assert handshake.returncode != 0


def https_connection(port: int, ca: str, timeout: float = 30) -> Any:
    import http.client

    context = ssl.create_default_context(cafile=ca)
    return http.client.HTTPSConnection("localhost", port, timeout=timeout, context=context)


def peer_cn(connection: Any) -> str:
    from cryptography import x509

    der = connection.sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def push_blob_blocking(port: int, ca: str, headers: Mapping[str, str], repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = https_connection(port, ca)
    conn.request("POST", f"/v2/{repo}/blobs/uploads/", body=b"", headers=dict(headers))
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 202, reply.status
    location = reply.getheader("Location")
    conn.close()
    conn = https_connection(port, ca)
    separator = "&" if "?" in location else "?"
    conn.request("PUT", f"{location}{separator}digest={digest}", body=data,
                 headers={**headers, "Content-Type": OCTET})
    reply = conn.getresponse()
    assert reply.status == 201, (reply.status, reply.read())
    reply.read()
    conn.close()
    return digest


def wait_for_log(path: str, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if text in f.read():
                return
        time.sleep(0.05)
    with open(path, errors="replace") as f:
        raise AssertionError(f"{text!r} not in the log within {timeout}s:\n{f.read()[-3000:]}")


def write_config(path: str, data_dir: str, listen: list[dict[str, str]], htpasswd: str | None,
                 rules: list[dict[str, Any]] = RULES) -> str:
    lines = [f'data_dir = "{data_dir}"']
    for table in listen:
        lines.append("[[listen]]")
        lines += [f'{key} = "{value}"' for key, value in table.items()]
    if htpasswd is not None:
        lines += ["[auth]", f'htpasswd = "{htpasswd}"', "failures_before_delay = 1000"]
    for rule in rules:
        lines.append("[[access]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in rule.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_certificate_swap_and_sighup_while_a_download_is_open(tmp_path: Any) -> None:
    """twistd with a plain and a TLS listener. A 48 MiB blob is being
    downloaded over TLS, slowly; meanwhile the certificate files are
    replaced and SIGHUP sent: new connections get the new certificate (and
    a user added to htpasswd meanwhile can log in), the open download
    completes intact on the old one, and the plain listener keeps serving."""
    pki = make_server_pki(str(tmp_path))
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    plain_port, tls_port = free_port(), free_port()
    config = write_config(str(tmp_path / "registryd.toml"), str(tmp_path / "data"), [
        {"endpoint": f"tcp:{plain_port}:interface=127.0.0.1"},
        {"endpoint": f"tcp:{tls_port}:interface=127.0.0.1", "tls_cert": pki.cert, "tls_key": pki.key},
    ], htpasswd, RULES + [{"users": ["frank"], "repositories": ["team/**"], "actions": ["pull"]}])
    log_path = str(tmp_path / "twistd.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "registryd", "--config", config],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for_port("127.0.0.1", plain_port, process)
        wait_for_port("127.0.0.1", tls_port, process)
        alice = basic("alice", PASSWORDS["alice"])
        data = os.urandom(48 << 20)
        digest = push_blob_blocking(tls_port, pki.ca, alice, "team/big", data)

        download = https_connection(tls_port, pki.ca)
        download.request("GET", f"/v2/team/big/blobs/{digest}", headers=alice)
        response = download.getresponse()
        assert response.status == 200 and int(response.getheader("Content-Length")) == len(data)
        assert peer_cn(download) == "CN=first"
        hasher = hashlib.sha256()
        received = 0
        for _ in range(16):                        # 1 MiB, slowly
            chunk = response.read(64 << 10)
            hasher.update(chunk)
            received += len(chunk)
            time.sleep(0.02)

        os.replace(pki.second[0], pki.cert)
        os.replace(pki.second[1], pki.key)
        with open(htpasswd, "a") as f:
            f.write(htpasswd_line("frank", "frank-Secret-8"))
        process.send_signal(signal.SIGHUP)
        wait_for_log(log_path, "reloaded TLS certificate")
        wait_for_log(log_path, "reloading certificates and the htpasswd file")

        fresh = https_connection(tls_port, pki.ca)
        fresh.request("GET", "/v2/team/app/tags/list", headers=basic("frank", "frank-Secret-8"))
        answer = fresh.getresponse()
        answer.read()
        assert peer_cn(fresh) == "CN=second"
        assert answer.status == 404, answer.status       # frank is in; team/app does not exist
        fresh.close()
        # openssl agrees, off this process entirely
        result = s_client(tls_port, pki.ca, "-tls1_3")
        assert result.returncode == 0 and "CN = second" in result.stdout, result.stdout + result.stderr

        while True:                                     # the rest of the open download
            chunk = response.read(1 << 20)
            if not chunk:
                break
            hasher.update(chunk)
            received += len(chunk)
        assert received == len(data)
        assert "sha256:" + hasher.hexdigest() == digest
        assert peer_cn(download) == "CN=first"
        download.close()

        import http.client
        plain = http.client.HTTPConnection("127.0.0.1", plain_port, timeout=10)
        plain.request("GET", f"/v2/team/big/blobs/{digest}", headers={**alice, "Range": "bytes=0-9"})
        ranged = plain.getresponse()
        assert ranged.status == 206 and ranged.read() == data[:10]
        plain.close()
        assert process.poll() is None
    finally:
        stop_process(process)


# --- start-up failures ----------------------------------------------------------

def run_twistd_config(config: str, as_root_without_dac: bool = False) -> subprocess.CompletedProcess[str]:
    command = [TWISTD, "-n", "--pidfile=", "registryd", "--config", config]
    if as_root_without_dac:
        # root reads any file; without these capabilities mode 000 applies to it too
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.mark.parametrize("problem", ["missing key", "unreadable key", "certificate not matching key",
                                     "missing certificate", "non-bcrypt htpasswd line", "missing htpasswd"])
def test_startup_failure_is_one_readable_line(tmp_path: Any, problem: str) -> None:
    pki = make_server_pki(str(tmp_path))
    cert, key = pki.cert, pki.key
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), {"alice": PASSWORDS["alice"]})
    if problem == "missing key":
        key = str(tmp_path / "nowhere.key")
        expected = f"cannot read TLS key {key}: No such file or directory"
    elif problem == "unreadable key":
        os.chmod(key, 0)
        expected = f"cannot read TLS key {key}: Permission denied"
    elif problem == "certificate not matching key":
        key = pki.other_key
        expected = f"TLS certificate {cert} does not match the key {key}"
    elif problem == "missing certificate":
        cert = str(tmp_path / "nowhere.pem")
        expected = f"cannot read TLS certificate {cert}: No such file or directory"
    elif problem == "non-bcrypt htpasswd line":
        with open(htpasswd, "a") as f:
            f.write("bob:$apr1$abcdefgh$0123456789abcdefghijkl\n")
        expected = f"htpasswd file {htpasswd} line 2: user 'bob' has an Apache MD5 ($apr1$) hash"
    else:
        htpasswd = str(tmp_path / "no-htpasswd")
        expected = f"cannot read htpasswd file {htpasswd}: No such file or directory"
    port = free_port()
    config = write_config(str(tmp_path / "registryd.toml"), str(tmp_path / "data"), [
        {"endpoint": f"tcp:{port}:interface=127.0.0.1", "tls_cert": cert, "tls_key": key}], htpasswd)
    result = run_twistd_config(config, as_root_without_dac=problem == "unreadable key" and os.geteuid() == 0)
    output = (result.stderr + result.stdout).strip()
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = output.splitlines()
    # Errors found while twistd builds the service come out bare; those
    # found when it starts listening (the TLS files) go through twistd's
    # log and carry its time stamp: the message itself is the same.
    assert f"registryd: {expected}" in lines[-1], output
    assert sum(expected in line for line in lines) == 1, output
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def bytes_under(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


@pytest.mark.parametrize("authorization", [
    basic("alice", "a wrong password")["Authorization"],
    basic("mallory", "whatever")["Authorization"],
    "Basic !!!not-base64!!!",
    "Bearer made-up-token",
    None,   # control: no header at all
], ids=["wrong password", "unknown user", "malformed Basic", "Bearer", "no header (control)"])
@pytest_twisted.ensureDeferred
async def test_bad_credentials_cannot_stream_a_body_to_disk(make_registry: Any, tmp_path: Any,
                                                            authorization: str | None) -> None:
    """Credentials that will be refused must not buy disk space: while a
    monolithic upload (POST ?digest=) with wrong credentials streams its
    body, nothing of it is written (an anonymous request without any
    Authorization header is already turned away before its body)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from oci_client import _Exchange

    f = await secured_registry(make_registry, tmp_path)
    uploads = os.path.join(f.data_dir, "uploads")
    before = bytes_under(uploads)
    sent = 4 << 20
    head = (f"POST /v2/team/app/blobs/uploads/?digest=sha256:{'0' * 64} HTTP/1.1\r\n"
            f"Host: {f.registry.host}\r\n" + (f"Authorization: {authorization}\r\n" if authorization else "") +
            f"Content-Type: {OCTET}\r\nContent-Length: {64 << 20}\r\n\r\n").encode()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", int(f.registry.host.split(":")[1]))
    protocol = await connectProtocol(endpoint, _Exchange(head + b"x" * sent))
    await sleep(0.3)
    during = bytes_under(uploads)
    protocol.transport.abortConnection()
    await protocol.finished
    await sleep(0.2)
    assert during - before < 64 << 10, f"{during - before} bytes of a refused body were written to disk"
