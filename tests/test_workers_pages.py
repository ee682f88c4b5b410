"""The status page and the mirror page of a node of two workers show the whole node.

A real twistd with ``[server] workers = 2`` (tests/test_workers.py starts it),
mirroring the in-process fake upstream. Each response names the worker that
answered it (X-Registryd-Worker), so a test sends requests to each worker over
a kept-alive connection of its own and reads each worker's pages: whichever
worker answers the page, it counts what both saw. Blocking HTTP runs in a
thread: the fake upstream answers the node on this test's reactor.
"""
from __future__ import annotations

import http.client
import json
import os
import re
from typing import Any, Callable

import pytest_twisted
from twisted.internet.threads import deferToThread

from conftest import stop_process
from fake_upstream import fake_upstream  # noqa: F401  (the fixture)
from support.wait import wait_until
from test_workers import NS, Node, _ask, _connections_to_both_workers, start_download, start_node

#: Longer than the workers' view interval (registryd.web.worker_snapshots.INTERVAL) a few times over.
SEEN_WITHIN = 20.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def mirror_config(fake: Any) -> str:
    return f'[[upstream]]\nnamespace = "{NS}"\nurl = "{fake.url}"\nidle_timeout = 60\n'


async def start(tmp_path: Any, fake: Any) -> tuple[Node, dict[str, http.client.HTTPConnection]]:
    node = await deferToThread(start_node, tmp_path, mirror_config(fake))
    return node, await deferToThread(_connections_to_both_workers, node)


