"""The OCI distribution API v1.1 (``/v2/...``) as one Klein app.

Handlers validate, call the store and set every header themselves; errors
are raised as RegistryError and turned into the spec's JSON document in one
place (``_registry_error``).
"""
from __future__ import annotations

import errno
import re
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from registryd.auth import tokens
from registryd.auth.basic import AuthenticationFailed, TooManyChecks, carries_credentials
from registryd.auth.proxies import client_address, forwarded_https, is_loopback
from registryd.auth.policy import DELETE, PULL, PUSH, Verdict, mirrored_namespaces
from registryd.auth.settings import Auth, build_auth
from registryd.auth.throttle import client_key
from registryd.config import Config
from registryd.deferreds import shielded
from registryd.digest import Digest, digest_of, is_digest, parse_digest
from registryd.errors import (
    RegistryError,
    blob_unknown,
    blob_upload_invalid,
    denied,
    digest_invalid,
    manifest_blob_unknown,
    manifest_unknown,
    method_not_allowed,
    name_invalid,
    name_unknown,
    not_found,
    range_invalid,
    too_large,
    unsupported,
)
from registryd.lru import SizedLRU
from registryd.manifests import parse_manifest
from registryd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from registryd.metrics import Metrics
from registryd.names import check_name, check_raw_path, check_tag
from registryd.mirror.cache import MirrorCache, unavailable
from registryd.mirror.fill import FillFailed
from registryd.mirror.routing import Route
from registryd.storage import Store
from registryd.storage.driver import Pool
from registryd.storage.files import free_bytes
from registryd.storage.interface import BlobGone
from registryd.storage.outage import outage_reason
from registryd.storage.pulls import PullRecorder
from registryd.storage.uploads import Upload
from registryd.upkeep.pins import read_pins
from registryd.upkeep.scheduler import Upkeep
from registryd.web.replies import (
    Utf8Paths,
    blob_headers,
    cut_response,
    forget_blob_headers,
    header_text,
    paginate,
    public_readiness_reason,
    query_arg,
    query_args,
    respond,
    respond_json,
    store_unavailable,
)
from registryd.web.request import CappedBody, PendingBody, RefusedBody, RegistryRequest, UploadBody
from registryd.web.follow import FillCommitted, stream_fill
from registryd.web.hot_path import HotPath
from registryd.web.upload_pace import NodeTraffic, node_rate
from registryd.web.limits import BodyBudget, RateLimitedLog, SessionQuota, store_full
from registryd.web.status import CONTENT_TYPE as STATUS_CONTENT_TYPE
from registryd.web.status import StatusBoard
from registryd.web.sendfile import send_file_range
from registryd.web.ui import Gate, WebUI
from registryd.web.ui.node_view import NodeViews, local_view

if TYPE_CHECKING:
    from registryd.sync.scheduler import SyncScheduler

log = Logger()

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# ASCII digits only, and few enough of them that int() never refuses.
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?([0-9]{1,18})-([0-9]{1,18})(?:/(?:[0-9]{1,18}|\*))?")
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
# A byte position past any real blob: what a Range position of more digits means.
_FAR_POSITION = 1 << 62
# Stored manifests were capped when pushed or fetched; this only bounds a read.
MANIFEST_READ_LIMIT = 64 * 1024 * 1024
# Bytes a client connection may hold before a streamed blob's source is paused.
STREAM_BUFFER = 1024 * 1024
_ENDPOINT = re.compile(r"^/v2/(.*)/(?:blobs/uploads/[^/]*|blobs/[^/]+|manifests/[^/]+|tags/list|referrers/[^/]+)$")


def _position(text: str) -> int | None:
    """A Range position (ASCII digits); absurdly long ones are simply far away."""
    if not text:
        return None
    return int(text) if len(text) <= 18 else _FAR_POSITION


def _job_paused() -> type[Exception]:
    """registryd.sync's JobPaused, imported only where a [[sync]] job runs (a worker's RSS)."""
    from registryd.sync.scheduler import JobPaused

    return JobPaused


def _policy_name(name: str, route: Route | None) -> str:
    """The one name access rules see for a repository, however it was addressed:
    a mirrored one is ``<namespace>/<name upstream>`` (``docker.io/library/alpine``)
    whether asked for by path prefix, ``?ns=`` or the default upstream."""
    return f"{route.upstream.namespace}/{route.remote}" if route is not None else name


