"""Real upstream registries for the pull-through cache tests.

Debian's ``docker-registry`` (CNCF distribution 2.8.2) runs as a subprocess
on a free loopback port, in one of four set-ups::

    def test_something(reference_upstream):
        up = reference_upstream("token")            # "open" | "htpasswd" | "tls" | "token"
        image = push_image(up, "lib/app", "v1", layer_sizes=[1024, 5 << 20])
        image["digest"]                             # the manifest digest
        up.count("GET", blob_path("lib/app", image["layers"][0]["digest"]))

Use it from a test module with ``from upstreams import reference_upstream``
(``tests/`` is on ``sys.path``; the fixture has to be imported to be found).
The test CA and certificates (one set per session) are ``up.pki``, or the
``upstream_pki`` fixture without an upstream.

Everything in here is blocking: call it from sync tests, or from async tests
only where the far end is another process (docker-registry, the token
server), never an in-process server on the reactor. While an in-process
registryd must make progress (waiting for it to hit the upstream), use the
async ``await up.wait_count(...)`` / ``await up.acount(...)``.

Counting requests: docker-registry writes one Apache "combined" access-log
line per request to its stdout (gorilla ``CombinedLoggingHandler``) *after*
the handler returns, i.e. after the last body byte was handed to the socket.
A client that has just read the whole body can therefore look before the
line is written (a window of micro- to milliseconds); ``count`` waits until
the log has not grown for ``settle`` seconds (0.1 by default). A request the
client aborted mid-body is still logged, with the bytes actually written.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.parse
from typing import Any, Callable, Iterable, Iterator

import attrs
import bcrypt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from support.pki import issue, make_ca
from support.ports import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
DOCKER_REGISTRY = "/usr/bin/docker-registry"
KINDS = ("open", "htpasswd", "tls", "token")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: Layers up to this size keep their bytes in push_image's result.
KEEP_BYTES_LIMIT = 1 << 20
CHUNK = 1 << 20


# -- deterministic data ------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def iter_seeded(seed: int | str, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """``size`` pseudo-random bytes from ``seed``, in chunks, never all in memory.

    Block ``i`` (of ``CHUNK`` bytes) depends only on (seed, i), so the same
    seed and size always give the same bytes, whatever ``chunk`` is.
    """
    position = 0
    block_index, block = -1, b""
    while position < size:
        index, offset = divmod(position, CHUNK)
        if index != block_index:
            block_index = index
            block = random.Random(f"{seed}:{index}").randbytes(min(CHUNK, size - index * CHUNK))
        piece = block[offset:offset + chunk]
        yield piece
        position += len(piece)


def seeded_bytes(seed: int | str, size: int) -> bytes:
    """All of ``iter_seeded`` at once: for small blobs only."""
    return b"".join(iter_seeded(seed, size))


@attrs.frozen
class SeededBlob:
    """A blob defined by (seed, size): regenerate it instead of holding it."""

    seed: int | str
    size: int

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        return iter_seeded(self.seed, self.size, chunk)

    def data(self) -> bytes:
        return seeded_bytes(self.seed, self.size)

    @property
    def digest(self) -> str:
        cached = _digest_cache.get((self.seed, self.size))
        if cached is None:
            h = hashlib.sha256()
            for piece in self.chunks():
                h.update(piece)
            cached = _digest_cache[(self.seed, self.size)] = "sha256:" + h.hexdigest()
        return cached


_digest_cache: dict[tuple[Any, int], str] = {}


def blob_info(blob: bytes | SeededBlob, media_type: str | None = None) -> dict[str, Any]:
    """The dict push_image and push_blob return for a blob.

    Keys: ``digest``, ``size``, ``media_type``, ``seed`` (None for literal
    bytes), ``data`` (the bytes when at most ``KEEP_BYTES_LIMIT``, else None;
    regenerate with ``SeededBlob(seed, size).chunks()``).
    """
    if isinstance(blob, SeededBlob):
        return {"digest": blob.digest, "size": blob.size, "media_type": media_type, "seed": blob.seed,
                "data": blob.data() if blob.size <= KEEP_BYTES_LIMIT else None}
    return {"digest": sha256_digest(blob), "size": len(blob), "media_type": media_type, "seed": None,
            "data": blob}


def blob_path(repo: str, digest: str) -> str:
    """A regular expression for ``count``: the path of one blob."""
    return re.escape(f"/v2/{repo}/blobs/{digest}")


def manifest_path(repo: str, reference: str) -> str:
    """A regular expression for ``count``: the path of one manifest."""
    return re.escape(f"/v2/{repo}/manifests/{reference}")


# -- synthetic images ----------------------------------------------------------

def build_image(layer_sizes: Iterable[int] = (1024,), seed: int | str | None = None,
                docker: bool = False) -> dict[str, Any]:
    """A synthetic image: config + random layers, not pushed anywhere.

    Returns ``{"manifest": bytes, "digest", "media_type", "config": blob
    dict, "layers": [blob dict, ...]}`` (blob dicts as in ``blob_info``,
    plus ``"blob": SeededBlob | bytes`` to push). The layers are random bytes
    labelled as gzipped tars: registries never look inside. ``docker=True``
    makes a Docker schema-2 manifest instead of an OCI one.
    """
    if seed is None:
        seed = random.getrandbits(64)
    layer_type = DOCKER_LAYER if docker else OCI_LAYER
    layers = []
    for i, size in enumerate(layer_sizes):
        blob = SeededBlob(f"{seed}/layer{i}", size)
        info = blob_info(blob, layer_type)
        info["blob"] = blob
        layers.append(info)
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Labels": {"seed": str(seed)}},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }
    config_bytes = json.dumps(config_doc, sort_keys=True).encode()
    config = blob_info(config_bytes, DOCKER_CONFIG if docker else OCI_CONFIG)
    config["blob"] = config_bytes
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config["media_type"], "digest": config["digest"], "size": config["size"]},
        "layers": [{"mediaType": layer_type, "digest": layer["digest"], "size": layer["size"]}
                   for layer in layers],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    return {"manifest": manifest_bytes, "digest": sha256_digest(manifest_bytes), "media_type": media_type,
            "config": config, "layers": layers, "seed": seed}


def build_index(manifests: Iterable[dict[str, Any]], docker: bool = False) -> dict[str, Any]:
    """An image index (or Docker manifest list) over images from build_image.

    Each entry of ``manifests`` is a build_image/push_image result, optionally
    with a ``"platform"`` dict (default linux/amd64, then arm64, ...).
    """
    arches = ["amd64", "arm64", "arm", "ppc64le", "s390x", "riscv64"]
    entries = []
    for i, image in enumerate(manifests):
        platform = image.get("platform") or {"architecture": arches[i % len(arches)], "os": "linux"}
        entries.append({"mediaType": image["media_type"], "digest": image["digest"],
                        "size": len(image["manifest"]), "platform": platform})
    media_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, indent=2).encode()
    return {"manifest": body, "digest": sha256_digest(body), "media_type": media_type}


# -- test PKI ----------------------------------------------------------------

@attrs.frozen
class UpstreamPKI:
    """A CA, a TLS server certificate and a token-signing certificate, in PEM files."""

    directory: str
    ca_file: str            # the CA certificate: clients' trust root, rootcertbundle
    server_cert_file: str   # 127.0.0.1 / localhost, signed by the CA
    server_key_file: str
    token_key_file: str     # RSA, for RS256
    token_chain_file: str   # the token signer's certificate (leaf), signed by the CA


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_pki(directory: str) -> UpstreamPKI:
    """Generate the test PKI into ``directory`` (EC for TLS: fast; RSA for RS256)."""
    os.makedirs(directory, exist_ok=True)
    ca = make_ca("registryd test CA")
    server = issue(ca, "127.0.0.1", hosts=["127.0.0.1", "localhost"])
    token_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = issue(ca, "registryd test token signer", key=token_key, signer=True)
    server_cert_file, server_key_file = server.write(directory, "server", key_suffix="-key.pem")
    token_chain_file, token_key_file = token.write(directory, "token", cert_suffix="-chain.pem", key_suffix="-key.pem")
    return UpstreamPKI(directory=directory, ca_file=_write(os.path.join(directory, "ca.pem"), ca.cert_pem()),
                       server_cert_file=server_cert_file, server_key_file=server_key_file,
                       token_key_file=token_key_file, token_chain_file=token_chain_file)


_session_pki: list[UpstreamPKI] = []


def shared_pki(tmp_path_factory: Any) -> UpstreamPKI:
    """One test PKI per session (key generation is the slow part)."""
    if not _session_pki:
        _session_pki.append(make_pki(str(tmp_path_factory.mktemp("pki"))))
    return _session_pki[0]


@pytest.fixture
def upstream_pki(tmp_path_factory: Any) -> UpstreamPKI:
    """The session's test PKI (the CA every reference upstream uses)."""
    return shared_pki(tmp_path_factory)


