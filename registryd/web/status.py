"""The status page at ``/``: a small, server-rendered board for a person with a browser.

``StatusBoard`` collects what the page shows while the registry runs (fed
by ``RegistrySite.log`` once per request and by the mirror on upstream
failures) and renders it as one HTML document: inline CSS, no scripts,
everything escaped. With workers, the pulls, errors, transfers and upstream
health on the page are the whole node's (registryd.web.ui.node_view). Store
usage walks ``blobs/`` in the IO thread pool, at most once a minute; nothing
here touches the disk on the reactor.
"""
from __future__ import annotations

import collections
import html
import os
import re
import time
from typing import Any, Callable, Iterable

import attrs
from twisted.logger import Logger

from registryd import __version__
from registryd.config import Config
from registryd.mirror.cache import MirrorCache
from registryd.deferreds import Coalescer
from registryd.storage import Store
# RecentError and the bounds are the node view's (one process's or a node's: the same shapes).
from registryd.web.ui.node_view import MAX_ERRORS, MAX_REPOSITORIES, NodeView, NodeViews, RecentError

log = Logger()

CONTENT_TYPE = "text/html; charset=utf-8"
USAGE_TTL = 60.0
TOP = 10

_MANIFEST = re.compile(r"^/v2/(.+)/manifests/[^/]+$")
_USERINFO = re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/@\s]*@")


