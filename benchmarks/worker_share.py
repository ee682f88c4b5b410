#!/usr/bin/env python3
"""How a node's workers share a load: connections and CPU per worker under wrk or hey.

Starts registryd with ``[server] workers = 2`` on a free loopback port, pushes one
small manifest, runs ``wrk -c8`` (or ``hey -c32``) on GET of it by tag, and prints
req/s, each worker's CPU seconds, the busiest worker's share of the CPU, and how
many of the client's connections each worker holds (``ss``, half-way through).
With one accept queue shared by the workers a burst could land on one worker
(share 100%); with a socket per worker (SO_REUSEPORT) the split is the kernel's
hash of each connection: Binomial(c, 1/2).

    worker_share.py [--tree DIR] [--seconds N] [--tool wrk|hey]

``--tree``: the registryd source tree to run (default this one), e.g. a
``git worktree`` of an older commit, to compare before and after.
"""
import argparse
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=REPO)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--tool", choices=("wrk", "hey"), default="wrk")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "registryd.toml")
    with open(config, "w") as f:
        f.write(f'listen = ["tcp:{port}:interface=127.0.0.1"]\ndata_dir = "{tmp}/data"\n[server]\nworkers = 2\n')
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    node = subprocess.Popen([twistd, "-n", "--pidfile=", "registryd", "-c", config], cwd=args.tree,
                            env={**os.environ, "PYTHONPATH": args.tree},
                            stdout=open(os.path.join(tmp, "log"), "w"), stderr=subprocess.STDOUT)
    try:
        report = measure(node, port, args)
    finally:
        node.terminate()
        node.wait(60)
    print(f"{os.path.basename(os.path.abspath(args.tree))}: {report}")


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body, headers or {})
    status = conn.getresponse().status
    conn.close()
    return status


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(node: subprocess.Popen, port: int, args: argparse.Namespace) -> str:
    for _ in range(600):
        try:
            if request(port, "GET", "/v2/") == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    blob = b'{"architecture":"amd64","os":"linux"}'
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert request(port, "POST", f"/v2/share/app/blobs/uploads/?digest={digest}", blob) == 201
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "layers": [], "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": len(blob)}}).encode()
    assert request(port, "PUT", "/v2/share/app/manifests/latest", manifest, {"Content-Type": MANIFEST}) == 201
    time.sleep(2)
    with open(f"/proc/{node.pid}/task/{node.pid}/children") as f:
        workers = sorted(int(pid) for pid in f.read().split())
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.splitlines()
    before = [cpu_seconds(pid) for pid in workers]
    url = f"http://127.0.0.1:{port}/v2/share/app/manifests/latest"
    load = (["wrk", "-t2", "-c8", f"-d{args.seconds}s"] if args.tool == "wrk"
            else ["hey", "-z", f"{args.seconds}s", "-c", "32"])
    client = subprocess.Popen([*load, "-H", f"Accept: {MANIFEST}", url], stdout=subprocess.PIPE, text=True)
    time.sleep(args.seconds / 2)
    held = subprocess.run(["ss", "-tnpH", "state", "established", f"sport = :{port}"],
                          capture_output=True, text=True).stdout.splitlines()
    connections = [sum(f"pid={pid}," in line for line in held) for pid in workers]
    output = client.communicate()[0]
    used = [cpu_seconds(pid) - start for pid, start in zip(workers, before)]
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    rps = float(found.group(1)) if found else float("nan")
    return (f"{len(listening)} listening socket(s); {args.tool} {rps:.0f} req/s; worker CPU s "
            f"{', '.join(f'{u:.1f}' for u in used)} (busiest {max(used) / max(sum(used), 1e-9):.0%}); "
            f"connections per worker {connections}")


if __name__ == "__main__":
    main()
