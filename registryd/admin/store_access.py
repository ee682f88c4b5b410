"""The configured store, opened by an admin command through the storage interface.

Commands that work on content (ls, export, import, prune, preload) go
through ``registryd.storage.interface`` like the server does, so they work
on either driver: the data directory, or the S3 bucket the config names.
Opening never runs ``Store.recover()``: a server may be running beside the
command (on S3 there always is one, on another node) and ``tmp/`` holds its
transfers.

Also what every such command shares: the options naming the store, and
the context managers that turn an I/O or store error into one line.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import attrs
from twisted.internet.task import react

from registryd.admin import AdminError, ExitCode
from registryd.config import Config, ConfigError
from registryd.storage import layout
from registryd.storage.interface import Store
from registryd.storage.outage import OBJECT_STORE_ERRORS

T = TypeVar("T")


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir``, as ``twistd registryd`` takes them."""
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="the registryd TOML config file: its data_dir or its [storage] "
                             "section (driver = \"s3\": the bucket), and its upstreams to name "
                             "mirrored repositories")
    parser.add_argument("-d", "--data-dir", metavar="DIR",
                        help="the data directory (overrides the config file's data_dir); without "
                             "either option, the default that `twistd registryd` uses")


def load_admin_config(args: argparse.Namespace) -> Config:
    """The config ``--config``/``--data-dir`` name, as ``twistd registryd`` would load it."""
    from registryd.config import load_config

    try:
        return load_config(args.config, {"data_dir": args.data_dir})
    except ConfigError as e:
        raise AdminError(str(e), ExitCode.ERROR) from None


def check_data_dir(root: str, allow_empty: bool = False) -> None:
    """The data directory exists, is readable and is registryd's (not a mistyped ``-d``)."""
    if not os.path.exists(root):
        raise AdminError(f"the data directory {root} does not exist")
    if not os.path.isdir(root):
        raise AdminError(f"the data directory {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise AdminError(f"cannot read the data directory {root}: permission denied")
    if allow_empty and not os.listdir(root):
        return
    if not any(os.path.isdir(layout.local_path(root, sub)) for sub in layout.TOP_LEVEL):
        raise AdminError(f"{root} is not a registryd data directory (it has no blobs/, "
                         f"repositories/ or mirror/)")


def run_reactor(main: Callable[[Any], Awaitable[T]]) -> T:
    """``main(reactor)`` under task.react, which always exits: its result, or its AdminError."""
    outcome: list[Any] = []

    async def wrapped(reactor: Any) -> None:
        # A shutdown before main is done is an interrupt (SIGINT, SIGTERM): what
        # main returns then is only the wreckage of connections being closed.
        interrupted: list[bool] = []
        trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted.append, True)
        try:
            result: Any = await main(reactor)
        except AdminError as e:
            result = e
        except ConfigError as e:   # a secret the config names, read when the store or an upstream needs it
            result = AdminError(str(e), ExitCode.ERROR)
        if not interrupted:
            reactor.removeSystemEventTrigger(trigger)
            outcome.append(result)

    try:
        react(wrapped)
    except SystemExit as e:
        if e.code:
            raise  # react logged the failure: a bug
    if not outcome:
        raise AdminError("interrupted", ExitCode.INTERRUPTED)
    if isinstance(outcome[0], AdminError):
        raise outcome[0]
    return outcome[0]  # type: ignore[no-any-return]


async def open_admin_store(config: Config, reactor: Any, pool: Any, allow_empty: bool = False) -> Store:
    """The store ``config`` names, checked to be usable; the caller closes it.

    The filesystem: the data directory must exist and be registryd's. S3:
    the bucket must answer (the data directory is only for ``tmp/`` there).
    """
    from registryd.storage import open_store

    if config.storage.driver == "filesystem":   # elsewhere the data directory only spools
        check_data_dir(config.data_dir, allow_empty)
    # The hot blob cache belongs to the node's server: a command neither fills nor evicts it.
    config = attrs.evolve(config, storage=attrs.evolve(config.storage, cache_size=0, cache_dir=None))
    try:
        store = open_store(config, pool, reactor)   # the S3 store makes its spool folder in tmp/
    except OSError as e:
        raise AdminError(f"the data directory {config.data_dir} is not usable: {e.filename}: "
                         f"{e.strerror}") from None
    problem = await store.check_backend()
    if problem is not None:
        await store.close()
        raise AdminError(f"{store.location()}: {problem}")
    return store


def run_with_store(config: Config, main: Callable[[Store, Any], Awaitable[T]], allow_empty: bool = False) -> T:
    """Run ``main(store, reactor)`` on the configured store, with an IO pool, and close it after."""
    from registryd.threads import BlockingPool

    async def session(reactor: Any) -> T:
        pool = BlockingPool(reactor, config.io_threads, name="registryd-admin")
        pool.start()
        # Its threads are not daemons: an interrupted run must still stop them to exit.
        stop_threads = reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
        try:
            store = await open_admin_store(config, reactor, pool, allow_empty)
            try:
                return await main(store, reactor)
            finally:
                await store.close()
        finally:
            with contextlib.suppress(ValueError):   # gone already when a shutdown (SIGINT) fired it
                reactor.removeSystemEventTrigger(stop_threads)
            pool.stop()

    return run_reactor(session)


@contextlib.contextmanager
def os_errors_reported() -> Iterator[None]:
    """Turn an OSError the command cannot get past into one line (exit status 3)."""
    try:
        yield
    except PermissionError as e:
        raise AdminError(f"cannot read {e.filename}: permission denied (run as the user registryd "
                         f"runs as, or root)") from None
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise AdminError(f"I/O error on{where}: {e.strerror or e}") from None


@contextlib.contextmanager
def store_errors_reported(location: str) -> Iterator[None]:
    """``os_errors_reported``, and a store that fails to answer, as one line (exit status 3).

    For commands that work through the storage interface: on S3 a read or a
    write can fail with the object store's own error (an access denied, a
    store that cannot be reached); ``location`` says which store.
    """
    with os_errors_reported():
        try:
            yield
        except OBJECT_STORE_ERRORS as e:
            raise AdminError(f"{location}: {e}") from None


@contextlib.contextmanager
def no_empty_dirs_left(root: str, keep: bool = False) -> Iterator[None]:
    """If ``root`` does not exist before: afterwards, remove the empty directories left in it.

    Opening a store may make its local directories (the S3 store makes
    ``tmp/uploads/``); a command that found no data directory, and failed or
    had nothing to keep, should not leave one behind. Only empty directories
    go; ``keep`` (the command did what it should) keeps them all.
    """
    existed = os.path.lexists(root)
    ok = False
    try:
        yield
        ok = True
    finally:
        if not existed and not (keep and ok):
            for directory, _, _ in os.walk(root, topdown=False):
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
