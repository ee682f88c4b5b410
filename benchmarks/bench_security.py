#!/usr/bin/env python3
"""Side-by-side security benchmark: registryd against the reference registry,
both serving TLS with Basic authentication from the same htpasswd file.

Starts registryd (``twistd -n registryd --config CONF``, a ``[[listen]]`` TLS
listener, ``[auth] htpasswd``, one ``[[access]]`` rule for the bench user) and
the reference registry (Debian's ``docker-registry``, CNCF distribution 2.8,
with ``http.tls.certificate/key`` and ``auth.htpasswd.realm/path``) on
loopback, each on a free port with its own temporary storage, with the SAME
certificate and key (a throw-away EC P-256 CA and server certificate made
with ``openssl``) and the SAME htpasswd file (bcrypt, made with
``registryd htpasswd``). Every request of the load generators carries
``Authorization: Basic ...``.

Figures
  tls_blob_get_256M_c{1,8}_MBps        wrk GET https://.../blobs/<256 MiB blob>, Basic auth on every
                                       request, at concurrency 1 and 8, MB/s
  tls_manifest_get_auth_c32_rps        hey GET https://.../manifests/<tag>, Basic auth on every request,
                                       32 concurrent clients, requests/s (+ p99 ms)
  rss_idle_MiB, rss_peak_MiB           server VmRSS after start, VmHWM at the end

wrk does not verify certificates; hey skips verification. The setup (pushes
and the readiness check) verifies the server against the test CA.

--quick uses a 32 MiB blob and 2 s load runs: a smoke test of well under a minute.

Only the stdlib is used (plus bench_core.py next to this file), and openssl,
wrk, hey, docker-registry and registryd's own ``registryd htpasswd`` (next to
the Python running this) on PATH. Loopback only.
"""
import argparse
import base64
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import startup  # noqa: E402  (results path and file, SIGTERM)
from bench_core import (  # noqa: E402  (the core benchmark: servers, runner, report)
    DEFAULT_REFERENCE, REPO, Server, add_ratio, find_twistd, fmt, log, print_table, run_group, tail,
)

PHASES = ("blobget", "auth")
SERVERS = ("registryd", "reference")
SETTINGS = {
    "full": {"blob_mib": 256, "seconds": 10},
    "quick": {"blob_mib": 32, "seconds": 2},
}
USER = "bench"
REPO_NAME = "bench/secure"
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
CONCURRENCY = (1, 8)
HEY_CLIENTS = 32


# --------------------------------------------------------------------------
# PKI and users


def make_pki(directory):
    """A CA and a server certificate for 127.0.0.1/localhost (EC P-256), with
    openssl. Returns (ca.crt, server.crt, server.key)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise SystemExit("openssl is needed (apt-get install openssl)")
    ca_key, ca_crt = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.crt")
    key, csr, crt = (os.path.join(directory, n) for n in ("server.key", "server.csr", "server.crt"))
    ext = os.path.join(directory, "server.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for cmd in (
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "2",
         "-subj", "/CN=bench_security CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
         "-out", crt, "-days", "2", "-sha256", "-extfile", ext],
    ):
        rc, out, err = run_group(cmd, 60)
        if rc != 0:
            raise SystemExit(f"{' '.join(cmd[:3])} failed: {err.strip()}")
    return ca_crt, crt, key


def find_registryd_cli():
    cand = os.path.join(os.path.dirname(sys.executable), "registryd")
    if os.access(cand, os.X_OK):
        return cand
    return shutil.which("registryd")


def make_htpasswd(path, user, password, cost):
    """The htpasswd file both servers read, written by ``registryd htpasswd``."""
    cli = find_registryd_cli()
    if not cli:
        raise SystemExit("registryd (the admin command) not found next to this Python or on PATH")
    proc = subprocess.run([cli, "htpasswd", "--password-stdin", "--cost", str(cost), path, user],
                          input=password + "\n", capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"registryd htpasswd failed: {proc.stderr.strip()}")
    # docker-registry runs from its own directory; make sure it may read the file
    os.chmod(path, 0o644)


# --------------------------------------------------------------------------
# Servers


class TLSServer(Server):
    """A server that answers https://127.0.0.1:PORT/v2/ with Basic auth."""

    def __init__(self, name, workdir, ca, authorization):
        super().__init__(name, workdir)
        self.ca = ca
        self.authorization = authorization

    @property
    def base(self):
        return f"https://127.0.0.1:{self.port}"

    def connection(self, timeout=120):
        context = ssl.create_default_context(cafile=self.ca)
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=context)

    def wait_ready(self, timeout):
        t0 = time.monotonic()
        last = "no answer"
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before answering GET /v2/")
            try:
                c = self.connection(timeout=2)
                c.request("GET", "/v2/", headers={"Authorization": self.authorization})
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return time.monotonic() - t0
                last = f"GET /v2/ answered {r.status}"
            except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                last = f"GET /v2/: {e}"
            time.sleep(0.1)
        raise RuntimeError(f"not ready after {timeout} s ({last})")


