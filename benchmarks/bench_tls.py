#!/usr/bin/env python3
"""Hot paths side by side: registryd, the reference registry and nginx, in one run.

Starts, each on free loopback ports with its own temporary storage:
  * registryd (``twistd -n registryd``) with a plain and a TLS listener;
  * the reference registry (Debian's ``docker-registry``), one process on plain
    HTTP and one with TLS, over the same storage folder;
  * nginx, plain and TLS, serving the same blob as a static file: the ceiling.
The TLS certificate is a throw-away self-signed one made with ``openssl``.

Figures (wrk and hey on loopback; the order of the servers alternates per phase)
  tls_blob_get_{N}M_c{1,8}_MBps   TLS GET of one N MiB blob (256, 32 with --quick), MB/s
  tls_blob_get_{N}M_c{1,8}_cpu_s_per_GB
                                  CPU seconds the server's processes used per GB sent in that run
                                  (user + system, every process of its tree): steadier than MB/s
                                  on a machine that others load too
  blob_get_{N}M_c{1,8}_MBps       the same over plain HTTP (and _cpu_s_per_GB)
  blob_get_{N}M_c{1,8}_lean_MBps  plain GETs by lean_client.py, which reads 1 MiB per recv: what the
                                  server sends when the client is not the limit (wrk reads 8 KiB
                                  per read(2), and on 2 cores its own CPU caps nginx too)
  manifest_get_tag_c32_rps        GET of a manifest by tag, 32 clients, req/s (+ _p99_ms); nginx has none
  push_big_s, push_many_s         (phase push, not run by default) bench_core's skopeo pushes, s; nginx has none
  rss_idle_MiB, rss_peak_MiB      the server's RSS before any traffic and its peak (VmHWM) at the end

``--servers`` may add ``registryd-containerd``: registryd with ``[storage]
driver = "containerd"`` over a private containerd it starts (as root; blobs
sent from containerd's files, or with ``--containerd-stream`` through its
content service); the rows then show it against the reference and against
registryd on its filesystem store. For the containerd comparison in one run:
``--servers registryd,registryd-containerd,reference --only tls,plain,push``.

Each row shows how many times better registryd is than the reference and
than nginx (and registryd-containerd than the reference and than registryd).
The exit status is 0 only if every figure was measured for every server that has it.

Only the stdlib, plus wrk, hey, openssl, docker-registry and nginx on PATH.
"""
import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "tools"))
import bench_core as core  # noqa: E402  (servers, process groups, formatting, the push phase)
import regbench  # noqa: E402  (push_blob, MANIFEST_TYPES)
import startup  # noqa: E402  (results path and file, SIGTERM)
import report  # noqa: E402  (the one table printer)
from lean_client import lean_get  # noqa: E402

SERVERS = ("registryd", "reference", "nginx", "registryd-containerd")
DEFAULT_SERVERS = ("registryd", "reference", "nginx")
PHASES = ("tls", "plain", "manifest", "push")
DEFAULT_PHASES = ("tls", "plain", "manifest")
FULL_BLOB_MIB = 256
QUICK_BLOB_MIB = 32
DEFAULT_NGINX = "/usr/sbin/nginx"


# --------------------------------------------------------------------------
# Servers


