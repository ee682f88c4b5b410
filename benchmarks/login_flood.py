#!/usr/bin/env python3
"""How long a 1 KiB push takes while a flood of wrong passwords arrives.

Starts registryd (``twistd -n registryd``, from ``--root``: compare two
checkouts with the same interpreter) with one htpasswd user at bcrypt cost
``--cost``, then, from 127.0.0.2, pushes a 1 KiB layer, its config and a
manifest with that user's right password, sent on every request as docker
does; first alone, then while ``--flood`` logins with wrong passwords
keep arriving from ``--flood`` clients at 127.0.0.1 (``--from one``) or
at as many loopback addresses (``--from many``), and then as a second user who logs in for
the first time during the flood. Prints one JSON line.

    .venv/bin/python benchmarks/login_flood.py
    .venv/bin/python benchmarks/login_flood.py --root /tmp/old-checkout --from many
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import bcrypt

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"",
            source: str = "127.0.0.1") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(source, 0))
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def push(port: int, password: str, seed: str, user: str = "ci") -> float:
    """A 1 KiB layer, a config and a manifest, each request with Basic credentials."""
    auth = basic(user, password)
    start = time.monotonic()
    blobs = []
    for data in (hashlib.sha512(seed.encode()).digest() * 16, json.dumps({"seed": seed}).encode()):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status = request(port, "POST", f"/v2/team/app/blobs/uploads/?digest={digest}",
                         {**auth, "Content-Type": "application/octet-stream"}, data, source="127.0.0.2")
        assert status == 201, status
        blobs.append((digest, len(data)))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[1][0], "size": blobs[1][1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blobs[0][0], "size": blobs[0][1]}],
    }).encode()
    status = request(port, "PUT", f"/v2/team/app/manifests/{seed}",
                     {**auth, "Content-Type": "application/vnd.oci.image.manifest.v1+json"}, manifest,
                     source="127.0.0.2")
    assert status == 201, status
    return time.monotonic() - start


def flood(port: int, count: int, many: bool, statuses: list[int], stop: threading.Event,
          anonymous: bool = False) -> list[threading.Thread]:
    """``count`` clients sending wrong passwords one after another until ``stop``."""
    def one(index: int) -> None:
        source = f"127.0.{1 + index // 240}.{10 + index % 240}" if many else "127.0.0.1"
        # One kept-alive connection per client, as a login-guessing tool
        # would: what is measured is the logins, not a connection flood.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(source, 0))
        attempt = 0
        while not stop.is_set():
            attempt += 1
            try:
                connection.request("GET", "/v2/", headers={} if anonymous else basic("ci", f"wrong-{index}-{attempt}"))
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
            except (OSError, http.client.HTTPException):
                statuses.append(-1)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120,
                                                        source_address=(source, 0))
        connection.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.dirname(HERE), help="the registryd source tree to run")
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--from", dest="source", choices=["one", "many"], default="one")
    parser.add_argument("--cost", type=int, default=10)
    parser.add_argument("--anonymous", action="store_true",
                        help="the flood sends no credentials: the same request load without logins")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of flood before the pushes")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="login-flood-")
    password = "ci-Right-Password-1"
    with open(os.path.join(work, "htpasswd"), "w") as f:
        for user in ("ci", "dev"):
            f.write(f"{user}:" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(args.cost)).decode() + "\n")
    port = free_port()
    with open(os.path.join(work, "registryd.toml"), "w") as f:
        f.write(f'listen = ["tcp:{port}:interface=127.0.0.1"]\ndata_dir = "{work}/data"\n'
                f'[auth]\nhtpasswd = "{work}/htpasswd"\n')
    boot = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from twisted.scripts.twistd import run; "
            "sys.argv[0] = 'twistd'; run()")
    log = open(os.path.join(work, "twistd.log"), "wb")
    server = subprocess.Popen([sys.executable, "-c", boot, args.root, "-n", "--pidfile=", "registryd",
                               "--config", os.path.join(work, "registryd.toml")],
                              stdout=log, stderr=subprocess.STDOUT, cwd=args.root)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"registryd did not start; see {work}/twistd.log")
                time.sleep(0.1)
        quiet = push(port, password, "quiet")
        statuses: list[int] = []
        stop = threading.Event()
        threads = flood(port, args.flood, args.source == "many", statuses, stop, args.anonymous)
        time.sleep(args.warmup)
        try:
            busy = push(port, password, "busy")
            fresh = push(port, password, "fresh", user="dev")   # a first login during the flood
        finally:
            stop.set()
        for thread in threads:
            thread.join(120)
        counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
        print(json.dumps({"root": args.root, "flood": args.flood, "from": args.source, "cost": args.cost,
                          "flood_sends": "no credentials" if args.anonymous else "wrong passwords",
                          "push_alone_s": round(quiet, 3), "push_during_flood_s": round(busy, 3),
                          "first_login_push_during_flood_s": round(fresh, 3),
                          "flood_statuses": counts}))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
