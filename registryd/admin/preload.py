"""``registryd preload``: pull images through the mirror cache ahead of need.

Either through a running registryd (``--url``), or on the configured store
itself (the data directory, or the S3 bucket) through a private server built
from the same config and listening on 127.0.0.1 only. Both ways the same HTTP
client pulls as a container runtime would, so what lands in the store is
exactly what a client's pull leaves there.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Awaitable, Callable, Iterable

import attrs
import treq
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectError, DNSLookupError
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse

from registryd import __version__
from registryd.admin import EXIT_DAMAGE, EXIT_OK, EXIT_USAGE, AdminError
from registryd.admin.image_list import (
    ImageListError,
    ImageRef,
    Platform,
    describe_platform,
    parse_platform,
    parse_reference,
    read_image_file,
    unique,
)
from registryd.admin.progress import Progress
from registryd.admin.remote import add_remote_arguments, authorization
from registryd.admin.store_access import add_store_arguments, check_data_dir, load_admin_config, run_reactor
from registryd.config import Config, UpstreamConfig
from registryd.deferreds import Shared, bounded_gather
from registryd.digest import Digest, digest_of, parse_digest
from registryd.errors import RegistryError
from registryd.manifests import INDEX_TYPES, MANIFEST_TYPES, NON_DISTRIBUTABLE, parse_manifest
from registryd.units import human_size

log = Logger()


DESCRIPTION = """\
Pull images through registryd's pull-through cache now, so that they are on
disk before anyone asks (fill an edge site before it goes offline). Each
image is pulled as a client pulls it: its manifest, asked for with every
manifest media type; for an image index, the child manifests of the
--platform(s) given (default: every platform; a child that names no platform
is always included); then every config and layer blob, streamed and checked
against its digest and size, never held in memory. --jobs images run at
once, and each fetches a few blobs at once.