# -- a blocking registry client -------------------------------------------------

@attrs.frozen
class Response:
    status: int
    headers: dict[str, str]   # lower-cased names
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)


class RegistryError(AssertionError):
    """An upstream answered something a test helper did not expect."""


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service="..",scope=".."`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


Body = bytes | Callable[[], Iterable[bytes]] | None


class RegistryClient:
    """Blocking HTTP to one upstream, doing Basic or the Bearer token dance.

    ``body`` may be bytes or a zero-argument callable returning an iterable
    of chunks (called again if the request is retried after a 401); with an
    iterable, pass Content-Length in ``headers`` to avoid chunked encoding.
    """

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, timeout: float = 60) -> None:
        parts = urllib.parse.urlsplit(url)
        self.scheme = parts.scheme
        self.hostname = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.username = username
        self.password = password
        self.ca_file = ca_file
        self.timeout = timeout
        self.basic = False
        self.tokens: dict[str, str] = {}   # scope -> token
        self.token_responses: list[dict[str, Any]] = []

    def _connection(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        if scheme == "https":
            context = ssl.create_default_context(cafile=self.ca_file)
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def send(self, method: str, url: str, body: Body = None, headers: dict[str, str] | None = None) -> Response:
        """One request as given: no authentication, no retry."""
        headers = headers or {}
        parts = urllib.parse.urlsplit(url)
        if parts.scheme:
            conn = self._connection(parts.scheme, parts.hostname or "",
                                    parts.port or (443 if parts.scheme == "https" else 80))
            target = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
        else:
            conn = self._connection(self.scheme, self.hostname, self.port)
            target = url
        try:
            payload = body() if callable(body) else body
            conn.request(method, target, body=payload, headers=headers)  # type: ignore[arg-type]
            response = conn.getresponse()
            data = response.read()
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            conn.close()

    def _basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def fetch_token(self, realm: str, service: str | None, scope: str | None) -> str:
        query = []
        if service:
            query.append(("service", service))
        if scope:
            query.append(("scope", scope))
        url = realm + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": self._basic_header()} if self.username is not None else {}
        response = self.send("GET", url, None, headers)
        if response.status != 200:
            raise RegistryError(f"token server answered {response.status}: {response.body!r}")
        document = response.json()
        self.token_responses.append(document)
        return document.get("token") or document["access_token"]

    def request(self, method: str, path: str, body: Body = None,
                headers: dict[str, str] | None = None, scope: str | None = None) -> Response:
        """One request; on a 401 challenge authenticate and retry once."""
        headers = dict(headers or {})
        if scope is not None and scope in self.tokens:
            headers["Authorization"] = "Bearer " + self.tokens[scope]
        elif self.basic:
            headers["Authorization"] = self._basic_header()
        response = self.send(method, path, body, headers)
        challenge = response.header("WWW-Authenticate")
        if response.status != 401 or not challenge:
            return response
        kind, params = parse_challenge(challenge)
        if kind == "basic":
            if self.username is None or self.basic:
                return response
            self.basic = True
            headers["Authorization"] = self._basic_header()
        elif kind == "bearer":
            wanted = scope or params.get("scope")
            token = self.fetch_token(params["realm"], params.get("service"), wanted)
            self.tokens[wanted or ""] = token
            headers["Authorization"] = "Bearer " + token
        else:
            return response
        return self.send(method, path, body, headers)

    def expect(self, status: int | tuple[int, ...], method: str, path: str, body: Body = None,
               headers: dict[str, str] | None = None, scope: str | None = None) -> Response:
        response = self.request(method, path, body, headers, scope)
        if response.status not in (status if isinstance(status, tuple) else (status,)):
            raise RegistryError(f"{method} {path}: {response.status} {response.body[:500]!r}")
        return response


def client_for(upstream: Any, **kwargs: Any) -> RegistryClient:
    """A RegistryClient with the upstream's URL, credentials and CA."""
    return RegistryClient(upstream.url, getattr(upstream, "username", None),
                          getattr(upstream, "password", None), getattr(upstream, "ca_file", None), **kwargs)


# -- pushing -------------------------------------------------------------------

def _upload(client: RegistryClient, repo: str, blob: bytes | SeededBlob, digest: str) -> None:
    scope = f"repository:{repo}:pull,push"
    head = client.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=scope)
    if head.status == 200:
        return
    started = client.expect(202, "POST", f"/v2/{repo}/blobs/uploads/", b"",
                            {"Content-Length": "0"}, scope=scope)
    location = started.header("Location") or ""
    separator = "&" if "?" in location else "?"
    if isinstance(blob, bytes):
        client.expect(201, "PUT", f"{location}{separator}digest={digest}", blob,
                      {"Content-Type": "application/octet-stream", "Content-Length": str(len(blob))},
                      scope=scope)
        return
    # Stream with one PATCH (the body is generated as it is sent), then
    # close the upload with an empty PUT: the blob is never all in memory.
    patched = client.expect(202, "PATCH", location, lambda: blob.chunks(),
                            {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
                            scope=scope)
    location = patched.header("Location") or location
    separator = "&" if "?" in location else "?"
    client.expect(201, "PUT", f"{location}{separator}digest={digest}", b"", {"Content-Length": "0"},
                  scope=scope)


def push_blob(upstream: Any, repo: str, data_or_size_seed: bytes | SeededBlob | tuple[int, int | str],
              client: RegistryClient | None = None) -> dict[str, Any]:
    """Push one blob; ``(size, seed)`` or a SeededBlob streams it (fine for 256 MiB).

    Returns the ``blob_info`` dict: digest, size, seed, data (small only).
    """
    blob: bytes | SeededBlob
    if isinstance(data_or_size_seed, tuple):
        size, seed = data_or_size_seed
        blob = SeededBlob(seed, size)
    else:
        blob = data_or_size_seed
    info = blob_info(blob)
    _upload(client or client_for(upstream), repo, blob, info["digest"])
    return info


def push_manifest(upstream: Any, repo: str, reference: str, body: bytes, media_type: str,
                  client: RegistryClient | None = None) -> str:
    """PUT a manifest by tag or digest; returns its digest."""
    client = client or client_for(upstream)
    response = client.expect(201, "PUT", f"/v2/{repo}/manifests/{reference}", body,
                             {"Content-Type": media_type, "Content-Length": str(len(body))},
                             scope=f"repository:{repo}:pull,push")
    digest = sha256_digest(body)
    assert response.header("Docker-Content-Digest") in (None, digest), response.headers
    return digest


def push_image(upstream: Any, repo: str, tag: str | None = "latest", layer_sizes: Iterable[int] = (1024,),
               seed: int | str | None = None, docker: bool = False,
               client: RegistryClient | None = None) -> dict[str, Any]:
    """Push a synthetic image (config + random layers) and return what was pushed.

    Returns the build_image dict plus ``repo`` and ``tag``::

        {"repo", "tag", "digest": manifest digest, "manifest": bytes, "media_type",
         "config": {"digest", "size", "data", ...},
         "layers": [{"digest", "size", "seed", "data": bytes | None, "blob"}, ...]}

    With ``tag=None`` the manifest is pushed by digest only.
    """
    client = client or client_for(upstream)
    image = build_image(layer_sizes, seed, docker)
    for layer in image["layers"]:
        _upload(client, repo, layer["blob"], layer["digest"])
    _upload(client, repo, image["config"]["blob"], image["config"]["digest"])
    push_manifest(upstream, repo, tag or image["digest"], image["manifest"], image["media_type"], client)
    image.update(repo=repo, tag=tag)
    return image


def push_index(upstream: Any, repo: str, tag: str | None, images: Iterable[dict[str, Any]],
               docker: bool = False, client: RegistryClient | None = None) -> dict[str, Any]:
    """Push an index over images already pushed to ``repo`` (push_image results)."""
    index = build_index(images, docker)
    push_manifest(upstream, repo, tag or index["digest"], index["manifest"], index["media_type"], client)
    index.update(repo=repo, tag=tag)
    return index


# -- the reference registry ------------------------------------------------------

@attrs.frozen
class AccessEntry:
    """One line of docker-registry's access log."""

    method: str
    path: str      # without the query string
    query: str
    status: int
    size: int      # response body bytes actually written


_ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')


def _docker_registry() -> str:
    binary = DOCKER_REGISTRY if os.access(DOCKER_REGISTRY, os.X_OK) else shutil.which("docker-registry")
    if not binary:
        pytest.fail("docker-registry (Debian package docker-registry, distribution 2.8) is not installed")
    return binary


def _stop(process: subprocess.Popen[Any] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@attrs.define
class ReferenceUpstream:
    """A docker-registry subprocess; see the module docstring.

    Attributes: ``kind``, ``url``, ``host`` (127.0.0.1:PORT), ``port``,
    ``username``/``password`` (htpasswd and token kinds, else None),
    ``ca_file`` (the test CA; the tls kind needs it, harmless elsewhere),
    ``log_path`` (the access log), ``app_log_path``, ``data_dir``,
    ``config_path``; token kind: ``token_server`` (its URL),
    ``token_realm``, ``token_service``, ``token_issuer``.
    """

    kind: str
    directory: str
    port: int
    scheme: str
    pki: UpstreamPKI
    username: str | None = None
    password: str | None = None
    token_server: str | None = None
    token_service: str | None = None
    token_issuer: str | None = None
    process: subprocess.Popen[Any] | None = None
    token_process: subprocess.Popen[Any] | None = None
    _log_files: list[Any] = attrs.field(factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def ca_file(self) -> str:
        return self.pki.ca_file

    @property
    def token_realm(self) -> str | None:
        return self.token_server and self.token_server + "/token"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "config.yml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "access.log")

    @property
    def app_log_path(self) -> str:
        return os.path.join(self.directory, "registry.log")

    # -- process ---------------------------------------------------------------

    def write_config(self) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.data_dir}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.scheme == "https":
            lines += ["  tls:", f"    certificate: {self.pki.server_cert_file}",
                      f"    key: {self.pki.server_key_file}"]
        if self.kind == "htpasswd":
            lines += ["auth:", "  htpasswd:", "    realm: upstream-test",
                      f"    path: {os.path.join(self.directory, 'htpasswd')}"]
        elif self.kind == "token":
            lines += ["auth:", "  token:", f"    realm: {self.token_realm}",
                      f"    service: {self.token_service}", f"    issuer: {self.token_issuer}",
                      f"    rootcertbundle: {self.pki.ca_file}"]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 20) -> None:
        """Start docker-registry (again, after ``stop``: same port, same data)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.write_config()
        access = open(self.log_path, "ab")
        app = open(self.app_log_path, "ab")
        self._log_files += [access, app]
        self.process = subprocess.Popen([_docker_registry(), "serve", self.config_path],
                                        stdout=access, stderr=app, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = RegistryClient(self.url, ca_file=self.ca_file, timeout=2)
        while True:
            if self.process.poll() is not None:
                with open(self.app_log_path, "rb") as f:
                    tail = f.read()[-2000:].decode("utf-8", "replace")
                raise RuntimeError(f"docker-registry exited with {self.process.returncode}:\n{tail}")
            try:
                if client.send("GET", "/v2/", None, {}).status in (200, 401):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer on {self.url} within {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop docker-registry (terminate, then kill); ``start`` brings it back."""
        _stop(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        self.stop()
        _stop(self.token_process)
        for f in self._log_files:
            f.close()

    # -- counting --------------------------------------------------------------

    def _settled_size(self, settle: float) -> None:
        deadline = time.monotonic() + 5
        size = os.path.getsize(self.log_path)
        while time.monotonic() < deadline:
            time.sleep(settle)
            now = os.path.getsize(self.log_path)
            if now == size:
                return
            size = now

    def requests(self, settle: float = 0.0) -> list[AccessEntry]:
        """Every request in the access log so far (after ``settle`` seconds of quiet)."""
        if settle:
            self._settled_size(settle)
        entries = []
        with open(self.log_path, "rb") as f:
            for raw in f:
                m = _ACCESS_LINE.match(raw.decode("utf-8", "replace"))
                if m:
                    path, _, query = m.group(2).partition("?")
                    size = 0 if m.group(4) == "-" else int(m.group(4))
                    entries.append(AccessEntry(m.group(1), path, query, int(m.group(3)), size))
        return entries

    def _matching(self, entries: list[AccessEntry], method: str | None, path_regex: str,
                  status: int | None) -> int:
        pattern = re.compile(path_regex)
        return sum(1 for e in entries
                   if (method is None or e.method == method.upper())
                   and pattern.fullmatch(e.path)
                   and (status is None or e.status == status))

    def count(self, method: str | None, path_regex: str, status: int | None = None,
              settle: float = 0.1) -> int:
        """Requests whose method is ``method`` (None: any) and whose path
        (without the query) fully matches ``path_regex``; optionally only
        those answered with ``status``. Blocks ``settle`` seconds at least;
        see the module docstring for why.

        ``up.count("GET", blob_path("lib/app", digest))``,
        ``up.count("HEAD", r"/v2/lib/app/manifests/.*", status=200)``.
        """
        return self._matching(self.requests(settle), method, path_regex, status)

    async def acount(self, method: str | None, path_regex: str, status: int | None = None,
                     settle: float = 0.1) -> int:
        """``count`` for async tests: waits for the log to settle on the reactor."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        size = -1
        for _ in range(50):
            now = os.path.getsize(self.log_path)
            if now == size:
                break
            size = now
            await deferLater(reactor, settle, lambda: None)
        return self._matching(self.requests(), method, path_regex, status)

    async def wait_count(self, method: str | None, path_regex: str, expected: int,
                         status: int | None = None, timeout: float = 10) -> int:
        """Wait on the reactor until at least ``expected`` requests match."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        deadline = time.monotonic() + timeout
        while True:
            n = self._matching(self.requests(), method, path_regex, status)
            if n >= expected:
                return n
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} of {expected} {method} {path_regex} requests after {timeout}s")
            await deferLater(reactor, 0.02, lambda: None)

    # -- token server control (token kind) ------------------------------------

    def _token_admin(self, method: str, path: str, document: Any = None) -> Any:
        assert self.token_server, "not a token upstream"
        body = json.dumps(document).encode() if document is not None else None
        response = RegistryClient(self.token_server).send(method, path, body, {})
        assert response.status == 200, response
        return response.json()

    def token_requests(self) -> list[dict[str, Any]]:
        """Token requests seen: [{method, user, scopes, service, status}, ...]."""
        return self._token_admin("GET", "/_stats")["requests"]

    def token_count(self, **match: Any) -> int:
        """Token requests seen, optionally only those with fields equal to ``match``,
        e.g. ``token_count(status=200)``, ``token_count(user="alice")``."""
        return sum(1 for r in self.token_requests() if all(r.get(k) == v for k, v in match.items()))

    def reset_token_count(self) -> None:
        self._token_admin("POST", "/_reset", {})

    def set_token_policy(self, **policy: Any) -> dict[str, Any]:
        """Change the token server live: ``allow_anonymous``, ``expires_in``,
        ``fail_status`` (e.g. 503 for every token request; None to stop)."""
        return self._token_admin("POST", "/_policy", policy)


def _start_token_server(directory: str, pki: UpstreamPKI, issuer: str, service: str, username: str,
                        password: str, allow_anonymous: bool, expires_in: int) -> tuple[subprocess.Popen[Any], str]:
    port_file = os.path.join(directory, "token-server.port")
    log = open(os.path.join(directory, "token-server.log"), "ab")
    command = [sys.executable, os.path.join(HERE, "token_server.py"), "--key", pki.token_key_file,
               "--chain", pki.token_chain_file, "--issuer", issuer, "--service", service,
               "--user", f"{username}:{password}", "--expires-in", str(expires_in), "--port-file", port_file]
    if not allow_anonymous:
        command.append("--no-anonymous")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file):
        if process.poll() is not None:
            raise RuntimeError(f"token server exited with {process.returncode}; see {log.name}")
        if time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError("token server did not start")
        time.sleep(0.02)
    with open(port_file) as f:
        return process, f"http://127.0.0.1:{int(f.read())}"


@pytest.fixture
def reference_upstream(tmp_path: Any, tmp_path_factory: Any) -> Iterator[Callable[..., ReferenceUpstream]]:
    """Factory: ``make(kind, **options) -> ReferenceUpstream``, stopped at teardown.

    kind: "open" (plain HTTP, no auth), "htpasswd" (Basic, bcrypt htpasswd),
    "tls" (HTTPS with the test CA, no auth), "token" (Bearer tokens from a
    token_server.py subprocess).
    options: ``tls=True`` adds HTTPS to htpasswd/token; ``username``,
    ``password``; token kind: ``allow_anonymous`` (default True, Docker Hub
    style anonymous pull), ``expires_in`` (seconds, default 300).
    """
    _docker_registry()
    pki = shared_pki(tmp_path_factory)
    made: list[ReferenceUpstream] = []

    def make(kind: str, *, tls: bool | None = None, username: str = "alice", password: str = "s3cret-pw",
             allow_anonymous: bool = True, expires_in: int = 300) -> ReferenceUpstream:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        directory = str(tmp_path / f"upstream{len(made)}-{kind}")
        os.makedirs(os.path.join(directory, "data"))
        secure = kind == "tls" or bool(tls)
        upstream = ReferenceUpstream(kind, directory, 0, "https" if secure else "http", pki)
        made.append(upstream)
        if kind in ("htpasswd", "token"):
            upstream.username, upstream.password = username, password
        if kind == "htpasswd":
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            with open(os.path.join(directory, "htpasswd"), "w") as f:
                f.write(f"{username}:{hashed}\n")
        if kind == "token":
            upstream.token_service = "upstream.test"
            upstream.token_issuer = "registryd-test-token-issuer"
            upstream.token_process, upstream.token_server = _start_token_server(
                directory, pki, upstream.token_issuer, upstream.token_service, username, password,
                allow_anonymous, expires_in)
        for attempt in range(3):   # a free port can be taken before docker-registry binds it
            upstream.port = free_port()
            try:
                upstream.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        return upstream

    yield make
    for upstream in made:
        upstream.close()
