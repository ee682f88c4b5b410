#!/usr/bin/env python3
"""Side-by-side sync benchmark: a registryd [[sync]] job against ``skopeo sync``.

One upstream (a plain Debian ``docker-registry`` on loopback, its access log
kept so every request made to it can be counted) holds one repository of
200 tags (``--quick``: 40) that share layers: every image is a 512 KiB base
layer, a 64 KiB layer shared by each group of 20 tags, and a small layer
and config of its own. Then, one after the other, from the same upstream:

  registryd   ``registryd sync --now bench -c CONF``: the job copies every tag
              into a fresh registryd data directory (the mirror cache)
  skopeo      ``skopeo sync --src docker --dest docker`` of the same repository
              into a fresh docker-registry (the reference registry)

Each runs twice: cold (nothing copied yet) and warm (everything there
already, as at each later run of a schedule). Figures, for both, with the
ratio registryd / skopeo:

  cold_wall_s, warm_wall_s                     wall time of the command, s
  cold_upstream_requests, warm_upstream_requests   requests the upstream saw
  cold_upstream_gets, warm_upstream_gets       of which GETs (HEADs are free on Docker Hub)
  cold_upstream_MiB                            body bytes the upstream sent (GETs), MiB

Only the stdlib is used (plus bench_core.py and bench_mirror.py next to
this file), and skopeo and docker-registry on PATH. Loopback only.
"""
import argparse
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_core import DEFAULT_REFERENCE, fmt, log  # noqa: E402
from bench_mirror import DockerRegistry  # noqa: E402

REPO = "bench/app"
NS = "upstream.bench"
_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pusher:
    """Pushes blobs and manifests over one keep-alive connection (seeding is not measured)."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.pushed = set()

    def _send(self, method, path, body=b"", headers=None):
        self.conn.request(method, path, body=body, headers={"Content-Length": str(len(body)), **(headers or {})})
        response = self.conn.getresponse()
        response.read()
        return response

    def blob(self, data):
        digest = digest_of(data)
        if digest not in self.pushed:
            started = self._send("POST", f"/v2/{REPO}/blobs/uploads/")
            location = started.getheader("Location")
            separator = "&" if "?" in location else "?"
            path = re.sub(r"^https?://[^/]+", "", location)
            done = self._send("PUT", f"{path}{separator}digest={digest}", data,
                              {"Content-Type": "application/octet-stream"})
            assert done.status == 201, done.status
            self.pushed.add(digest)
        return {"digest": digest, "size": len(data)}

    def image(self, tag, layers):
        config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
                             "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]},
                             "config": {"Labels": {"tag": tag}}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **self.blob(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **d} for d in layers],
        }).encode()
        done = self._send("PUT", f"/v2/{REPO}/manifests/{tag}", manifest, {"Content-Type": OCI_MANIFEST})
        assert done.status == 201, done.status


def seed(port, tags):
    rng = random.Random(17)
    pusher = Pusher(port)
    base = pusher.blob(rng.randbytes(512 * 1024))
    groups = {}
    for n in range(tags):
        group = n // 20
        if group not in groups:
            groups[group] = pusher.blob(rng.randbytes(64 * 1024))
        own = pusher.blob(rng.randbytes(1024))
        pusher.image(f"1.{group}.{n}", [base, groups[group], own])


def upstream_since(upstream, offset):
    """(requests, GETs, bytes sent) in the upstream's access log after byte ``offset``."""
    with open(upstream.access_log, "rb") as f:
        f.seek(offset)
        text = f.read().decode("latin-1")
    requests = gets = sent = 0
    for method, _, _, size in _ACCESS.findall(text):
        requests += 1
        gets += method == "GET"
        # docker-registry logs a HEAD with the size it would have sent: only GET bodies count.
        sent += 0 if size == "-" or method != "GET" else int(size)
    return requests, gets, sent


def settle(upstream):
    """docker-registry logs a request once its body is sent: wait until the log stops growing."""
    size = -1
    while upstream.log_size() != size:
        size = upstream.log_size()
        time.sleep(0.2)
    return size


def timed(cmd, env=None, timeout=1800):
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited with {done.returncode}: {done.stderr[-2000:]}")
    return elapsed, done.stdout


def registryd_command():
    found = os.path.join(os.path.dirname(sys.executable), "registryd")
    return found if os.access(found, os.X_OK) else shutil.which("registryd") or "registryd"


