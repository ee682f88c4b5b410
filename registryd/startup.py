"""What start-up checks before anything serves, shared by one process and a supervisor.

Light on purpose: a supervisor of worker processes (registryd.supervisor)
checks the config, its credentials, the store and the htpasswd file with
these, and binds the listeners, without building the web stack, the
mirror or the pools a worker has (each worker builds them for itself).
"""
from __future__ import annotations

import resource
from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import mirrored_namespaces
from registryd.auth.settings import build_auth
from registryd.config import Config
from registryd.storage import open_store
from registryd.storage.interface import Store, StoreUnusable
from registryd.threads import BlockingPool

log = Logger()

# Descriptors kept beside client connections: blob files, upload sessions,
# upstream and object store connections, log files.
FILES_BESIDE_CONNECTIONS = 1024


class StartupError(Exception):
    """Start-up cannot go on; the message is one line for the operator."""


def listen_at_once(endpoint: IStreamServerEndpoint, factory: Any, description: str) -> Any:
    """The port of ``endpoint``, listening now: a port in use (or any failure to listen) stops
    start-up with one line, never a server that runs without its socket."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome or isinstance(outcome[0], Failure):
        reason = outcome[0].getErrorMessage() if outcome else "did not listen at once"
        raise StartupError(f"cannot listen on {description}: {reason}")
    return outcome[0]


def make_room_for_connections(max_connections: int) -> None:
    """Raise the soft descriptor limit (often 1024) so that ``max_connections``
    clients cannot starve the files of the requests being served; warn if the
    hard limit does not allow it."""
    wanted = max_connections + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warn("the open-file limit ({soft}) is below [server] max_connections + {extra}: lower "
                 "max_connections or raise LimitNOFILE", soft=soft, extra=FILES_BESIDE_CONNECTIONS)


def prepare_store(store: Store, data_dir: str, check: bool = True) -> None:
    """Create the data directory layout and prove it writable; with ``check``, prove the store
    takes a write and a read (on S3: that the bucket exists). A failure: StartupError, one line."""
    try:
        store.prepare()
    except OSError as e:
        where = f"{e.filename}: " if e.filename and e.filename != data_dir else ""
        raise StartupError(f"data directory {data_dir} is not usable: {where}{e.strerror}") from None
    if check:
        try:
            store.check_store()
        except StoreUnusable as e:
            raise StartupError(str(e)) from None


def check_node(config: Config, reactor: Any) -> str:
    """What a single process proves at start, for a supervisor: the htpasswd file and access
    rules load, the store is usable. Returns the store's ``tmp/`` folder (a supervisor empties
    it before its workers start). Raises StartupError with one line."""
    pool = BlockingPool(reactor, 1)     # never started: the checks below run here, at once
    try:
        build_auth(config.auth, config.access, pool, reactor,
                   mirrored_namespaces(u.namespace for u in config.upstreams))
    except AuthConfigError as e:
        raise StartupError(str(e)) from None
    store = open_store(config, pool, reactor, maintenance=pool)
    try:
        prepare_store(store, config.data_dir)
        return store.tmp_dir
    finally:
        store.close().addErrback(lambda f: log.warn("closing the store checked at start failed: {error}",
                                                    error=f.getErrorMessage()))