async def ask(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return await deferToThread(_ask, conn, "GET", path, None, headers)


async def mirror_json(conn: http.client.HTTPConnection) -> dict[str, Any]:
    status, body = await ask(conn, "/ui/api/mirror")
    assert status == 200, body
    (upstream,) = json.loads(body)["upstreams"]
    assert isinstance(upstream, dict)
    return upstream


async def status_page(conn: http.client.HTTPConnection) -> str:
    status, body = await ask(conn, "/")
    assert status == 200, body
    return body.decode()


async def on_every_worker(workers: dict[str, http.client.HTTPConnection], read: Callable[[Any], Any],
                          shows: Callable[[Any], bool], what: str) -> None:
    """Each worker's page comes to show ``what`` (its view of the others is a few seconds late)."""
    for name, conn in workers.items():
        seen: list[Any] = []

        async def check() -> bool:
            seen[:] = [await read(conn)]
            return shows(seen[0])

        try:
            await wait_until(check, SEEN_WITHIN, f"worker {name}'s page shows {what}", interval=0.2)
        except AssertionError:
            raise AssertionError(f"worker {name}'s page never showed {what}: {seen}") from None


def close(workers: dict[str, http.client.HTTPConnection]) -> None:
    for conn in workers.values():
        conn.close()


@pytest_twisted.ensureDeferred
async def test_traffic_through_both_workers_is_summed_on_the_pages_of_either(tmp_path: Any,
                                                                            fake_upstream: Any) -> None:  # noqa: F811
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[5000], seed="pages")
    layer = image["layers"][0]["digest"]
    node, workers = await start(tmp_path, fake_upstream)
    try:
        sent = 0
        for name in ("0", "1", "0", "1"):       # two manifest pulls and two blob GETs on each worker
            status, body = await ask(workers[name], f"/v2/{NS}/lib/app/manifests/v1", {"Accept": OCI_MANIFEST})
            assert status == 200, body
            sent += len(body)
            status, body = await ask(workers[name], f"/v2/{NS}/lib/app/blobs/{layer}")
            assert status == 200 and len(body) == 5000
            sent += len(body)

        def summed(up: dict[str, Any]) -> bool:
            since = up["since_start"]
            return (since["requests"] == 8 and since["bytes_from_cache"] + since["bytes_from_upstream"] == sent
                    and sum(bucket["requests"] for bucket in up["last_24h"]) == 8)

        await on_every_worker(workers, mirror_json, summed, "both workers' 8 mirrored requests")
        for conn in workers.values():
            since = (await mirror_json(conn))["since_start"]
            assert since["misses"] >= 1 and since["hits"] == 8 - since["misses"]
            mirror_page = (await ask(conn, "/ui/mirror"))[1].decode()
            assert "hit rate (8 requests)" in mirror_page

        # The status page: the pulls of both workers, and the hit rate of the node.
        await on_every_worker(workers, status_page,
                              lambda page: f'<td class="wrap">{NS}/lib/app</td><td class="n">4</td>' in page,
                              "4 pulls of the mirrored repository")
        for conn in workers.values():
            page = await status_page(conn)
            hits = re.search(r"<b>([\d,]+)</b><span>hits</span>", page)
            misses = re.search(r"<b>([\d,]+)</b><span>misses</span>", page)
            assert hits and misses and int(hits[1]) + int(misses[1]) == 8, page
    finally:
        close(workers)
        await deferToThread(stop_process, node.process)


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_seen_by_one_worker_shows_on_the_pages_of_the_other(
        tmp_path: Any, fake_upstream: Any) -> None:  # noqa: F811
    fake_upstream.add_image("lib/app", "v1", seed="errors")
    fake_upstream.status(fake_upstream.manifest_path("lib/app", "v2"), 503)
    node, workers = await start(tmp_path, fake_upstream)
    try:
        status, _ = await ask(workers["0"], f"/v2/{NS}/lib/app/manifests/v2", {"Accept": OCI_MANIFEST})
        assert status == 503
        other = {"1": workers["1"]}

        def failed(up: dict[str, Any]) -> bool:
            return (up["errors"] >= 1 and up["last_error"] is not None
                    and any("503" in e["message"] for e in up["recent_errors"]))

        await on_every_worker(other, mirror_json, failed, "the upstream's 503")
        assert "503" in (await ask(workers["1"], "/ui/mirror"))[1].decode()

        def shown(page: str) -> bool:
            upstreams = page[page.index('id="upstreams"'):page.index('id="errors"')]
            errors = page[page.index('id="errors"'):]
            return ("failing" in upstreams and f"{NS} answered 503" in upstreams
                    and f"/v2/{NS}/lib/app/manifests/v2" in errors and f"upstream {NS}" in errors)

        await on_every_worker(other, status_page, shown, "the failing upstream and the 503 response")
    finally:
        close(workers)
        await deferToThread(stop_process, node.process)


@pytest_twisted.ensureDeferred
async def test_a_fill_running_in_one_worker_shows_on_the_pages_of_the_other(tmp_path: Any,
                                                                            fake_upstream: Any) -> None:  # noqa: F811
    blob = os.urandom(200_000)
    digest = fake_upstream.add_blob("lib/slow", blob)
    path = fake_upstream.blob_path("lib/slow", digest)
    fake_upstream.stall_after(path, 50_000)
    node, workers = await start(tmp_path, fake_upstream)
    try:
        download = await start_download(node, f"/v2/{NS}/lib/slow/blobs/{digest}")
        await wait_until(lambda: download.body > 0 or download.done.called, 20, "the first bytes")
        assert download.status == 200 and download.worker in workers
        other = {name: conn for name, conn in workers.items() if name != download.worker}

        await on_every_worker(other, mirror_json, lambda up: up["fills_running"] == 1, "the fill running")
        await on_every_worker(other, status_page, lambda page: "<b>1</b><span>transfers running</span>" in page,
                              "the transfer running")
        assert fake_upstream.stalled(path)

        fake_upstream.release_stalled(path)
        await download.done
        assert download.complete and download.digest == digest
        await on_every_worker(workers, mirror_json, lambda up: up["fills_running"] == 0, "no fill running")
    finally:
        close(workers)
        await deferToThread(stop_process, node.process)