def make_certificate(folder):
    """A self-signed EC P-256 certificate for 127.0.0.1: (cert path, key path)."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    os.chmod(key, 0o644)   # nginx's workers may run as another user
    return cert, key


class Registryd(core.Server):
    def __init__(self, workdir, twistd, cert, key, extra, workers=None):
        super().__init__("registryd", workdir)
        self.tls_port = core.free_port()
        self.cwd = core.REPO
        self.env = core.registryd_environment()
        self.cmd = [twistd, "-n", "--pidfile=", "registryd",
                    "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                    "--listen", f"tls:{self.tls_port}:interface=127.0.0.1:cert={cert}:key={key}",
                    "--data-dir", self.data, *extra]
        if workers is not None:
            config = os.path.join(self.dir, "registryd.toml")
            with open(config, "w") as f:
                f.write(f"[server]\nworkers = {workers}\n")
            self.cmd += ["--config", config]


class RegistrydContainerd(core.RegistrydContainerd):
    """bench_core's registryd over a private containerd, with a TLS listener too."""

    def __init__(self, workdir, twistd, containerd, stream, cert, key, workers=None):
        super().__init__(workdir, twistd, containerd, stream)
        self.tls_port = core.free_port()
        self.cmd += ["--listen", f"tls:{self.tls_port}:interface=127.0.0.1:cert={cert}:key={key}"]
        if workers is not None:
            with open(os.path.join(self.dir, "registryd.toml"), "a") as f:
                f.write(f"[server]\nworkers = {workers}\n")


class Reference(core.Server):
    """docker-registry on plain HTTP and, in a second process over the same storage, on TLS."""

    def __init__(self, workdir, binary, cert, key):
        super().__init__("reference", workdir)
        self.tls_port = core.free_port()
        self.cwd = self.dir
        self.cmd = [binary, "serve", self._config("plain.yml", self.port)]
        self.tls_cmd = [binary, "serve", self._config("tls.yml", self.tls_port, cert, key)]
        self.tls_proc = None

    def _config(self, name, port, cert=None, key=None):
        path = os.path.join(self.dir, name)
        tls = f"  tls:\n    certificate: {cert}\n    key: {key}\n" if cert else ""
        with open(path, "w") as f:
            f.write("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self.data}\n  delete:\n    enabled: true\n"
                    f"http:\n  addr: 127.0.0.1:{port}\n{tls}")
        return path

    def start(self):
        super().start()
        self.tls_proc = subprocess.Popen(self.tls_cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd, start_new_session=True)

    def memory(self):
        """The TLS process's: it serves the heaviest figures."""
        alive = self.tls_proc is not None and self.tls_proc.poll() is None
        return core.read_status(self.tls_proc.pid) if alive else {}

    def alive(self):
        return super().alive() and self.tls_proc is not None and self.tls_proc.poll() is None

    def stop(self):
        if self.tls_proc is not None and self.tls_proc.poll() is None:
            self.tls_proc.terminate()
            try:
                self.tls_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.tls_proc.kill()
                self.tls_proc.wait()
        super().stop()


