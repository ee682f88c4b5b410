#!/usr/bin/env python3
"""Web UI latency with a large store: 10,000 repositories, 1,000 tags in one repository.

The store is written directly in registryd's layout (registryd.storage.layout;
plain file writes, no fsync: this is a fixture, not a push), then
``twistd -n registryd`` serves it and every UI page is fetched one request at
a time: the first (cold) view, then ``--requests`` warm views, whose median
and 95th percentile are reported in milliseconds. The target is under 200 ms
per warm page on a small machine. While the cold views run, ``/healthz`` is
polled: its slowest answer shows whether browsing ever held the reactor.

The reference registry has no web UI, so there is nothing to put side by
side; figures are registryd's own, against the target.

Pages
  repositories          /ui/                                  the first 50 of 10,000
  repositories_search   /ui/?q=r0999                          a name search over all of them
  repositories_page     /ui/?page=150                         a page deep in the list
  repositories_json     /ui/api/repositories?per_page=100
  repository_1000_tags  /ui/repositories/big/tags             100 of its 1,000 tags
  repository_tags_page  /ui/repositories/big/tags?page=10
  repository_json       /ui/api/repositories/big/tags
  image                 /ui/repositories/big/tags/manifests/t0500
  index                 /ui/repositories/big/tags/manifests/multi
  mirror                /ui/mirror                            200 cached repositories of one upstream

--quick: 2,000 repositories, 200 tags, 5 warm views (a CI smoke test). Loopback only; stdlib only.
"""
import argparse
import hashlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_core import Registryd, find_twistd, log  # noqa: E402
from registryd.digest import Digest  # noqa: E402
from registryd.storage import layout  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
UPSTREAM = "mirror.bench"
TARGET_MS = 200.0


class Filler:
    """Writes repositories straight into a data directory, in registryd's layout."""

    def __init__(self, data: str) -> None:
        self.data = data
        self.layer = self.blob(b"shared layer " * 4096)

    def _write(self, key: str, body: bytes) -> None:
        path = layout.local_path(self.data, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)

    def blob(self, body: bytes) -> Digest:
        digest = Digest("sha256", hashlib.sha256(body).hexdigest())
        self._write(layout.blob_key(digest), body)
        return digest

    def image(self, seed: str, arch: str = "amd64") -> tuple[Digest, int]:
        config = json.dumps({"architecture": arch, "os": "linux", "created": "2026-11-01T00:00:00Z",
                             "config": {"Cmd": ["/bin/app", seed]}, "rootfs": {"type": "layers"}}).encode()
        config_digest = self.blob(config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": str(config_digest), "size": len(config)},
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                           "digest": str(self.layer), "size": len(b"shared layer " * 4096)}]}
                              ).encode()
        return self.blob(manifest), len(manifest)

    def add(self, root: str, name: str, digest: Digest, media_type: str, tags: list[str],
            links: list[Digest]) -> None:
        repo = f"{root}{name}/"
        self._write(repo + layout.revision_key(digest), json.dumps({"mediaType": media_type}).encode())
        for blob in links:
            self._write(repo + layout.link_key(blob), b"")
        for tag in tags:
            self._write(repo + layout.tag_key(tag), str(digest).encode())


def fill(data: str, repositories: int, tags: int, mirrored: int) -> None:
    filler = Filler(data)
    local = layout.repositories_root(None)
    for i in range(repositories):
        digest, _ = filler.image(f"r{i}")
        filler.add(local, f"bench/r{i:05d}", digest, OCI_MANIFEST, ["latest"], [filler.layer])
    for i in range(tags):
        digest, _ = filler.image(f"t{i}")
        filler.add(local, "big/tags", digest, OCI_MANIFEST, [f"t{i:04d}"], [filler.layer])
    children = []
    for arch in ("amd64", "arm64"):
        digest, size = filler.image(f"multi-{arch}", arch)
        filler.add(local, "big/tags", digest, OCI_MANIFEST, [], [])
        children.append({"mediaType": OCI_MANIFEST, "digest": str(digest), "size": size,
                         "platform": {"os": "linux", "architecture": arch}})
    index = filler.blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode())
    filler.add(local, "big/tags", index, OCI_INDEX, ["multi"], [])
    cached = layout.repositories_root(UPSTREAM)
    for i in range(mirrored):
        digest, _ = filler.image(f"m{i}")
        filler.add(cached, f"library/m{i:04d}", digest, OCI_MANIFEST, ["latest"], [filler.layer])


def get(port: int, path: str, keep: bool = False) -> tuple[int, float, Any]:
    """Status, milliseconds and the body's length (``keep``: the body)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, (time.monotonic() - started) * 1000, body if keep else len(body)


class HealthPoller(threading.Thread):
    """GET /healthz every 20 ms; the slowest answer while the UI is browsed cold."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.slowest = 0.0
        self.times: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                _, ms, _ = get(self.port, "/healthz")
                self.slowest = max(self.slowest, ms)
                self.times.append(ms)
            except OSError:
                pass
            time.sleep(0.02)


