"""End-to-end: headless Chromium (Debian's ``chromium``) loads every page of the web UI.

A registry filled by tests/ui_content.py (local images, a multi-arch index,
an artifact with referrers, an image pulled through the mirror) is browsed
at desktop and phone widths under a host name of its own
(``--host-resolver-rules``), as a person's browser would reach it. The
tests read the DOM Chromium rendered (after the copy script ran: the
buttons are shown) and keep a screenshot of each page under
``test-artifacts/ui/`` (gitignored). A viewer who may pull only
``public/**`` sees nothing else. If Chromium is missing these tests fail.
"""
from __future__ import annotations

import html
import os
import re
import subprocess
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

import ui_content
from fake_upstream import fake_upstream  # noqa: F401
from oci_client import Client

pytestmark = pytest.mark.timeout(240)

CHROMIUM = "/usr/bin/chromium"
HOST = "registry.test"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHOTS = os.path.join(ROOT, "test-artifacts", "ui")
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
PAGES = {
    "repositories": "/ui/",
    "repository": "/ui/repositories/team/app",
    "image": "/ui/repositories/team/app/manifests/v1",
    "index": "/ui/repositories/team/multi/manifests/latest",
    "mirrored": "/ui/repositories/up.test/lib/app",
    "mirror": "/ui/mirror",
}


def chromium(profile: str, *args: str, size: tuple[int, int] = WIDTHS["desktop"]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
         f"--host-resolver-rules=MAP {HOST} 127.0.0.1", f"--user-data-dir={profile}",
         f"--window-size={size[0]},{size[1]}", *args],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