def run_registryd(workdir, upstream, concurrency):
    data = os.path.join(workdir, "registryd-data")
    os.makedirs(data)
    config = os.path.join(workdir, "registryd.toml")
    with open(config, "w") as f:
        f.write(f'data_dir = "{data}"\n[[upstream]]\nnamespace = "{NS}"\nurl = "http://{upstream.hostport}"\n'
                f'[[sync]]\nname = "bench"\nupstream = "{NS}"\nrepositories = ["{REPO}"]\n'
                f"concurrency = {concurrency}\n")
    figures = {}
    for phase in ("cold", "warm"):
        offset = settle(upstream)
        elapsed, out = timed([registryd_command(), "sync", "--now", "bench", "-c", config, "--json"])
        report = json.loads(out)
        if report["errors"]:
            raise RuntimeError(f"registryd sync reported errors: {report['messages']}")
        settle(upstream)
        requests, gets, sent = upstream_since(upstream, offset)
        figures.update({f"{phase}_wall_s": elapsed, f"{phase}_upstream_requests": requests,
                        f"{phase}_upstream_gets": gets})
        if phase == "cold":
            figures["cold_upstream_MiB"] = sent / (1 << 20)
            figures["cold_images"] = report["images"]
    return figures


def run_skopeo(workdir, upstream, reference_binary):
    dest = DockerRegistry("skopeo-dest", workdir, reference_binary)
    dest.start()
    try:
        dest.wait_ready(30)
        policy = os.path.join(workdir, "policy.json")
        with open(policy, "w") as f:
            json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir,
               "XDG_RUNTIME_DIR": workdir, "REGISTRY_AUTH_FILE": os.path.join(workdir, "auth.json")}
        with open(env["REGISTRY_AUTH_FILE"], "w") as f:
            json.dump({"auths": {}}, f)
        figures = {}
        for phase in ("cold", "warm"):
            offset = settle(upstream)
            elapsed, _ = timed(["skopeo", "--policy", policy, "sync", "--src", "docker", "--dest", "docker",
                                "--src-tls-verify=false", "--dest-tls-verify=false",
                                f"{upstream.hostport}/{REPO}", f"{dest.hostport}/{REPO.rsplit('/', 1)[0]}"], env=env)
            settle(upstream)
            requests, gets, sent = upstream_since(upstream, offset)
            figures.update({f"{phase}_wall_s": elapsed, f"{phase}_upstream_requests": requests,
                            f"{phase}_upstream_gets": gets})
            if phase == "cold":
                figures["cold_upstream_MiB"] = sent / (1 << 20)
        return figures
    finally:
        dest.stop()


KEYS = ("cold_wall_s", "warm_wall_s", "cold_upstream_requests", "warm_upstream_requests", "cold_upstream_gets",
        "warm_upstream_gets", "cold_upstream_MiB")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 tags instead of 200 (a CI smoke test)")
    ap.add_argument("--tags", type=int, default=None, help="tags in the repository (default 200, quick 40)")
    ap.add_argument("--concurrency", type=int, default=2, help="the job's images at once (its default: 2)")
    ap.add_argument("--reference", default=DEFAULT_REFERENCE, help="the docker-registry binary")
    ap.add_argument("--output", help="write the figures as JSON here")
    ap.add_argument("--keep-temp", action="store_true")
    args = ap.parse_args(argv)
    tags = args.tags or (40 if args.quick else 200)
    workdir = tempfile.mkdtemp(prefix="bench-sync-")
    upstream = DockerRegistry("upstream", workdir, args.reference)
    result = {"tags": tags, "concurrency": args.concurrency, "registryd": {}, "skopeo": {}, "errors": {}}
    try:
        upstream.start()
        upstream.wait_ready(30)
        log(f"seeding {tags} tags into {REPO}")
        seed(upstream.port, tags)
        for side, run in (("registryd", lambda: run_registryd(workdir, upstream, args.concurrency)),
                          ("skopeo", lambda: run_skopeo(workdir, upstream, args.reference))):
            log(f"{side}: cold and warm sync")
            try:
                result[side] = run()
            except Exception as e:      # one side failing still shows the other
                result["errors"][side] = str(e)
                log(f"{side} FAILED: {e}")
    finally:
        upstream.stop()
        if not args.keep_temp:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nsync of {tags} tags sharing layers ({REPO}), registryd job concurrency {args.concurrency}")
    head = f"{'figure':<26} {'registryd':>11} {'skopeo':>11} {'ratio':>7}  (ratio = registryd / skopeo; lower is better)"
    print(head)
    print("-" * len(head))
    for key in KEYS:
        ours, theirs = result["registryd"].get(key), result["skopeo"].get(key)
        ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "-"
        print(f"{key:<26} {fmt(ours) if ours is not None else 'FAILED':>11} "
              f"{fmt(theirs) if theirs is not None else 'FAILED':>11} {ratio:>7}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    complete = all(key in result[side] for side in ("registryd", "skopeo") for key in KEYS)
    if complete and result["registryd"].get("cold_images") != tags:
        result["errors"]["registryd"] = f"copied {result['registryd'].get('cold_images')} of {tags} images"
        complete = False
    return 0 if complete and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
