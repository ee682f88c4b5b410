"""The web UI (/ui/) and its JSON (/ui/api/) through HTTP: content, search, paging, access, read-only.

A registry is filled by tests/ui_content.py (local images with a rich
config, a multi-arch index, an artifact with referrers, ``public/hello``,
an image pulled through the mirror). The browser's view of the same pages
is tests/e2e/test_web_ui_browser.py.
"""
from __future__ import annotations

import os
import re
from typing import Any

import pytest_twisted
from twisted.internet import defer

import ui_content
from fake_upstream import fake_upstream  # noqa: F401
from oci_client import Client
from registryd.storage.s3.errors import S3Unavailable
from registryd.web.ui import charts, pages, traffic
from registryd.web.ui.inventory import Inventory

PAGES = ("/ui/", "/ui/repositories/team/app", "/ui/repositories/team/app/manifests/v1",
         "/ui/repositories/team/multi/manifests/latest", "/ui/repositories/up.test/lib/app", "/ui/mirror")


async def page(client: Client, path: str, **kw: Any) -> Any:
    reply = await client.request("GET", path, check=False, **kw)
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"
    return reply


async def api(client: Client, path: str, **kw: Any) -> Any:
    reply = await page(client, path, **kw)
    assert reply.status == 200, str(reply)
    assert reply.header("Content-Type") == "application/json"
    return reply.json()


async def filled_registry(make_registry: Any, fake: Any, **overrides: Any) -> tuple[Any, Client, ui_content.Filled]:
    registry = make_registry(upstreams=(ui_content.upstream(fake),), **overrides)
    client = Client(registry.url)
    headers = ui_content.basic("admin") if "auth" in overrides else None
    if headers:
        client = _Authenticated(registry.url, headers)
    return registry, client, await ui_content.fill(client, fake)


