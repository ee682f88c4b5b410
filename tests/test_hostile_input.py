"""Hostile input gets a clean OCI error, never a 500, and leaks nothing to anonymous clients.

Each case here once reached a client as ``500 UNKNOWN`` with a traceback in
the log (the autouse fixture in conftest fails a test that logs one), or
told an anonymous client something only the log should know.
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from fake_upstream import fake_upstream  # noqa: F401  (fixture)
from oci_client import OCI_MANIFEST, Client, digest_of
from registryd.auth.policy import parse_access_rules
from registryd.config import UpstreamConfig
from test_security import as_user, auth_settings, write_htpasswd

NS = "upstream.test"
#: Deeper than any JSON parser recursion limit (CPython's is about 1000).
NESTED = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","x":' + b"[" * 100_000 \
    + b"]" * 100_000 + b"}"
MANY_DIGITS = "9" * 5000


@pytest_twisted.ensureDeferred
async def test_deeply_nested_manifest_is_manifest_invalid(make_registry: Any) -> None:
    registry = make_registry()
    client = Client(registry.url)
    for reference in ("v1", digest_of(NESTED)):
        reply = await client.put(f"/v2/lab/app/manifests/{reference}", NESTED, headers={"Content-Type": OCI_MANIFEST})
        assert reply.status == 400 and reply.codes == ["MANIFEST_INVALID"], str(reply)
    assert (await client.get("/v2/lab/app/tags/list")).status == 404


@pytest.mark.parametrize("what", ["manifest", "manifest-as-json", "tags", "referrers"])
@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_from_an_upstream_is_an_upstream_error(
        fake_upstream: Any, make_registry: Any, what: str) -> None:
    """The upstream's manifest (with a manifest or a JSON Content-Type), tag list or referrers list."""
    image = fake_upstream.add_image("lib/app", "v1")
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    client = Client(registry.url)
    subject = image["digest"]
    path = {"manifest": "/v2/lib/app/manifests/v1", "manifest-as-json": "/v2/lib/app/manifests/v1",
            "tags": "/v2/lib/app/tags/list", "referrers": f"/v2/lib/app/referrers/{subject}"}[what]
    content_type = OCI_MANIFEST if what == "manifest" else "application/json"
    fake_upstream.serve(path, NESTED, content_type)
    reply = await client.get(f"/v2/{NS}{path.removeprefix('/v2')}", headers={"Accept": OCI_MANIFEST})
    if what == "referrers":
        # Nothing cached to fall back on: an empty list, as for an upstream without the API.
        assert reply.status == 200 and reply.json()["manifests"] == [], str(reply)
    else:
        assert reply.status == 503 and reply.codes == ["UNAVAILABLE"], str(reply)


@pytest.mark.parametrize("n", [MANY_DIGITS, "1" + "0" * 12, "%C2%B2", "%D9%A3", "-1", "1.5", "0x10"])
@pytest_twisted.ensureDeferred
async def test_absurd_page_sizes_are_pagination_number_invalid(make_registry: Any, n: str) -> None:
    registry = make_registry()
    client = Client(registry.url)
    await client.push_blob("lab/app", b"some blob")
    for path in (f"/v2/_catalog?n={n}", f"/v2/lab/app/tags/list?n={n}"):
        reply = await client.get(path)
        assert reply.status == 400 and reply.codes == ["PAGINATION_NUMBER_INVALID"], str(reply)
        assert len(reply.body) < 500, "the error echoes the whole parameter"


@pytest.mark.parametrize("header, status, expected", [
    ("bytes=500-0", 416, None),                        # last before first: no byte satisfies it
    ("bytes=1-0", 416, None),
    (f"bytes=0-{MANY_DIGITS}", 200, (0, 1000)),        # past the end: up to the end (all of it)
    (f"bytes=1-{MANY_DIGITS}", 206, (1, 1000)),
    (f"bytes={MANY_DIGITS}-", 416, None),              # starts past the end
    (f"bytes=-{MANY_DIGITS}", 200, (0, 1000)),         # a suffix longer than the blob: all of it
    ("bytes=\u0663-\u0664", 200, (0, 1000)),           # not ASCII digits: ignored, the whole blob
])
@pytest_twisted.ensureDeferred
async def test_unsatisfiable_and_absurd_ranges(make_registry: Any, header: str, status: int,
                                               expected: tuple[int, int] | None) -> None:
    registry = make_registry()
    client = Client(registry.url)
    data = os.urandom(1000)
    digest = await client.push_blob("lab/app", data)
    reply = await client.get(f"/v2/lab/app/blobs/{digest}",
                             headers={"Range": header.encode().decode("latin-1")})
    assert reply.status == status, str(reply)
    if status == 416:
        assert reply.header("Content-Range") == "bytes */1000", str(reply)
    else:
        assert expected is not None
        assert reply.body == data[expected[0]:expected[1]]


