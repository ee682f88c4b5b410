#!/usr/bin/env python3
"""Side-by-side core benchmark: registryd against the reference registry.

Starts registryd (``twistd -n registryd``) and the reference registry (Debian's
``docker-registry``, CNCF distribution 2.8) on loopback, each on a free port
with its own temporary storage, measures both in the same run with the shared
measurement script ``regbench.py`` (skopeo, wrk, hey), prints every figure for
both with the ratio registryd / reference, and writes everything as JSON.

Figures
  push_big_s, push_many_s    skopeo push of a 1 x 256 MiB and a 50 x 1 MiB image (median of 3), s
  pull_big_s, pull_many_s    skopeo pull of the same images (median of 3), s
  blob_get_256M_c{1,8}_MBps  wrk GET of a 256 MiB blob at concurrency 1 and 8, MB/s
  manifest_get_tag_c32_rps   hey GET of a manifest by tag at concurrency 32, requests/s (+ p99 ms)
  blob_get_1K_c32_rps        hey GET of a 1 KiB blob at concurrency 32, requests/s (+ p99 ms)
  rss_idle_MiB               server VmRSS after start, before any traffic
  rss_peak_MiB               server VmHWM at the end of the run (peak under load)

--quick uses smaller images (1 x 32 MiB, 20 x 256 KiB, one run each), a 32 MiB
blob and 2 s load runs, for a CI smoke test that finishes in well under 2 min.

Only the stdlib is used, plus skopeo, wrk and hey on PATH. Loopback only.
"""
import argparse
import datetime
import http.client
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (the one table printer)
import startup  # noqa: E402  (results path and file, SIGTERM)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The measurement scripts (regbench.py, mkimage.py) live in benchmarks/tools.
DEFAULT_REGBENCH_DIR = os.environ.get("REGBENCH_DIR") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
DEFAULT_REFERENCE = "/usr/bin/docker-registry"
PHASES = ("push", "pull", "blobget", "small", "burst")
#: Clients of the burst phase: under registryd's default max_connections_per_client (128), all from 127.0.0.1.
BURST_CLIENTS = 120
SERVERS = ("registryd", "reference", "registryd-containerd")
#: What runs without --servers: registryd-containerd needs root (it starts a private containerd).
DEFAULT_SERVERS = ("registryd", "reference")
DEFAULT_CONTAINERD = "/usr/bin/containerd"

# Quick (smoke) mode: image layer sizes for mkimage.py, runs per image, blob size.
QUICK_IMAGES = {"big": ["32M"], "many": ["256K"] * 20}
QUICK_RUNS = 1
QUICK_BLOB_MIB = 32
FULL_BLOB_MIB = 256  # fixed inside regbench.py blobget