class Nginx(core.Server):
    """nginx with a private config, pid and logs, serving ``root`` plain and over TLS."""

    def __init__(self, workdir, binary, cert, key):
        super().__init__("nginx", workdir)
        self.tls_port = core.free_port()
        self.root = os.path.join(self.dir, "www")
        os.makedirs(self.root)
        for folder in (workdir, self.dir, self.root):
            os.chmod(folder, 0o755)    # its workers may run as another user
        config = os.path.join(self.dir, "nginx.conf")
        temp = os.path.join(self.dir, "temp")
        with open(config, "w") as f:
            f.write(f"""daemon off;
worker_processes auto;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{ listen 127.0.0.1:{self.port}; root {self.root}; }}
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {self.root};
    }}
}}
""")
        os.makedirs(temp)
        self.cwd = self.dir
        self.cmd = [binary, "-p", self.dir, "-c", config, "-e", os.path.join(self.dir, "error.log")]

    def wait_ready(self, timeout):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), 1).close()
                return time.monotonic() - t0
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"not listening after {timeout} s")

    def memory(self):
        """The master and its workers together."""
        if not self.alive():
            return {}
        total = {"VmRSS": 0.0, "VmHWM": 0.0}
        for pid in [self.proc.pid] + _children(self.proc.pid):
            for k, v in core.read_status(pid).items():
                total[k] += v
        return {k: round(v, 1) for k, v in total.items()}


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def negotiated(port):
    """The TLS version and cipher a default client gets from the server on ``port``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), 5) as raw, context.wrap_socket(raw) as tls:
            name, version, _ = tls.cipher()
            return f"{version} {name}"
    except OSError as e:
        return f"no TLS: {e}"


# --------------------------------------------------------------------------
# Load


def wrk(url, conns, seconds):
    """(MB/s, requests/s, non-2xx responses, error) of one wrk run; MB are MiB-based as regbench's."""
    # A 256 MiB response on one of 8 connections takes seconds: past wrk's 2 s default
    # timeout it would count as an error and be fetched again.
    rc, out, err = core.run_group(["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{seconds}s",
                                   "--timeout", f"{seconds + 30}s", url], seconds + 60)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out or "")
    requests = re.search(r"Requests/sec:\s+([\d.]+)", out or "")
    if rc != 0 or not transfer or not requests:
        return None, None, None, f"wrk exit status {rc}: {core.summarize(err or out)}"
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1, "GB": 1e3}[transfer.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = int(bad.group(1)) if bad else 0
    rps = float(requests.group(1))
    error = None
    # A 256 MiB body on one of 8 slow connections may not finish within the run: bytes
    # read count then (check_answer proved the URL answers 200 with the whole body).
    if non2xx or not float(transfer.group(1)):
        error = f"{non2xx} non-2xx responses, {transfer.group(0)}"
    elif errors and re.search(r"read [1-9]|timeout [1-9]", errors.group(1)):
        error = f"socket errors: {errors.group(1).strip()}"
    return round(float(transfer.group(1)) * scale * 1.048576, 1), rps, non2xx, error


def cpu_seconds(pids):
    """User + system CPU seconds used so far by ``pids`` and all their descendants."""
    total = 0
    seen = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
        todo += _children(pid)
    return total / os.sysconf("SC_CLK_TCK")


def server_pids(srv, tls=True):
    """The processes serving a server's TLS or plain port (the reference serves TLS in a second process)."""
    proc = (getattr(srv, "tls_proc", None) if tls else None) or srv.proc
    return [proc.pid] if proc is not None else []


def check_answer(url, size):
    """None when a HEAD of ``url`` answers 200 with Content-Length ``size``, else what it answered."""
    scheme, _, rest = url.partition("://")
    hostport, _, path = rest.partition("/")
    host, port = hostport.rsplit(":", 1)
    if scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        c = http.client.HTTPSConnection(host, int(port), timeout=30, context=context)
    else:
        c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request("HEAD", "/" + path)
        r = c.getresponse()
        r.read()
        length = r.getheader("Content-Length")
    except OSError as e:
        return f"HEAD {url}: {e}"
    finally:
        c.close()
    if r.status != 200 or length != str(size):
        return f"HEAD {url} answered {r.status} with Content-Length {length}, not 200 with {size}"
    return None


def hey(url, seconds, accept):
    rc, out, err = core.run_group(["hey", "-z", f"{seconds}s", "-c", "32", "-H", f"Accept: {accept}", url],
                                  seconds + 60)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out or "")
    if rc != 0 or not rps:
        return None, None, f"hey exit status {rc}: {core.summarize(err or out)}"
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    codes = {k: int(v) for k, v in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    error = None if codes and set(codes) == {"200"} else f"non-200 responses: {codes}"
    return float(rps.group(1)), (round(float(p99.group(1)) * 1000, 2) if p99 else None), error


def seed(hostport, blob):
    """Push the blob and a tagged manifest (over a 1 KiB layer) over plain HTTP: the blob's digest."""
    digest = regbench.push_blob(hostport, "bench/blob", blob)
    layer = regbench.push_blob(hostport, "bench/small", os.urandom(1024))
    config = regbench.push_blob(hostport, "bench/small", b"{}")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1024}],
    }).encode()
    c = regbench.conn(hostport)
    c.request("PUT", "/v2/bench/small/manifests/latest", body=manifest,
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    r = c.getresponse()
    r.read()
    if r.status != 201:
        raise RuntimeError(f"PUT manifest: {r.status}")
    return digest


def blob_path(name, srv, digest, tls):
    port = srv.tls_port if tls else srv.port
    scheme = "https" if tls else "http"
    path = "/blob" if name == "nginx" else f"/v2/bench/blob/blobs/{digest}"
    return f"{scheme}://127.0.0.1:{port}{path}"


def measure(args, phase, name, srv, digest):
    figs = {}
    mib = args.blob_mib
    if phase in ("tls", "plain"):
        prefix = "tls_" if phase == "tls" else ""
        url = blob_path(name, srv, digest, phase == "tls")
        wrong = check_answer(url, mib << 20)
        pids = server_pids(srv, tls=phase == "tls")
        for c in (1, 8):
            before = cpu_seconds(pids)
            mbps, rps, _, error = (None, None, None, wrong) if wrong else wrk(url, c, args.seconds)
            used = cpu_seconds(pids) - before
            figs[f"{prefix}blob_get_{mib}M_c{c}_MBps"] = {"value": None if error else mbps,
                                                           "requests_per_s": rps, "error": error}
            per_gb = round(used / (mbps * args.seconds / 1000), 3) if mbps and not error else None
            figs[f"{prefix}blob_get_{mib}M_c{c}_cpu_s_per_GB"] = {"value": per_gb, "error": error}
        if phase == "plain":
            for c in (1, 8):
                mbps, finished, error = (None, None, wrong) if wrong else lean_get(url, c, args.seconds)
                figs[f"blob_get_{mib}M_c{c}_lean_MBps"] = {"value": mbps, "responses": finished, "error": error}
    elif phase == "push":
        push_args = argparse.Namespace(quick=args.quick, seconds=args.seconds, regbench_dir=core.DEFAULT_REGBENCH_DIR)
        found, error = core.measure(push_args, "push", srv)
        for key in core.expected_figures(push_args, "push"):
            fig = found.get(key) or {}
            figs[key] = {"value": None if error else fig.get("value"), "runs": fig.get("runs"),
                         "error": error or (None if fig.get("value") is not None else "not measured")}
    elif phase == "manifest" and name != "nginx":
        rps, p99, error = hey(f"http://127.0.0.1:{srv.port}/v2/bench/small/manifests/latest", args.seconds,
                              regbench.MANIFEST_TYPES)
        figs["manifest_get_tag_c32_rps"] = {"value": None if error else rps, "error": error}
        figs["manifest_get_tag_c32_p99_ms"] = {"value": None if error else p99, "error": error}
    return figs


# --------------------------------------------------------------------------
# Report


def expected(args, name):
    mib = args.blob_mib
    keys = ["rss_idle_MiB"]
    for phase in args.phases:
        if phase == "tls":
            keys += [f"tls_blob_get_{mib}M_c1_MBps", f"tls_blob_get_{mib}M_c8_MBps",
                     f"tls_blob_get_{mib}M_c1_cpu_s_per_GB", f"tls_blob_get_{mib}M_c8_cpu_s_per_GB"]
        elif phase == "plain":
            keys += [f"blob_get_{mib}M_c1_MBps", f"blob_get_{mib}M_c8_MBps",
                     f"blob_get_{mib}M_c1_cpu_s_per_GB", f"blob_get_{mib}M_c8_cpu_s_per_GB",
                     f"blob_get_{mib}M_c1_lean_MBps", f"blob_get_{mib}M_c8_lean_MBps"]
        elif phase == "push" and name != "nginx":
            keys += ["push_big_s", "push_many_s"]
        elif phase == "manifest" and name != "nginx":
            keys += ["manifest_get_tag_c32_rps", "manifest_get_tag_c32_p99_ms"]
    return keys + ["rss_peak_MiB"]


ratio = report.times


def compare(args, result):
    keys = []
    for name in SERVERS:
        keys += [k for k in expected(args, name) if k not in keys]
    rows = []
    for key in keys:
        better = core.better_of(key)
        row = {"figure": key, "unit": core.unit_of(key), "better": better}
        for name, info in result["servers"].items():
            if key not in expected(args, name):
                continue
            fig = info["figures"].get(key) or {}
            row[name] = fig.get("value")
            if row[name] is None:
                row[f"{name}_error"] = (fig.get("error") or info.get("start_error")
                                        or ("interrupted" if result.get("interrupted") else "not measured"))
        # How many times better registryd is (above 1: registryd wins), whichever way is better.
        row["vs_reference"] = ratio(row.get("registryd"), row.get("reference"), better)
        row["vs_nginx"] = ratio(row.get("registryd"), row.get("nginx"), better)
        row["containerd_vs_reference"] = ratio(row.get("registryd-containerd"), row.get("reference"), better)
        row["containerd_vs_filesystem"] = ratio(row.get("registryd-containerd"), row.get("registryd"), better)
        rows.append(row)
    return rows


def print_table(rows, servers):
    columns = [("vs ref", "vs_reference")]
    if "nginx" in servers:
        columns.append(("vs nginx", "vs_nginx"))
    if "registryd-containerd" in servers:
        columns += [("ctrd vs ref", "containerd_vs_reference"), ("ctrd vs fs", "containerd_vs_filesystem")]
    report.print_table(rows, servers, columns, label_width=36, note=(
        "vs ref / vs nginx: how many times better registryd is (above 1: registryd better; for latency, "
        "time and memory the inverse ratio); ctrd vs ref / ctrd vs fs: the same for registryd-containerd "
        "against the reference and against registryd on its filesystem store"))


# --------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(DEFAULT_PHASES),
                    help="comma-separated subset of: tls,plain,manifest,push (default tls,plain,manifest)")
    ap.add_argument("--seconds", type=int, default=None, help="each wrk/hey run (default 10, 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help=f"a {QUICK_BLOB_MIB} MiB blob and 2 s runs")
    ap.add_argument("--blob-mib", type=int, default=None, help=f"blob size (default {FULL_BLOB_MIB})")
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                    help="which to run: registryd,reference,nginx,registryd-containerd (default the first three; "
                         "registryd-containerd starts a private containerd, as root)")
    ap.add_argument("--containerd-stream", action="store_true",
                    help="registryd-containerd streams blobs through the content service's Read")
    ap.add_argument("--containerd-bin", default=core.DEFAULT_CONTAINERD)
    ap.add_argument("--output", default=None, help="JSON results (default benchmarks/results/tls-<time>.json)")
    ap.add_argument("--twistd", default=None, help="twistd to start registryd with (default: next to python)")
    ap.add_argument("--workers", type=int, default=None,
                    help="registryd's [server] workers (default: its own, one per CPU); RSS counts them all")
    ap.add_argument("--registryd-arg", action="append", default=[],
                    help="an extra argument for registryd (repeatable), e.g. --registryd-arg=--config=FILE")
    ap.add_argument("--reference-bin", default=core.DEFAULT_REFERENCE)
    ap.add_argument("--nginx-bin", default=shutil.which("nginx") or DEFAULT_NGINX)
    ap.add_argument("--start-timeout", type=float, default=30)
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (storage, server logs)")
    args = ap.parse_args(argv)
    args.phases = [p for p in args.only.split(",") if p]
    if any(p not in PHASES for p in args.phases):
        ap.error(f"--only: choose from {','.join(PHASES)}")
    args.servers = [s for s in args.servers.split(",") if s]
    if not args.servers or any(s not in SERVERS for s in args.servers):
        ap.error(f"--servers: choose from {','.join(SERVERS)}")
    args.seconds = args.seconds or (2 if args.quick else 10)
    args.blob_mib = args.blob_mib or (QUICK_BLOB_MIB if args.quick else FULL_BLOB_MIB)
    return args


