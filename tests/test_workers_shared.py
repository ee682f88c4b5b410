"""What a node of two worker processes counts, or fetches, once for the node, not per worker.

[server] max_connections, max_connections_per_client and max_pending_body_bytes
(registryd.web.node_limits); the pull-through cache's manifest fetches
(registryd.mirror.shared_manifest): a tag asked for on both workers at once is one
upstream GET; and small blobs asked for on both workers at once, which one worker
fetches and stores while the other follows (registryd.mirror.shared_fill). The tests
hold connections answered by named workers (REGISTRYD_WORKER_HEADER, as
tests/test_workers.py starts its nodes), so what one worker holds is what the other
must count.
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from conftest import stop_process
from fake_upstream import fake_upstream  # noqa: F401  (the fixture)
from support.wait import wait_until
from syncclient import request
from test_workers import NS, WORKER, Node, mirror_config, start_node
from upstreams import push_blob, reference_upstream  # noqa: F401  (the fixture)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _open(node: Node) -> tuple[http.client.HTTPConnection, str | None, int]:
    """A new kept-alive connection that asked GET /v2/: (it, the worker that answered, the status)."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    conn.request("GET", "/v2/")
    reply = conn.getresponse()
    reply.read()
    return conn, reply.getheader(WORKER), reply.status


def hold(node: Node, per_worker: int) -> list[http.client.HTTPConnection]:
    """``per_worker`` open connections on each of the two workers (refused ones are tried again:
    an extra connection closed here may not have been counted off yet)."""
    held: dict[str, list[http.client.HTTPConnection]] = {"0": [], "1": []}
    deadline = time.monotonic() + 30
    while any(len(conns) < per_worker for conns in held.values()):
        assert time.monotonic() < deadline, f"could not hold {per_worker} connections per worker: {held}"
        conn, worker, status = _open(node)
        if status == 200 and worker in held and len(held[worker]) < per_worker:
            held[worker].append(conn)
        else:
            conn.close()
            if status == 503:
                time.sleep(0.05)    # a connection closed just now is not counted off yet
    return held["0"] + held["1"]


def refused(node: Node) -> bool:
    """Is a new connection answered 503 at once (a limit), rather than served?"""
    conn, _, status = _open(node)
    conn.close()
    return status == 503


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: Any) -> Iterator[Node]:
    """At most 4 connections, and 40,000 bytes of bodies in memory, on the whole node."""
    directory = tmp_path_factory.mktemp("small")
    node = start_node(directory, "max_connections = 4\nmax_pending_body_bytes = 40000\n"
                                 "[registry]\nmax_manifest_size = 30000\n")
    yield node
    stop_process(node.process)
    text = "".join(p.read_text(errors="replace") for p in directory.glob("twistd-*.log"))
    assert "Traceback" not in text and "Unhandled error" not in text, text[-4000:]


def test_max_connections_counts_the_connections_of_both_workers(small_node: Node) -> None:
    held = hold(small_node, 2)
    try:
        assert refused(small_node), "a fifth connection was served: each worker counted only its own"
    finally:
        held.pop().close()
    deadline = time.monotonic() + 10
    while refused(small_node):
        assert time.monotonic() < deadline, "a closed connection was never counted off"
        time.sleep(0.05)
    for conn in held:
        conn.close()


def test_max_connections_per_client_counts_on_both_workers(tmp_path: Any) -> None:
    node = start_node(tmp_path, "max_connections_per_client = 4\n")
    try:
        held = hold(node, 2)
        assert refused(node), "a fifth connection from one address was served"
        for conn in held:
            conn.close()
        deadline = time.monotonic() + 10
        while refused(node):
            assert time.monotonic() < deadline, "the closed connections were never counted off"
            time.sleep(0.05)
    finally:
        stop_process(node.process)


def _start_put(conn: http.client.HTTPConnection, path: str, length: int, part: bytes) -> None:
    conn.putrequest("PUT", path)
    conn.putheader("Content-Type", OCI_MANIFEST)
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    conn.send(part)


def test_bodies_held_on_both_workers_meet_one_budget(small_node: Node) -> None:
    """25,000 bytes held by a manifest push on one worker: a 25,000-byte push on the other is
    past the node's 40,000 (503 with Retry-After), and is taken once the first is done."""
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "pad": "x" * 25_000}).encode()
    first, other = hold(small_node, 1)      # one on each worker: worker 0's is kept
    other.close()
    _start_put(first, "/v2/team/budget/manifests/one", len(manifest), manifest[:100])
    try:
        # Until worker 0 has read the first request's head, the other worker may still take one.
        deadline = time.monotonic() + 10
        while True:
            status, retry_after, code = _put_on(small_node, "1", manifest)
            if status == 503:
                break
            assert time.monotonic() < deadline, "worker 1 never counted the body worker 0 holds"
            time.sleep(0.05)
        assert (retry_after, code) == ("1", "UNAVAILABLE")
        first.send(manifest[100:])
        done = first.getresponse()
        done.read()
        assert done.status != 503    # the body was taken (and judged as a manifest)
    finally:
        first.close()
    deadline = time.monotonic() + 10
    while _put_on(small_node, "1", manifest)[0] == 503:
        assert time.monotonic() < deadline, "the first body's bytes were never given back"
        time.sleep(0.05)