def pages(args: argparse.Namespace) -> dict[str, str]:
    deep = max(1, args.repositories // 50 // 2)
    return {
        "repositories": "/ui/",
        "repositories_search": "/ui/?q=r0999",
        "repositories_page": f"/ui/?page={deep}",
        "repositories_json": "/ui/api/repositories?per_page=100",
        "repository_1000_tags": "/ui/repositories/big/tags",
        "repository_tags_page": f"/ui/repositories/big/tags?page={max(1, args.tags // 100)}",
        "repository_json": "/ui/api/repositories/big/tags",
        "image": f"/ui/repositories/big/tags/manifests/t{args.tags // 2:04d}",
        "index": "/ui/repositories/big/tags/manifests/multi",
        "mirror": "/ui/mirror",
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 repositories, 200 tags, 5 warm views")
    parser.add_argument("--repositories", type=int, default=None)
    parser.add_argument("--tags", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None, help="warm views per page (default 20)")
    parser.add_argument("--seconds", type=float, default=None, help="accepted for symmetry with the others; unused")
    parser.add_argument("--output", default=None, help="results JSON (default benchmarks/results/ui-<time>.json)")
    parser.add_argument("--twistd", default=None)
    args = parser.parse_args(argv)
    args.repositories = args.repositories or (2000 if args.quick else 10_000)
    args.tags = args.tags or (200 if args.quick else 1000)
    args.requests = args.requests or (5 if args.quick else 20)
    mirrored = 50 if args.quick else 200
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    output = args.output or os.path.join(HERE, "results", f"ui-{stamp}.json")

    with tempfile.TemporaryDirectory(prefix="bench-ui-") as workdir:
        server = Registryd(workdir, args.twistd or find_twistd())
        started = time.monotonic()
        fill(server.data, args.repositories, args.tags, mirrored)
        fill_s = time.monotonic() - started
        log(f"filled {args.repositories} repositories, {args.tags} tags, {mirrored} mirrored in {fill_s:.1f} s")
        config = os.path.join(server.dir, "registryd.toml")
        with open(config, "w") as f:
            f.write(f'[mirror]\noffline = true\n\n[[upstream]]\nnamespace = "{UPSTREAM}"\n'
                    'url = "http://127.0.0.1:9"\n')
        server.cmd += ["--config", config]
        server.start()
        figures: dict[str, float] = {}
        failures: list[str] = []
        try:
            server.wait_ready(60)
            ready_at = time.monotonic()
            slowest = {}
            health: list[float] = []
            counting = False
            for name, path in pages(args).items():
                poller = HealthPoller(server.port)
                poller.start()
                status, ms, body = get(server.port, path, keep=True)
                poller.stop.set()
                poller.join()
                slowest[name] = poller.slowest
                health += poller.times
                if name == "repositories" and b'id="counting"' in body:
                    counting = True     # the names' walk begun at start-up was still running
                if status != 200:
                    failures.append(f"{name}: GET {path} answered {status}")
                    continue
                figures[f"{name}_cold_ms"] = round(ms, 1)
            figures["healthz_slowest_during_cold_ms"] = round(max(slowest.values()), 1)
            figures["healthz_median_during_cold_ms"] = round(statistics.median(health), 1) if health else 0.0
            figures["first_view_said_counting"] = float(counting)
            # How long after readiness until the names are all listed (the walk begun at start-up).
            while True:
                status, _, body = get(server.port, "/ui/api/repositories", keep=True)
                if status == 200 and not json.loads(body).get("counting"):
                    break
                time.sleep(0.05)
            figures["names_listed_after_ready_s"] = round(time.monotonic() - ready_at, 2)
            log("slowest /healthz during each cold view (ms): "
                + ", ".join(f"{name} {ms:.0f}" for name, ms in slowest.items()))
            for name, path in pages(args).items():
                times = []
                for _ in range(args.requests):
                    status, ms, _ = get(server.port, path)
                    if status == 200:
                        times.append(ms)
                if len(times) != args.requests:
                    failures.append(f"{name}: some warm views of {path} failed")
                    continue
                times.sort()
                figures[f"{name}_median_ms"] = round(statistics.median(times), 1)
                figures[f"{name}_p95_ms"] = round(times[min(len(times) - 1, int(len(times) * 0.95))], 1)
        finally:
            server.stop()
            if failures or not figures:
                sys.stderr.write(open(server.log_path, errors="replace").read()[-3000:])

    print(f"\nweb UI, {args.repositories:,} repositories, {args.tags:,} tags in one, {args.requests} warm views each")
    print(f"{'page':<24} {'cold ms':>9} {'median ms':>10} {'p95 ms':>8}  target < {TARGET_MS:.0f} ms")
    for name in pages(args):
        cold, median, p95 = (figures.get(f"{name}_{k}") for k in ("cold_ms", "median_ms", "p95_ms"))
        verdict = "" if median is None else ("ok" if median < TARGET_MS else "OVER")
        print(f"{name:<24} {cold if cold is not None else '-':>9} {median if median is not None else '-':>10} "
              f"{p95 if p95 is not None else '-':>8}  {verdict}")
    print(f"/healthz while browsing cold: median {figures.get('healthz_median_during_cold_ms')} ms, "
          f"slowest {figures.get('healthz_slowest_during_cold_ms')} ms")
    print(f"first /ui/ view said 'still counting': {bool(figures.get('first_view_said_counting'))}; "
          f"all names listed {figures.get('names_listed_after_ready_s')} s after ready")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"when": stamp, "repositories": args.repositories, "tags": args.tags,
                   "requests": args.requests, "fill_seconds": round(fill_s, 1), "figures": figures,
                   "failures": failures}, f, indent=2)
    for failure in failures:
        log(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
