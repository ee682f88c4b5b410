"""Health, readiness, Prometheus metrics and structured access logs."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time

import bcrypt
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from conftest import ROOT, VENV_BIN, free_port, stop_process, wait_for_port
from fake_upstream import fake_upstream  # noqa: F401
from oci_client import Client, digest_of
from registryd.auth.settings import AuthSettings
from registryd.config import UpstreamConfig
from syncclient import request as sync_request


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_twisted.ensureDeferred
async def test_health_and_readiness(make_registry) -> None:
    registry = make_registry()
    client = Client(registry.url)
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status == 200
    full = make_registry(min_free_bytes=10 ** 18)
    reply = await Client(full.url).get("/readyz")
    assert reply.status == 503
    assert "bytes free" not in reply.json()["reason"]   # the log says how many; anyone may ask /readyz
    assert (await Client(full.url).get("/healthz")).status == 200


@pytest_twisted.ensureDeferred
async def test_metrics_count_the_traffic(make_registry) -> None:
    registry = make_registry()
    client = Client(registry.url)
    data = os.urandom(100_000)
    digest = digest_of(data)
    assert (await client.post(f"/v2/m/app/blobs/uploads/?digest={digest}", data)).status == 201
    for _ in range(3):
        assert (await client.get(f"/v2/m/app/blobs/{digest}")).status == 200
    assert (await client.get("/v2/m/app/blobs/sha256:" + "0" * 64)).status == 404
    reply = await client.get("/metrics")
    assert reply.status == 200 and reply.header("Content-Type").startswith("text/plain")
    found = samples(reply.body.decode())
    assert value(found, "registryd_http_requests_total", route="blob", method="GET", status="200") == 3
    assert value(found, "registryd_http_requests_total", route="blob", method="GET", status="404") == 1
    assert value(found, "registryd_http_requests_total", route="upload", method="POST", status="201") == 1
    assert value(found, "registryd_http_sent_bytes_total", route="blob") >= 3 * len(data)
    assert value(found, "registryd_http_received_bytes_total", route="upload") == len(data)


@pytest_twisted.ensureDeferred
async def test_mirror_metrics(fake_upstream, make_registry) -> None:  # noqa: F811
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[300_000])
    layer = image["layers"][0]
    path = fake_upstream.blob_path("lib/app", layer["digest"])
    fake_upstream.slow(path, 30_000, tick=0.01)
    registry = make_registry(upstreams=(UpstreamConfig(namespace="up.test", url=fake_upstream.url),))
    client = Client(registry.url)
    blob = f"/v2/up.test/lib/app/blobs/{layer['digest']}"
    replies = await defer.gatherResults([defer.ensureDeferred(client.get(blob)) for _ in range(3)])
    assert all(r.status == 200 for r in replies)
    assert (await client.get(blob)).status == 200
    found = samples((await client.get("/metrics")).body.decode())
    assert value(found, "registryd_upstream_blob_fetches_total", upstream="up.test") == 1
    assert value(found, "registryd_upstream_coalesced_waiters_total") == 2
    assert value(found, "registryd_mirror_cache_requests_total", kind="blob", result="miss") == 3
    assert value(found, "registryd_mirror_cache_requests_total", kind="blob", result="hit") == 1
    assert value(found, "registryd_upstream_fills_in_flight") == 0
    fake_upstream.status(fake_upstream.manifest_path("lib/app", "v2"), 503)
    await client.get("/v2/up.test/lib/app/manifests/v2")
    found = samples((await client.get("/metrics")).body.decode())
    assert value(found, "registryd_upstream_errors_total", upstream="up.test") == 1


@pytest_twisted.ensureDeferred
async def test_metrics_need_an_admin_but_health_stays_open(make_registry, tmp_path) -> None:
    htpasswd = tmp_path / "htpasswd"
    lines = [f"{user}:{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}" for user in ("admin", "bob")]
    htpasswd.write_text("\n".join(lines) + "\n")
    registry = make_registry(auth=AuthSettings(htpasswd=str(htpasswd), admin_users=("admin",)))
    client = Client(registry.url)

    def auth(user: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()}

    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=auth("bob"))).status == 403
    assert (await client.get("/metrics", headers=auth("admin"))).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


def test_json_lines_access_log(tmp_path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "--logger", "registryd.logs.json_lines", "registryd",
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for_port("127.0.0.1", port, process)
        assert sync_request(f"127.0.0.1:{port}", "GET", "/v2/nothing/here/tags/list").status == 404
        time.sleep(0.3)
    finally:
        stop_process(process)
    events = [json.loads(line) for line in process.stdout.read().decode().splitlines() if line.strip()]
    access = [e for e in events if e.get("access")]
    assert len(access) == 1
    event = access[0]
    assert (event["method"], event["path"], event["status"], event["route"]) == \
        ("GET", "/v2/nothing/here/tags/list", 404, "tags")
    assert event["bytes_out"] > 0 and event["duration_ms"] >= 0 and event["user"] == "-"