LABELS = {
    "push_big_s": "push {big} image (skopeo)",
    "push_many_s": "push {many} image (skopeo)",
    "pull_big_s": "pull {big} image (skopeo)",
    "pull_many_s": "pull {many} image (skopeo)",
    "blob_get_{blob}_c1_MBps": "blob GET {blob}, c=1 (wrk)",
    "blob_get_{blob}_c8_MBps": "blob GET {blob}, c=8 (wrk)",
    "manifest_get_tag_c32_rps": "manifest GET by tag, c=32 (hey)",
    "manifest_get_tag_c32_p99_ms": "manifest GET by tag, c=32, p99",
    "blob_get_1K_c32_rps": "1 KiB blob GET, c=32 (hey)",
    "blob_get_1K_c32_p99_ms": "1 KiB blob GET, c=32, p99",
    "burst_c{burst}_median_ms": "{burst} connect at once, GET /v2/: median",
    "burst_c{burst}_slowest_ms": "{burst} connect at once: slowest",
    "rss_idle_MiB": "server RSS idle",
    "rss_peak_MiB": "server RSS peak (VmHWM)",
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def unit_of(key):
    for suffix, unit in (("_per_GB", "s/GB"), ("_MBps", "MB/s"), ("_rps", "req/s"), ("_ms", "ms"), ("_MiB", "MiB"), ("_s", "s")):
        if key.endswith(suffix):
            return unit
    return ""


def better_of(key):
    return "higher" if key.endswith(("_MBps", "_rps")) else "lower"


def free_port():
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 5000:
            return port


def read_status(pid):
    """VmRSS / VmHWM in MiB (the fields regbench.py rss prints) of a process and its children
    (registryd's worker processes, [server] workers), added up."""
    out = {}
    for process in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{process}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmRSS", "VmHWM"):
                        out[k] = round(out.get(k, 0) + int(v.split()[0]) / 1024, 1)
        except OSError:
            pass
    return out


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError:
        return []


def run_group(cmd, timeout, env=None, cwd=None):
    """Run cmd in its own process group; kill the whole group on timeout or
    interrupt (so no skopeo/wrk/hey is left behind). Returns (rc, stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc)
        out, err = proc.communicate()
        return None, out, (err or "") + f"\n(timed out after {timeout} s)"
    except BaseException:
        _killpg(proc)
        proc.wait()
        raise
    return proc.returncode, out, err


def _killpg(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# Servers


class Server:
    def __init__(self, name, workdir):
        self.name = name
        self.dir = os.path.join(workdir, name)
        self.data = os.path.join(self.dir, "data")
        self.tmp = os.path.join(self.dir, "tmp")  # TMPDIR of the load generators
        self.log_path = os.path.join(self.dir, "server.log")
        for d in (self.data, self.tmp):
            os.makedirs(d)
        self.port = free_port()
        self.proc = None
        self.logf = None
        self.cmd = None
        self.cwd = None
        self.env = None   # None: this process's environment

    @property
    def hostport(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env, start_new_session=True)

    def wait_ready(self, timeout):
        """Poll GET /v2/ until it answers 200. Returns seconds taken; raises
        RuntimeError if the process exits or the deadline passes."""
        t0 = time.monotonic()
        last = "no answer"
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before answering GET /v2/")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/v2/")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return time.monotonic() - t0
                last = f"GET /v2/ answered {r.status}"
            except OSError as e:
                last = f"GET /v2/: {e}"
            time.sleep(0.1)
        raise RuntimeError(f"not ready after {timeout} s ({last})")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def memory(self):
        return read_status(self.proc.pid) if self.alive() else {}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.logf:
            self.logf.close()
            self.logf = None


def registryd_environment():
    """This process's environment plus the variables the packaged systemd unit
    (etc/registryd/registryd.service) sets: registryd is measured as the appliance runs it
    (PYTHONOPTIMIZE=2 among them)."""
    found = dict(os.environ)
    with open(os.path.join(REPO, "etc", "registryd", "registryd.service")) as f:
        for line in f:
            if line.startswith("Environment="):
                found.update(item.split("=", 1) for item in line.split("=", 1)[1].split())
    return found


class Registryd(Server):
    def __init__(self, workdir, twistd, workers=None):
        super().__init__("registryd", workdir)
        self.cwd = REPO
        self.env = registryd_environment()
        self.cmd = [twistd, "-n", "--pidfile=", "registryd",
                    "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--data-dir", self.data]
        if workers is not None:
            config = os.path.join(self.dir, "registryd.toml")
            with open(config, "w") as f:
                f.write(f"[server]\nworkers = {workers}\n")
            self.cmd += ["--config", config]


class RegistrydContainerd(Registryd):
    """registryd with [storage] driver = "containerd", over a private containerd of its own
    (root, state and socket in the temp dir; CRI and the snapshotters it cannot use disabled)."""

    def __init__(self, workdir, twistd, containerd, stream=False):
        Server.__init__(self, "registryd-containerd", workdir)
        self.containerd = None
        self.containerd_bin = containerd
        self.socket = os.path.join(self.dir, "c.sock")
        self.containerd_root = os.path.join(self.dir, "croot")
        ctrd_config = os.path.join(self.dir, "containerd.toml")
        disabled = ", ".join(json.dumps(p) for p in (
            "io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"))
        with open(ctrd_config, "w") as f:
            f.write(f"version = 2\nroot = {json.dumps(self.containerd_root)}\n"
                    f"state = {json.dumps(os.path.join(self.dir, 'cstate'))}\n"
                    f"disabled_plugins = [{disabled}]\n[grpc]\n  address = {json.dumps(self.socket)}\n"
                    f"[ttrpc]\n  address = {json.dumps(self.socket + '.ttrpc')}\n")
        self.containerd_cmd = [containerd, "--config", ctrd_config]
        config = os.path.join(self.dir, "registryd.toml")
        with open(config, "w") as f:
            f.write(f'[storage]\ndriver = "containerd"\n[storage.containerd]\nsocket = {json.dumps(self.socket)}\n'
                    f'hostname = "bench.local"\ncontent_dir = '
                    f'{json.dumps("" if stream else os.path.join(self.containerd_root, "io.containerd.content.v1.content"))}\n')
        self.cwd = REPO
        self.env = registryd_environment()
        self.cmd = [twistd, "-n", "--pidfile=", "registryd", "-c", config,
                    "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--data-dir", self.data]

    def start_containerd(self):
        """The private containerd alone, once its socket answers to being there."""
        log_file = open(os.path.join(self.dir, "containerd.log"), "ab")
        self.containerd = subprocess.Popen(self.containerd_cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"containerd did not start (see {log_file.name})")
            time.sleep(0.1)

    def start(self):
        self.start_containerd()
        super().start()

    def stop(self):
        super().stop()
        if self.containerd is not None and self.containerd.poll() is None:
            self.containerd.terminate()
            try:
                self.containerd.wait(15)
            except subprocess.TimeoutExpired:
                self.containerd.kill()
                self.containerd.wait()


class Reference(Server):
    def __init__(self, workdir, binary):
        super().__init__("reference", workdir)
        config = os.path.join(self.dir, "config.yml")
        with open(config, "w") as f:
            f.write(
                "version: 0.1\n"
                "log:\n"
                "  level: error\n"
                "storage:\n"
                "  filesystem:\n"
                f"    rootdirectory: {self.data}\n"
                "  delete:\n"
                "    enabled: true\n"
                "http:\n"
                f"  addr: 127.0.0.1:{self.port}\n"
            )
        self.cwd = self.dir
        self.cmd = [binary, "serve", config]


def find_twistd():
    cand = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(cand, os.X_OK):
        return cand
    for cand in (os.path.join(REPO, ".venv", "bin", "twistd"), shutil.which("twistd")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return cand or "twistd"


# --------------------------------------------------------------------------
# Measurements. Each runs the shared regbench.py (as a subprocess with a
# timeout) and returns the JSON records it printed plus an error, if any.


def parse_records(out):
    recs = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    return recs


def run_worker(cmd, server, timeout):
    env = dict(os.environ, TMPDIR=server.tmp)
    rc, out, err = run_group(cmd, timeout, env=env)
    error = None
    if rc != 0:
        error = (f"exit status {rc}: " if rc is not None else "") + summarize(err)
    return parse_records(out), error


def summarize(err):
    """One line from a worker's stderr: the tool's own message (e.g. skopeo's)
    and the exception that ended the worker, without the traceback."""
    text = (err or "").strip()
    pre, tb, post = text.partition("Traceback (most recent call last):")
    pre_lines = [l.strip() for l in pre.splitlines() if l.strip()]
    post_lines = [l.strip() for l in post.splitlines() if l.strip()]
    parts = pre_lines[-2:] + post_lines[-1:] if tb else pre_lines[-3:]
    return " | ".join(parts) or "no output"


def regbench_cmd(args, sub, *rest):
    return [sys.executable, os.path.join(args.regbench_dir, "regbench.py"), sub, *map(str, rest)]


def worker_cmd(args, kind, hostport, *rest):
    return [sys.executable, os.path.abspath(__file__), "_worker", args.regbench_dir, kind, hostport, *map(str, rest)]


def to_figures(records):
    """Flatten regbench records into {figure: {value, ...details}}."""
    figs = {}
    for r in records:
        m = r.get("metric")
        if m is None:
            continue
        if "median" in r:  # push / pull
            figs[m] = {"value": r["median"], "runs": r.get("runs")}
        elif m.startswith("burst_"):  # burst: every answer 200, or the figure fails
            bad = {k: v for k, v in (r.get("codes") or {}).items() if k != "200"}
            figs[m] = {"value": r.get("value"), "runs": r.get("runs"), "codes": r.get("codes")}
            if bad or r.get("value") is None:
                figs[m]["error"] = f"answers other than 200: {bad}"
        elif "codes" in r:  # small (hey)
            codes = {k: int(v) for k, v in (r.get("codes") or {}).items()}
            bad = sum(v for k, v in codes.items() if k != "200")
            d = {"value": r.get("value"), "codes": codes}
            p = {"value": r.get("p99_ms")}
            if bad or not codes:
                d["error"] = p["error"] = f"non-200 responses: {codes}"
            figs[m] = d
            figs[m.replace("_rps", "_p99_ms")] = p
        elif "non2xx" in r:  # blobget (wrk)
            d = {"value": r.get("value"), "requests_per_s": r.get("requests_per_s"), "non2xx": r["non2xx"]}
            if r["non2xx"] or not r.get("requests_per_s"):
                d["error"] = f"{r['non2xx']} non-2xx responses, {r.get('requests_per_s')} req/s"
            figs[m] = d
        else:
            figs[m] = {k: v for k, v in r.items() if k != "metric"}
    return figs


def expected_figures(args, phase):
    blob = f"{QUICK_BLOB_MIB if args.quick else FULL_BLOB_MIB}M"
    return {
        "push": ["push_big_s", "push_many_s"],
        "pull": ["pull_big_s", "pull_many_s"],
        "blobget": [f"blob_get_{blob}_c1_MBps", f"blob_get_{blob}_c8_MBps"],
        "small": ["manifest_get_tag_c32_rps", "manifest_get_tag_c32_p99_ms",
                  "blob_get_1K_c32_rps", "blob_get_1K_c32_p99_ms"],
        "burst": [f"burst_c{BURST_CLIENTS}_median_ms", f"burst_c{BURST_CLIENTS}_slowest_ms"],
    }[phase]


def measure(args, phase, server):
    hp = server.hostport
    s = args.seconds
    if args.quick:
        t = 90
        cmd = {
            "push": worker_cmd(args, "push", hp, QUICK_RUNS),
            "pull": worker_cmd(args, "pull", hp),
            "blobget": worker_cmd(args, "blobget", hp, QUICK_BLOB_MIB, s),
            "small": regbench_cmd(args, "small", hp, s),
            "burst": worker_cmd(args, "burst", hp, BURST_CLIENTS),
        }[phase]
    else:
        t = {"push": 1800, "pull": 1200}.get(phase, 4 * s + 300)
        cmd = {
            "push": regbench_cmd(args, "push", hp),
            "pull": regbench_cmd(args, "pull", hp),
            "blobget": regbench_cmd(args, "blobget", hp, s),
            "small": regbench_cmd(args, "small", hp, s),
            "burst": worker_cmd(args, "burst", hp, BURST_CLIENTS),
        }[phase]
    records, error = run_worker(cmd, server, t)
    return to_figures(records), error


# Worker for --quick: regbench.py's push/pull use fixed image sizes, so quick
# mode builds smaller images with the same tools (mkimage.py + skopeo) and uses
# regbench's own helpers for the blob GET. Runs as a subprocess of the main script.

def skopeo_push(regbench, bench_dir, hostport, images, runs_n, stamp_file, prefix):
    """Push each image of ``images`` (name -> layer sizes) ``runs_n`` times with skopeo, each
    time a fresh one made by mkimage.py; emit the median; leave the tag stamp in ``stamp_file``."""
    work = tempfile.mkdtemp(prefix=f"{prefix}-push-")
    stamp = str(int(time.time()))
    for name, sizes in images.items():
        runs = []
        for i in range(runs_n):
            layout = os.path.join(work, f"{name}{i}")
            subprocess.run([sys.executable, os.path.join(bench_dir, "mkimage.py"), layout, "t", *sizes],
                           check=True, stdout=subprocess.DEVNULL)
            runs.append(regbench.timed(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:t",
                                        f"docker://{hostport}/regbench/{name}:{stamp}-{i}"]))
            shutil.rmtree(layout, ignore_errors=True)
        regbench.emit(metric=f"push_{name}_s", median=round(statistics.median(runs), 3),
                      runs=[round(r, 3) for r in runs])
    shutil.rmtree(work, ignore_errors=True)
    with open(stamp_file, "w") as f:
        f.write(f"{stamp} {runs_n}")


def skopeo_pull(regbench, hostport, names, stamp_file, prefix):
    """Pull what ``skopeo_push`` pushed last (its stamp file says which tags), each run timed."""
    with open(stamp_file) as f:
        stamp, runs_n = f.read().split()
    for name in names:
        runs = []
        for i in range(int(runs_n)):
            out = tempfile.mkdtemp(prefix=f"{prefix}-pull-")
            runs.append(regbench.timed(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                        f"docker://{hostport}/regbench/{name}:{stamp}-{i}", f"oci:{out}:t"]))
            shutil.rmtree(out, ignore_errors=True)
        regbench.emit(metric=f"pull_{name}_s", median=round(statistics.median(runs), 3),
                      runs=[round(r, 3) for r in runs])


def burst(regbench, hostport, clients, rounds=3):
    """``clients`` connections opened at once, each sending GET /v2/ as soon as it is up and
    timed until its whole answer is in; the medians of ``rounds`` rounds. A connection the
    server's accept queue had no room for waits for the client's SYN to be sent again (1 s)."""
    host, port = hostport.rsplit(":", 1)
    medians, slowest, statuses = [], [], {}
    for _ in range(rounds):
        began = time.monotonic()
        pending = {}
        selector = selectors.DefaultSelector()
        for _ in range(clients):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((host, int(port)))
            pending[sock] = b""
            selector.register(sock, selectors.EVENT_WRITE)
        took = []
        while pending and time.monotonic() - began < 30:
            for key, events in selector.select(1):
                sock = key.fileobj
                if events & selectors.EVENT_WRITE:
                    sock.send(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    pending[sock] += data
                    continue
                status = pending.pop(sock)[9:12].decode("latin-1") or "none"
                statuses[status] = statuses.get(status, 0) + 1
                took.append(time.monotonic() - began)
                selector.unregister(sock)
                sock.close()
        for sock in pending:
            statuses["timeout"] = statuses.get("timeout", 0) + 1
            sock.close()
        took.sort()
        medians.append(took[len(took) // 2] * 1000 if took else None)
        slowest.append(took[-1] * 1000 if took else None)
    for metric, values in ((f"burst_c{clients}_median_ms", medians), (f"burst_c{clients}_slowest_ms", slowest)):
        known = [v for v in values if v is not None]
        regbench.emit(metric=metric, value=round(statistics.median(known), 1) if known else None,
                      runs=[None if v is None else round(v, 1) for v in values], codes=statuses)


def worker(argv):
    bench_dir, kind, hostport, *rest = argv
    sys.path.insert(0, bench_dir)
    import regbench  # noqa: E402  (the shared measurement script)

    stamp_file = os.path.join(tempfile.gettempdir(), "bench-core-quick-push")
    if kind == "push":
        skopeo_push(regbench, bench_dir, hostport, QUICK_IMAGES, int(rest[0]), stamp_file, "quick")
    elif kind == "pull":
        skopeo_pull(regbench, hostport, QUICK_IMAGES, stamp_file, "quick")
    elif kind == "blobget":
        mib, seconds = int(rest[0]), int(rest[1])
        digest = regbench.push_blob(hostport, "regbench/blob", os.urandom(mib << 20))
        url = f"http://{hostport}/v2/regbench/blob/blobs/{digest}"
        for c in (1, 8):
            mbps, rps, bad = regbench.wrk_mbps(url, c, seconds)
            regbench.emit(metric=f"blob_get_{mib}M_c{c}_MBps", value=mbps, requests_per_s=rps, non2xx=bad)
    elif kind == "burst":
        burst(regbench, hostport, int(rest[0]))
    else:
        raise SystemExit(f"unknown worker {kind}")
    return 0


# --------------------------------------------------------------------------
# Report


fmt = report.fmt


def label_of(key, args):
    big, many = ("1x32M", "20x256K") if args.quick else ("1x256M", "50x1M")
    blob = f"{QUICK_BLOB_MIB if args.quick else FULL_BLOB_MIB}M"
    for pattern, text in LABELS.items():
        if pattern.format(blob=blob, burst=BURST_CLIENTS) == key:
            return text.format(big=big, many=many, blob=blob, burst=BURST_CLIENTS)
    return key


def describe_image(sizes):
    """["1M", "1M", "16M"] -> "2x1M+1x16M"."""
    parts = []
    for s in sizes:
        if parts and parts[-1][1] == s:
            parts[-1][0] += 1
        else:
            parts.append([1, s])
    return "+".join(f"{n}x{s}" for n, s in parts)


def add_ratio(row):
    """``ratio`` (registryd / reference, None without both) and ``winner`` of a figure's row."""
    a, b = row.get("registryd"), row.get("reference")
    row["ratio"] = None
    if a is not None and b:
        row["ratio"] = round(a / b, 3)
        good = a > b if row["better"] == "higher" else a < b
        # within 2 % is noise on this kind of machine
        row["winner"] = "equal" if abs(a / b - 1) < 0.02 else ("registryd" if good else "reference")
    return row


def compare(args, result, keys):
    rows = []
    for key in keys:
        row = {"figure": key, "label": label_of(key, args), "unit": unit_of(key), "better": better_of(key)}
        for name in SERVERS:
            srv = result["servers"].get(name)
            if srv is None:
                continue
            f = srv["figures"].get(key)
            if f is None or f.get("value") is None:
                row[name] = None
                row[f"{name}_error"] = (f or {}).get("error") or srv.get("phase_errors", {}).get(
                    _phase_of(args, key)) or srv.get("start_error") or (
                    "interrupted" if result.get("interrupted") else "not measured")
            elif f.get("error"):
                row[name] = None
                row[f"{name}_error"] = f["error"]
            else:
                row[name] = f["value"]
        add_ratio(row)
        ctrd, ref, fs = row.get("registryd-containerd"), row.get("reference"), row.get("registryd")
        row["containerd_vs_reference"] = round(ctrd / ref, 3) if ctrd is not None and ref else None
        row["containerd_vs_filesystem"] = round(ctrd / fs, 3) if ctrd is not None and fs else None
        rows.append(row)
    return rows


def _phase_of(args, key):
    for p in PHASES:
        if key in expected_figures(args, p):
            return p
    return "rss"


def print_table(rows, servers):
    """registryd / reference with two servers; with registryd-containerd too, fs/ref, ctrd/ref, ctrd/fs."""
    if len(servers) == 3:
        columns = [("fs/ref", "ratio"), ("ctrd/ref", "containerd_vs_reference"), ("ctrd/fs", "containerd_vs_filesystem")]
        rows = [{k: v for k, v in r.items() if k != "winner"} for r in rows]
    elif len(servers) == 2:
        columns = [("ratio", "ratio")]
    else:
        columns = []
    report.print_table(rows, servers, columns, note="ratio = registryd / reference" if len(servers) == 2 else None)


# --------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Benchmark registryd against the reference registry (docker-registry) side by side.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PHASES),
                    help="comma-separated subset of: push,pull,blobget,small,burst (default: all). "
                         "RSS (idle and peak) is always reported. pull implies an unreported push.")
    ap.add_argument("--seconds", type=int, default=None,
                    help="duration of each wrk/hey run (default 10, or 2 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: small images, one run each, 2 s load runs (well under 2 min)")
    ap.add_argument("--output", default=None,
                    help="JSON results file (default benchmarks/results/core-<timestamp>.json)")
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                    help="which to run: registryd,reference,registryd-containerd (default the first two; "
                         "registryd-containerd runs registryd on a private containerd, as root)")
    ap.add_argument("--containerd-stream", action="store_true",
                    help="registryd-containerd streams blobs through the content service's Read "
                         "instead of sending containerd's files (content_dir = \"\")")
    ap.add_argument("--containerd-bin", default=DEFAULT_CONTAINERD,
                    help=f"containerd for registryd-containerd (default {DEFAULT_CONTAINERD})")
    ap.add_argument("--twistd", default=None, help="twistd to start registryd with (default: next to python)")
    ap.add_argument("--workers", type=int, default=None,
                    help="registryd's [server] workers (default: its own, one per CPU); RSS counts them all")
    ap.add_argument("--reference-bin", default=DEFAULT_REFERENCE, help=f"reference registry (default {DEFAULT_REFERENCE})")
    ap.add_argument("--regbench-dir", default=DEFAULT_REGBENCH_DIR,
                    help="folder holding regbench.py and mkimage.py (default $REGBENCH_DIR or benchmarks/tools)")
    ap.add_argument("--start-timeout", type=float, default=30, help="seconds to wait for GET /v2/ (default 30)")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (storage, server logs)")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"--only: unknown {','.join(bad)} (choose from {','.join(PHASES)})")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or any(s not in SERVERS for s in args.servers):
        ap.error(f"--servers: choose from {','.join(SERVERS)}")
    if args.seconds is None:
        args.seconds = 2 if args.quick else 10
    if args.seconds < 1:
        ap.error("--seconds must be at least 1")
    if not os.path.exists(os.path.join(args.regbench_dir, "regbench.py")):
        ap.error(f"regbench.py not found in {args.regbench_dir} (use --regbench-dir or $REGBENCH_DIR)")
    return args