class RegistrydTLS(TLSServer):
    def __init__(self, workdir, twistd, ca, cert, key, htpasswd, authorization):
        super().__init__("registryd", workdir, ca, authorization)
        self.config = os.path.join(self.dir, "registryd.toml")
        with open(self.config, "w") as f:
            f.write(f'data_dir = "{self.data}"\n'
                    "[[listen]]\n"
                    f'endpoint = "tcp:{self.port}:interface=127.0.0.1"\n'
                    f'tls_cert = "{cert}"\n'
                    f'tls_key = "{key}"\n'
                    "[auth]\n"
                    f'htpasswd = "{htpasswd}"\n'
                    "[[access]]\n"
                    f'users = ["{USER}"]\n'
                    'repositories = ["**"]\n'
                    'actions = ["pull", "push", "delete"]\n')
        self.cwd = REPO
        self.cmd = [twistd, "-n", "--pidfile=", "registryd", "--config", self.config]


class ReferenceTLS(TLSServer):
    def __init__(self, workdir, binary, ca, cert, key, htpasswd, authorization):
        super().__init__("reference", workdir, ca, authorization)
        self.config = os.path.join(self.dir, "config.yml")
        with open(self.config, "w") as f:
            f.write("version: 0.1\n"
                    "log:\n"
                    "  level: error\n"
                    "storage:\n"
                    "  filesystem:\n"
                    f"    rootdirectory: {self.data}\n"
                    "  delete:\n"
                    "    enabled: true\n"
                    "http:\n"
                    f"  addr: 127.0.0.1:{self.port}\n"
                    "  tls:\n"
                    f"    certificate: {cert}\n"
                    f"    key: {key}\n"
                    "auth:\n"
                    "  htpasswd:\n"
                    "    realm: registryd-bench\n"
                    f"    path: {htpasswd}\n")
        self.cwd = self.dir
        self.cmd = [binary, "serve", self.config]


# --------------------------------------------------------------------------
# Setup (stdlib HTTPS client, verifying the test CA)


def request(server, method, path, body=None, headers=None, expect=(200,)):
    c = server.connection()
    try:
        c.request(method, path, body=body, headers={"Authorization": server.authorization, **(headers or {})})
        r = c.getresponse()
        data = r.read()
        if r.status not in expect:
            raise RuntimeError(f"{method} {path}: {r.status} {data[:200]!r}")
        return r, data
    finally:
        c.close()


def push_blob(server, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r, _ = request(server, "POST", f"/v2/{repo}/blobs/uploads/", body=b"", expect=(202,))
    location = r.getheader("Location")
    if location.startswith("http"):
        location = "/" + location.split("/", 3)[3]
    separator = "&" if "?" in location else "?"
    request(server, "PUT", f"{location}{separator}digest={digest}", body=data,
            headers={"Content-Type": "application/octet-stream"}, expect=(201,))
    return digest


def setup_content(server, blob):
    """The big blob (None: not needed), and a small image whose manifest hey
    asks for by tag."""
    if blob is None:
        return {"blob": None, "manifest_tag": _push_small_image(server)}
    big = push_blob(server, REPO_NAME, blob)
    tag = _push_small_image(server)
    # read back once, verified, before any load
    _, data = request(server, "GET", f"/v2/{REPO_NAME}/blobs/{big}")
    if hashlib.sha256(data).hexdigest() != big.split(":")[1]:
        raise RuntimeError("the big blob came back with other bytes")
    return {"blob": big, "manifest_tag": tag}


def _push_small_image(server):
    layer = push_blob(server, REPO_NAME, os.urandom(1024))
    config = push_blob(server, REPO_NAME, b"{}")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1024}],
    }).encode()
    request(server, "PUT", f"/v2/{REPO_NAME}/manifests/latest", body=manifest,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, expect=(201,))
    return "latest"


