"""The registry as a Twisted service: storage, listeners and timers."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint

from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import mirrored_namespaces
from registryd.auth.proxies import is_loopback
from registryd.auth.settings import build_auth
from registryd.auth.shared_failures import SharedFailures
from registryd.auth.tls import ServerTLSContext, TLSServerEndpoint, parse_tls_description, tls_endpoint
from registryd.config import Config
from registryd.listeners import HAPROXY, LIMITS, RUN, Inherited, WorkerRole, accept_one_at_a_time, plain_endpoint
from registryd.mirror.shared_fill import sweep_abandoned
from registryd.storage import open_store
from registryd.storage.claim_table import ClaimTable
from registryd.startup import StartupError, listen_at_once, make_room_for_connections, prepare_store
from registryd.storage.interface import Store
from registryd.storage.outage import outage_reason
from registryd.reactor_lag import ReactorLag
from registryd.threads import BODY_NICE, MAINTENANCE_THREADS, BlockingPool, BoundedPool
from registryd.upkeep.scheduler import Upkeep
from registryd.web.app import RegistryAPI
from registryd.web.probes import ProbesOnly, split_probes
from registryd.web.node_limits import TRAFFIC_SLOT, NodeBodyBudget, NodeConnectionLimits, NodeCounters
from registryd.web.upload_pace import NodeTraffic
from registryd.web.shared_sessions import SharedSessionQuota
from registryd.web.site import RegistrySite
from registryd.web.worker_snapshots import WorkerSnapshots

if TYPE_CHECKING:
    from registryd.sync.scheduler import SyncScheduler

log = Logger()


class RegistryService(MultiService):
    """Owns the store, the HTTP site, the listening ports and the reaper."""

    _store_checked = False

    def __init__(self, config: Config, reactor: Any,
                 store: Callable[[BlockingPool], Store] | None = None, role: WorkerRole | None = None) -> None:
        """``store``: opens another store than the config's on the IO pool (a test's memory store);
        ``role``: this process is one worker of a node (registryd.supervisor), on inherited sockets."""
        super().__init__()
        self.config = config
        self.role = role
        self._reactor = reactor
        # Pools: request I/O (fsync, commits, reads: ``pool``), whole-store passes
        # (gc, surveys, usage walks: ``maintenance_pool``) and password checks (``auth_pool``),
        # so none of them waits behind another's queue.
        self.pool = BlockingPool(reactor, config.io_threads)
        self.maintenance_pool = BlockingPool(reactor, MAINTENANCE_THREADS, name="registryd-maintenance")
        self.store = (store(self.pool) if store is not None
                      else open_store(config, self.pool, reactor, maintenance=self.maintenance_pool))
        # bcrypt gets threads of its own, at a lower CPU priority: a flood
        # of logins never queues in front of an upload's fsync, nor takes
        # the CPU from the reactor.
        self.auth_pool = BoundedPool(reactor, config.auth.check_threads, config.auth.check_queue,
                                     name="registryd-auth", nice=10)
        try:
            self.auth = build_auth(config.auth, config.access, self.auth_pool, reactor,
                                   mirrored_namespaces(u.namespace for u in config.upstreams))
        except AuthConfigError as e:
            raise StartupError(str(e)) from None
        # Upload bodies are written and hashed in threads of a lower CPU priority: on a busy
        # machine a push yields to pulls (the kernel's sendfile runs on the reactor's thread);
        # its queue fills, the connection pauses and TCP slows the pusher down.
        self.body_pool = BlockingPool(reactor, config.io_threads, name="registryd-bodies", nice=BODY_NICE)
        self.api = RegistryAPI(self.store, config, reactor, auth=self.auth, body_pool=self.body_pool)
        # Every worker of a node fetches a blob for all of them (registryd.mirror.shared_fill).
        self.api.mirror.shared_fills = role is not None
        if role is not None:
            # A collection in one worker sees the blobs every worker claimed.
            self.store.guard.share(ClaimTable(os.path.join(config.data_dir, RUN, "claims")))
            # A guesser meets one count of failed logins, whichever worker it reaches.
            throttle = self.auth.authenticator.throttle
            throttle.share(SharedFailures(os.path.join(config.data_dir, RUN, "login-failures"), throttle.expiry))
            # Upload sessions count against [uploads] limits wherever they started.
            store_uploads = self.store.uploads
            self.api.upload_quota = SharedSessionQuota(
                os.path.join(config.data_dir, RUN, "sessions"), config.max_upload_sessions,
                config.max_upload_sessions_per_client,
                store_uploads.open_here, self.api.warnings, self.pool)
        # The status and mirror pages show every worker's traffic, errors and fills.
        self.snapshots: WorkerSnapshots | None = None
        if role is not None:
            self.snapshots = WorkerSnapshots(os.path.join(config.data_dir, RUN, "views"), role.index, self.pool,
                                             reactor, self.api.views.local)
            self.api.views.node = self.snapshots.view
        self.site = RegistrySite(self.api, reactor)
        if role is not None:
            # Connections and the bodies held in memory count against [server] limits node-wide.
            counters = NodeCounters(os.path.join(config.data_dir, RUN, LIMITS), role.index, role.count)
            self.site.limits = NodeConnectionLimits(counters, config.max_connections,
                                                    config.max_connections_per_client, self.api.warnings)
            self.api.body_budget = NodeBodyBudget(counters, config.max_pending_body_bytes, self.api.warnings)
            # Uploads yield to the blob bodies any worker sends.
            self.api.traffic = NodeTraffic(counters, TRAFFIC_SLOT)
        self.probe_site: RegistrySite | None = None
        self.upkeep = self.api.upkeep = Upkeep(self.store, config, self.api.metrics, reactor)
        # The [[sync]] jobs; without any, none of registryd.sync is even imported (a worker's RSS).
        self.sync: SyncScheduler | None = None
        if config.syncs:
            from registryd.sync.scheduler import SyncScheduler

            self.sync = self.api.sync = SyncScheduler(config, self.api.mirror, self.store, self.api.metrics, reactor)
            self.api.status.sections.append(self.sync.render_section)
        self.ports: list[IListeningPort] = []
        self.tls_contexts: list[ServerTLSContext] = []
        self.reactor_lag = ReactorLag(reactor, self.api.metrics.reactor_lag)
        self._reaper = LoopingCall(lambda: Deferred.fromCoroutine(self._reap_uploads()))
        self._reaper.clock = reactor

    def prepare_storage(self) -> None:
        """Create the data directory layout and prove it writable; on S3, prove the bucket
        exists and takes a write and a read (once: twistd and startService both call this)."""
        prepare_store(self.store, self.config.data_dir, check=not self._store_checked)
        self._store_checked = True

    def privilegedStartService(self) -> None:
        make_room_for_connections(self.config.max_connections)
        # Listen here, synchronously, so a port in use stops start-up with
        # one line instead of a server that runs without a socket.
        for index, description in enumerate(self.config.listen):
            probes_only, description = split_probes(description)
            try:
                endpoint = self._endpoint(description, self.role.sockets[index] if self.role else None)
            except AuthConfigError as e:
                self._close_ports()
                raise StartupError(str(e)) from None
            except (ValueError, TypeError, KeyError) as e:
                self._close_ports()
                raise StartupError(f"bad listen endpoint {description!r}: {e}") from None
            try:
                port = listen_at_once(endpoint, self._probe_site() if probes_only else self.site, description)
            except StartupError:
                self._close_ports()
                raise
            if self.role is not None:
                accept_one_at_a_time(port)
            self.ports.append(port)
            if self.role is None:
                log.info("registryd listening on {address}{what}", address=str(port.getHost()),
                         what=" (health checks only)" if probes_only else "")
            if not probes_only and (self.role is None or self.role.runs_upkeep):
                self._warn_if_credentials_in_clear(description, port)
        super().privilegedStartService()

    def _probe_site(self) -> RegistrySite:
        """The site of ``probes:`` listeners: /healthz and /readyz only."""
        if self.probe_site is None:
            self.probe_site = RegistrySite(self.api, self._reactor, resource=ProbesOnly(self.site.resource))
        return self.probe_site

    def _warn_if_credentials_in_clear(self, description: str, port: IListeningPort) -> None:
        """Basic credentials on a plain listener others can reach travel in clear text: say so."""
        if self.config.auth.htpasswd is None or description.startswith(("tls:", "ssl:")):
            return
        host = getattr(port.getHost(), "host", None)
        if host is None or is_loopback(host):
            return      # a unix socket, or loopback only
        if self.config.auth.require_tls:
            log.warn("plain HTTP listener {description} is not loopback-only: credentials sent to it are "
                     "refused ([auth] require_tls); anonymous requests are served", description=description)
        else:
            log.warn("plain HTTP listener {description} is not loopback-only and users are configured: "
                     "passwords cross the network in clear text; use a TLS listener, or set "
                     "[auth] require_tls = true to refuse credentials here", description=description)

    def _endpoint(self, description: str, inherited: Inherited | None = None) -> Any:
        """A Twisted endpoint; ``tls:`` ones get our reloadable TLS context. With ``inherited``
        (a worker) it accepts on the supervisor's socket, with the same TLS or PROXY protocol on top."""
        tls = parse_tls_description(description)
        if inherited is not None:
            adopted = inherited.endpoint(self._reactor)
            if tls is not None:
                context = ServerTLSContext(tls[1])
                self.tls_contexts.append(context)
                return TLSServerEndpoint(adopted, context, clock=self._reactor)
            return proxyEndpoint(adopted) if description.startswith(HAPROXY) else adopted
        if tls is None:
            return plain_endpoint(self._reactor, description)
        plain, settings = tls
        endpoint = tls_endpoint(self._reactor, plain, settings)
        self.tls_contexts.append(endpoint.context)
        return endpoint

    def reload(self) -> None:
        """SIGHUP: new certificates for new connections, re-read htpasswd.

        Open connections keep going; a file that fails to load keeps the
        previous one and is logged.
        """
        log.info("reloading certificates and the htpasswd file")
        for context in self.tls_contexts:
            context.reload()
        self.auth.reload()

    def startService(self) -> None:
        self.prepare_storage()
        self.pool.start()
        self.maintenance_pool.start()
        self.auth_pool.start()
        self.body_pool.start()
        self.reactor_lag.start()
        if self.snapshots is not None:
            self.snapshots.start()
        # A worker leaves tmp/ to the supervisor: the other workers' fills and spools are in it.
        self.store.recover(keep_tmp=self.role is not None)
        super().startService()
        self.api.ui.start()     # the web UI's repository names, walked in the background
        if self.role is None or self.role.runs_upkeep:
            self._reaper.start(self.config.upload_reap_interval, now=False).addErrback(
                lambda f: log.failure("upload reaper stopped", f)
            )
            self.upkeep.start()
            if self.sync is not None:
                self.sync.start()      # [[sync]] jobs run once per node, beside the upkeep
        if self.role is None:
            log.info("registryd serving {location}", location=self.store.location(), data_dir=self.config.data_dir)
        else:
            log.info("registryd worker {index} serving", index=self.role.index)

    async def _reap_uploads(self) -> None:
        try:
            removed = await self.store.uploads.reap(self.config.upload_expiry)
        except Exception as e:
            reason = outage_reason(e)
            if reason is None:
                log.failure("reaping abandoned uploads failed; will try again")
            else:
                log.warn("reaping abandoned uploads failed ({reason}); will try again", reason=reason)
            return
        if removed:
            log.info("reaped {count} abandoned upload sessions", count=removed)
        if self.role is not None:
            # A worker killed while fetching a blob left its partial file (registryd.mirror.shared_fill).
            try:
                await self.pool.run(sweep_abandoned, self.store.tmp_dir, self.config.upload_reap_interval, time.time())
            except OSError as e:
                log.warn("sweeping abandoned fills failed ({error}); will try again", error=str(e))

    def _close_ports(self) -> Deferred:
        ports, self.ports = self.ports, []
        return DeferredList([maybeDeferred(port.stopListening) for port in ports])

    def stopService(self) -> Deferred:
        """Stop accepting, let running requests finish (up to shutdown_timeout), then stop."""
        if not self.running:
            return succeed(None)
        self.running = False
        if self._reaper.running:
            self._reaper.stop()
        self.upkeep.stop()
        self.reactor_lag.stop()
        if self.snapshots is not None:
            self.snapshots.stop()
        d = self._close_ports()
        if self.sync is not None:
            sync = self.sync
            d.addBoth(lambda _: sync.stop(self.config.shutdown_timeout))
        d.addBoth(lambda _: self.site.drain(self.config.shutdown_timeout))
        d.addBoth(lambda _: Deferred.fromCoroutine(self.api.mirror.settle_fills(self.config.shutdown_timeout)))
        d.addBoth(lambda _: self.api.mirror.close())
        d.addBoth(lambda _: self.store.close())
        d.addBoth(lambda _: MultiService.stopService(self))
        d.addBoth(lambda _: self.pool.stop())
        d.addBoth(lambda _: self.maintenance_pool.stop())
        d.addBoth(lambda _: self.auth_pool.stop())
        d.addBoth(lambda _: self.body_pool.stop())
        return d