def scrub(text: str, limit: int = 300) -> str:
    """A message fit for the page: no ``user:password@`` in URLs, bounded length."""
    text = _USERINFO.sub(r"\1", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@attrs.frozen
class StoreUsage:
    blob_bytes: int
    blob_files: int
    measured_at: float


def _free_bytes(root: str) -> tuple[int, int] | None:
    """(free for us, total) bytes of the data filesystem (runs in the IO pool)."""
    try:
        stats = os.statvfs(root)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize


class StatusBoard:
    """What the status page shows, gathered as the registry runs."""

    def __init__(self, store: Store, config: Config, mirror: MirrorCache, views: NodeViews,
                 clock: Callable[[], float] = time.time, usage_ttl: float = USAGE_TTL) -> None:
        """``views``: where the page reads pulls, errors, fills and upstream health (this
        process's, or with workers the node's: registryd.web.ui.node_view)."""
        self.store = store
        self.views = views
        self.config = config
        self.mirror = mirror
        self._clock = clock
        self._usage_ttl = usage_ttl
        self.started_at = clock()
        self.pulls: dict[str, int] = {}
        self.errors: collections.deque[RecentError] = collections.deque(maxlen=MAX_ERRORS)
        self._usage: StoreUsage | None = None
        self._measure: Coalescer[StoreUsage | None] = Coalescer()
        mirror.error_listeners.append(self.upstream_failed)
        #: More sections, each HTML for the time given (the server's sync jobs).
        self.sections: list[Callable[[float], str]] = []

    # --- feeding -------------------------------------------------------------

    def observe(self, method: str, path: str, status: int, cache: str | None,
                message: str | None = None) -> None:
        """One finished request (from RegistrySite.log)."""
        if method in ("GET", "HEAD") and status == 200:
            match = _MANIFEST.match(path)
            if match:
                self._count_pull(match[1])
        if status >= 500:
            self.errors.append(RecentError(self._clock(), "response", scrub(path, 200), status,
                                           scrub(message or "")))

    def _count_pull(self, name: str) -> None:
        pulls = self.pulls
        if name not in pulls and len(pulls) >= MAX_REPOSITORIES:
            # Bounded memory: the least pulled name makes room.
            del pulls[min(pulls, key=pulls.__getitem__)]
        pulls[name] = pulls.get(name, 0) + 1

    def upstream_failed(self, namespace: str, message: str) -> None:
        self.errors.append(RecentError(self._clock(), "upstream", namespace, None, scrub(message)))

    # --- reading ---------------------------------------------------------------

    @property
    def hits(self) -> int:
        return self.mirror.metrics.cache_totals()[0]

    @property
    def misses(self) -> int:
        return self.mirror.metrics.cache_totals()[1]

    def hit_rate(self) -> float | None:
        hits, misses = self.mirror.metrics.cache_totals()
        total = hits + misses
        return hits / total if total else None

    async def usage(self) -> StoreUsage | None:
        """Bytes and files in ``blobs/``: walked in the IO pool, at most once per ``usage_ttl``
        (None on a bucket: see Store.blob_usage)."""
        cached = self._usage
        if cached is not None and self._clock() - cached.measured_at < self._usage_ttl:
            return cached
        usage = await self._measure.run("usage", self._walk)
        return usage

    async def _walk(self) -> StoreUsage | None:
        counted = await self.store.blob_usage()
        if counted is None:
            return None     # blobs in an object store are not listed for a page view
        usage = self._usage = StoreUsage(counted[0], counted[1], self._clock())
        return usage

    async def render(self) -> bytes:
        try:
            usage = await self.usage()
        except Exception:
            log.failure("measuring the store for the status page failed")
            usage = None
        space = await self.store.pool.run(_free_bytes, self.store.root)
        view = await self.views.current()
        return render_page(self, usage, space, self._clock(), view).encode("utf-8")


# --- HTML --------------------------------------------------------------------

_CSS = """
:root{color-scheme:light dark;--fg:#1b1f24;--muted:#59636e;--bg:#fff;--card:#f6f8fa;--line:#d1d9e0;
--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;--card:#161b22;
--line:#30363d;--ok:#3fb950;--bad:#f85149;--warn:#d29922}}
*{box-sizing:border-box}
body{margin:0;padding:12px;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
main{max-width:960px;margin:0 auto}
h1{font-size:1.35rem;margin:4px 0 2px}
h2{font-size:1.05rem;margin:0 0 8px}
.sub{color:var(--muted);font-size:.85rem;margin:0 0 12px}
section .sub{margin:8px 0 0}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px;margin:0 0 12px}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:8px}
.kpi{display:flex;flex-direction:column}
.kpi b{font-size:1.3rem}
.kpi>span{color:var(--muted);font-size:.8rem}
table{width:100%;border-collapse:collapse;font-size:.9rem}
th,td{text-align:left;padding:6px 4px;border-top:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600;border-top:0}
td.n{text-align:right;white-space:nowrap}
.wrap{overflow-wrap:anywhere;word-break:break-word}
.muted{color:var(--muted)}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
ul.cards{list-style:none;margin:0;padding:0;font-size:.9rem}
ul.cards li{border-top:1px solid var(--line);padding:8px 0}
ul.cards li:first-child{border-top:0;padding-top:0}
code{font:.85em ui-monospace,SFMono-Regular,Menlo,monospace}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _when(at: float | None, now: float) -> str:
    if at is None:
        return '<span class="muted">never</span>'
    ago = max(0, int(now - at))
    if ago < 60:
        rel = f"{ago}s ago"
    elif ago < 3600:
        rel = f"{ago // 60}m ago"
    elif ago < 86400:
        rel = f"{ago // 3600}h ago"
    else:
        rel = f"{ago // 86400}d ago"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f'<time datetime="{_e(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)))}" ' \
           f'title="{_e(stamp)}">{_e(rel)}</time>'


def _kpi(value: str, label: str) -> str:
    return f'<div class="kpi"><b>{value}</b><span>{_e(label)}</span></div>'


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_page(board: StatusBoard, usage: StoreUsage | None, space: tuple[int, int] | None,
                now: float, view: NodeView) -> str:
    parts: list[str] = []

    # Store
    free, total = space if space is not None else (None, None)
    low = free is not None and free < board.config.min_free_bytes
    store_kpis = [
        _kpi(_e(_bytes(usage.blob_bytes if usage else None)), "blob bytes"),
        _kpi(_e(f"{usage.blob_files:,}" if usage else "unknown"), "blob files"),
        _kpi(f'<span class="{"bad" if low else "ok"}">{_e(_bytes(free))}</span>',
             f"free of {_bytes(total)}" if total is not None else "free"),
    ]
    measured = f"measured {_when(usage.measured_at, now)}" if usage else "not measured"
    parts.append(f'<section id="store"><h2>Store usage</h2><div class="kpis">{"".join(store_kpis)}</div>'
                 f'<p class="sub">Data directory <code class="wrap">{_e(board.store.root)}</code>, {measured}.</p>'
                 "</section>")

    # Cache
    rate = board.hit_rate()
    rate_text = "n/a" if rate is None else f"{rate * 100:.1f}%"
    cache_kpis = [_kpi(_e(rate_text), "hit rate"), _kpi(_e(f"{board.hits:,}"), "hits"),
                  _kpi(_e(f"{board.misses:,}"), "misses"),
                  _kpi(_e(str(len(view.fills))), "transfers running")]
    parts.append(f'<section id="cache"><h2>Cache hit rate</h2><div class="kpis">{"".join(cache_kpis)}</div>'
                 '<p class="sub">Mirrored manifests and blobs served from cache (hit) or fetched upstream '
                 "(miss) since start.</p></section>")

    # Top repositories
    rows = [f'<tr><td class="wrap">{_e(name)}</td><td class="n">{count:,}</td></tr>'
            for name, count in view.top_repositories(TOP)]
    parts.append('<section id="repositories"><h2>Top repositories</h2>'
                 + _table(("Repository", "Pulls"), rows, "No manifest pulls yet.") + "</section>")

    # Upstreams
    items = []
    for upstream in board.config.upstreams:
        health = view.health.get(upstream.namespace)
        offline = board.config.offline or upstream.offline
        if offline:
            state = '<span class="warn">offline</span>'
        elif health is None or (health.last_success is None and health.last_error is None):
            state = '<span class="muted">not used yet</span>'
        elif health.last_error is not None and (health.last_success is None
                                                or health.last_error > health.last_success):
            state = '<span class="bad">failing</span>'
        else:
            state = '<span class="ok">ok</span>'
        error = ""
        if health is not None and health.last_error is not None:
            error = (f'<div>Last error {_when(health.last_error, now)} ({health.errors:,} in all): '
                     f'<span class="wrap bad">{_e(scrub(health.last_error_message))}</span></div>')
        success = _when(health.last_success if health else None, now)
        items.append(f'<li><div><b class="wrap">{_e(upstream.namespace)}</b> — {state}'
                     f'{" (default)" if upstream.default else ""}</div>'
                     f'<div class="wrap muted"><code>{_e(scrub(upstream.url))}</code></div>'
                     f"<div>Offline: {'yes' if offline else 'no'} · Last success {success}</div>{error}</li>")
    body = f'<ul class="cards">{"".join(items)}</ul>' if items else \
        '<p class="muted">No upstreams configured: this registry serves local content only.</p>'
    parts.append(f'<section id="upstreams"><h2>Upstream health</h2>{body}</section>')

    parts.extend(section(now) for section in board.sections)   # sync jobs, ...

    # Recent errors: stacked cards rather than a table, to stay readable on a phone.
    items = []
    for entry in reversed(view.errors):
        what = "upstream " + entry.where if entry.kind == "upstream" else entry.where
        status = f'<b class="bad">{_e(entry.status)}</b> ' if entry.status is not None else ""
        items.append(f'<li><div>{status}<code class="wrap">{_e(what)}</code> · {_when(entry.at, now)}</div>'
                     f'<div class="wrap muted">{_e(entry.message)}</div></li>')
    body = f'<ul class="cards">{"".join(items)}</ul>' if items else '<p class="muted">No errors since start.</p>'
    parts.append(f'<section id="errors"><h2>Recent errors</h2>{body}</section>')

    started = _when(board.started_at, now)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>registryd status</title><style>{_CSS}</style></head>"
        f'<body><main><h1>registryd status</h1><p class="sub">Version {_e(__version__)} · started {started} · '
        f'page generated {_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))}</p>'
        '<p><a href="/ui/">Browse repositories and the mirror</a></p>'
        + "".join(parts)
        + "</main></body></html>\n"
    )