Two ways to run:

  with --url URL  pull through a running registryd's /v2 API: the server's
                  cache, and its one upstream fetch per blob, are shared with
                  its clients. --user sends Basic credentials; the password is
                  the first line of --password-file, or the environment
                  variable REGISTRYD_PASSWORD.

  without --url   work on the store itself (-c/-d as `twistd registryd`
                  takes them; with [storage] driver = "s3", the bucket):
                  the command starts registryd's own server code on
                  127.0.0.1 only, without authentication, and pulls through
                  it. This is safe alongside running servers: every store
                  write is an atomic rename (a completed PUT on S3), and
                  tmp/ (where a running server's transfers are) is left
                  alone. [mirror]
                  offline and an upstream's offline are ignored here:
                  preloading is the explicit request to contact upstreams.

FILE holds one image reference per line, as a client pulls it from
registryd: docker.io/library/alpine:3.19 (a path-prefix mirror),
127.0.0.1:5000/team/app@sha256:..., or alpine:3.19 when an upstream is the
default. The tag defaults to latest; blank lines and # comments are ignored;
"-" reads standard input. A bad line stops the command before anything is
fetched. Only mirrored repositories can be preloaded.

Each image is reported as it finishes ("ok REF DIGEST 2 manifests, 3 blobs,
12.3 MiB" or "FAILED REF: reason"), then one summary line; --json prints one
document instead. A progress bar goes to standard error when it is a
terminal."""

EPILOG = """\
examples:
  registryd preload -c /etc/registryd/registryd.toml --image-file images.txt
  registryd preload --url https://mirror.example:5000 --user ops \\
      --password-file /etc/registryd/ops.pw --image docker.io/library/alpine:3.19

exit status:
  0  every image is on disk
  1  some image failed (each one says why)
  2  bad arguments or a bad line in the image file; nothing was fetched
  3  preload could not start: bad config, data directory or bucket, cannot listen
     on 127.0.0.1, --url unreachable or refusing the credentials"""

EXIT_FAILED = EXIT_DAMAGE
DEFAULT_JOBS = 4
BLOBS_AT_ONCE = 3
IDLE_TIMEOUT = 300.0
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_INDEX_DEPTH = 4
MANIFEST_ACCEPT = ", ".join(sorted(MANIFEST_TYPES))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-file", metavar="FILE", help="image references, one a line ('-': stdin)")
    parser.add_argument("--image", action="append", default=[], metavar="REF",
                        help="one more image reference (repeatable)")
    parser.add_argument("--platform", action="append", default=[], type=parse_platform,
                        metavar="OS/ARCH[/VARIANT]",
                        help="only these children of an image index (repeatable; default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                        help=f"images pulled at once (default {DEFAULT_JOBS})")
    add_remote_arguments(parser, "pull through")
    local = parser.add_argument_group("on the data directory (without --url)")
    add_store_arguments(local)  # type: ignore[arg-type]
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")


# --- the client --------------------------------------------------------------


class FetchError(Exception):
    """Why one image (or the first request) failed, as one line."""


def _describe(error: BaseException) -> str:
    if isinstance(error, Refused):
        return "connection refused"
    if isinstance(error, ResponseFailed):
        return "; ".join(_describe(f.value) for f in error.reasons) or "the response broke off"
    if type(error).__module__.startswith("OpenSSL") and error.args and isinstance(error.args[0], list):
        # [('SSL routines', '', 'certificate verify failed')]
        return "TLS: " + "; ".join(str(e[-1]) for e in error.args[0] if e)
    return str(error).strip() or type(error).__name__


def _error_of(status: int, body: bytes) -> str:
    """``404 MANIFEST_UNKNOWN: manifest unknown to registry`` from an OCI error document."""
    try:
        error = json.loads(body)["errors"][0]
        return f"{status} {error['code']}: {error['message']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {status}"


class RegistryHTTP:
    """GETs against one registry's /v2 API over one connection pool.

    Twisted's Agent and treq's ``collect`` rather than treq's request(),
    which asks for gzip and decodes it: a blob must reach the hasher as sent.
    """

    def __init__(self, reactor: Any, url: str, authorization: str | None = None,
                 tls: IPolicyForHTTPS | None = None, connections: int = 8) -> None:
        self._reactor = reactor
        self.url = url
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = connections
        self._agent = Agent(reactor, contextFactory=tls or BrowserLikePolicyForHTTPS(), connectTimeout=30,
                            pool=self._pool)
        self._headers = {"User-Agent": f"registryd-preload/{__version__}"}
        if authorization is not None:
            self._headers["Authorization"] = authorization

    async def get(self, path: str, headers: dict[str, str] | None = None) -> IResponse:
        raw = Headers({k.encode(): [v.encode()] for k, v in {**self._headers, **(headers or {})}.items()})
        d = self._agent.request(b"GET", (self.url + path).encode(), raw)
        timer = self._reactor.callLater(IDLE_TIMEOUT, d.cancel)
        try:
            return await d
        except CancelledError:
            raise FetchError(f"no answer within {IDLE_TIMEOUT:g}s") from None
        except (ConnectError, DNSLookupError, ResponseFailed) as e:
            raise FetchError(_describe(e)) from None
        finally:
            if timer.active():
                timer.cancel()

    async def collect(self, response: IResponse, sink: Callable[[bytes], None]) -> None:
        """Feed the body to ``sink`` as it arrives; FetchError if it stalls or breaks off.

        A sink that raises FetchError ends the transfer (treq drops the connection).
        """
        done: Deferred[None] = Deferred()

        def stalled() -> None:
            if not done.called:
                done.errback(FetchError(f"no data for {IDLE_TIMEOUT:g}s"))

        timer = self._reactor.callLater(IDLE_TIMEOUT, stalled)

        def receive(data: bytes) -> None:
            if timer.active():
                timer.reset(IDLE_TIMEOUT)
            sink(data)

        def settle(result: Any) -> None:
            # A body still coming after a stall only lands here: nothing left unhandled.
            if timer.active():
                timer.cancel()
            if done.called:
                return
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(None)

        treq.collect(response, receive).addBoth(settle)
        try:
            await done
        except FetchError:
            raise
        except Exception as e:
            raise FetchError(f"the transfer broke off: {_describe(e)}") from None

    async def read(self, response: IResponse, limit: int) -> bytes:
        """A small body (a manifest, an error document) whole, refusing more than ``limit`` bytes."""
        parts: list[bytes] = []
        received = 0

        def keep(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > limit:
                raise FetchError(f"more than {limit} bytes")
            parts.append(data)

        await self.collect(response, keep)
        return b"".join(parts)

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


# --- pulling -----------------------------------------------------------------


@attrs.define
class ImageResult:
    """What happened to one image."""

    ref: ImageRef
    digest: str | None = None
    media_type: str | None = None
    manifests: set[Digest] = attrs.field(factory=set)     # the image's own and its children
    blobs: dict[Digest, int] = attrs.field(factory=dict)   # configs and layers, with their sizes
    error: str | None = None

    @property
    def size(self) -> int:
        return sum(self.blobs.values())

    def line(self) -> str:
        if self.error is not None:
            return f"FAILED {self.ref}: {self.error}"
        return (f"ok {self.ref} {self.digest} {_plural(len(self.manifests), 'manifest')}, "
                f"{_plural(len(self.blobs), 'blob')}, {human_size(self.size)}")

    def document(self) -> dict[str, Any]:
        return {"reference": str(self.ref), "repository": self.ref.name, "ok": self.error is None,
                "digest": self.digest, "media_type": self.media_type, "manifests": len(self.manifests),
                "blobs": len(self.blobs), "bytes": self.size, "error": self.error}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Preloader:
    """Pulls images through one registry, reporting each as it finishes."""

    def __init__(self, client: RegistryHTTP, platforms: list[Platform], jobs: int, max_manifest_size: int,
                 progress: Progress, on_done: Callable[[ImageResult], None],
                 check: Callable[[ImageRef], Awaitable[str | None]],
                 confirm: Callable[[Iterable[Digest]], Awaitable[str | None]] | None = None) -> None:
        self._client = client
        self._platforms = platforms
        self._jobs = jobs
        self._max_manifest_size = max_manifest_size
        self._progress = progress
        self._on_done = on_done
        self._check = check
        self._confirm = confirm
        # (repository, digest) -> error or None: a blob two tags share is pulled once.
        self._blobs: dict[tuple[str, Digest], Shared[str | None]] = {}

    async def run(self, refs: list[ImageRef]) -> list[ImageResult]:
        return await bounded_gather(refs, self.image, self._jobs)

    async def image(self, ref: ImageRef) -> ImageResult:
        """Never fails: the reason is kept on the result."""
        result = ImageResult(ref)
        try:
            problem = await self._check(ref)
            if problem is not None:
                raise FetchError(problem)
            digest, media_type, document = await self._manifest(ref.name, ref.reference, None)
            result.digest, result.media_type = str(digest), media_type
            manifests: set[Digest] = set()
            blobs: dict[Digest, int] = {}
            await self._walk(ref.name, digest, media_type, document, manifests, blobs, 0)
            self._progress.size += sum(blobs.values())
            await self._fetch_blobs(ref.name, blobs)
            if self._confirm is not None:
                problem = await self._confirm([*manifests, *blobs])
                if problem is not None:
                    raise FetchError(problem)
            result.manifests, result.blobs = manifests, blobs
        except FetchError as e:
            result.error = str(e)
        except Exception as e:
            log.failure("preloading {ref} failed", ref=str(ref))
            result.error = f"internal error: {_describe(e)}"
        self._progress.advance(items=1)
        self._on_done(result)
        return result

    async def _manifest(self, name: str, reference: str, size: int | None) -> tuple[Digest, str, Any]:
        """Fetch, verify and parse one manifest: (digest, media type, document)."""
        response = await self._client.get(f"/v2/{name}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT})
        try:
            data = await self._client.read(response, self._max_manifest_size)
        except FetchError as e:
            raise FetchError(f"manifest {reference}: {e}") from None
        if response.code != 200:
            raise FetchError(f"manifest {reference}: {_error_of(response.code, data)}")
        expected = parse_digest(reference) if ":" in reference else None
        digest = digest_of(data, expected.algorithm if expected else "sha256")
        if expected is not None and digest != expected:
            raise FetchError(f"manifest {reference} does not match its digest (got {digest})")
        if size is not None and len(data) != size:
            raise FetchError(f"manifest {reference} is {len(data)} bytes, the index says {size}")
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
        try:
            media_type = parse_manifest(data, content_type or None).media_type
        except RegistryError as e:
            raise FetchError(f"manifest {reference}: {e.message}") from None
        return digest, media_type, json.loads(data)

    async def _walk(self, name: str, digest: Digest, media_type: str, document: Any, manifests: set[Digest],
                    blobs: dict[Digest, int], depth: int) -> None:
        """Collect the blobs of an image, or fetch an index's chosen children and theirs."""
        manifests.add(digest)
        if media_type not in INDEX_TYPES:
            for descriptor in [document["config"], *(document.get("layers") or [])]:
                if not descriptor["mediaType"].startswith(NON_DISTRIBUTABLE):
                    blobs[parse_digest(descriptor["digest"])] = descriptor["size"]
            return
        if depth >= MAX_INDEX_DEPTH:
            raise FetchError(f"image indexes nested more than {MAX_INDEX_DEPTH} deep")
        children = document["manifests"]
        chosen = [c for c in children if not self._platforms or any(p.matches(c.get("platform"))
                                                                    for p in self._platforms)]
        if not chosen:
            offered = ", ".join(sorted({describe_platform(c.get("platform")) for c in children})) or "none"
            wanted = ", ".join(str(p) for p in self._platforms) or "any platform"
            raise FetchError(f"the index has no manifest for {wanted} (it has {offered})")
        for child in chosen:
            child_digest, child_type, child_document = await self._manifest(name, child["digest"], child["size"])
            await self._walk(name, child_digest, child_type, child_document, manifests, blobs, depth + 1)

    async def _fetch_blobs(self, name: str, blobs: dict[Digest, int]) -> None:
        """A few at once; FetchError naming the first blob that failed."""
        found = await bounded_gather(blobs.items(), lambda blob: self._blob(name, *blob), BLOBS_AT_ONCE)
        errors = [e for e in found if e is not None]
        if errors:
            more = f" (and {_plural(len(errors) - 1, 'more blob')} failed)" if len(errors) > 1 else ""
            raise FetchError(errors[0] + more)

    def _blob(self, name: str, digest: Digest, size: int) -> Deferred[str | None]:
        shared = self._blobs.get((name, digest))
        if shared is None:
            shared = self._blobs[(name, digest)] = Shared(self._download(name, digest, size))
        return shared.wait()

    async def _download(self, name: str, digest: Digest, size: int) -> str | None:
        """Stream one blob into its hasher; the error, or None. Never fails."""
        try:
            response = await self._client.get(f"/v2/{name}/blobs/{digest}")
            if response.code != 200:
                return f"blob {digest}: {_error_of(response.code, await self._client.read(response, 65536))}"
            hasher = digest.hasher()
            received = 0

            def feed(data: bytes) -> None:
                nonlocal received
                received += len(data)
                if received > size:
                    raise FetchError(f"larger than the {size} bytes its manifest says")
                hasher.update(data)
                self._progress.advance(size=len(data))

            await self._client.collect(response, feed)
            if received != size:
                return f"blob {digest}: {received} bytes, its manifest says {size}"
            if hasher.hexdigest() != digest.hex:
                return f"blob {digest}: the content does not match the digest"
            return None
        except FetchError as e:
            return f"blob {digest}: {e}"
        except Exception as e:
            log.failure("downloading {digest} failed", digest=str(digest))
            return f"blob {digest}: internal error: {_describe(e)}"


# --- the two ways to run -----------------------------------------------------


def _local_config(args: argparse.Namespace) -> Config:
    """The config, checked far enough that the private server can start."""
    config = load_admin_config(args)
    if config.storage.driver != "s3":
        # Empty is a new site; anything else must look like registryd's, not a mistyped -d.
        check_data_dir(config.data_dir, allow_empty=True)
    if not config.upstreams:
        raise AdminError("the config has no [[upstream]]: there is nothing to preload")
    # Anonymous full access, no listeners of its own, upstreams reachable.
    upstreams = tuple(attrs.evolve(u, offline=False) for u in config.upstreams)
    # The node's hot blob cache (S3) is its server's alone.
    storage = attrs.evolve(config.storage, cache_size=0, cache_dir=None)
    return attrs.evolve(config, auth=attrs.evolve(config.auth, htpasswd=None), access=(), offline=False,
                        upstreams=upstreams, listen=(), storage=storage)


class LocalServer:
    """registryd's own API over the configured store, on 127.0.0.1 for this command only.

    Never Store.recover(): tmp/ holds the transfers of a server that may be running.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        # The server's modules (Klein, werkzeug) load only here: every other
        # `registryd` command imports this module to build its parser.
        from registryd.storage import open_store
        from registryd.threads import BlockingPool
        from registryd.web.app import RegistryAPI
        from registryd.web.site import RegistrySite

        self._config = config
        self._reactor = reactor
        self._pool = BlockingPool(reactor, config.io_threads, name="registryd-preload")
        self.store = open_store(config, self._pool, reactor)
        self.api = RegistryAPI(self.store, config, reactor)
        self.site = RegistrySite(self.api, reactor)
        self._port: Any = None
        self._stop_threads: Any = None

    async def start(self) -> str:
        try:
            self.store.prepare()  # creates missing directories, probes tmp/ with a file of its own
        except OSError as e:
            raise AdminError(f"the data directory {self._config.data_dir} is not usable: "
                             f"{e.filename}: {e.strerror}") from None
        problem = await self.store.check_backend()
        if problem is not None:
            raise AdminError(f"{self.store.location()}: {problem}")
        self._pool.start()
        # Its threads are not daemons: an interrupted run must still stop them to exit.
        self._stop_threads = self._reactor.addSystemEventTrigger("after", "shutdown", self._pool.stop)
        try:
            self._port = await TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1").listen(self.site)
        except CannotListenError as e:
            raise AdminError(f"cannot listen on 127.0.0.1: {e.socketError}") from None
        return f"http://127.0.0.1:{self._port.getHost().port}"

    async def check(self, ref: ImageRef) -> str | None:
        """Why ``ref`` cannot be preloaded here, or None."""
        try:
            route = self.api.mirror.router.route(ref.name, None)
        except RegistryError as e:
            return e.message
        if route is None:
            return "not a mirrored repository (no [[upstream]] namespace or default upstream serves it)"
        return None

    async def confirm(self, digests: Iterable[Digest]) -> str | None:
        """Why what a client fetched is not all in the store, or None.

        A client has a whole blob before its fill is stored (on S3 an upload
        follows): wait for each fill, then look.
        """
        for digest in digests:
            await self.api.mirror.fill_ended(digest)
            if await self.store.blobs.size(digest) is None:
                return f"{digest} was fetched but could not be stored (see the errors above)"
        return None

    async def stop(self) -> None:
        """Stop listening, let running requests end and running fills be stored (a
        client has all of a blob before its fill is in the store), close upstream
        connections, stop the threads."""
        if self._port is not None:
            await maybeDeferred(self._port.stopListening)  # None when a shutdown closed it already
        await self.site.drain(self._config.shutdown_timeout)
        await self.api.mirror.settle_fills(self._config.shutdown_timeout)
        await self.api.mirror.close()
        await self.store.close()
        if self._stop_threads is not None:
            self._reactor.removeSystemEventTrigger(self._stop_threads)
            self._pool.stop()


def _tls_policy(args: argparse.Namespace) -> IPolicyForHTTPS | None:
    from registryd.mirror.client import UpstreamTLSPolicy

    if not args.url.startswith("https://"):
        return None
    # To preload, the registryd is what an upstream is to registryd.
    settings = UpstreamConfig("preload", args.url, ca_file=args.ca_file, tls_verify=not args.insecure)
    try:
        return UpstreamTLSPolicy(settings)
    except Exception as e:
        raise AdminError(f"cannot use --ca-file {args.ca_file}: {_describe(e)}", EXIT_USAGE) from None


async def _check_base(client: RegistryHTTP, user: str | None) -> None:
    """--url must answer /v2/ as a registry that lets us in."""
    try:
        response = await client.get("/v2/")
        await client.read(response, 65536)
    except FetchError as e:
        raise AdminError(f"cannot reach {client.url}: {e}") from None
    if response.code == 401:
        raise AdminError(f"{client.url} refused the credentials of {user}" if user
                         else f"{client.url} needs credentials: give --user")
    if response.code != 200:
        raise AdminError(f"{client.url}/v2/ answered {response.code}: is it a registry?")


# --- the command --------------------------------------------------------------


def _check_arguments(args: argparse.Namespace) -> list[ImageRef]:
    """Everything that is exit status 2, before anything starts."""
    if args.image_file is None and not args.image:
        raise AdminError("give --image-file FILE or --image REF", EXIT_USAGE)
    if args.jobs < 1:
        raise AdminError(f"--jobs must be at least 1, not {args.jobs}", EXIT_USAGE)
    if args.url is None:
        given = [f for f, v in (("--user", args.user), ("--password-file", args.password_file),
                                ("--ca-file", args.ca_file), ("--insecure", args.insecure)) if v]
        if given:
            raise AdminError(f"{given[0]} goes with --url", EXIT_USAGE)
    else:
        if args.config is not None or args.data_dir is not None:
            raise AdminError("--config and --data-dir are for working on the data directory, not with --url",
                             EXIT_USAGE)
        if not args.url.startswith(("http://", "https://")) or "/" in args.url.split("://", 1)[1].rstrip("/"):
            raise AdminError(f"--url must be http(s)://host[:port], not {args.url!r}", EXIT_USAGE)
        if args.password_file is not None and args.user is None:
            raise AdminError("--password-file goes with --user", EXIT_USAGE)
    try:
        refs = read_image_file(args.image_file) if args.image_file is not None else []
        for text in args.image:
            try:
                refs.append(parse_reference(text))
            except ImageListError as e:
                raise ImageListError(f"--image {text}: {e}") from None
    except ImageListError as e:
        raise AdminError(str(e), EXIT_USAGE) from None
    if not refs:
        raise AdminError(f"{args.image_file} names no image", EXIT_USAGE)
    return unique(refs)


async def _no_check(ref: ImageRef) -> str | None:
    return None


def _log_errors_to_stderr() -> None:
    """Only errors (bugs) reach the operator; the access log and warnings stay quiet."""
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def run(args: argparse.Namespace) -> int:
    refs = _check_arguments(args)
    config = _local_config(args) if args.url is None else None
    url = args.url.rstrip("/") if args.url is not None else None
    credentials = authorization(args) if url is not None else None
    tls = _tls_policy(args) if url is not None else None
    progress = Progress("registryd preload", len(refs), 0)

    def report(result: ImageResult) -> None:
        if not args.json:
            progress.close()
            print(result.line(), flush=True)

    async def main(reactor: Any) -> list[ImageResult]:
        connections = args.jobs * BLOBS_AT_ONCE + 1
        server = LocalServer(config, reactor) if config is not None else None
        client = None
        check: Callable[[ImageRef], Awaitable[str | None]]
        try:
            if server is not None:
                client = RegistryHTTP(reactor, await server.start(), connections=connections)
                check = server.check
            else:
                assert url is not None
                client = RegistryHTTP(reactor, url, credentials, tls, connections)
                await _check_base(client, args.user)
                check = _no_check  # the server answers for names it does not serve
            limit = config.max_manifest_size if config is not None else MAX_MANIFEST_SIZE
            preloader = Preloader(client, args.platform, args.jobs, limit, progress, report, check,
                                  server.confirm if server is not None else None)
            return await preloader.run(refs)
        finally:
            progress.close()
            if client is not None:
                await client.close()
            if server is not None:
                await server.stop()

    _log_errors_to_stderr()
    results = run_reactor(main)
    done = [r for r in results if r.error is None]
    failed = len(results) - len(done)
    # What is on disk: an image asked for by tag and by digest counts once.
    manifests = {d for r in done for d in r.manifests}
    blobs = {d: size for r in done for d, size in r.blobs.items()}
    total = sum(blobs.values())
    if args.json:
        document = {
            "mode": "url" if config is None else "data-dir",
            "url": url,
            "data_dir": config.data_dir if config is not None else None,
            "platforms": [str(p) for p in args.platform] or None,
            "images": [r.document() for r in results],
            "preloaded": len(done),
            "failed": failed,
            "manifests": len(manifests),
            "blobs": len(blobs),
            "bytes": total,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        tail = f"; {failed} failed" if failed else ""
        print(f"preloaded {len(done)} of {_plural(len(results), 'image')} "
              f"({_plural(len(manifests), 'manifest')}, {_plural(len(blobs), 'blob')}, "
              f"{human_size(total)}){tail}")
    return EXIT_FAILED if failed else EXIT_OK