class RegistryAPI:
    """Every route of the distribution API over one Store."""

    app = Klein()
    # "//" must reach the name check, not be merged into a redirect.
    app.url_map.merge_slashes = False

    def __init__(self, store: Store, config: Config, reactor: Any, mirror: MirrorCache | None = None,
                 auth: Auth | None = None, metrics: Metrics | None = None, body_pool: Pool | None = None) -> None:
        self.store = store
        self.body_pool = body_pool or store.pool   # where upload bodies are written and hashed
        self.config = config
        self._reactor = reactor
        self.metrics = metrics or Metrics()
        if store.hot_cache is not None:
            self.metrics.watch_hot_cache(store.hot_cache)
        self.mirror = mirror or MirrorCache(store, config, reactor, self.metrics)
        self.auth = auth or build_auth(config.auth, config.access, store.pool, reactor,
                                       mirrored_namespaces(u.namespace for u in config.upstreams))
        # What the status and mirror pages read from memory: this process's (RegistryService
        # makes it the node's in a worker: registryd.web.worker_snapshots).
        self.views = NodeViews(lambda: local_view(self.ui.traffic, self.status.pulls, self.status.errors,
                                                  self.mirror.fills.keys(), self.mirror.health))
        self.status = StatusBoard(store, config, self.mirror, self.views)
        self.ui = WebUI(store, self.mirror, config.upstreams,
                        Gate(self._user, lambda: self.auth.policy, lambda: self.auth.authenticator.enabled,
                             self._secure, lambda: self.auth.authenticator.challenge), reactor, self.views)
        self.pulls = PullRecorder()
        # Manifests by digest (content never changes); their repositories are checked on each GET.
        self.manifest_cache: SizedLRU[Digest, bytes] = SizedLRU(config.manifest_cache_size, len)
        self.upkeep: Upkeep | None = None   # set by RegistryService: online gc and surveys
        self.sync: SyncScheduler | None = None   # set by RegistryService: the [[sync]] jobs
        self._readiness_logged: str | None = None   # the last /readyz problem written to the log
        self.warnings = RateLimitedLog(reactor.seconds)
        # Blob bodies being sent and upload bodies received (the node's, in a worker): pulls go first.
        self.traffic = NodeTraffic()
        self.upload_rate = node_rate(config.upload_rate_while_pulling)
        self.body_budget = BodyBudget(config.max_pending_body_bytes, self.warnings)
        self.upload_quota = SessionQuota(config.max_upload_sessions, config.max_upload_sessions_per_client,
                                         store.uploads.open_here, self.warnings, store.pool)

    def resource(self) -> Any:
        return HotPath(Utf8Paths(self.app.resource(), self._registry_error), self.get_manifest,
                       self._registry_error, self._internal_error)

    # --- errors ---------------------------------------------------------

    @app.handle_errors(RegistryError)
    def _registry_error(self, request: Any, failure: Failure) -> Any:
        error = failure.value
        if request.startedWriting:
            return cut_response(request, str(error))
        request.error_message = error.message  # for the status page's recent errors
        forget_blob_headers(request)  # a blob's, set before its body failed to start
        return respond_json(request, error.status, error.document(), error.headers)

    @app.handle_errors(NotFound)
    def _not_found(self, request: Any, failure: Failure) -> bytes:
        # A known endpoint whose name part the router could not take
        # (``/v2//a/tags/list``) is a bad name, not a missing endpoint;
        # one with an encoded separator names nothing (``manifests/x%2f..``).
        try:
            check_raw_path(request.path)
        except RegistryError as e:
            return self._registry_error(request, Failure(e))
        endpoint = _ENDPOINT.match(request.path.decode("latin-1"))
        error = name_invalid(endpoint[1][:255]) if endpoint else not_found()
        return self._registry_error(request, Failure(error))

    @app.handle_errors(RequestRedirect)
    def _redirect(self, request: Any, failure: Failure) -> bytes:
        # /v2 -> /v2/ and the like: say where, relative, without a body to parse.
        location = request.path.decode("latin-1") + "/"
        if request.uri.find(b"?") >= 0:
            location += "?" + request.uri.split(b"?", 1)[1].decode("latin-1")
        return respond(request, 308, {"Location": location})

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: Any, failure: Failure) -> bytes:
        allowed = sorted(failure.value.valid_methods or [])
        return self._registry_error(request, Failure(method_not_allowed(allowed)))

    @app.handle_errors(Exception)
    def _internal_error(self, request: Any, failure: Failure) -> Any:
        reason = outage_reason(failure.value)
        if isinstance(failure.value, OSError) and failure.value.errno in (errno.ENOSPC, errno.EDQUOT):
            self.warnings.warn("disk_full", "the data directory's disk is full: {method} {uri} refused with 507",
                               method=request.method.decode("latin-1"), uri=request.uri.decode("latin-1"))
            error = store_full()
        elif reason is None:
            log.failure("request {method} {uri} failed", failure,
                        method=request.method.decode("latin-1"), uri=request.uri.decode("latin-1"))
            error = RegistryError(500, "UNKNOWN", "internal server error")
        elif request.startedWriting:
            return cut_response(request, reason)
        else:
            log.warn("{method} {uri}: 503, {reason}", method=request.method.decode("latin-1"),
                     uri=request.uri.decode("latin-1"), reason=reason)
            error = store_unavailable()
        return self._registry_error(request, Failure(error))

    # --- helpers ---------------------------------------------------------

    async def _user(self, request: RegistryRequest) -> str | None:
        """Who is asking (None: anonymous); 401 for credentials that fail."""
        credentials = await self._credentials(request)
        request.user = credentials[0] if credentials else None
        return request.user

    async def _credentials(self, request: RegistryRequest) -> tuple[str, bytes] | None:
        """The checked (user, password) of a request, None when anonymous."""
        address = self._client_address(request)
        authorization = header_text(request, "Authorization")
        if (authorization and self.auth.authenticator.enabled and carries_credentials(authorization)
                and not self._credentials_allowed(request)):
            raise RegistryError(403, "DENIED", "credentials are accepted only over TLS here ([auth] require_tls): "
                                               "use the registry's https address")
        try:
            return await self.auth.authenticator.credentials(address, authorization)
        except AuthenticationFailed as e:
            raise self._unauthorized(str(e)) from None
        except TooManyChecks as e:
            raise RegistryError(429, "TOOMANYREQUESTS", f"too many login attempts: {e}",
                                headers={"Retry-After": str(e.retry_after)}) from None

    def _client_address(self, request: RegistryRequest) -> str:
        """The client's address: the peer's, or what a trusted proxy forwarded."""
        peer = getattr(request.getClientAddress(), "host", "") or ""
        return client_address(peer, request.requestHeaders.getRawHeaders("X-Forwarded-For", []),
                              self.auth.settings.trusted_proxies)

    def _secure(self, request: RegistryRequest) -> bool:
        """Did the request come over TLS (here, or to a trusted proxy that says so)?"""
        if request.isSecure():
            return True
        peer = getattr(request.getClientAddress(), "host", "") or ""
        return forwarded_https(peer, request.requestHeaders.getRawHeaders("X-Forwarded-Proto", []),
                               self.auth.settings.trusted_proxies)

    def _credentials_allowed(self, request: RegistryRequest) -> bool:
        """False on a plain-HTTP, non-loopback listener with ``[auth] require_tls``."""
        if not self.auth.settings.require_tls or self._secure(request):
            return True
        return is_loopback(getattr(request.getHost(), "host", "") or "")

    def _unauthorized(self, why: str) -> RegistryError:
        return RegistryError(401, "UNAUTHORIZED", f"authentication required: {why}",
                             headers={"WWW-Authenticate": self.auth.authenticator.challenge})

    async def _allow(self, request: RegistryRequest, name: str, action: str, hide: bool = True) -> str | None:
        """Refuse unless the requester may ``action`` on ``name``.

        A repository the requester may not even pull answers as unknown
        (``hide``) where the spec allows it, else DENIED.
        """
        user = await self._user(request)
        self._check_verdict(user, name, action, hide)
        return user

    def _check_verdict(self, user: str | None, name: str, action: str, hide: bool = True) -> None:
        """Raise what ``_allow`` answers when ``user`` may not ``action`` on ``name``."""
        verdict = self.auth.policy.verdict(user, name, action)
        if verdict is Verdict.ALLOW:
            return
        if verdict is Verdict.AUTHENTICATE:
            raise self._unauthorized(f"{action} on {name} needs credentials")
        if verdict is Verdict.HIDE and hide:
            raise name_unknown(name)
        raise RegistryError(403, "DENIED", f"{user or 'anonymous'} may not {action} {name}", {"name": name})

    async def _local(self, request: RegistryRequest, name: str) -> str:
        """The name of a repository the request may change: never a mirrored one.

        A mirrored name is refused only to a requester who may pull it: anyone
        else gets the answer a pull would get, and learns nothing of the mirrors.
        """
        check_raw_path(request.path)
        ns, host = query_arg(request, "ns"), header_text(request, "Host")
        route = self.mirror.router.route(name, ns, host=host)
        if route is not None:
            await self._refuse_mirrored(request, name, route, ns, host)
        return self._writable(name, ns, host)

    async def _refuse_mirrored(self, request: RegistryRequest, name: str, route: Route,
                               ns: str | None, host: str | None) -> NoReturn:
        """Refuse a change to a mirrored repository, saying so only to who may pull it."""
        user = await self._user(request)
        verdict = self.auth.policy.verdict(user, _policy_name(name, route), PULL)
        if verdict is Verdict.AUTHENTICATE:
            raise self._unauthorized(f"{name} needs credentials")
        if verdict is not Verdict.ALLOW:
            raise name_unknown(name)
        self._writable(name, ns, host)
        raise denied(f"{name} is read-only")  # not reached: _writable refuses every mirrored name

    def _refuse_mirrored_body(self, request: RegistryRequest, name: str,
                              args: dict[str, list[str]]) -> PendingBody | None:
        """Before a body: a change to a mirrored repository is refused once the
        requester is known (with the connection paused), never earlier."""
        ns, host = args.get("ns", [None])[0], header_text(request, "Host")
        route = self.mirror.router.route(name, ns, host=host)
        if route is None:
            return None
        return PendingBody(self._refuse_mirrored(request, name, route, ns, host))

    def _writable(self, name: str, ns: str | None, host: str | None) -> str:
        route = self.mirror.router.route(name, ns, host=host)
        if route is not None and route.by_default:
            prefixes = ", ".join(self.config.local_prefixes) or "none is configured"
            raise denied(f"{name} is what clients of the default upstream {route.upstream.namespace} pull: "
                         f"local repositories live under [mirror] local_prefixes ({prefixes})")
        if route is not None:
            raise denied(f"{name} mirrors {route.upstream.namespace}: mirrored repositories are read-only")
        return check_name(name)

    async def _target(self, request: RegistryRequest, name: str) -> tuple[str, Route | None]:
        """A repository to read: local, or the mirror route that serves it. With a default
        upstream, a name outside ``[mirror] local_prefixes`` is the upstream's, whatever is stored here."""
        check_raw_path(request.path)
        route = self.mirror.router.route(name, query_arg(request, "ns"), host=header_text(request, "Host"))
        return (name, route) if route is not None else (check_name(name), None)

    def _check_delete_enabled(self) -> None:
        if not self.config.delete_enabled:
            raise unsupported("deletes are disabled on this registry")

    async def _resolve(self, name: str, reference: str) -> Digest:
        """A tag or digest reference to the manifest digest it names."""
        if is_digest(reference):
            return parse_digest(reference)
        check_tag(reference)
        digest = await self.store.repositories.resolve_tag(name, reference)
        if digest is None:
            raise manifest_unknown(reference)
        return digest

    # --- base and catalog --------------------------------------------------

    @app.route("/v2/", methods=["GET", "HEAD"])
    async def base(self, request: RegistryRequest) -> bytes:
        """200 for a known user; with users configured, 401 and a challenge
        for anyone else: clients decide here whether to send credentials at
        all, and one that holds none carries on anonymously."""
        user = await self._user(request)
        if user is None and self.auth.authenticator.enabled and self._credentials_allowed(request):
            raise self._base_challenge(request)
        if user is None and self.auth.authenticator.enabled and not self.auth.policy.grants_anything(None):
            raise RegistryError(403, "DENIED", "this registry needs credentials, accepted only over TLS here")
        return respond_json(request, 200, {})

    def _base_challenge(self, request: RegistryRequest) -> RegistryError:
        """Bearer to our token endpoint when anonymous users may do something
        (see Auth.bearer), else Basic as the reference registry does."""
        realm = tokens.realm(self._secure(request), request.getHeader("Host")) if self.auth.bearer else None
        if realm is None:
            return self._unauthorized("this registry needs credentials")
        return RegistryError(401, "UNAUTHORIZED", "authentication required: log in, or fetch an anonymous token",
                             headers={"WWW-Authenticate": tokens.bearer_challenge(realm)})

    @app.route("/v2/token", methods=["GET"])
    async def token(self, request: RegistryRequest) -> bytes:
        """A bearer token for the Basic credentials given (an anonymous one
        without): what docker, containers/image and containerd fetch after
        the Bearer challenge of ``/v2/``. Wrong credentials get 401."""
        if not self.auth.authenticator.enabled:
            raise not_found()
        credentials = await self._credentials(request)
        request.user = credentials[0] if credentials else None
        now = self._reactor.seconds()
        token = tokens.issue(credentials[0], self.auth.authenticator.token_key(credentials[0]), now) \
            if credentials else tokens.ANONYMOUS_TOKEN
        return respond_json(request, 200, tokens.response(token, now),
                     {"Cache-Control": "no-store"})

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: RegistryRequest) -> bytes:
        """Alive: the process answers. Open to everyone."""
        return respond_json(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request: RegistryRequest) -> bytes:
        """Ready: the store is writable and has room (on S3: a probe object written and read back
        within ``ready_timeout``). Open to everyone."""
        problem = await self.store.check_ready() or self.store.readiness_problem(self.config.min_free_bytes)
        if problem != self._readiness_logged:
            self._readiness_logged = problem
            if problem is not None:
                log.warn("not ready: {problem}", problem=problem)
            else:
                log.info("ready again")
        if problem is not None:
            # OS error texts, paths and endpoints are for the log, not for whoever asks.
            return respond_json(request, 503, {"status": "unavailable", "reason": public_readiness_reason(problem)})
        return respond_json(request, 200, {"status": "ok"})

    async def _admin(self, request: RegistryRequest, what: str) -> str | None:
        """Refuse unless the requester is an admin (everyone, without htpasswd)."""
        user = await self._user(request)
        verdict = self.auth.policy.admin_verdict(user)
        if verdict is Verdict.AUTHENTICATE:
            raise self._unauthorized(f"{what} need an admin user")
        if verdict is not Verdict.ALLOW:
            raise RegistryError(403, "DENIED", f"{what} are for admin users")
        return user

    @staticmethod
    def _refuse_cross_site(request: RegistryRequest) -> None:
        """Admin POSTs change the store, and a browser attaches cached Basic
        credentials to a cross-site form. A form can only send urlencoded,
        multipart or text/plain bodies, and a JSON request from another
        origin needs a CORS preflight registryd never grants: so require
        JSON, and refuse an ``Origin`` that is not this host."""
        content_type = (request.getHeader("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RegistryError(415, "UNSUPPORTED", "admin requests must be sent with Content-Type: "
                                                    "application/json (cross-site form protection)")
        origin = request.getHeader("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != (request.getHeader("Host") or "").lower():
            raise RegistryError(403, "DENIED", f"admin requests from another origin ({origin}) are refused")

    @app.route("/metrics", methods=["GET"])
    async def metrics_page(self, request: RegistryRequest) -> bytes:
        """Prometheus metrics, for admin users."""
        await self._admin(request, "metrics")
        return respond(request, 200, body=self.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.route("/admin/gc", methods=["POST"])
    async def run_gc(self, request: RegistryRequest) -> bytes:
        """One garbage collection now, inside the server (``registryd gc --url``), for admin users.

        ``?delay=SECONDS`` overrides ``[gc] delay`` for this pass; ``?dry_run=1``
        only reports.
        """
        self._refuse_cross_site(request)
        await self._admin(request, "garbage collections")
        if self.store.self_collecting:
            raise unsupported(f"{self.store.location()} collects its own garbage: registryd collects nothing there", 400)
        if self.upkeep is None:
            raise RegistryError(503, "UNAVAILABLE", "garbage collection is not available in this server")
        delay_arg = query_arg(request, "delay")
        try:
            delay = float(delay_arg) if delay_arg is not None else None
        except ValueError:
            delay = -1.0
        if delay is not None and not 0 <= delay < 1e9:
            raise RegistryError(400, "UNSUPPORTED", f"delay must be a number of seconds, not {delay_arg!r}")
        try:
            report = await self.upkeep.collect(delay, dry_run=query_arg(request, "dry_run") in ("1", "true"))
        except Exception:
            raise RegistryError(500, "UNKNOWN", "garbage collection failed; the server log says why") from None
        return respond_json(request, 200, report.as_json())

    @app.route("/admin/prune", methods=["POST"])
    async def run_prune(self, request: RegistryRequest) -> bytes:
        """Prune the mirror cache now, on either storage driver (``registryd prune --url``), for admin users.

        ``?older_than=SECONDS``, ``?unused_for=SECONDS``, ``?pattern=GLOB`` (repeatable),
        at least one of them; ``?dry_run=1`` only reports. registryd.upkeep.online_prune
        has the rules.
        """
        self._refuse_cross_site(request)
        await self._admin(request, "prunes")
        if self.store.self_collecting:
            raise unsupported(f"{self.store.location()} holds the node's own images: registryd prunes nothing there", 400)
        from registryd.upkeep.online_prune import PruneSelection, server_pruner   # only where a prune runs

        try:
            selection = PruneSelection.from_query(query_arg(request, "older_than"), query_arg(request, "unused_for"),
                                                  query_args(request, "pattern"), query_arg(request, "dry_run"))
        except ValueError as e:
            raise unsupported(str(e), 400) from None
        pinned = await read_pins(self.store.objects, [job.name for job in self.config.syncs])
        pruner = server_pruner(self.mirror, self.store, self.config.max_manifest_size, self._reactor.seconds, pinned)
        return respond_json(request, 200, await pruner.run(selection))

    @app.route("/admin/retention", methods=["POST"])
    async def run_retention(self, request: RegistryRequest) -> bytes:
        """Apply the ``[[retention]]`` rules now (``registryd retention --url``), for admin users;
        ``?dry_run=1`` only reports. registryd.upkeep.retention has the rules."""
        self._refuse_cross_site(request)
        await self._admin(request, "retention runs")
        if self.upkeep is None:
            raise RegistryError(503, "UNAVAILABLE", "retention is not available in this server")
        if not self.upkeep.retention.rules:
            raise unsupported("this server's config has no [[retention]] rules", 400)
        try:
            report = await self.upkeep.retention.run(dry_run=query_arg(request, "dry_run") in ("1", "true"))
        except Exception:
            raise RegistryError(500, "UNKNOWN", "the retention run failed; the server log says why") from None
        return respond_json(request, 200, report)
    @app.route("/admin/sync", methods=["POST"])
    async def run_sync(self, request: RegistryRequest) -> bytes:
        """Run a [[sync]] job now (``registryd sync --now JOB --url``), for admin users: ``?job=NAME``,
        ``?dry_run=1`` only lists what would be copied. Answers with the run's report once it ends
        (joining the run already under way, if any)."""
        self._refuse_cross_site(request)
        await self._admin(request, "sync runs")
        scheduler, name = self._sync_job(request)
        try:
            result = await scheduler.run_now(name, dry_run=query_arg(request, "dry_run") in ("1", "true"))
        except _job_paused() as e:
            raise RegistryError(409, "DENIED", str(e)) from None
        return respond_json(request, 200, result.as_json())

    @app.route("/admin/sync", methods=["GET"])
    async def sync_status(self, request: RegistryRequest) -> bytes:
        """The [[sync]] jobs' state and progress (``?job=NAME``: that one), for admin users."""
        await self._admin(request, "sync status")
        if query_arg(request, "job") is None:
            jobs = sorted(self.sync.slots) if self.sync is not None else []
            return respond_json(request, 200, {"jobs": [self.sync.status(n) for n in jobs] if self.sync else []})
        scheduler, name = self._sync_job(request)
        return respond_json(request, 200, scheduler.status(name))

    def _sync_job(self, request: RegistryRequest) -> tuple[SyncScheduler, str]:
        name = query_arg(request, "job")
        if name is None:
            raise unsupported("give job=NAME (a [[sync]] job of the config)", 400)
        if self.sync is None or name not in self.sync.slots:
            raise unsupported(f"no [[sync]] job is named {name[:100]!r}", 400)    # the command's exit 2
        return self.sync, name

    @app.route("/", methods=["GET", "HEAD"])
    async def status_page(self, request: RegistryRequest) -> bytes:
        """The status page for a person with a browser, for admin users."""
        await self._admin(request, "status pages")
        body = await self.status.render()
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                   "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                              "frame-ancestors 'none'",
                   "Referrer-Policy": "no-referrer"}
        body = respond(request, 200, headers, body, STATUS_CONTENT_TYPE)
        return b"" if request.method == b"HEAD" else body

    @app.route("/ui/", branch=True, methods=["GET", "HEAD"])
    def web_ui(self, request: RegistryRequest) -> Any:
        """The web UI (registryd.web.ui): read-only pages, by the same access rules."""
        return self.ui.resource()

    @app.route("/v2/_catalog", methods=["GET"])
    async def catalog(self, request: RegistryRequest) -> bytes:
        user = await self._user(request)
        names = await self.store.repositories.catalog()
        names = list(self.auth.policy.visible(user, names))
        page, headers = paginate(request, names, "/v2/_catalog")
        return respond_json(request, 200, {"repositories": page}, headers)

    # --- blobs -------------------------------------------------------------

    @app.route("/v2/<path:name>/blobs/<digest>", methods=["GET", "HEAD"])
    async def get_blob(self, request: RegistryRequest, name: str, digest: str) -> bytes | None:
        name, route = await self._target(request, name)
        await self._allow(request, _policy_name(name, route), PULL)
        parsed = parse_digest(digest)
        self.traffic.sending(1)   # while it runs, upload bodies on the node yield to it (upload_pace)
        try:
            if route is not None:
                return await self._mirror_blob(request, route, parsed)
            if not await self.store.repositories.has_blob(name, parsed):
                raise blob_unknown(digest)
            # A client that finds the blob here will name it in a manifest next:
            # an in-server gc must not take it meanwhile.
            self.store.guard.claim([parsed])
            return await self._send_stored_blob(request, parsed)
        finally:
            self.traffic.sending(-1)

    async def _send_stored_blob(self, request: RegistryRequest, digest: Digest) -> bytes | None:
        """_send_blob; a blob deleted since it was found is unknown, as if asked for a moment later."""
        try:
            return await self._send_blob(request, digest)
        except BlobGone:
            if request.startedWriting:
                raise
            raise blob_unknown(str(digest)) from None

    async def _send_blob(self, request: RegistryRequest, digest: Digest) -> bytes | None:
        """Serve a stored blob, honouring a single Range; BlobGone, with nothing sent, if it is
        not (or no longer) in the store."""
        blob = await self.store.blobs.open(digest)
        if blob is None:
            raise BlobGone(errno.ENOENT, "blob not in the store", str(digest))
        try:
            size = blob.size
            start, length = self._range(request, size)
            headers = blob_headers(str(digest), length)
            if length != size:
                request.setResponseCode(206)
                headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
            for key, value in headers.items():
                request.setHeader(key, value)
            if request.method == b"HEAD" or length == 0:
                return b""
            url = blob.redirect_url(self.config.storage.redirect_expiry)
            if url is not None:
                # The client fetches from the object store directly (and asks it for its range).
                request.setResponseCode(307)
                request.setHeader("Location", url)
                request.responseHeaders.removeHeader("Content-Range")
                request.setHeader("Content-Length", "0")
                return b""
            file = blob.local_file()
            if file is not None:
                await send_file_range(request, file, start, length, reactor=self._reactor,
                                      stall_timeout=self.config.stall_timeout)
            else:
                # Bytes from an object store pass through Python: a deeper
                # socket buffer pauses the store's connection far less often.
                transport = getattr(request.channel, "transport", None)
                if transport is not None and getattr(transport, "bufferSize", 0) < STREAM_BUFFER:
                    transport.bufferSize = STREAM_BUFFER
                await blob.send(request, start, start + length)
        finally:
            blob.close()
        return None

    async def _mirror_blob(self, request: RegistryRequest, route: Route, digest: Digest) -> bytes | None:
        mirror = self.mirror
        request.upstream = route.upstream.namespace
        if await mirror.cached_blob(route, digest):
            request.cache = "hit"
            try:
                return await self._send_blob(request, digest)
            except BlobGone:
                if request.startedWriting:
                    raise
                # Evicted (here or by another node) since it was found: fetched again below.
                request.setResponseCode(200)
                forget_blob_headers(request)
        request.cache = "miss"
        if request.method == b"HEAD":
            # Asked of the upstream without downloading; nothing is linked by it.
            head = await mirror.head_blob(route, digest)
            for key, value in blob_headers(head.digest, head.size).items():
                request.setHeader(key, value)
            return b""
        # Fetched and verified even when the store has these bytes: only that
        # shows this upstream repository has them (they may be someone's private push).
        fill = await mirror.fill(route, digest)
        for key, value in blob_headers(str(digest), fill.size).items():
            request.setHeader(key, value)
        try:
            await stream_fill(request, fill, reactor=self._reactor, stall_timeout=self.config.stall_timeout)
        except FillCommitted:
            return await self._send_stored_blob(request, digest)
        except FillFailed as e:
            request.responseHeaders.removeHeader("Content-Length")
            raise unavailable(route.upstream, str(e)) from None
        return None

    @staticmethod
    def _range(request: RegistryRequest, size: int) -> tuple[int, int]:
        """One ``bytes=`` range as (start, length); 416 if unsatisfiable
        (``bytes=500-0`` included).

        Several ranges, or a header we do not understand, get the whole blob
        (RFC 9110 lets a server ignore Range).
        """
        header = header_text(request, "Range")
        if header is None:
            return 0, size
        match = _RANGE.fullmatch(header.strip())
        if match is None or (not match[1] and not match[2]):
            return 0, size
        first, last = _position(match[1]), _position(match[2])
        if first is not None:
            start = first
            end = min(last, size - 1) if last is not None else size - 1
            if last is not None and last < start:
                end = -1   # ``bytes=500-0``: no byte satisfies it
        else:
            assert last is not None
            start, end = max(size - last, 0), size - 1
            if last == 0:
                start = size
        if start >= size or end < start:
            raise RegistryError(416, "BLOB_UNKNOWN", "requested range not satisfiable",
                                {"size": size}, {"Content-Range": f"bytes */{size}"})
        return start, end - start + 1

    @app.route("/v2/<path:name>/blobs/<digest>", methods=["DELETE"])
    async def delete_blob(self, request: RegistryRequest, name: str, digest: str) -> bytes:
        name = await self._local(request, name)
        await self._allow(request, name, DELETE, hide=False)
        self._check_delete_enabled()
        parsed = parse_digest(digest)
        removed = await shielded(self.store.repositories.unlink_blob(name, parsed))
        if not removed:
            raise blob_unknown(digest)
        return respond(request, 202, {"Docker-Content-Digest": digest})

    # --- uploads -----------------------------------------------------------

    def upload_body(self, request: RegistryRequest, method: str, name: str, upload_id: str,
                    args: dict[str, list[str]], length: int | None) -> UploadBody | PendingBody | None:
        """Decide, before the body arrives, which session file it goes into.

        Called from RegistryRequest.gotLength. None means "not an upload
        body" (a POST that starts a session or mounts). When credentials
        must be checked first (bcrypt runs off the reactor), the body waits
        in a PendingBody with the connection paused: nothing of a request
        that will be refused is ever written.
        """
        digest = args.get("digest", [None])[0]
        if method == "POST" and (upload_id or args.get("mount") or not digest):
            return None
        refusal = self._refuse_mirrored_body(request, name, args)
        if refusal is not None:
            return refusal
        self._writable(name, args.get("ns", [None])[0], header_text(request, "Host"))
        algorithm = parse_digest(digest).algorithm if digest else None
        uploads = self.store.uploads

        def start_of(upload: Any) -> int | None:
            """Where the client says its chunk begins (Content-Range), checked against its length."""
            header = header_text(request, "Content-Range")
            if header is None:
                return None
            match = _CONTENT_RANGE.fullmatch(header.strip())
            if match is None:
                raise range_invalid(upload.size, upload.location())
            start, end = int(match[1]), int(match[2])
            if end < start or (length is not None and length != end - start + 1):
                raise range_invalid(upload.size, upload.location())
            return start

        # Chunks are written and hashed in the pool, the connection paused while too many wait.
        off_reactor: dict[str, Any] = {"pool": self.body_pool, "on_error": request.body_failed,
                                       "producer": getattr(request.channel, "transport", None),
                                       "rate_while_pulling": self.upload_rate, "clock": self._reactor,
                                       "traffic": self.traffic}

        async def open_body() -> UploadBody:
            if method == "POST":
                # A monolithic upload's session exists only for this request:
                # if the body never completes, nothing of it may stay on disk.
                session = await uploads.create(name)
                return UploadBody(uploads.open_writer(session, 0, algorithm),
                                  on_abandon=lambda: self._discard(session), **off_reactor)
            upload = uploads.known(name, upload_id) or await uploads.get(name, upload_id)
            return UploadBody(uploads.open_writer(upload, start_of(upload), algorithm), **off_reactor)

        async def authorize_then_open() -> UploadBody:
            await self._allow(request, name, PUSH, hide=False)
            return await open_body()

        async def unless_store_fails(opening: Any) -> UploadBody:
            try:
                return await opening  # type: ignore[no-any-return]
            except Exception as e:
                reason = outage_reason(e)
                if reason is None:
                    raise
                log.warn("{method} {uri}: 503, {reason}", method=method,
                         uri=f"/v2/{name}/blobs/uploads/{upload_id}", reason=reason)
                raise store_unavailable() from None

        check_credentials = self._credentials_to_check(request)
        if not check_credentials:
            self._check_verdict(None, name, PUSH, hide=False)
        self.check_room(length)
        if not check_credentials and method != "POST":
            # The common case, answered at once: a session this node has at hand.
            upload = uploads.known(name, upload_id)
            if upload is not None:
                return UploadBody(uploads.open_writer(upload, start_of(upload), algorithm), **off_reactor)
        return PendingBody(unless_store_fails(authorize_then_open() if check_credentials else open_body()))

    def _credentials_to_check(self, request: RegistryRequest) -> bool:
        """Does the request carry credentials that must be checked (off the reactor) before its body?
        Without, it is anonymous, and the access rules decide at once."""
        authorization = header_text(request, "Authorization")
        return bool(self.auth.authenticator.enabled and authorization and carries_credentials(authorization))

    def check_room(self, length: int | None) -> None:
        """507 unless the disk keeps ``[server] min_free_bytes`` free after ``length`` more bytes."""
        try:
            free = free_bytes(self.store.root)
        except OSError:
            return  # the write itself will say what is wrong
        needed = (length or 0) + self.config.min_free_bytes
        if free < needed:
            self.warnings.warn("min_free_bytes", "an upload was refused: {free} bytes free, {needed} needed "
                               "with [server] min_free_bytes", free=free, needed=needed)
            raise store_full(free, needed)

    def manifest_body(self, request: RegistryRequest, name: str, args: dict[str, list[str]],
                      length: int | None) -> CappedBody | PendingBody:
        """Decide, before a manifest's body arrives, whether it may be pushed at all.

        Called from RegistryRequest.gotLength. Anonymous requests are decided
        by the access rules at once, others once their credentials are
        checked (the body waits in a PendingBody with its connection paused);
        a refused one is answered before its body is read. An admitted body
        is held in memory, reserved from ``[server] max_pending_body_bytes``.
        """
        limit = self.config.max_manifest_size
        if length is not None and length > limit:
            raise too_large("manifest", limit)
        refusal = self._refuse_mirrored_body(request, name, args)
        if refusal is not None:
            return refusal
        name = self._writable(name, args.get("ns", [None])[0], header_text(request, "Host"))

        def buffer() -> CappedBody:
            return CappedBody(limit, "manifest", self.body_budget, length)

        async def authorize_then_buffer() -> CappedBody:
            await self._allow(request, name, PUSH, hide=False)
            return buffer()

        if self._credentials_to_check(request):
            return PendingBody(authorize_then_buffer())
        self._check_verdict(None, name, PUSH, hide=False)
        return buffer()

    def _owner(self, request: RegistryRequest, user: str | None) -> str:
        """Whose upload sessions a request counts against: its user, or its address for anonymous."""
        if user is not None:
            return user
        return "anonymous@" + client_key(self._client_address(request) or "-")

    def _discard(self, upload: Upload) -> None:
        def failed(failure: Failure) -> None:
            reason = outage_reason(failure.value)
            if reason is None:
                log.failure("removing an abandoned upload failed", failure)
            else:  # the reaper removes it once the store is back
                log.warn("removing an abandoned upload failed: {reason}", reason=reason)
        Deferred.fromCoroutine(self.store.uploads.cancel(upload)).addErrback(failed)

    async def _claim(self, request: RegistryRequest) -> Any:
        body = await request.settled_body()
        if isinstance(body, RefusedBody):
            raise body.error
        if not isinstance(body, UploadBody):
            raise blob_upload_invalid("no upload body")
        return await body.claim()

    def _upload_headers(self, upload: Any) -> dict[str, str]:
        return {
            "Location": upload.location(),
            "Range": f"0-{max(upload.size - 1, 0)}",
            "Docker-Upload-UUID": upload.id,
            "Blob-Upload-Session-ID": upload.id,
        }

    @app.route("/v2/<path:name>/blobs/uploads/", methods=["POST"])
    async def start_upload(self, request: RegistryRequest, name: str) -> bytes:
        name = await self._local(request, name)
        user = await self._allow(request, name, PUSH, hide=False)
        mount, source = query_arg(request, "mount"), query_arg(request, "from")
        digest = query_arg(request, "digest")
        if mount is not None:
            mounted = await self._mount(name, parse_digest(mount), source, user)
            if mounted is not None:
                return respond(request, 201, {"Location": f"/v2/{name}/blobs/{mounted}",
                                               "Docker-Content-Digest": str(mounted)})
        elif digest is not None:
            return await self._commit(request, name, parse_digest(digest))
        if isinstance(request.body, RefusedBody):
            raise request.body.error
        ticket = await self.upload_quota.claim(self._owner(request, user))
        try:
            upload = await self.store.uploads.create(name)
        except BaseException:
            self.upload_quota.drop(ticket)
            raise
        await self.upload_quota.bind(ticket, upload.repo, upload.id)
        return respond(request, 202, self._upload_headers(upload))

    async def _mount(self, name: str, digest: Digest, source: str | None, user: str | None) -> Digest | None:
        """Link a blob from ``source`` (local or a mirrored repository's cache),
        or, without ``from``, any blob the registry holds."""
        repositories = self.store.repositories
        if source is None and self.auth.authenticator.enabled:
            # Without ``from`` a digest alone would reach any repository's blob.
            return None
        if source is not None:
            try:
                route = self.mirror.router.route(source, None)
                if not self.auth.policy.allows(user, _policy_name(check_name(source) if route is None
                                                                  else source, route), PULL):
                    return None  # a plain upload follows; the other repository stays unseen
                present = (await self.mirror.cached_blob(route, digest) if route is not None
                           else await repositories.has_blob(source, digest))
            except RegistryError:
                return None
            if not present:
                return None
        self.store.guard.claim([digest])  # before the check: an in-server gc must not take it now
        if await self.store.blobs.size(digest) is None:
            return None
        await shielded(repositories.link_blob(name, digest))
        return digest

    async def _commit(self, request: RegistryRequest, name: str, digest: Digest) -> bytes:
        writer = await self._claim(request)
        await shielded(self._commit_and_link(writer, name, digest))
        return respond(request, 201, {"Location": f"/v2/{name}/blobs/{digest}",
                                       "Docker-Content-Digest": str(digest)})

    async def _commit_and_link(self, writer: Any, name: str, digest: Digest) -> None:
        await self.store.uploads.commit(writer, digest)
        await self.store.repositories.link_blob(name, digest)

    @app.route("/v2/<path:name>/blobs/uploads/<upload_id>", methods=["PATCH"])
    async def patch_upload(self, request: RegistryRequest, name: str, upload_id: str) -> bytes:
        await self._allow(request, await self._local(request, name), PUSH, hide=False)
        writer = await self._claim(request)
        await shielded(self.store.uploads.acknowledge(writer))
        return respond(request, 202, self._upload_headers(writer.upload))

    @app.route("/v2/<path:name>/blobs/uploads/<upload_id>", methods=["PUT"])
    async def finish_upload(self, request: RegistryRequest, name: str, upload_id: str) -> bytes:
        name = await self._local(request, name)
        await self._allow(request, name, PUSH, hide=False)
        digest = query_arg(request, "digest")
        if digest is None:
            body = await request.settled_body()
            if isinstance(body, UploadBody):
                body.abandon()
            raise digest_invalid("the digest query parameter is required to finish an upload")
        return await self._commit(request, name, parse_digest(digest))

    @app.route("/v2/<path:name>/blobs/uploads/<upload_id>", methods=["GET"])
    async def upload_status(self, request: RegistryRequest, name: str, upload_id: str) -> bytes:
        name = await self._local(request, name)
        await self._allow(request, name, PUSH, hide=False)
        upload = await self.store.uploads.get(name, upload_id)
        return respond(request, 204, self._upload_headers(upload))

    @app.route("/v2/<path:name>/blobs/uploads/<upload_id>", methods=["DELETE"])
    async def cancel_upload(self, request: RegistryRequest, name: str, upload_id: str) -> bytes:
        name = await self._local(request, name)
        await self._allow(request, name, PUSH, hide=False)
        upload = await self.store.uploads.get(name, upload_id)
        await shielded(self.store.uploads.cancel(upload))
        return respond(request, 204)

    # --- manifests -----------------------------------------------------------

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
    async def get_manifest(self, request: RegistryRequest, name: str, reference: str) -> bytes:
        name, route = await self._target(request, name)
        await self._allow(request, _policy_name(name, route), PULL)
        if route is not None:
            # Go clients send one Accept header per media type.
            accepted = request.requestHeaders.getRawHeaders(b"Accept", [])
            accept = ", ".join(v.decode("latin-1") for v in accepted) or None
            request.upstream = route.upstream.namespace
            fetches = self.mirror.manifest_fetches.started
            cached = await self.mirror.manifest(route, reference, accept)
            request.cache = "stale" if cached.stale else \
                "miss" if self.mirror.manifest_fetches.started != fetches else "hit"
            digest, media_type, data = cached.digest, cached.media_type, cached.data
            self.pulls.record(self.mirror.mirror(route).repositories, route.remote, digest)
        else:
            digest = await self._resolve(name, reference)
            found = await self.store.repositories.manifest_media_type(name, digest)
            stored = self.manifest_cache.get(digest) if found is not None else None
            if found is not None and stored is None:
                stored = await self.store.blobs.read(digest, MANIFEST_READ_LIMIT)
                if stored is not None:
                    self.manifest_cache.put(digest, stored)
            if found is None or stored is None:
                raise manifest_unknown(reference)
            media_type, data = found, stored
            self.pulls.record(self.store.repositories, name, digest)
        headers = {"Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}
        body = respond(request, 200, headers, data, media_type)
        return b"" if request.method == b"HEAD" else body

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["PUT"])
    async def put_manifest(self, request: RegistryRequest, name: str, reference: str) -> bytes:
        name = await self._local(request, name)
        await self._allow(request, name, PUSH, hide=False)
        body = await request.settled_body()
        if isinstance(body, RefusedBody):
            raise body.error
        assert isinstance(body, CappedBody)
        data = body.data()
        if is_digest(reference):
            digest = parse_digest(reference)
            if digest_of(data, digest.algorithm) != digest:
                raise digest_invalid("manifest content does not match the digest it was pushed by", reference)
            tags = [check_tag(tag) for tag in query_args(request, "tag")]
        else:
            digest = digest_of(data)
            tags = [check_tag(reference)]
        manifest = parse_manifest(data, header_text(request, "Content-Type"))
        repositories = self.store.repositories
        # Claimed before checking, so an in-server gc cannot remove them
        # between the check and the commit.
        self.store.guard.claim([digest, *manifest.blobs, *manifest.children])
        for blob in manifest.blobs:
            if not (await repositories.has_blob(name, blob) and await self.store.blobs.size(blob) is not None):
                raise manifest_blob_unknown(str(blob))
        for child in manifest.children:
            if await repositories.manifest_media_type(name, child) is None:
                raise manifest_blob_unknown(str(child))
        referrer = manifest.referrer_entry(digest, len(data))
        await shielded(self._store_manifest(name, digest, data, manifest.media_type, tags, referrer,
                                            manifest.blobs))
        headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": str(digest)}
        if manifest.subject is not None:
            headers["OCI-Subject"] = str(manifest.subject)
        if is_digest(reference) and tags:
            # The spec: one OCI-Tag header per tag a push by digest applied.
            request.responseHeaders.setRawHeaders("OCI-Tag", tags)
        return respond(request, 201, headers)

    async def _store_manifest(self, name: str, digest: Digest, data: bytes, media_type: str,
                              tags: list[str], referrer: Any, blobs: tuple[Digest, ...]) -> None:
        """Content, revision, a last look at the blobs, then the tags.

        The last look closes the race with a garbage collection on another
        node sharing the store: it moves unreferenced blobs aside, then marks
        again. If our revision landed before its second mark, it puts the
        blob back; if not, we see the blob gone here and refuse the push
        before any tag points at it.
        """
        repositories = self.store.repositories
        existed = await repositories.manifest_media_type(name, digest) is not None
        await self.store.blobs.put(digest, data)
        await repositories.add_manifest(name, digest, media_type, [], referrer)
        for blob in (digest, *blobs):
            if await self.store.blobs.size(blob) is None:
                if not existed:
                    await repositories.delete_manifest(name, digest, referrer[0] if referrer else None)
                raise manifest_blob_unknown(str(blob))
        if tags:
            await repositories.set_tags(name, digest, tags)

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["DELETE"])
    async def delete_manifest(self, request: RegistryRequest, name: str, reference: str) -> bytes:
        name = await self._local(request, name)
        await self._allow(request, name, DELETE, hide=False)
        self._check_delete_enabled()
        repositories = self.store.repositories
        if not is_digest(reference):
            check_tag(reference)
            if not await shielded(repositories.delete_tag(name, reference)):
                raise manifest_unknown(reference)
            return respond(request, 202)
        digest = parse_digest(reference)
        media_type = await repositories.manifest_media_type(name, digest)
        data = await self.store.blobs.read(digest, MANIFEST_READ_LIMIT) if media_type is not None else None
        if data is None:
            raise manifest_unknown(reference)
        subject = parse_manifest(data, media_type).subject
        self.manifest_cache.discard(digest)
        if not await shielded(repositories.delete_manifest(name, digest, subject)):
            raise manifest_unknown(reference)
        return respond(request, 202)

    # --- tags and referrers -------------------------------------------------------

    @app.route("/v2/<path:name>/tags/list", methods=["GET"])
    async def list_tags(self, request: RegistryRequest, name: str) -> bytes:
        name, route = await self._target(request, name)
        await self._allow(request, _policy_name(name, route), PULL)
        if route is not None:
            tags: list[str] | None = await self.mirror.tags(route)
        else:
            tags = await self.store.repositories.tags(name)
        if tags is None:
            raise name_unknown(name)
        page, headers = paginate(request, tags, f"/v2/{name}/tags/list")
        return respond_json(request, 200, {"name": name, "tags": page}, headers)

    @app.route("/v2/<path:name>/referrers/<digest>", methods=["GET"])
    async def referrers(self, request: RegistryRequest, name: str, digest: str) -> bytes:
        name, route = await self._target(request, name)
        await self._allow(request, _policy_name(name, route), PULL)
        subject = parse_digest(digest)
        if route is not None:
            found = await self.mirror.referrers(route, subject)
        else:
            found = await self.store.repositories.referrers(name, subject)
        headers = {}
        wanted = query_args(request, "artifactType")
        if wanted:
            found = [d for d in found if d.get("artifactType") in wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return respond_json(request, 200, index, headers, content_type=OCI_INDEX)