def _put_on(node: Node, worker: str, manifest: bytes) -> tuple[int, str | None, str | None]:
    """PUT ``manifest`` as team/budget:two over a connection of ``worker``: (status, Retry-After, error code)."""
    for _ in range(100):
        conn, who, _ = _open(node)
        if who != worker:
            conn.close()
            time.sleep(0.01)
            continue
        try:
            conn.request("PUT", "/v2/team/budget/manifests/two", body=manifest,
                         headers={"Content-Type": OCI_MANIFEST})
            reply = conn.getresponse()
            body = reply.read()
        finally:
            conn.close()
        code = json.loads(body)["errors"][0]["code"] if reply.status >= 400 else None
        return reply.status, reply.getheader("Retry-After"), code
    raise AssertionError(f"worker {worker} never answered")


# --- one upstream manifest GET per tag for the node -----------------------------------------

def _ask_on(node: Node, worker: str, path: str) -> tuple[int, bytes, str | None]:
    """GET ``path`` over a connection that worker ``worker`` answered (blocking: for a thread)."""
    for _ in range(100):
        conn, who, status = _open(node)
        if who != worker:
            conn.close()
            continue
        conn.request("GET", path, headers={"Accept": OCI_MANIFEST})
        reply = conn.getresponse()
        body = reply.read()
        conn.close()
        return reply.status, body, reply.getheader("Docker-Content-Digest")
    raise AssertionError(f"worker {worker} never answered")


@pytest_twisted.ensureDeferred
async def test_a_tag_asked_on_both_workers_at_once_is_one_upstream_get(tmp_path: Any, fake_upstream: Any) -> None:
    image = fake_upstream.add_image("lib/app", "v1")
    upstream_path = fake_upstream.manifest_path("lib/app", "v1")
    fake_upstream.stall_after(upstream_path, 10, times=2)
    node = await deferToThread(start_node, tmp_path, mirror_config(fake_upstream))
    try:
        path = f"/v2/{NS}/lib/app/manifests/v1"
        first = deferToThread(_ask_on, node, "0", path)
        await wait_until(lambda: fake_upstream.stalled(upstream_path) == 1, 10, "the first upstream GET")
        second = deferToThread(_ask_on, node, "1", path)
        # Half a second for the second worker to ask upstream too, were it going to (it does at
        # once without the node's claim: then the count is 2).
        await _for(0.5)
        assert fake_upstream.count("GET", upstream_path) == 1
        fake_upstream.release_stalled(upstream_path)
        answers = [await first, await second]
        assert [(status, digest) for status, _, digest in answers] == [(200, image["digest"])] * 2
        assert all(body == image["manifest"] for _, body, _ in answers)
        assert fake_upstream.count("GET", upstream_path) == 1
    finally:
        await deferToThread(stop_process, node.process)


async def _for(seconds: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


# --- small blobs fetched by one worker, followed by the other --------------------------------

def test_small_blobs_asked_on_both_workers_at_once_are_all_served(tmp_path: Any, reference_upstream: Any) -> None:
    """A blob of a few hundred bytes is fetched, verified and moved into the store in a moment.
    A worker following the fill that finds the partial file already moved, while the fetching
    worker has not yet said "stored", must wait for that word: it used to start over at once,
    five times in a row, and answer 503 "the transfer did not begin in another worker process"."""
    up = reference_upstream("open")
    node = start_node(tmp_path, f'[[upstream]]\nnamespace = "{NS}"\nurl = "{up.url}"\n')
    try:
        failed = []
        for round in range(30):
            data = os.urandom(300 + round)
            digest = push_blob(up, "lib/small", data)["digest"]
            answers: list[tuple[int, bytes, str | None]] = []

            def get() -> None:
                reply = request(node.host, "GET", f"/v2/{NS}/lib/small/blobs/{digest}")
                answers.append((reply.status, reply.body, reply.header(WORKER)))

            threads = [threading.Thread(target=get) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            failed += [answer for answer in answers if answer[:2] != (200, data)]
        assert not failed, failed[:3]
        assert up.count("GET", r"/v2/lib/small/blobs/.*") == 30
    finally:
        stop_process(node.process)
