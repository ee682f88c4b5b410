"""The status page at ``/``: content through the HTTP API, rendering in headless Chromium."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from typing import Any

import bcrypt
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from fake_upstream import fake_upstream  # noqa: F401
from oci_client import Client
from registryd.auth.settings import AuthSettings
from registryd.config import UpstreamConfig
from registryd.web import status

CHROMIUM = "/usr/bin/chromium"


async def make_traffic(registry: Any, fake: Any) -> Client:
    """Push and pull a local image, pull a mirrored one twice, then make the upstream fail."""
    fake.add_image("lib/app", "v1", layer_sizes=[20_000])
    client = Client(registry.url)
    await client.push_image("team/app", "v1", seed="status")
    for _ in range(3):
        assert (await client.get("/v2/team/app/manifests/v1")).status == 200
    manifest = None
    for _ in range(2):  # a miss, then a hit
        reply = await client.get("/v2/up.test/lib/app/manifests/v1")
        assert reply.status == 200, str(reply)
        manifest = reply.json()
    assert manifest is not None
    layer = manifest["layers"][0]["digest"]
    for _ in range(2):  # a miss, then a hit
        assert (await client.get(f"/v2/up.test/lib/app/blobs/{layer}")).status == 200
    fake.status(fake.manifest_path("lib/app", "v2"), 503)
    assert (await client.get("/v2/up.test/lib/app/manifests/v2")).status == 503
    return client


def mirror_registry(make_registry: Any, fake: Any, **overrides: Any) -> Any:
    upstream = UpstreamConfig(namespace="up.test", url=fake.url, username="mirror-user",
                              password="s3cret-upstream-pw")
    return make_registry(upstreams=(upstream,), **overrides)


def blob_files(data_dir: str) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(data_dir, "blobs")))


@pytest_twisted.ensureDeferred
async def test_status_page_shows_usage_hit_rate_repositories_and_upstream_errors(
        make_registry, fake_upstream) -> None:  # noqa: F811
    registry = mirror_registry(make_registry, fake_upstream)
    client = await make_traffic(registry, fake_upstream)

    reply = await client.get("/")
    assert reply.status == 200
    assert reply.header("Content-Type") == "text/html; charset=utf-8"
    assert reply.header("Content-Length") == str(len(reply.body))
    assert reply.header("Cache-Control") == "no-store"
    page = reply.body.decode("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "<script" not in page
    for heading in ("Store usage", "Cache hit rate", "Top repositories", "Upstream health", "Recent errors"):
        assert f"<h2>{heading}</h2>" in page

    # Store usage: what is on disk (walked in the IO pool).
    files = re.search(r"<b>([\d,]+)</b><span>blob files</span>", page)
    assert files is not None and int(files[1].replace(",", "")) == blob_files(registry.data_dir)
    assert re.search(r"<span>free of [\d.]+ [KMGT]?i?B</span>", page)

    # Cache: 2 hits (manifest, blob) and 2 misses; the failed pull is neither.
    assert "<b>50.0%</b><span>hit rate</span>" in page
    assert "<b>2</b><span>hits</span>" in page and "<b>2</b><span>misses</span>" in page

    # Top repositories by manifest pulls, most pulled first.
    top = re.findall(r'<tr><td class="wrap">([^<]+)</td><td class="n">(\d+)</td></tr>', page)
    assert top[:2] == [("team/app", "3"), ("up.test/lib/app", "2")]

    # Upstream health: namespace, url, offline flag, last success, last error and its message.
    upstreams = page[page.index('id="upstreams"'):page.index('id="errors"')]
    assert "up.test" in upstreams and fake_upstream.url in upstreams
    assert "Offline: no" in upstreams and "failing" in upstreams
    assert "Last success <time" in upstreams and "Last error <time" in upstreams
    assert "up.test answered 503" in upstreams

    # Recent errors: the 503 response and the upstream failure behind it.
    errors = page[page.index('id="errors"'):]
    assert "/v2/up.test/lib/app/manifests/v2" in errors and ">503</b>" in errors
    assert "upstream up.test" in errors and "unavailable" in errors

    # Never the upstream's credentials.
    assert "s3cret-upstream-pw" not in page and "mirror-user" not in page

    # HEAD: same headers, no body.
    head = await client.head("/")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Type") == "text/html; charset=utf-8"


@pytest_twisted.ensureDeferred
async def test_store_usage_is_measured_at_most_once_a_minute(make_registry) -> None:
    registry = make_registry()
    client = Client(registry.url)
    pattern = r"<b>([\d,]+)</b><span>blob files</span>"
    first = re.search(pattern, (await client.get("/")).body.decode())
    await client.push_blob("team/more", os.urandom(10_000))
    second = re.search(pattern, (await client.get("/")).body.decode())
    assert first is not None and second is not None and first[1] == second[1] == "0"
    board = registry.service.api.status
    board._usage_ttl = 0  # the minute is up
    third = re.search(pattern, (await client.get("/")).body.decode())
    assert third is not None and third[1] == "1"


def test_board_escapes_bounds_and_scrubs() -> None:
    assert status.scrub("GET https://bob:hunter2@registry.example/v2/ failed") == \
        "GET https://registry.example/v2/ failed"
    assert len(status.scrub("x" * 5000)) == 300


@pytest_twisted.ensureDeferred
async def test_board_html_is_escaped_and_memory_bounded(make_registry) -> None:
    registry = make_registry()
    client = Client(registry.url)
    board = registry.service.api.status
    board.observe("GET", "/v2/<script>alert(1)</script>/x", 500, None, "<img src=x onerror=alert(1)>")
    for i in range(status.MAX_REPOSITORIES + 50):
        board.observe("GET", f"/v2/many/r{i}/manifests/latest", 200, None)
    assert len(board.pulls) == status.MAX_REPOSITORIES
    for i in range(status.MAX_ERRORS + 5):
        board.observe("GET", "/v2/x/blobs/y", 502, None, f"boom {i}")
    assert len(board.errors) == status.MAX_ERRORS
    board.errors.appendleft(status.RecentError(0, "response", "/v2/<script>", 500, "<img src=x>"))
    page = (await client.get("/")).body.decode()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x&gt;" in page


@pytest_twisted.ensureDeferred
async def test_status_page_needs_an_admin(make_registry, tmp_path) -> None:
    htpasswd = tmp_path / "htpasswd"
    lines = [f"{user}:{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}" for user in ("admin", "bob")]
    htpasswd.write_text("\n".join(lines) + "\n")
    registry = make_registry(auth=AuthSettings(htpasswd=str(htpasswd), admin_users=("admin",)))
    client = Client(registry.url)

    def auth(user: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()}

    anonymous = await client.get("/")
    assert anonymous.status == 401 and anonymous.header("WWW-Authenticate")
    assert (await client.get("/", headers=auth("bob"))).status == 403
    reply = await client.get("/", headers=auth("admin"))
    assert reply.status == 200 and b"<h1>registryd status</h1>" in reply.body


def chromium(*args: str, profile: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=390,844", *args],
        capture_output=True, timeout=25, stdin=subprocess.DEVNULL)


@pytest_twisted.ensureDeferred
async def test_status_page_in_headless_chromium(make_registry, fake_upstream, tmp_path) -> None:  # noqa: F811
    assert os.path.exists(CHROMIUM), "headless Chromium is needed: apt-get install chromium"
    registry = mirror_registry(make_registry, fake_upstream)
    client = await make_traffic(registry, fake_upstream)
    url = registry.url + "/"
    shot = tmp_path / "status.png"

    # Chromium runs in threads; the in-process registry keeps serving it on the reactor.
    screenshot = deferToThread(chromium, f"--screenshot={shot}", url, profile=str(tmp_path / "profile1"))
    dump = deferToThread(chromium, "--dump-dom", url, profile=str(tmp_path / "profile2"))
    assert (await client.get("/healthz")).status == 200  # served while Chromium runs
    shot_run, dump_run = await defer.gatherResults([screenshot, dump], consumeErrors=True)

    assert shot_run.returncode == 0, shot_run.stderr.decode(errors="replace")[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5 * 1024
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (390, 844)
    keep = os.environ.get("REGISTRYD_SCREENSHOT_DIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(shot, os.path.join(keep, "status.png"))

    assert dump_run.returncode == 0, dump_run.stderr.decode(errors="replace")[-2000:]
    dom = dump_run.stdout.decode("utf-8")
    assert "<title>registryd status</title>" in dom
    for heading in ("Store usage", "Cache hit rate", "Top repositories", "Upstream health", "Recent errors"):
        assert f"<h2>{heading}</h2>" in dom
    assert "team/app" in dom and "up.test answered 503" in dom and "50.0%" in dom