def main(argv):
    if argv[:1] == ["_worker"]:
        return worker(argv[1:])
    args = parse_args(argv)
    output = startup.results_path(args.output, "core")
    startup.interrupt_on_sigterm()

    missing = [t for t in ("skopeo", "wrk", "hey") if not shutil.which(t)]
    if missing:
        log(f"warning: not on PATH: {', '.join(missing)}; figures that need them will fail")

    workdir = tempfile.mkdtemp(prefix="bench-core-")
    servers = {}
    result = {
        "benchmark": "core",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "params": {"quick": args.quick, "seconds": args.seconds, "phases": args.phases,
                   "images": ({k: f"{len(v)}x{v[0]}" for k, v in QUICK_IMAGES.items()} if args.quick
                              else {"big": "1x256M", "many": "50x1M"}),
                   "runs_per_image": QUICK_RUNS if args.quick else 3,
                   "blob_MiB": QUICK_BLOB_MIB if args.quick else FULL_BLOB_MIB,
                   "regbench_dir": args.regbench_dir},
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "servers": {},
    }
    interrupted = False
    try:
        if "registryd" in args.servers:
            servers["registryd"] = Registryd(workdir, args.twistd or find_twistd(), args.workers)
        if "reference" in args.servers:
            servers["reference"] = Reference(workdir, args.reference_bin)
        if "registryd-containerd" in args.servers:
            servers["registryd-containerd"] = RegistrydContainerd(workdir, args.twistd or find_twistd(),
                                                                  args.containerd_bin, args.containerd_stream)
        for name, srv in servers.items():
            info = result["servers"][name] = {"cmd": srv.cmd, "port": srv.port, "figures": {}, "phase_errors": {},
                                             "memory_after": {}}
            if name == "reference":
                rc, out, err = run_group([args.reference_bin, "--version"], 10)
                info["version"] = (out or err or "").strip()
            log(f"starting {name} on {srv.hostport}: {' '.join(srv.cmd)}")
            try:
                srv.start()
            except OSError as e:
                info["start_error"] = f"cannot start: {e}"
                log(f"{name}: {info['start_error']}")
        # Wait for both; only then take the idle RSS (no traffic but GET /v2/).
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
                for line in info["log_tail"][-8:]:
                    log(f"  {name}| {line}")
                srv.stop()
        time.sleep(1)
        for name, srv in servers.items():
            info = result["servers"][name]
            if srv.alive():
                mem = srv.memory()
                info["figures"]["rss_idle_MiB"] = {"value": mem.get("VmRSS"), "pid": srv.proc.pid}
                info["memory_after"]["idle"] = mem

        # Interleave: each phase runs for both servers back to back, and the
        # order alternates from phase to phase so neither always goes first.
        plan = list(args.phases)
        if "pull" in plan and "push" not in plan:
            plan.insert(plan.index("pull"), "push(setup)")
        order = list(servers)
        for i, phase in enumerate(plan):
            real = phase.split("(")[0]
            for name in (order if i % 2 == 0 else order[::-1]):
                srv, info = servers[name], result["servers"][name]
                if "start_error" in info:
                    continue
                if not srv.alive():
                    info["phase_errors"][real] = f"server exited with status {srv.proc.returncode}"
                    info.setdefault("log_tail", tail(srv.log_path))
                    continue
                if real == "pull" and "push" in info["phase_errors"]:
                    info["phase_errors"]["pull"] = "skipped: push failed, nothing to pull"
                    continue
                log(f"{name}: {phase} ...")
                t0 = time.monotonic()
                figs, error = measure(args, real, srv)
                if not srv.alive():
                    error = (error + "; " if error else "") + f"server exited with status {srv.proc.returncode}"
                    info["log_tail"] = tail(srv.log_path)
                if phase == real:
                    info["figures"].update(figs)
                    if error:
                        info["phase_errors"][real] = error
                elif error:  # the setup push failed: pull cannot run
                    info["phase_errors"]["pull"] = f"setup push failed: {error}"
                info["memory_after"][phase] = srv.memory()
                shown = ", ".join(f"{k}={fmt(v.get('value'))}" for k, v in figs.items()) or "no figures"
                log(f"{name}: {phase} done in {time.monotonic() - t0:.1f} s: {shown}"
                    + (f"  ERROR: {error}" if error else ""))
                if error and "log_tail" not in info:
                    info["log_tail"] = tail(srv.log_path)
        for name, srv in servers.items():
            info = result["servers"][name]
            if srv.alive():
                info["figures"]["rss_peak_MiB"] = {"value": srv.memory().get("VmHWM")}
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
    keys = ["rss_idle_MiB"]
    for p in args.phases:
        keys += expected_figures(args, p)
    keys.append("rss_peak_MiB")
    for info in result["servers"].values():  # anything regbench printed that we did not expect
        keys += [k for k in info["figures"] if k not in keys]
    result["comparison"] = compare(args, result, keys)
    print_table(result["comparison"], list(result["servers"]))
    startup.write_results(output, result)
    if interrupted:
        return 130
    complete = all(r.get(s) is not None for r in result["comparison"] for s in result["servers"])
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
