"""The web UI under ``/ui/``: server-rendered pages and the same data as JSON under ``/ui/api/``.

Every route is a GET (HEAD too): nothing here changes the store. Every
page and listing shows only what the viewer may pull, by the same
``[[access]]`` rules as the API (the browser logs in with Basic auth); a
repository the viewer may not pull answers 404 as the API does. Templates
are Jinja2 with autoescape on; the one script (the copy button) is a
static file, so the Content-Security-Policy allows no inline script.
"""
from __future__ import annotations

import functools
import math
import os
import re
from urllib.parse import unquote_to_bytes, urlencode
from typing import Any, Awaitable, Callable, Iterable

import attrs
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from registryd import __version__
from registryd.auth.policy import PULL, AccessPolicy, Verdict
from registryd.digest import Digest, is_digest, parse_digest
from registryd.errors import RegistryError
from registryd.mirror.cache import MirrorCache
from registryd.names import is_tag
from registryd.storage.interface import Store
from registryd.units import human_size
from registryd.storage.outage import outage_reason
from registryd.web.replies import header_text, query_arg, respond, respond_json, store_unavailable
from registryd.web.ui.charts import traffic_charts
from registryd.web.ui.images import ImageReader, read_detail
from registryd.web.ui.inventory import Inventory, RepoRef, iso
from registryd.web.ui.node_view import NodeViews
from registryd.web.ui.offload import offload
from registryd.web.ui.pacing import Pacer
from registryd.web.ui.tag_rows import tag_rows
from registryd.web.ui.traffic import Traffic

log = Logger()
HERE = os.path.dirname(os.path.abspath(__file__))
HTML = "text/html; charset=utf-8"
#: Strict: no inline script, no inline style, nothing from elsewhere.
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY"}
REPOSITORIES_PER_PAGE = 50
TAGS_PER_PAGE = 100
MAX_PER_PAGE = 1000
_MANIFEST_PATH = re.compile(r"^/v2/(.+)/manifests/[^/]+$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
#: Where a login may send the browser back to: a page of the UI, nothing else.
_LOCAL_TARGET = re.compile(r"^/ui/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$")
STATIC = {"ui.css": "text/css; charset=utf-8", "copy.js": "text/javascript; charset=utf-8"}


@attrs.frozen
class Gate:
    """How the API decides who asks and what they may do (registryd.web.app supplies it)."""

    user_of: Callable[[Any], Awaitable[str | None]]     # 401 (RegistryError) for credentials that fail
    policy: Callable[[], AccessPolicy]
    authentication: Callable[[], bool]                    # whether users are configured
    secure: Callable[[Any], bool]                         # the request came over TLS
    challenge: Callable[[], str]                          # WWW-Authenticate: Basic, the configured realm


def _bytes(n: int | None) -> str:
    return "—" if n is None else human_size(n)


def _short(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}" if hexpart else digest


def _page_number(request: Any) -> int:
    text = query_arg(request, "page") or "1"
    return int(text) if text.isdigit() and 0 < len(text) < 7 and int(text) > 0 else 1


def _per_page(request: Any, default: int) -> int:
    text = query_arg(request, "per_page") or ""
    return min(int(text), MAX_PER_PAGE) if text.isdigit() and 0 < len(text) < 6 and int(text) > 0 else default


def _search(request: Any, key: str = "q") -> str:
    return (query_arg(request, key) or "").strip().lower()[:200]


@attrs.frozen
class Pager:
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))

    @property
    def start(self) -> int:
        return (min(self.page, self.pages) - 1) * self.per_page

    def window(self, items: list[Any]) -> list[Any]:
        return items[self.start:self.start + self.per_page]

    def document(self) -> dict[str, int]:
        return {"page": min(self.page, self.pages), "per_page": self.per_page, "total": self.total,
                "pages": self.pages}


@functools.cache
def _templates() -> Environment:
    """The pages' templates, compiled once per process (the same for every WebUI in it), and
    at start-up, not on the reactor at a first view."""
    templates = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")),
                            autoescape=select_autoescape(default=True, default_for_string=True),
                            undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    templates.filters.update(bytes=_bytes, short=_short, iso=iso)
    templates.globals["query"] = _query_string
    for name in ("repositories.html", "repository.html", "image.html", "mirror.html", "error.html"):
        templates.get_template(name)
    return templates