# --------------------------------------------------------------------------
# Load generators


def wrk(url, conns, seconds, authorization):
    cmd = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{seconds}s",
           "-H", f"Authorization: {authorization}", url]
    rc, out, err = run_group(cmd, seconds + 120)
    if rc != 0:
        return {"error": f"wrk exit status {rc}: {(err or out).strip()[-300:]}"}
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    reqs = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if not m or not reqs:
        return {"error": f"cannot read wrk's output: {out.strip()[-300:]}"}
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1, "GB": 1e3}[m.group(2)]
    # MiB-based, as regbench.py (and so bench_core.py) reports it
    figure = {"value": round(float(m.group(1)) * scale * 1.048576, 1), "requests_per_s": float(reqs.group(1)),
              "non2xx": int(non2xx.group(1)) if non2xx else 0}
    if socket_errors:
        figure["socket_errors"] = socket_errors.group(1).strip()
    if figure["non2xx"] or not figure["requests_per_s"]:
        figure["error"] = f"{figure['non2xx']} non-2xx responses, {figure['requests_per_s']} req/s"
    return figure


def hey(url, seconds, authorization, accept):
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(HEY_CLIENTS), "-H", f"Authorization: {authorization}",
           "-H", f"Accept: {accept}", url]
    rc, out, err = run_group(cmd, seconds + 120)
    if rc != 0:
        return {"error": f"hey exit status {rc}: {(err or out).strip()[-300:]}"}, {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    codes = {k: int(v) for k, v in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = re.search(r"Error distribution:(.*)", out, re.S)
    figure = {"value": float(rps.group(1)) if rps else None, "codes": codes}
    latency = {"value": round(float(p99.group(1)) * 1000, 1) if p99 else None}
    slowest = re.search(r"Slowest:\s+([\d.]+) secs", out)
    if p99 is None and slowest and sum(codes.values()) < 100:
        # hey prints no 99th percentile under 100 responses: the slowest is the best estimate
        latency = {"value": round(float(slowest.group(1)) * 1000, 1),
                   "source": f"slowest of {sum(codes.values())} responses (hey prints no p99 under 100)"}
    bad = sum(v for k, v in codes.items() if k != "200")
    if bad or not codes or errors:
        figure["error"] = latency["error"] = (f"non-200 responses: {codes}"
                                              + (f"; {errors.group(1).strip()[:200]}" if errors else ""))
    return figure, latency


# --------------------------------------------------------------------------
# Report


def keys_of(args):
    keys = ["rss_idle_MiB"]
    if "blobget" in args.phases:
        keys += [f"tls_blob_get_{args.blob_mib}M_c{c}_MBps" for c in CONCURRENCY]
    if "auth" in args.phases:
        keys += [f"tls_manifest_get_auth_c{HEY_CLIENTS}_rps", f"tls_manifest_get_auth_c{HEY_CLIENTS}_p99_ms"]
    return keys + ["rss_peak_MiB"]


def label_of(key, args):
    for c in CONCURRENCY:
        if key == f"tls_blob_get_{args.blob_mib}M_c{c}_MBps":
            return f"TLS blob GET {args.blob_mib}M, c={c} (wrk)"
    return {
        f"tls_manifest_get_auth_c{HEY_CLIENTS}_rps": f"TLS+Basic manifest GET, c={HEY_CLIENTS} (hey)",
        f"tls_manifest_get_auth_c{HEY_CLIENTS}_p99_ms": f"TLS+Basic manifest GET, c={HEY_CLIENTS}, p99",
        "rss_idle_MiB": "server RSS idle",
        "rss_peak_MiB": "server RSS peak (VmHWM)",
    }.get(key, key)


def unit_of(key):
    for suffix, unit in (("_MBps", "MB/s"), ("_rps", "req/s"), ("_ms", "ms"), ("_MiB", "MiB"), ("_s", "s")):
        if key.endswith(suffix):
            return unit
    return ""


def compare(args, result, keys):
    rows = []
    for key in keys:
        better = "higher" if key.endswith(("_MBps", "_rps")) else "lower"
        row = {"figure": key, "label": label_of(key, args), "unit": unit_of(key), "better": better}
        for name, srv in result["servers"].items():
            f = srv["figures"].get(key)
            if f is None or f.get("value") is None or f.get("error"):
                row[name] = None
                row[f"{name}_error"] = ((f or {}).get("error") or srv.get("start_error")
                                        or next(iter(srv.get("phase_errors", {}).values()), None)
                                        or ("interrupted" if result.get("interrupted") else "not measured"))
            else:
                row[name] = f["value"]
        rows.append(add_ratio(row))
    return rows


# --------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Benchmark registryd against the reference registry over TLS with Basic auth, side by side.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PHASES), help="comma-separated subset of: blobget,auth (default: both)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: 32 MiB blob, 2 s load runs")
    ap.add_argument("--seconds", type=int, default=None, help="duration of each wrk/hey run (default 10, 2 with --quick)")
    ap.add_argument("--blob-mib", type=int, default=None, help="size of the blob wrk fetches (default 256, 32 with --quick)")
    ap.add_argument("--bcrypt-cost", type=int, default=10,
                    help="bcrypt cost of the bench user's hash (default 10, registryd htpasswd's default; "
                         "Apache htpasswd -B uses 5)")
    ap.add_argument("--output", default=None, help="JSON results file (default benchmarks/results/security-<time>.json)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="which to run: registryd,reference (default both)")
    ap.add_argument("--twistd", default=None, help="twistd to start registryd with (default: next to python)")
    ap.add_argument("--reference-bin", default=DEFAULT_REFERENCE, help=f"reference registry (default {DEFAULT_REFERENCE})")
    ap.add_argument("--start-timeout", type=float, default=30, help="seconds to wait for GET /v2/ (default 30)")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (storage, configs, PKI, logs)")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    if not args.phases or any(p not in PHASES for p in args.phases):
        ap.error(f"--only: choose from {','.join(PHASES)}")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or any(s not in SERVERS for s in args.servers):
        ap.error(f"--servers: choose from {','.join(SERVERS)}")
    mode = SETTINGS["quick" if args.quick else "full"]
    args.seconds = args.seconds if args.seconds is not None else mode["seconds"]
    args.blob_mib = args.blob_mib if args.blob_mib is not None else mode["blob_mib"]
    if args.seconds < 1 or args.blob_mib < 1:
        ap.error("--seconds and --blob-mib must be at least 1")
    if not 4 <= args.bcrypt_cost <= 31:
        ap.error("--bcrypt-cost must be between 4 and 31")
    return args


def measure(args, phase, srv, content):
    figures = {}
    if phase == "blobget":
        url = f"{srv.base}/v2/{REPO_NAME}/blobs/{content['blob']}"
        for c in CONCURRENCY:
            figures[f"tls_blob_get_{args.blob_mib}M_c{c}_MBps"] = wrk(url, c, args.seconds, srv.authorization)
    else:
        url = f"{srv.base}/v2/{REPO_NAME}/manifests/{content['manifest_tag']}"
        rps, p99 = hey(url, args.seconds, srv.authorization, MANIFEST_TYPES)
        figures[f"tls_manifest_get_auth_c{HEY_CLIENTS}_rps"] = rps
        figures[f"tls_manifest_get_auth_c{HEY_CLIENTS}_p99_ms"] = p99
    errors = [f"{k}: {v['error']}" for k, v in figures.items() if v.get("error")]
    return figures, "; ".join(errors) or None


def main(argv):
    args = parse_args(argv)
    output = startup.results_path(args.output, "security")
    startup.interrupt_on_sigterm()

    missing = [t for t in ("openssl", "wrk", "hey") if not shutil.which(t)]
    if missing:
        log(f"warning: not on PATH: {', '.join(missing)}; figures that need them will fail")

    workdir = tempfile.mkdtemp(prefix="bench-security-")
    pki_dir = os.path.join(workdir, "pki")
    os.makedirs(pki_dir)
    password = secrets.token_urlsafe(18)
    authorization = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
    result = {
        "benchmark": "security",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "params": {"quick": args.quick, "seconds": args.seconds, "phases": args.phases, "blob_MiB": args.blob_mib,
                   "bcrypt_cost": args.bcrypt_cost, "hey_clients": HEY_CLIENTS, "wrk_connections": list(CONCURRENCY),
                   "certificate": "EC P-256 server certificate from a throw-away CA (openssl), same for both",
                   "auth": "Basic on every request, one htpasswd file (registryd htpasswd) for both"},
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "servers": {},
    }
    servers = {}
    interrupted = False
    try:
        ca, cert, key = make_pki(pki_dir)
        htpasswd = os.path.join(workdir, "htpasswd")
        make_htpasswd(htpasswd, USER, password, args.bcrypt_cost)
        if "registryd" in args.servers:
            servers["registryd"] = RegistrydTLS(workdir, args.twistd or find_twistd(), ca, cert, key, htpasswd,
                                                authorization)
        if "reference" in args.servers:
            servers["reference"] = ReferenceTLS(workdir, args.reference_bin, ca, cert, key, htpasswd,
                                                authorization)
        for name, srv in servers.items():
            info = result["servers"][name] = {"cmd": srv.cmd, "port": srv.port, "figures": {}, "phase_errors": {},
                                             "memory_after": {}}
            if name == "reference":
                rc, out, err = run_group([args.reference_bin, "--version"], 10)
                info["version"] = (out or err or "").strip()
            log(f"starting {name} on https://{srv.hostport}: {' '.join(srv.cmd)}")
            try:
                srv.start()
            except OSError as e:
                info["start_error"] = f"cannot start: {e}"
        for name, srv in servers.items():
            info = result["servers"][name]
            if "start_error" in info:
                continue
            try:
                info["ready_s"] = round(srv.wait_ready(args.start_timeout), 2)
                log(f"{name} ready in {info['ready_s']} s")
            except RuntimeError as e:
                info["start_error"] = str(e)
                info["log_tail"] = tail(srv.log_path)
                log(f"{name} FAILED to start: {e}")
                srv.stop()
        time.sleep(1)
        for name, srv in servers.items():
            info = result["servers"][name]
            if srv.alive():
                mem = srv.memory()
                info["figures"]["rss_idle_MiB"] = {"value": mem.get("VmRSS"), "pid": srv.proc.pid}
                info["memory_after"]["idle"] = mem

        blob = os.urandom(args.blob_mib << 20) if "blobget" in args.phases else None
        content = {}
        for name, srv in servers.items():
            info = result["servers"][name]
            if not srv.alive():
                continue
            log(f"{name}: pushing {f'a {args.blob_mib} MiB blob and ' if blob else ''}a small image over TLS ...")
            t0 = time.monotonic()
            try:
                content[name] = setup_content(srv, blob)
                info["setup_s"] = round(time.monotonic() - t0, 2)
            except (OSError, ssl.SSLError, http.client.HTTPException, RuntimeError) as e:
                info["start_error"] = f"setup failed: {e}"
                info["log_tail"] = tail(srv.log_path)
                log(f"{name}: setup FAILED: {e}")
        del blob

        order = list(servers)
        for i, phase in enumerate(args.phases):
            for name in (order if i % 2 == 0 else order[::-1]):
                srv, info = servers[name], result["servers"][name]
                if name not in content or "start_error" in info:
                    continue
                if not srv.alive():
                    info["phase_errors"][phase] = f"server exited with status {srv.proc.returncode}"
                    info.setdefault("log_tail", tail(srv.log_path))
                    continue
                log(f"{name}: {phase} ...")
                figures, error = measure(args, phase, srv, content[name])
                info["figures"].update(figures)
                if error:
                    info["phase_errors"][phase] = error
                    info.setdefault("log_tail", tail(srv.log_path))
                info["memory_after"][phase] = srv.memory()
                shown = ", ".join(f"{k}={fmt(v.get('value'))}" for k, v in figures.items())
                log(f"{name}: {phase}: {shown}" + (f"  ERROR: {error}" if error else ""))
        for name, srv in servers.items():
            if srv.alive():
                result["servers"][name]["figures"]["rss_peak_MiB"] = {"value": srv.memory().get("VmHWM")}
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping servers")
    finally:
        for name, srv in servers.items():
            srv.stop()
            info = result["servers"].get(name)
            if info is not None and srv.proc is not None:
                info["exit_status"] = srv.proc.returncode
        if args.keep_temp:
            log(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["interrupted"] = interrupted
    result["comparison"] = compare(args, result, keys_of(args))
    print_table(result["comparison"], list(result["servers"]))
    startup.write_results(output, result)
    if interrupted:
        return 130
    complete = all(r.get(s) is not None for r in result["comparison"] for s in result["servers"])
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