@pytest.mark.parametrize("content_range", [f"0-{MANY_DIGITS}", f"{MANY_DIGITS}-{MANY_DIGITS}", "\u0660-\u0660"])
@pytest_twisted.ensureDeferred
async def test_absurd_content_range_on_a_chunk_is_416(make_registry: Any, content_range: str) -> None:
    registry = make_registry()
    client = Client(registry.url)
    location = await client.start_upload("lab/app")
    reply = await client.patch(client.path_of(location), b"x",
                               headers={"Content-Range": content_range.encode().decode("latin-1"),
                                        "Content-Type": "application/octet-stream"})
    assert reply.status == 416 and reply.codes == ["BLOB_UPLOAD_INVALID"], str(reply)


@pytest_twisted.ensureDeferred
async def test_a_push_to_a_mirror_is_answered_only_after_authentication(
        fake_upstream: Any, make_registry: Any, tmp_path: Any) -> None:
    """Anonymous clients of a registry with users learn nothing of its mirrors: 401, not a 405 naming one."""
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), {"alice": "alice-Secret-1"})
    rules = [{"users": ["alice"], "repositories": ["**"], "actions": ["pull", "push"]}]
    registry = make_registry(auth=auth_settings(htpasswd), access=parse_access_rules(rules),
                             upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    data = b"a blob"
    targets = [("PUT", f"/v2/{NS}/lib/app/manifests/v1"), ("PUT", f"/v2/lib/app/manifests/v1?ns={NS}"),
               ("POST", f"/v2/{NS}/lib/app/blobs/uploads/"),
               ("POST", f"/v2/{NS}/lib/app/blobs/uploads/?digest={digest_of(data)}"),
               ("DELETE", f"/v2/{NS}/lib/app/manifests/v1"), ("DELETE", f"/v2/{NS}/lib/app/blobs/{digest_of(data)}")]
    for method, path in targets:
        reply = await as_user(registry.url, None).request(method, path, data if method != "DELETE" else None)
        assert reply.status == 401 and reply.codes == ["UNAUTHORIZED"], str(reply)
        assert b"mirror" not in reply.body and b"read-only" not in reply.body, str(reply)
        if "?ns=" in path:
            assert NS.encode() not in reply.body, str(reply)
        # A user who may pull it is told why the push cannot be.
        reply = await as_user(registry.url, "alice", "alice-Secret-1").request(
            method, path, data if method != "DELETE" else None)
        assert reply.status == 405 and reply.codes == ["DENIED"], str(reply)
    assert fake_upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_readyz_gives_anonymous_clients_a_generic_reason(make_registry: Any) -> None:
    registry = make_registry()
    tmp = os.path.join(registry.data_dir, "tmp")
    os.rename(tmp, tmp + ".away")
    with open(tmp, "w"):   # a file where the store writes its probes: ENOTDIR
        pass
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        reply = await Client(registry.url).get("/readyz")
    finally:
        globalLogPublisher.removeObserver(observe)
        os.unlink(tmp)
        os.rename(tmp + ".away", tmp)
    assert reply.status == 503, str(reply)
    reason = reply.json()["reason"]
    assert "Not a directory" not in reason and registry.data_dir not in reason, reason
    assert any("Not a directory" in line for line in logged), logged
    assert (await Client(registry.url).get("/readyz")).status == 200


@pytest.mark.parametrize("path", [
    "/v2/team/app/manifests/v1%2f..", "/v2/team/app/manifests/v1%2F..%2Fother", "/v2/team/app/tags/list%2f..",
    "/v2/team/app%2f..%2fother/manifests/v1", "/v2/team/app/blobs/sha256:{hex}%2f..",
])
@pytest_twisted.ensureDeferred
async def test_encoded_separators_get_an_error_that_names_no_repository(
        make_registry: Any, tmp_path: Any, path: str) -> None:
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), {"alice": "alice-Secret-1"})
    rules = [{"users": ["alice"], "repositories": ["team/**"], "actions": ["pull", "push"]}]
    registry = make_registry(auth=auth_settings(htpasswd), access=parse_access_rules(rules))
    reply = await as_user(registry.url, None).get(path.format(hex="a" * 64))
    assert reply.status in (400, 401, 404), str(reply)
    assert b"team" not in reply.body, str(reply)