def main(argv):
    args = parse_args(argv)
    output = startup.results_path(args.output, "tls")
    startup.interrupt_on_sigterm()

    workdir = tempfile.mkdtemp(prefix="bench-tls-")
    result = {"benchmark": "tls", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "params": {"quick": args.quick, "seconds": args.seconds, "blob_MiB": args.blob_mib,
                         "phases": args.phases, "registryd_args": args.registryd_arg, "workers": args.workers},
              "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                       "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
              "servers": {}}
    servers = {}
    interrupted = False
    try:
        cert, key = make_certificate(workdir)
        makers = {"registryd": lambda: Registryd(workdir, args.twistd or core.find_twistd(), cert, key,
                                                 args.registryd_arg, args.workers),
                  "reference": lambda: Reference(workdir, args.reference_bin, cert, key),
                  "nginx": lambda: Nginx(workdir, args.nginx_bin, cert, key),
                  "registryd-containerd": lambda: RegistrydContainerd(
                      workdir, args.twistd or core.find_twistd(), args.containerd_bin, args.containerd_stream,
                      cert, key, args.workers)}
        for name in args.servers:
            srv = servers[name] = makers[name]()
            info = result["servers"][name] = {"cmd": srv.cmd, "figures": {}}
            try:
                srv.start()
            except OSError as e:
                info["start_error"] = f"cannot start: {e}"
        blob = os.urandom(args.blob_mib << 20)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        for name, srv in servers.items():
            info = result["servers"][name]
            if "start_error" in info:
                continue
            try:
                info["ready_s"] = round(srv.wait_ready(args.start_timeout), 2)
                if name == "nginx":
                    with open(os.path.join(srv.root, "blob"), "wb") as f:
                        f.write(blob)
                    os.chmod(os.path.join(srv.root, "blob"), 0o644)
                else:
                    if isinstance(srv, Reference):
                        _wait_tls(srv.tls_port, args.start_timeout)
                    seed(srv.hostport, blob)
                info["tls"] = negotiated(srv.tls_port)
                core.log(f"{name} ready ({info['tls']})")
            except (RuntimeError, OSError, SystemExit) as e:
                info["start_error"] = str(e)
                info["log_tail"] = core.tail(srv.log_path)
                core.log(f"{name} FAILED to start: {e}")
                srv.stop()
        del blob
        time.sleep(1)
        for name, srv in servers.items():
            if srv.alive():
                result["servers"][name]["figures"]["rss_idle_MiB"] = {"value": srv.memory().get("VmRSS")}
        order = list(servers)
        for i, phase in enumerate(args.phases):
            for name in (order if i % 2 == 0 else order[::-1]):
                srv, info = servers[name], result["servers"][name]
                if "start_error" in info or (phase in ("manifest", "push") and name == "nginx"):
                    continue
                if not srv.alive():
                    info["start_error"] = "the server exited"
                    info.setdefault("log_tail", core.tail(srv.log_path))
                    continue
                core.log(f"{name}: {phase} ...")
                figs = measure(args, phase, name, srv, digest)
                info["figures"].update(figs)
                core.log(f"{name}: {phase}: " + ", ".join(f"{k}={core.fmt(v.get('value'))}" for k, v in figs.items()))
        for name, srv in servers.items():
            if srv.alive():
                result["servers"][name]["figures"]["rss_peak_MiB"] = {"value": srv.memory().get("VmHWM")}
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for srv in servers.values():
            srv.stop()
        if args.keep_temp:
            core.log(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["interrupted"] = interrupted
    result["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["comparison"] = compare(args, result)
    print_table(result["comparison"], list(result["servers"]))
    print(f"\nregistryd workers: {args.workers if args.workers is not None else 'default'}; load average "
          f"(1, 5, 15 min) at start {result['host']['loadavg_start']}, at end {result['host']['loadavg_end']}")
    startup.write_results(output, result)
    if interrupted:
        return 130
    complete = all(r.get(s) is not None for r in result["comparison"] for s in result["servers"] if s in r)
    return 0 if complete else 1


def _wait_tls(port, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the TLS listener on {port} did not open")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
