"""The process ``twistd -n registryd`` is with ``[server] workers`` > 1: it serves nothing itself.

It binds every listener (registryd.listeners; a tcp: one as one socket per
worker, registryd.reuseport), empties ``tmp/`` (what a crash left), then
starts the workers: each is ``twistd -n registryd``
again, with the same options, told by its environment which worker it is
and which inherited descriptors are its listeners. Every worker serves
every request (upload sessions, tags and fills are in the store); worker 0
also runs the node's timers (collections, surveys, eviction, reaping).

A worker that exits while the node runs is started again, at once if it
had run a while, else after a delay that doubles with each quick failure
(up to ``MAX_BACKOFF``), so a crash loop does not spin. ``SIGHUP`` is
passed on to every worker (certificates and htpasswd reload there).
``SIGTERM`` is passed on too: each worker drains as one process does
(``[server] shutdown_timeout``), and the supervisor exits once all have
(a worker still there ``KILL_GRACE`` seconds after that is killed).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from registryd.auth.errors import AuthConfigError
from registryd.auth.tls import ServerTLSContext, parse_tls_description
from registryd.config import Config
from registryd.listeners import (
    FIRST_FD, LIMITS, MULTIPROC_ENV, RUN, Inherited, WorkerRole, family_of, plain_endpoint, plain_part,
)
from registryd.memory import release_once_running
from registryd.reuseport import ListenerGroup, ReusePortBinder
from registryd.startup import StartupError, listen_at_once, make_room_for_connections
from registryd.storage.files import empty_dir
from registryd.web.probes import split_probes

log = Logger()

#: A worker that ran at least this long before it exited is restarted at once.
STEADY_AFTER = 10.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: Seconds past shutdown_timeout a worker gets before it is killed.
KILL_GRACE = 15.0


def shareable(config: Config) -> list[str]:
    """The listen descriptions workers cannot share (an empty list: all can)."""
    return [d for d in config.listen if plain_part(_plain(split_probes(d)[1])) is None]


def _plain(description: str) -> str:
    try:
        tls = parse_tls_description(description)
    except AuthConfigError:
        return description      # not shareable: one process, which says what is wrong with it
    return tls[0] if tls is not None else description


def worker_command(argv: list[str]) -> list[str]:
    """The command line of a worker: twistd with the supervisor's own arguments, in the
    foreground and without its pid file (``argv``: ``sys.argv``).

    twistd's options are told from the subcommand as twistd's own parser does (options that
    take a value consume it), so a value that happens to read ``registryd`` stays a value.
    """
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    valued_long = {name[:-1] for name in options.longOpt if name.endswith("=")}
    valued_short = {options.shortOpt[i - 1] for i, c in enumerate(options.shortOpt) if c == ":"}
    args: list[str] = []
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--" or not arg.startswith("-") or arg == "-":
            args.append(arg)
            args.extend(rest)     # the subcommand and its own options, as given
            break
        if arg.startswith("--"):
            name = arg[2:].partition("=")[0]
            value = [] if "=" in arg or name not in valued_long else [next(rest, "")]
            if name == "pidfile" or name == "nodaemon":
                continue
            args.extend([arg, *value])
            continue
        flags, value = arg[1:], []
        for i, flag in enumerate(flags):
            if flag in valued_short:
                if i == len(flags) - 1:
                    value = [next(rest, "")]
                break
        if flags == "n":
            continue
        args.extend([arg, *value])
    # -P: not the working directory first on sys.path, as -c would put it: a worker imports the
    # registryd the supervisor imported (the installed one), never a source tree it was started in.
    # -OO: no docstrings in memory (2.8 MiB of a worker's idle RSS; nothing a worker runs reads
    # them), and no asserts (type narrowing only); the packages byte-compile that level too.
    return [sys.executable, "-P", "-OO", "-c", "from registryd.worker_main import run; run()",
            "-n", "--pidfile=", *args]


class _Worker(ProcessProtocol):
    """One worker process as the supervisor sees it."""

    def __init__(self, index: int, ended: Callable[[_Worker, Failure], None], started_at: float) -> None:
        self.index = index
        self.started_at = started_at
        self.pid: int | None = None
        self._ended = ended
        self.gone: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def processEnded(self, reason: Failure) -> None:
        self._ended(self, reason)
        self.gone.callback(None)

    def signal(self, number: int) -> None:
        if self.transport is not None and not self.gone.called:
            try:
                self.transport.signalProcess(number)
            except Exception:   # it exited just now: processEnded follows
                pass


class Supervisor(Service):
    """Binds the listeners, runs ``workers`` worker processes, restarts them, passes signals on."""

    def __init__(self, config: Config, reactor: Any, workers: int, tmp_dir: str,
                 argv: list[str] | None = None, header: bool = False) -> None:
        """``tmp_dir``: the store's, emptied before the workers start."""
        self.config = config
        self._reactor = reactor
        self.workers = workers
        self._tmp_dir = tmp_dir
        self._command = worker_command(list(sys.argv if argv is None else argv))
        self._header = header
        #: One per listener: worker i gets the socket of ``port_for(i)`` (its own on tcp:, shared on unix:).
        self.ports: list[ListenerGroup] = []
        self.running_workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._failures: dict[int, int] = {}
        self._timers: dict[int, IDelayedCall] = {}
        #: prometheus_client's multiprocess folder: every worker's metrics, added up by any worker.
        self.metrics_dir = os.path.join(config.data_dir, RUN, "metrics")

    # -- start ------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every listener (a port in use, a bad TLS file: one line, exit 1)."""
        try:
            self._bind()
        except StartupError as e:
            raise SystemExit(f"registryd: {e}") from None
        super().privilegedStartService()

    def _bind(self) -> None:
        make_room_for_connections(self.config.max_connections)
        for description in self.config.listen:
            probes_only, description = split_probes(description)
            tls = parse_tls_description(description) if description.startswith("tls:") else None
            try:
                if tls is not None:
                    ServerTLSContext(tls[1])     # the workers load it again; a bad file stops start-up here
                plain = plain_part(_plain(description))
                assert plain is not None, description     # shareable() was asked before
                # tcp:/tcp6: one socket per worker (registryd.reuseport); unix: one shared by all.
                balanced = plain.startswith(("tcp:", "tcp6:"))
                binder = ReusePortBinder(self._reactor, self.workers) if balanced else self._reactor
                endpoint = plain_endpoint(binder, plain)
            except AuthConfigError as e:
                self._close_ports()
                raise StartupError(str(e)) from None
            except (ValueError, TypeError, KeyError) as e:
                self._close_ports()
                raise StartupError(f"bad listen endpoint {description!r}: {e}") from None
            try:
                listening = listen_at_once(endpoint, Factory.forProtocol(Protocol), description)
            except StartupError:
                self._close_ports()
                raise
            port = listening if isinstance(listening, ListenerGroup) else ListenerGroup([listening])
            for each in port.ports:
                each.stopReading()      # the workers accept; this process only holds the sockets
            self.ports.append(port)
            log.info("registryd listening on {address}{what}", address=str(port.getHost()),
                     what=" (health checks only)" if probes_only else "")

    def startService(self) -> None:
        super().startService()
        empty_dir(self._tmp_dir)     # what a crash left; no worker runs yet
        shutil.rmtree(self.metrics_dir, ignore_errors=True)     # counters start at 0, as in one process
        os.makedirs(self.metrics_dir)
        try:
            os.unlink(os.path.join(os.path.dirname(self.metrics_dir), LIMITS))   # an earlier run's counts
        except FileNotFoundError:
            pass
        for index in range(self.workers):
            self._spawn(index)
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload))
        log.info("registryd supervising {count} worker processes", count=self.workers)
        release_once_running(self._reactor)

    def _role(self, index: int) -> WorkerRole:
        sockets = tuple(Inherited(FIRST_FD + i, family_of(group.ports[0])) for i, group in enumerate(self.ports))
        return WorkerRole(index, sockets, header=self._header, count=self.workers)

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        if not self.running:
            return
        role = self._role(index)
        env = {**os.environ, **role.environment(), MULTIPROC_ENV: self.metrics_dir}
        fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for i, group in enumerate(self.ports):
            fds[FIRST_FD + i] = group.port_for(index).fileno()
        worker = _Worker(index, self._worker_ended, self._reactor.seconds())
        self._reactor.spawnProcess(worker, self._command[0], self._command, env=env, childFDs=fds)
        self.running_workers[index] = worker
        log.info("started worker {index} (pid {pid})", index=index, pid=worker.pid)

    def _worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.running_workers.get(worker.index) is worker:
            del self.running_workers[worker.index]
        if worker.pid is not None:
            # Imported here: a worker's end is rare, and prometheus_client is a worker's concern.
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(worker.pid, self.metrics_dir)    # its live gauges go; its counters stay
        if not self.running:
            return
        ran = self._reactor.seconds() - worker.started_at
        failures = 0 if ran >= STEADY_AFTER else self._failures.get(worker.index, 0) + 1
        self._failures[worker.index] = failures
        delay = 0.0 if failures == 0 else min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
        log.warn("worker {index} (pid {pid}) stopped ({reason}); starting it again in {delay}s",
                 index=worker.index, pid=worker.pid, reason=reason.getErrorMessage(), delay=delay)
        self.restarts += 1
        self._timers[worker.index] = self._reactor.callLater(delay, self._spawn, worker.index)

    # -- signals and stop ---------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: every worker reloads its certificates and htpasswd file."""
        log.info("passing SIGHUP on to {count} workers", count=len(self.running_workers))
        for worker in list(self.running_workers.values()):
            worker.signal(signal.SIGHUP)

    def stopService(self) -> Deferred[Any]:
        """Every worker drains (SIGTERM) and exits; then so does this process."""
        if not self.running:
            return succeed(None)
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._close_ports()     # the workers' copies keep accepting until each one stops
        workers = list(self.running_workers.values())
        for worker in workers:
            worker.signal(signal.SIGTERM)
        if not workers:
            return succeed(None)
        log.info("waiting for {count} workers to finish", count=len(workers))
        kill = self._reactor.callLater(self.config.shutdown_timeout + KILL_GRACE, self._kill, workers)
        done = DeferredList([w.gone for w in workers])
        done.addBoth(lambda _: kill.cancel() if kill.active() else None)
        return done

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.gone.called:
                log.warn("worker {index} (pid {pid}) did not stop in time; killing it", index=worker.index,
                         pid=worker.pid)
                worker.signal(signal.SIGKILL)

    def _close_ports(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            maybeDeferred(port.stopListening)


def watch_parent(reactor: Any, interval: float = 1.0) -> None:
    """A worker whose supervisor is gone (killed with -9) stops as on SIGTERM: it is nobody's now."""
    from twisted.internet.task import LoopingCall

    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            log.warn("the supervisor (pid {pid}) is gone; stopping", pid=parent)
            loop.stop()
            reactor.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(interval, now=False)