@pytest.mark.parametrize("what, answer", [
    ("tags", b'{"tags": 5}'),                                      # not a list: TypeError
    ("manifest", b'{"schemaVersion": 2, "mediaType": ["x"]}'),     # unhashable media type: TypeError
    ("manifest", b'{"schemaVersion": 2, "mediaType": {"a": 1}}'),
    ("realm", 'Bearer realm="{url}/to ken"'),                      # not a valid URI: ValueError
    ("realm", 'Bearer realm="{url}/to\u00e9ken"'),
])
@pytest_twisted.ensureDeferred
async def test_malformed_upstream_answers_are_upstream_errors(fake_upstream: Any, make_registry: Any, what: str,
                                                             answer: Any) -> None:
    fake_upstream.add_image("lib/app", "v1")
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    path = "/v2/lib/app/tags/list" if what == "tags" else "/v2/lib/app/manifests/v1"
    if what == "realm":
        fake_upstream.challenge(answer.format(url=fake_upstream.url))
    else:
        fake_upstream.serve(path, answer, "application/json")
    reply = await Client(registry.url).get(f"/v2/{NS}{path.removeprefix('/v2')}", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 503 and reply.codes == ["UNAVAILABLE"], str(reply)


@pytest_twisted.ensureDeferred
async def test_tags_an_upstream_lists_are_checked(fake_upstream: Any, make_registry: Any) -> None:
    fake_upstream.add_image("lib/app", "v1")
    fake_upstream.serve("/v2/lib/app/tags/list", b'{"tags": ["v1", 5, null, "\\u0000bad", "../x", "v2"]}')
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    reply = await Client(registry.url).get(f"/v2/{NS}/lib/app/tags/list")
    assert reply.status == 200 and reply.json()["tags"] == ["v1", "v2"], str(reply)


@pytest.mark.parametrize("method, path, header", [
    ("GET", f"/v2/{NS}/lib/app/manifests/v1", "Accept"),
    ("PUT", "/v2/lab/app/manifests/v1", "Content-Type"),
    ("GET", "/v2/lab/app/manifests/v1", "Authorization"),
    ("GET", "/v2/lab/app/blobs/{digest}", "Range"),
])
@pytest_twisted.ensureDeferred
async def test_header_values_that_are_not_utf8(fake_upstream: Any, make_registry: Any, method: str, path: str,
                                               header: str) -> None:
    fake_upstream.add_image("lib/app", "v1")
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    client = Client(registry.url)
    digest = await client.push_blob("lab/app", b"a blob")
    reply = await client.request(method, path.format(digest=digest), b"{}" if method == "PUT" else None,
                                 headers={header: "\xff\xfe"})   # sent as the bytes ff fe
    assert reply.status in {"Accept": (200, 404), "Content-Type": (400,), "Authorization": (404,),
                            "Range": (200,)}[header], str(reply)


@pytest.mark.parametrize("path", ["/v2/lab/app/manifests/%ff", "/v2/lab/%ff/tags/list", "/v2/lab/app/blobs/uploads/%c3",
                                  "/%ff"])
@pytest_twisted.ensureDeferred
async def test_paths_that_are_not_utf8_get_the_error_document(make_registry: Any, path: str) -> None:
    registry = make_registry()
    reply = await Client(registry.url).get(path)
    assert reply.status == 400 and reply.codes == ["UNSUPPORTED"], str(reply)