class _Authenticated(Client):
    """A client that sends one user's credentials with every request."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(url)
        self._auth = headers

    async def request(self, method: str, path: str, body: bytes | None = None, headers: Any = None,
                      check: bool = True) -> Any:
        return await super().request(method, path, body, {**self._auth, **(headers or {})}, check)


@pytest_twisted.ensureDeferred
async def test_json_lists_local_and_mirrored_repositories_with_tags_sizes_and_times(
        make_registry, fake_upstream) -> None:  # noqa: F811
    registry, client, filled = await filled_registry(make_registry, fake_upstream)
    listing = await api(client, "/ui/api/repositories")
    assert listing["total"] == 4 and listing["page"] == 1
    by_name = {r["name"]: r for r in listing["repositories"]}
    assert list(by_name) == ["public/hello", "team/app", "team/multi", "up.test/lib/app"]
    app, mirrored = by_name["team/app"], by_name["up.test/lib/app"]
    assert (app["kind"], app["upstream"], app["tags"], app["manifests"]) == ("local", None, 2, 4)
    assert mirrored["kind"] == "mirror" and mirrored["upstream"] == "up.test" and mirrored["tags"] == 1
    image = filled.mirrored
    mirrored_bytes = len(image["manifest"]) + image["config"]["size"] + sum(l["size"] for l in image["layers"])
    assert mirrored["size"] == mirrored_bytes
    assert app["size"] > filled.app_v1_size
    for entry in by_name.values():
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["last_push"])
    assert by_name["public/hello"]["last_pull"] is None and app["last_pull"] is not None

    # A repository: each tag's digest, type, platforms, size (manifest + config + layers), created, last pull.
    repo = await api(client, "/ui/api/repositories/team/app")
    tags = {t["tag"]: t for t in repo["tag_list"]}
    assert list(tags) == ["v1", "v2"]
    v1 = tags["v1"]
    assert v1["digest"] == filled.app_v1 and v1["media_type"] == "application/vnd.oci.image.manifest.v1+json"
    assert v1["platforms"] == ["linux/amd64"] and v1["size"] == filled.app_v1_size
    assert v1["created"] == "2026-11-05T10:20:30Z" and v1["last_pull"] is not None
    assert tags["v2"]["last_pull"] is None
    assert repo["pull"] == {"docker": f"docker pull {registry.host}/team/app:v1",
                            "podman": f"podman pull --tls-verify=false {registry.host}/team/app:v1",
                            "ctr": f"ctr images pull --plain-http {registry.host}/team/app:v1"}
    multi = await api(client, "/ui/api/repositories/team/multi")
    assert multi["tag_list"][0]["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert multi["tag_list"][0]["created"] == "2026-11-05T10:20:30Z"

    # An image: layers, config fields, history, annotations, referrers by artifact type.
    v1_doc = await api(client, "/ui/api/repositories/team/app/manifests/v1")
    assert v1_doc["digest"] == filled.app_v1 and v1_doc["manifests"] is None
    assert [l["size"] for l in v1_doc["layers"]] == [len(b"app layer one" * 500)]
    config = v1_doc["config"]
    assert config["entrypoint"] == ["/usr/bin/app"] and config["cmd"] == ["--serve", "--port=8080"]
    assert config["env"] == ["PATH=/usr/bin", "APP_MODE=<production>"] and config["exposed_ports"] == ["8080/tcp"]
    assert config["labels"]["team"] == "platform" and config["user"] == "app" and config["working_dir"] == "/srv/app"
    assert [step["created_by"] for step in config["history"]] == ["ADD rootfs.tar /", 'CMD ["--serve"]']
    assert v1_doc["annotations"] == {"org.opencontainers.image.source": "https://example.test/app"}
    referrers = v1_doc["referrers"]
    assert sorted(referrers) == [ui_content.SBOM, ui_content.SIGNATURE]
    assert [r["digest"] for r in referrers[ui_content.SBOM]] == [filled.sbom]
    assert [r["digest"] for r in referrers[ui_content.SIGNATURE]] == [filled.signature]
    by_digest = await api(client, f"/ui/api/repositories/team/app/manifests/{filled.app_v1}")
    assert by_digest["digest"] == filled.app_v1
    sbom = await api(client, f"/ui/api/repositories/team/app/manifests/{filled.sbom}")
    assert sbom["artifact_type"] == ui_content.SBOM and sbom["subject"] == filled.app_v1

    # An index: its platforms.
    index = await api(client, "/ui/api/repositories/team/multi/manifests/latest")
    assert index["layers"] is None and index["digest"] == filled.multi
    assert [(m["platform"], m["digest"]) for m in index["manifests"]] == [
        ("linux/amd64", filled.multi_children[0]), ("linux/arm64/v8", filled.multi_children[1])]

    # The mirror: what is cached, the hit rate, the bytes from cache and from upstream.
    mirror = await api(client, "/ui/api/mirror")
    (up,) = mirror["upstreams"]
    assert up["namespace"] == "up.test"
    assert up["cached"] == {"repositories": 1, "images": 1, "bytes": mirrored_bytes}
    since = up["since_start"]
    assert (since["hits"], since["misses"]) == (3, 3) and since["hit_rate"] == 0.5
    blob_bytes = image["config"]["size"] + sum(l["size"] for l in image["layers"])
    assert since["bytes_from_upstream"] == since["bytes_from_cache"] == len(image["manifest"]) + blob_bytes
    assert sum(bucket["requests"] for bucket in up["last_24h"]) == 6
    assert up["fills_running"] == 0 and up["errors"] == 0


@pytest_twisted.ensureDeferred
async def test_pages_render_what_the_json_says_escaped(make_registry, fake_upstream) -> None:  # noqa: F811
    registry, client, filled = await filled_registry(make_registry, fake_upstream)
    await ui_content.push_artifact(client, "team/app", filled.app_v2, 597, "application/x.evil",
                                   b"<script>alert(1)</script>")
    for path in PAGES:
        reply = await page(client, path)
        assert reply.status == 200, str(reply)
        assert reply.header("Content-Type") == "text/html; charset=utf-8"
        csp = reply.header("Content-Security-Policy") or ""
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        body = reply.body.decode()
        assert body.startswith("<!DOCTYPE html>") and 'name="viewport"' in body
        assert re.search(r"<script>(?!</script>)", body) is None    # no inline script
    home = (await page(client, "/ui/")).body.decode()
    for name in ("public/hello", "team/app", "team/multi", "up.test/lib/app"):
        assert f'data-name="{name}"' in home
    app = (await page(client, "/ui/repositories/team/app/manifests/v1")).body.decode()
    assert "APP_MODE=&lt;production&gt;" in app and "<production>" not in app
    assert ui_content.SBOM in app and filled.sbom in app
    v2 = (await page(client, f"/ui/repositories/team/app/manifests/{filled.app_v2}")).body.decode()
    assert "application/x.evil" in v2
    multi = (await page(client, "/ui/repositories/team/multi/manifests/latest")).body.decode()
    assert "linux/arm64/v8" in multi and f"/ui/repositories/team/multi/manifests/{filled.multi_children[1]}" in multi
    mirror = (await page(client, "/ui/mirror")).body.decode()
    assert mirror.count("<svg") == 3 and "<polyline" in mirror and "50.0%" in mirror
    static = await page(client, "/ui/static/copy.js")
    assert static.status == 200 and static.header("Content-Type") == "text/javascript; charset=utf-8"
    # HEAD: the headers, no body; a page that is not there: 404 in HTML; JSON errors in JSON.
    head = await client.request("HEAD", "/ui/", check=False)
    assert head.status == 200 and head.body == b""
    assert (await page(client, "/ui/nothing")).status == 404
    missing = await page(client, "/ui/api/repositories/team/nothing")
    assert missing.status == 404 and missing.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert (await page(client, "/ui/repositories/team/app/manifests/v9")).status == 404
    # A manifest of another repository is not shown here, though the blob store holds it.
    assert (await page(client, f"/ui/repositories/public/hello/manifests/{filled.app_v1}")).status == 404
    # The status page links here.
    assert b'<a href="/ui/">' in (await client.get("/")).body


@pytest_twisted.ensureDeferred
async def test_search_filter_and_pages(make_registry, fake_upstream) -> None:  # noqa: F811
    registry, client, filled = await filled_registry(make_registry, fake_upstream)

    async def names(query: str) -> list[str]:
        return [r["name"] for r in (await api(client, "/ui/api/repositories?" + query))["repositories"]]

    assert await names("q=multi") == ["team/multi"]
    assert await names("q=APP") == ["team/app", "up.test/lib/app"]
    assert await names("upstream=up.test") == ["up.test/lib/app"]
    assert await names("upstream=local") == ["public/hello", "team/app", "team/multi"]
    assert await names("upstream=local&q=lib") == []
    first = await api(client, "/ui/api/repositories?per_page=3")
    second = await api(client, "/ui/api/repositories?per_page=3&page=2")
    assert (first["pages"], first["total"], second["page"]) == (2, 4, 2)
    assert [r["name"] for r in first["repositories"] + second["repositories"]] == await names("")
    tags = await api(client, "/ui/api/repositories/team/app?per_page=1&page=2")
    assert [t["tag"] for t in tags["tag_list"]] == ["v2"] and tags["total"] == 2
    assert [t["tag"] for t in (await api(client, "/ui/api/repositories/team/app?q=v1"))["tag_list"]] == ["v1"]
    home = (await page(client, "/ui/?per_page=2&q=t")).body.decode()
    assert re.search(r'rel="next" href="/ui/\?[^"]*page=2', home)

    # A push shows at once (the request is seen), not after the summary's time to live.
    await client.push_image("team/app", "v3", seed="later")
    await client.push_image("team/new", "1", seed="new")
    app = next(r for r in (await api(client, "/ui/api/repositories?q=team/"))["repositories"]
               if r["name"] == "team/app")
    assert app["tags"] == 3
    assert "team/new" in await names("q=team/")


@pytest_twisted.ensureDeferred
async def test_a_public_only_viewer_sees_nothing_else_anywhere(make_registry, fake_upstream, tmp_path) -> None:  # noqa: F811
    registry, admin, filled = await filled_registry(make_registry, fake_upstream,
                                                    **ui_content.access_settings(tmp_path))
    viewer = _Authenticated(registry.url, ui_content.basic("viewer"))
    anonymous = Client(registry.url)
    hidden = ("team/", "up.test", "lib/app", filled.app_v1, filled.multi, filled.sbom)

    for who in (viewer, anonymous):
        listing = await api(who, "/ui/api/repositories")
        assert [r["name"] for r in listing["repositories"]] == ["public/hello"] and listing["total"] == 1
        for query in ("q=team", "q=app", "upstream=up.test", "q=lib&upstream=up.test"):
            found = await api(who, "/ui/api/repositories?" + query)
            assert found["repositories"] == [] and found["total"] == 0
        bodies = [(await page(who, path)).body.decode() for path in (
            "/ui/", "/ui/?q=team", "/ui/?upstream=up.test", "/ui/api/repositories", "/ui/repositories/public/hello",
            "/ui/api/repositories/public/hello", "/ui/repositories/public/hello/manifests/1.0",
            "/ui/api/repositories/public/hello/manifests/1.0")]
        for body in bodies:
            # What the viewer typed comes back in the search box and links; nothing else may.
            body = body.replace("upstream=up.test", "").replace('value="team"', "").replace("q=team", "")
            for secret in hidden:
                assert secret not in body, (secret, body[:500])
        assert "public/hello" in bodies[0]
        assert 'href="/ui/mirror"' not in bodies[0]

    # Other repositories answer as if they did not exist (viewer), or ask for credentials (anonymous).
    for path in ("/ui/repositories/team/app", "/ui/api/repositories/team/app",
                 "/ui/repositories/team/app/manifests/v1", "/ui/api/repositories/up.test/lib/app",
                 "/ui/repositories/team/nothing"):
        assert (await page(viewer, path)).status == 404
        refused = await page(anonymous, path)
        assert refused.status == 401 and refused.header("WWW-Authenticate") == 'Basic realm="registryd"'
    # The mirror's totals span every cached repository: for admins only.
    assert (await page(viewer, "/ui/mirror")).status == 403
    assert (await page(viewer, "/ui/api/mirror")).status == 403
    assert (await page(anonymous, "/ui/mirror")).status == 401
    # Logging in: a challenge until credentials work, then back to the list.
    assert (await page(anonymous, "/ui/login")).status == 401
    logged = await page(viewer, "/ui/login")
    assert logged.status == 303 and logged.header("Location") == "/ui/"
    wrong = await page(anonymous, "/ui/", headers={"Authorization": "Basic dmlld2VyOm5vcGU="})
    assert wrong.status == 401
    assert (await page(anonymous, "/ui/repositories/public/hello?login=1")).status == 401
    assert (await page(viewer, "/ui/repositories/public/hello?login=1")).status == 200
    assert 'href="/ui/?q=x&amp;login=1"' in (await page(anonymous, "/ui/?q=x")).body.decode()
    back = await page(viewer, "/ui/login?next=/ui/repositories/public/hello")
    assert back.header("Location") == "/ui/repositories/public/hello"
    for elsewhere in ("https://evil.example/", "//evil.example/ui/", "/v2/_catalog"):
        away = await page(viewer, "/ui/login?next=" + elsewhere)
        assert away.header("Location") == "/ui/", elsewhere

    # The admin sees everything.
    assert (await api(admin, "/ui/api/repositories"))["total"] == 4
    assert (await page(admin, "/ui/mirror")).status == 200


@pytest_twisted.ensureDeferred
async def test_the_ui_never_changes_the_store(make_registry, fake_upstream) -> None:  # noqa: F811
    registry, client, filled = await filled_registry(make_registry, fake_upstream)

    def state() -> dict[str, tuple[int, int]]:
        found = {}
        for root, _, files in os.walk(registry.data_dir):
            if "/tmp" in root:
                continue
            for name in files:
                info = os.stat(os.path.join(root, name))
                found[os.path.join(root, name)] = (info.st_size, info.st_mtime_ns)
        return found

    before = state()
    for path in PAGES + ("/ui/api/repositories", "/ui/api/repositories/team/app", "/ui/api/mirror",
                         "/ui/api/repositories/up.test/lib/app/manifests/v1", "/ui/login"):
        assert (await page(client, path)).status in (200, 303)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/ui/", "/ui/repositories/team/app", "/ui/repositories/team/app/manifests/v1",
                     "/ui/api/repositories/team/app/manifests/v1"):
            reply = await client.request(method, path, b"{}" if method in ("POST", "PUT") else None, check=False)
            assert reply.status == 405, str(reply)
    assert state() == before
    assert (await client.get("/v2/team/app/manifests/v1")).status == 200


def test_traffic_ring_is_bounded_to_a_day() -> None:
    now = [1_000_000.0]
    ring = traffic.Traffic(["up.test"], lambda: now[0])
    for hour in range(48):      # two days of traffic, one hit and one miss an hour
        now[0] += 3600
        ring.observe("up.test", "hit", 100)
        ring.observe("up.test", "miss", 10)
        ring.observe("elsewhere", "hit", 5)   # not an upstream: ignored
        ring.observe(None, None, 7)          # not mirrored: ignored
    series = ring.series("up.test")
    assert len(series) == traffic.BUCKETS and len(ring._rings["up.test"]) <= traffic.BUCKETS
    assert sum(c.hits for _, c in series) == 24 and sum(c.bytes_cached for _, c in series) == 2400
    assert ring.totals["up.test"].requests == 96 and ring.totals["up.test"].hit_rate == 0.5
    drawn = charts.traffic_charts(series)
    assert [c.slug for c in drawn] == ["requests", "bytes", "hit-rate"]
    assert all(len(line.points.split()) == traffic.BUCKETS for c in drawn for line in c.lines)
    assert drawn[2].top == "100%" and "50.0%" in drawn[2].summary


def test_names_resolve_to_the_longest_upstream_namespace() -> None:
    inventory = Inventory(None, ["up.test", "up.test:5000", "docker.io"], lambda: 0.0)  # type: ignore[arg-type]
    assert inventory.ref("docker.io/library/alpine").upstream == "docker.io"  # type: ignore[union-attr]
    assert inventory.ref("up.test:5000/a").remote == "a"  # type: ignore[union-attr]
    assert inventory.ref("team/app").upstream is None  # type: ignore[union-attr]
    assert inventory.ref("Team/App") is None and inventory.ref("docker.io/") is None


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_answer_is_a_503_never_a_traceback(make_registry, monkeypatch) -> None:
    registry = make_registry()
    client = Client(registry.url)
    await client.push_image("team/app", "v1", seed="outage")
    store = registry.service.api.store

    async def down(*args: Any) -> Any:
        raise S3Unavailable("connection refused")

    monkeypatch.setattr(store.repositories, "catalog", down)
    monkeypatch.setattr(store.repositories, "tags", down)
    # As on a bucket: no blocking twin to read through, and no names listed yet (walked at start-up).
    ui = registry.service.api.ui
    monkeypatch.setattr(ui, "offload", None)
    monkeypatch.setattr(ui.inventory, "_offload", None)
    ui.inventory._names.clear()
    for path in ("/ui/api/repositories", "/ui/repositories/team/app"):
        reply = await page(client, path)
        assert reply.status == 503, str(reply)
        assert b"Traceback" not in reply.body and b"connection refused" not in reply.body
    assert (await page(client, "/ui/api/repositories")).json()["errors"][0]["code"] == "UNAVAILABLE"


def test_the_login_link_stays_on_this_site() -> None:
    assert pages._with_login("/ui/", "/ui/?q=a") == "/ui/?q=a&login=1"
    assert pages._with_login("/ui/", "http://evil.example/ui/?q=a&login=1") == "/ui/?q=a&login=1"
    assert pages._query_string(page=1, q="a b", upstream="") == "q=a+b"
    assert pages._query_string(page=3, q="") == "page=3"


@pytest_twisted.ensureDeferred
async def test_the_mirror_shows_fills_running_and_upstream_errors(make_registry, fake_upstream) -> None:  # noqa: F811
    from twisted.internet import reactor, task

    registry, client, filled = await filled_registry(make_registry, fake_upstream)
    slow = fake_upstream.add_image("lib/slow", "v1", layer_sizes=[200_000], seed="slow")
    assert (await client.get("/v2/up.test/lib/slow/manifests/v1")).status == 200
    layer = slow["layers"][0]["digest"]
    path = fake_upstream.blob_path("lib/slow", layer)
    fake_upstream.stall_after(path, 50_000)
    download = defer.ensureDeferred(client.get(f"/v2/up.test/lib/slow/blobs/{layer}"))
    for _ in range(500):
        if fake_upstream.stalled(path):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    (up,) = (await api(client, "/ui/api/mirror"))["upstreams"]
    assert up["fills_running"] == 1
    assert "1</b><span>fills running" in (await page(client, "/ui/mirror")).body.decode()
    fake_upstream.release_stalled(path)
    assert (await download).status == 200
    (up,) = (await api(client, "/ui/api/mirror"))["upstreams"]
    assert up["fills_running"] == 0

    fake_upstream.status(fake_upstream.manifest_path("lib/app", "v2"), 503)
    assert (await client.get("/v2/up.test/lib/app/manifests/v2")).status == 503
    (up,) = (await api(client, "/ui/api/mirror"))["upstreams"]
    assert up["errors"] >= 1 and up["last_error"] is not None
    assert "503" in up["recent_errors"][0]["message"]
    assert "503" in (await page(client, "/ui/mirror")).body.decode()


@pytest_twisted.ensureDeferred
async def test_the_names_are_walked_at_start_up_not_at_the_first_view(make_registry) -> None:
    registry = make_registry()
    inventory = registry.service.api.ui.inventory
    # Begun by the service's start, before any page asked (a first view of 10,000 names need not wait).
    assert inventory._walks.started >= 1
    client = Client(registry.url)
    await client.push_image("team/late", "v1", seed="late")
    listing = await api(client, "/ui/api/repositories")
    # A push after the walk shows at once, and the page knew every name without walking again.
    assert [r["name"] for r in listing["repositories"]] == ["team/late"] and listing["counting"] is False
    assert inventory._walks.started == 1


def _count_store_work(registry: Any, monkeypatch: Any) -> tuple[list[str], list[Any]]:
    """The reads and stats made on the reactor (the calling thread), and the trips to the IO pool."""
    store, pool = registry.service.api.store, registry.service.pool
    on_reactor: list[str] = []
    for method in ("read", "stat"):
        real = getattr(store.objects, method)

        def counted(key: str, *args: Any, _real: Any = real) -> Any:
            on_reactor.append(key)
            return _real(key, *args)
        monkeypatch.setattr(store.objects, method, counted)
    trips: list[Any] = []
    real_run = pool.run

    def run(fn: Any, *args: Any, **kw: Any) -> Any:
        trips.append(fn)
        return real_run(fn, *args, **kw)
    monkeypatch.setattr(pool, "run", run)
    return on_reactor, trips


@pytest_twisted.ensureDeferred
async def test_a_repository_page_reads_its_tags_in_one_trip_to_the_pool(make_registry, monkeypatch) -> None:
    registry = make_registry()
    client = Client(registry.url)
    tags = [f"v{i:02d}" for i in range(12)]
    for tag in tags:
        await client.push_image("team/many", tag, seed=tag)
    on_reactor, trips = _count_store_work(registry, monkeypatch)
    reply = await page(client, "/ui/repositories/team/many")
    assert reply.status == 200
    assert all(f'data-tag="{tag}"'.encode() in reply.body for tag in tags), reply.body
    # 12 tags, each with a manifest and a config, and the repository's summary: none of it read
    # on the reactor, and a few trips to the pool, however many tags (the tag and pull listings,
    # the rows, the summary).
    assert on_reactor == [] and len(trips) <= 4, (on_reactor, trips)


@pytest_twisted.ensureDeferred
async def test_the_repositories_page_summarises_its_rows_in_one_trip_to_the_pool(make_registry, monkeypatch) -> None:
    registry = make_registry()
    client = Client(registry.url)
    names = [f"team/r{i}" for i in range(8)]
    for name in names:
        await client.push_image(name, "v1", seed=name)
    on_reactor, trips = _count_store_work(registry, monkeypatch)
    listing = await api(client, "/ui/api/repositories")
    assert [r["name"] for r in listing["repositories"]] == names and all(r["tags"] == 1 for r in listing["repositories"])
    # Eight summaries (each a listing of revisions, tags and pulls, a manifest read, blob sizes): one trip.
    assert on_reactor == [] and len(trips) == 1, (on_reactor, trips)


@pytest_twisted.ensureDeferred
async def test_a_first_view_waits_for_the_names_walk_only_a_moment_then_says_it_is_counting() -> None:
    from twisted.internet.task import Clock

    walk: defer.Deferred[list[str]] = defer.Deferred()

    class Local:
        def catalog(self) -> Any:
            return walk

    class Slow:
        repositories = Local()

    clock = Clock()
    inventory = Inventory(Slow(), [], clock.seconds, reactor=clock, names_wait=0.1)  # type: ignore[arg-type]
    inventory.warm()
    assert inventory.counting()
    view = defer.ensureDeferred(inventory.names())
    assert not view.called
    clock.advance(0.1)
    assert (await view) == [] and inventory.counting()       # the page answers without the names
    walk.callback(["a/one", "b/two"])                         # the walk begun at start-up ends
    assert [ref.name for ref in await inventory.names()] == ["a/one", "b/two"] and not inventory.counting()