class Browser:
    """Runs Chromium in threads (the in-process registry keeps serving on the reactor)."""

    def __init__(self, base: str, tmp_path: Any) -> None:
        self.base = base
        self.tmp = tmp_path
        self.runs = 0

    def _profile(self) -> str:
        self.runs += 1
        return str(self.tmp / f"profile{self.runs}")

    async def dom(self, path: str, size: str = "desktop") -> str:
        run = await deferToThread(chromium, self._profile(), "--dump-dom", self.base + path, size=WIDTHS[size])
        errors = run.stderr.decode(errors="replace")
        assert run.returncode == 0, errors[-2000:]
        assert "Content Security Policy" not in errors, errors[-2000:]
        return run.stdout.decode("utf-8")

    async def screenshot(self, name: str, path: str, size: str) -> str:
        os.makedirs(SHOTS, exist_ok=True)
        target = os.path.join(SHOTS, f"{name}-{size}.png")
        if os.path.exists(target):
            os.unlink(target)
        run = await deferToThread(chromium, self._profile(), f"--screenshot={target}", self.base + path,
                                  size=WIDTHS[size])
        assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
        with open(target, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5 * 1024
        assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == WIDTHS[size]
        return target


def text_of(dom: str) -> str:
    """The page's text as a person reads it: tags removed, entities decoded, whitespace squeezed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest_twisted.ensureDeferred
async def test_every_page_in_headless_chromium_at_desktop_and_phone_widths(
        make_registry, fake_upstream, tmp_path) -> None:  # noqa: F811
    assert os.path.exists(CHROMIUM), "headless Chromium is needed: apt-get install chromium"
    registry = make_registry(upstreams=(ui_content.upstream(fake_upstream),))
    filled = await ui_content.fill(Client(registry.url), fake_upstream)
    port = registry.host.rsplit(":", 1)[1]
    browser = Browser(f"http://{HOST}:{port}", tmp_path)

    shots = [browser.screenshot(name, path, size) for name, path in PAGES.items() for size in WIDTHS]
    doms = {name: browser.dom(path) for name, path in PAGES.items()}
    # Two Chromiums at a time: the machine is shared.
    saved: list[str] = []
    work = list(shots) + list(doms.values())
    results = []
    for i in range(0, len(work), 2):
        results += await defer.gatherResults([defer.ensureDeferred(w) for w in work[i:i + 2]], consumeErrors=True)
    saved = results[:len(shots)]
    dom = dict(zip(doms, results[len(shots):]))
    assert sorted(os.path.basename(s) for s in saved) == sorted(f"{n}-{s}.png" for n in PAGES for s in WIDTHS)

    home = text_of(dom["repositories"])
    for name in ("public/hello", "team/app", "team/multi", "up.test/lib/app"):
        assert name in home
    assert "4 repositories" in home and "mirror · up.test" in home
    assert re.search(r"team/app local 2 21\.\d KiB", home), home

    repo = dom["repository"]
    assert f"docker pull {HOST}:{port}/team/app:v1" in repo
    assert f"podman pull --tls-verify=false {HOST}:{port}/team/app:v1" in repo
    assert f"ctr images pull --plain-http {HOST}:{port}/team/app:v1" in repo
    # The copy script ran under the page's CSP: the buttons are shown.
    buttons = re.findall(r"<button[^>]*class=\"copy\"[^>]*>", repo)
    assert len(buttons) == 3 and not any("hidden" in b for b in buttons)
    repo_text = text_of(repo)
    assert "v1" in repo_text and "v2" in repo_text and filled.app_v1[:19] in repo_text
    assert "linux/amd64" in repo_text and "7.5 KiB" in repo_text and "2026-11-05 10:20" in repo_text

    image = text_of(dom["image"])
    for expected in ("Layers", "6.3 KiB", "/usr/bin/app", "--serve --port=8080", "APP_MODE=<production>",
                     "8080/tcp", "/srv/app", "ADD rootfs.tar /", "org.opencontainers.image.source",
                     ui_content.SBOM, ui_content.SIGNATURE, filled.sbom[:19]):
        assert expected in image, expected
    assert f'href="/ui/repositories/team/app/manifests/{filled.sbom}"' in dom["image"]

    index = text_of(dom["index"])
    assert "Platforms" in index and "linux/amd64" in index and "linux/arm64/v8" in index
    assert f'href="/ui/repositories/team/multi/manifests/{filled.multi_children[1]}"' in dom["index"]

    mirrored = text_of(dom["mirrored"])
    assert "Mirror of up.test" in mirrored and f"docker pull {HOST}:{port}/up.test/lib/app:v1" in mirrored

    mirror = dom["mirror"]
    assert mirror.count("<svg") == 3 and "<polyline" in mirror
    mirror_text = text_of(mirror)
    assert "up.test" in mirror_text and "50.0%" in mirror_text and "images cached" in mirror_text
    assert re.search(r'class="images">1<', mirror)


@pytest_twisted.ensureDeferred
async def test_a_public_only_viewer_sees_only_public_in_the_browser(
        make_registry, fake_upstream, tmp_path) -> None:  # noqa: F811
    assert os.path.exists(CHROMIUM), "headless Chromium is needed: apt-get install chromium"
    settings = ui_content.access_settings(tmp_path)
    registry = make_registry(upstreams=(ui_content.upstream(fake_upstream),), **settings)
    admin = Client(registry.url)
    admin_headers = ui_content.basic("admin")

    class AdminClient(Client):
        async def request(self, method: str, path: str, body: bytes | None = None, headers: Any = None,
                          check: bool = True) -> Any:
            return await super().request(method, path, body, {**admin_headers, **(headers or {})}, check)

    admin = AdminClient(registry.url)
    filled = await ui_content.fill(admin, fake_upstream)
    port = registry.host.rsplit(":", 1)[1]
    anonymous = Browser(f"http://{HOST}:{port}", tmp_path)
    viewer = Browser(f"http://viewer:{ui_content.PASSWORD}@{HOST}:{port}", tmp_path / "viewer")
    os.makedirs(tmp_path / "viewer")

    for browser, who in ((anonymous, "anonymous"), (viewer, "viewer")):
        # Chromium sends a URL's credentials once challenged: ?login challenges an anonymous browser.
        login = "login=1" if who == "viewer" else ""
        home = await browser.dom("/ui/?" + login)
        searched = await browser.dom("/ui/?q=team&" + login)
        public = await browser.dom("/ui/repositories/public/hello?" + login)
        for dom in (home, searched, public):
            for secret in ("team/", "up.test", filled.app_v1):
                assert secret not in dom, (who, secret)
        assert "public/hello" in home and "1 repository" in text_of(home)
        assert "0 repositories" in text_of(searched)
        assert "hello" in public
        if who == "viewer":
            assert ">viewer</b>" in home        # logged in with Basic auth
        else:
            assert 'href="/ui/?login=1"' in home
    await anonymous.screenshot("public-viewer", "/ui/", "desktop")
    await anonymous.screenshot("public-viewer", "/ui/", "phone")