class WebUI:
    """The pages and their JSON, over one store, the mirror and the API's access rules."""

    app = Klein()
    app.url_map.merge_slashes = False

    def __init__(self, store: Store, mirror: MirrorCache, upstreams: Iterable[Any], gate: Gate,
                 reactor: Any, views: NodeViews) -> None:
        """``views``: where the mirror page reads traffic, fills, upstream health and errors
        (this process's, or with workers the node's: registryd.web.ui.node_view)."""
        self.store = store
        self.views = views
        self.mirror = mirror
        self.upstreams = list(upstreams)
        namespaces = [u.namespace for u in self.upstreams]
        self.gate = gate
        self.reactor = reactor
        self.clock: Callable[[], float] = reactor.seconds
        clock = self.clock
        # A page's many small reads: one trip to the IO pool on a data directory.
        self.offload = offload(store)
        self.inventory = Inventory(store, namespaces, clock, pace=lambda: Pacer(reactor), offload=self.offload,
                                   reactor=reactor)
        self.images = ImageReader(store.blobs)
        self.traffic = Traffic(namespaces, clock)
        self.templates = _templates()
        self._static = {}
        for name in STATIC:
            with open(os.path.join(HERE, "static", name), "rb") as f:
                self._static[name] = f.read()
        self._resource = _FromRoot(self.app.resource())

    def start(self) -> None:
        """At start-up: the repository names are walked in the background (readiness does not wait)."""
        self.inventory.warm()

    def resource(self) -> Resource:
        """The UI, to be handed a request for ``/ui/...`` (its routes name the whole path)."""
        return self._resource

    # --- fed by every finished request (RegistrySite.log) ---------------------------------

    def observe(self, method: str, path: str, status: int, cache: str | None, upstream: str | None,
                sent: int) -> None:
        self.traffic.observe(upstream, cache, sent)
        if cache == "miss" and upstream is not None:
            self.inventory.changed(None, upstream)
        elif method in ("PUT", "DELETE") and 200 <= status < 300:
            match = _MANIFEST_PATH.match(path)
            if match:
                self.inventory.changed(match[1])

    # --- errors ------------------------------------------------------------------------

    def _error(self, request: Any, error: RegistryError) -> bytes:
        headers = dict(PAGE_HEADERS)
        if error.status == 401:
            # Basic, always: the browser asks for a user name and password.
            headers["WWW-Authenticate"] = self.gate.challenge()
        for key in ("Retry-After",):
            if key in error.headers:
                headers[key] = error.headers[key]
        if request.path.startswith(b"/ui/api/"):
            return self._head(request, respond_json(request, error.status, error.document(), headers))
        body = self._render("error.html", request, None, status=error.status, message=error.message,
                            title=f"{error.status}")
        return self._head(request, respond(request, error.status, headers, body, HTML))

    @app.handle_errors(RegistryError)
    def _registry_error(self, request: Any, failure: Failure) -> bytes:
        return self._error(request, failure.value)

    @app.handle_errors(NotFound)
    def _not_found(self, request: Any, failure: Failure) -> bytes:
        return self._error(request, RegistryError(404, "NOT_FOUND", "there is no such page"))

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: Any, failure: Failure) -> bytes:
        error = RegistryError(405, "UNSUPPORTED", "the web UI only reads: GET and HEAD",
                              headers={"Allow": "GET, HEAD"})
        request.setHeader("Allow", "GET, HEAD")
        return self._error(request, error)

    @app.handle_errors(RequestRedirect)
    def _redirect(self, request: Any, failure: Failure) -> bytes:
        return respond(request, 308, {"Location": request.path.decode("latin-1") + "/"})

    @app.handle_errors(Exception)
    def _failed(self, request: Any, failure: Failure) -> bytes:
        """A store that cannot answer: 503 and one log line; anything else: 500, logged once."""
        reason = outage_reason(failure.value)
        if reason is None:
            log.failure("web UI {uri} failed", failure, uri=request.uri.decode("latin-1"))
            return self._error(request, RegistryError(500, "UNKNOWN", "internal server error"))
        log.warn("web UI {uri}: 503, {reason}", uri=request.uri.decode("latin-1"), reason=reason)
        return self._error(request, store_unavailable())

    # --- helpers -------------------------------------------------------------------------

    @staticmethod
    def _head(request: Any, body: bytes) -> bytes:
        return b"" if request.method == b"HEAD" else body

    def _page(self, request: Any, template: str, user: str | None, **context: Any) -> bytes:
        body = self._render(template, request, user, **context)
        return self._head(request, respond(request, 200, PAGE_HEADERS, body, HTML))

    def _json(self, request: Any, document: Any) -> bytes:
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        return self._head(request, respond_json(request, 200, document, headers))

    def _render(self, template: str, request: Any, user: str | None, **context: Any) -> bytes:
        policy = self.gate.policy()
        login_url = _with_login(request.path.decode("latin-1"), request.uri.decode("latin-1"))
        return self.templates.get_template(template).render(
            version=__version__, user=user, login_url=login_url, login=self.gate.authentication() and user is None,
            mirror_link=bool(self.upstreams) and policy.is_admin(user), **context).encode("utf-8")

    def _host(self, request: Any) -> str:
        """The registry's address as the browser reached it (for pull commands)."""
        host = header_text(request, "Host") or ""
        if _HOST.match(host):
            return host.lower()
        own = request.getHost()
        return f"{getattr(own, 'host', '127.0.0.1')}:{getattr(own, 'port', 5000)}"

    async def _viewer(self, request: Any) -> str | None:
        """Who is looking (None: anonymous). ``?login`` on any page asks an anonymous
        browser for credentials first (a Basic challenge), then shows that page."""
        user = await self.gate.user_of(request)
        if user is None and query_arg(request, "login") is not None and self.gate.authentication():
            raise RegistryError(401, "UNAUTHORIZED", "log in with your registry user name and password")
        return user

    async def _may_pull(self, request: Any, name: str) -> tuple[str | None, RepoRef]:
        """The viewer and the repository, or the answer a pull would get (404 for a hidden one)."""
        user = await self._viewer(request)
        ref = self.inventory.ref(name)
        if ref is None:
            raise RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry")
        verdict = self.gate.policy().verdict(user, ref.name, PULL)
        if verdict is Verdict.AUTHENTICATE:
            raise RegistryError(401, "UNAUTHORIZED", f"log in to see {name}")
        if verdict is not Verdict.ALLOW:
            raise RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry")
        return user, ref

    def pull_commands(self, request: Any, ref: RepoRef, reference: str) -> dict[str, str]:
        """docker, podman and ctr, for the address the browser used."""
        image = f"{self._host(request)}/{ref.name}{'@' if is_digest(reference) else ':'}{reference}"
        secure = self.gate.secure(request)
        return {"docker": f"docker pull {image}",
                "podman": f"podman pull {image}" if secure else f"podman pull --tls-verify=false {image}",
                "ctr": f"ctr images pull {image}" if secure else f"ctr images pull --plain-http {image}"}

    # --- the repositories ------------------------------------------------------------

    async def _repositories(self, request: Any) -> dict[str, Any]:
        user = await self._viewer(request)
        policy = self.gate.policy()
        search, source = _search(request), (query_arg(request, "upstream") or "").strip()
        refs = await self.inventory.names()
        counting = self.inventory.counting()
        chosen = []
        pacer = Pacer(self.reactor)
        for start in range(0, len(refs), 2000):
            await pacer.step()
            chosen += [ref for ref in refs[start:start + 2000]
                       if (not search or search in ref.name)
                       and (not source or (source == "local" and ref.upstream is None) or ref.upstream == source)
                       and policy.allows(user, ref.name, PULL)]
        pager = Pager(_page_number(request), _per_page(request, REPOSITORIES_PER_PAGE), len(chosen))
        summaries = await self.inventory.summaries(pager.window(chosen))
        # Upstreams the viewer may pull something of, for the filter.
        sources = sorted({ref.upstream for ref in refs if ref.upstream is not None
                          and policy.allows(user, ref.name, PULL)})
        return {"user": user, "search": search, "source": source, "pager": pager, "summaries": summaries,
                "sources": sources, "counting": counting}

    @app.route("/ui/", methods=["GET", "HEAD"])
    async def repositories_page(self, request: Any) -> bytes:
        found = await self._repositories(request)
        return self._page(request, "repositories.html", found.pop("user"), title="Repositories", **found)

    @app.route("/ui/api/repositories", methods=["GET", "HEAD"])
    async def repositories_json(self, request: Any) -> bytes:
        found = await self._repositories(request)
        return self._json(request, dict(found["pager"].document(), counting=found["counting"],
                                        repositories=[s.document() for s in found["summaries"]]))

    # --- one repository -------------------------------------------------------------------

    async def _repository(self, request: Any, name: str) -> dict[str, Any]:
        user, ref = await self._may_pull(request, name)
        backend = self.inventory.backend(ref)
        tags = await backend.tags(ref.remote)
        if tags is None:
            raise RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry")
        search = _search(request)
        chosen = [tag for tag in tags if not search or search in tag.lower()]
        pager = Pager(_page_number(request), _per_page(request, TAGS_PER_PAGE), len(chosen))
        shown = pager.window(chosen)
        pulls = await backend.pulls(ref.remote)
        # A tag deleted since the listing is left out.
        rows = [{"tag": tag, "facts": facts, "last_pull": pulls.get(facts.digest)}
                for tag, facts in await tag_rows(backend, ref.remote, shown, self.images, self.offload,
                                                 Pacer(self.reactor))]
        summary = await self.inventory.summary(ref)
        first = shown[0] if shown else "latest"
        return {"user": user, "ref": ref, "summary": summary, "rows": rows, "pager": pager, "search": search,
                "pull": self.pull_commands(request, ref, first if tags else "latest")}

    @app.route("/ui/repositories/<path:name>", methods=["GET", "HEAD"])
    async def repository_page(self, request: Any, name: str) -> bytes:
        found = await self._repository(request, name)
        return self._page(request, "repository.html", found.pop("user"), title=name, **found)

    @app.route("/ui/api/repositories/<path:name>", methods=["GET", "HEAD"])
    async def repository_json(self, request: Any, name: str) -> bytes:
        found = await self._repository(request, name)
        tags = [dict(row["facts"].document(), tag=row["tag"], last_pull=iso(row["last_pull"]))
                for row in found["rows"]]
        return self._json(request, dict(found["pager"].document(), **found["summary"].document(),
                                        tag_list=tags, pull=found["pull"]))

    # --- one image --------------------------------------------------------------------------

    async def _image(self, request: Any, name: str, reference: str) -> dict[str, Any]:
        user, ref = await self._may_pull(request, name)
        backend = self.inventory.backend(ref)
        digest: Digest | None
        if is_digest(reference):
            try:
                digest = parse_digest(reference)
            except RegistryError:
                digest = None
        elif is_tag(reference):
            digest = await backend.resolve_tag(ref.remote, reference)
        else:
            digest = None
        # Only a manifest this repository holds: the blob store is shared by every repository.
        if digest is None or await backend.manifest_media_type(ref.remote, digest) is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "manifest unknown to this repository")
        detail = await read_detail(self.images, digest)
        if detail is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "manifest unknown to this repository")
        referrers: dict[str, list[dict[str, Any]]] = {}
        for entry in sorted(await backend.referrers(ref.remote, digest), key=lambda d: str(d.get("digest"))):
            kind = entry.get("artifactType") or entry.get("mediaType") or "unknown"
            referrers.setdefault(str(kind), []).append(entry)
        children = []
        pacer = Pacer(self.reactor)
        for child in detail.children:
            await pacer.step()
            facts = await self.images.facts(parse_digest(child.digest)) if is_digest(child.digest) else None
            here = is_digest(child.digest) and await backend.manifest_media_type(
                ref.remote, parse_digest(child.digest)) is not None
            children.append({"child": child, "facts": facts, "here": here})
        pulls = await backend.pulls(ref.remote)
        return {"user": user, "ref": ref, "reference": reference, "detail": detail, "referrers": referrers,
                "children": children, "last_pull": pulls.get(digest),
                "pull": self.pull_commands(request, ref, reference)}

    @app.route("/ui/repositories/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
    async def image_page(self, request: Any, name: str, reference: str) -> bytes:
        found = await self._image(request, name, reference)
        return self._page(request, "image.html", found.pop("user"), title=f"{name} {reference}", **found)

    @app.route("/ui/api/repositories/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
    async def image_json(self, request: Any, name: str, reference: str) -> bytes:
        found = await self._image(request, name, reference)
        document = found["detail"].document()
        document.update(name=found["ref"].name, reference=reference, last_pull=iso(found["last_pull"]),
                        referrers=found["referrers"], pull=found["pull"])
        return self._json(request, document)

    # --- the mirror -------------------------------------------------------------------------

    async def _mirror(self, request: Any) -> dict[str, Any]:
        user = await self._viewer(request)
        verdict = self.gate.policy().admin_verdict(user)
        if verdict is Verdict.AUTHENTICATE:
            raise RegistryError(401, "UNAUTHORIZED", "the mirror's statistics need an admin user: log in")
        if verdict is not Verdict.ALLOW:
            # Totals over every cached repository would tell of ones the viewer may not pull.
            raise RegistryError(403, "DENIED", "the mirror's statistics are for admin users")
        report = self.inventory.totals()
        if report is None:
            report = await self.inventory.measure_totals()
        view = await self.views.current()
        errors, traffic = list(view.errors), view.traffic
        chosen = (query_arg(request, "upstream") or "").strip()
        if chosen not in traffic.namespaces:
            chosen = ""
        upstreams = []
        for upstream in self.upstreams:
            ns = upstream.namespace
            health = view.health.get(ns)
            upstreams.append({
                "namespace": ns, "default": upstream.default,
                "offline": bool(upstream.offline),
                "cached": report.upstreams.get(ns),
                "traffic": traffic.totals[ns],
                "fills": view.fills_of(ns),
                "last_success": health.last_success if health else None,
                "last_error": health.last_error if health else None,
                "errors": health.errors if health else 0,
                "recent_errors": [e for e in reversed(errors) if e.kind == "upstream" and e.where == ns][:5],
            })
        return {"user": user, "upstreams": upstreams, "measured_at": report.measured_at, "chosen": chosen,
                "charts": traffic_charts(traffic.series(chosen or None)), "series": traffic.series}

    @app.route("/ui/mirror", methods=["GET", "HEAD"])
    async def mirror_page(self, request: Any) -> bytes:
        found = await self._mirror(request)
        return self._page(request, "mirror.html", found.pop("user"), title="Mirror", now=self.clock(), **found)

    @app.route("/ui/api/mirror", methods=["GET", "HEAD"])
    async def mirror_json(self, request: Any) -> bytes:
        found = await self._mirror(request)
        upstreams = []
        for entry in found["upstreams"]:
            cached = entry["cached"]
            upstreams.append({
                "namespace": entry["namespace"], "default": entry["default"], "offline": entry["offline"],
                "cached": cached.document() if cached is not None else None,
                "since_start": entry["traffic"].document(), "fills_running": entry["fills"],
                "last_success": iso(entry["last_success"]), "last_error": iso(entry["last_error"]),
                "errors": entry["errors"],
                "recent_errors": [{"at": iso(e.at), "message": e.message} for e in entry["recent_errors"]],
                "last_24h": [dict(counts.document(), start=iso(start))
                             for start, counts in found["series"](entry["namespace"])
                             if counts.requests],
            })
        return self._json(request, {"measured_at": iso(found["measured_at"]), "upstreams": upstreams})

    # --- logging in, static files -------------------------------------------------------

    @app.route("/ui/login", methods=["GET", "HEAD"])
    async def login(self, request: Any) -> bytes:
        """Asks the browser for credentials (a Basic challenge) until it sends some that work."""
        user = await self._viewer(request)
        if user is None and self.gate.authentication():
            raise RegistryError(401, "UNAUTHORIZED", "log in with your registry user name and password")
        target = query_arg(request, "next") or "/ui/"
        if not _LOCAL_TARGET.match(target):
            target = "/ui/"     # never a redirect off this site
        return respond(request, 303, {"Location": target, "Cache-Control": "no-store"})

    @app.route("/ui/static/<file>", methods=["GET", "HEAD"])
    def static(self, request: Any, file: str) -> bytes:
        if file not in self._static:
            raise RegistryError(404, "NOT_FOUND", "there is no such file")
        headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
        return self._head(request, respond(request, 200, headers, self._static[file], STATIC[file]))


def _query_string(**params: Any) -> str:
    """A link's query: only the parameters that are set, page 1 left out (escaped by the template)."""
    return urlencode({k: v for k, v in params.items() if v and not (k == "page" and v == 1)})


def _with_login(path: str, uri: str) -> str:
    """The page the browser is on, with ``login=1``: the same page, once logged in
    (always a path on this site, whatever form the request line took)."""
    query = uri.partition("?")[2]
    kept = [part for part in query.split("&") if part and not part.startswith("login")]
    return path + "?" + "&".join([*kept, "login=1"])


class _FromRoot(Resource):
    """Hands a request to the UI's Klein resource with its whole path to route on."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: Any) -> Any:
        request.prepath = []
        request.postpath = [unquote_to_bytes(part) for part in request.path[1:].split(b"/")]
        return self._inner.render(request)
