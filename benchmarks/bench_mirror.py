#!/usr/bin/env python3
"""Side-by-side pull-through cache benchmark: registryd against the reference registry.

Each proxy gets its own upstream: a plain Debian ``docker-registry`` (CNCF
distribution 2.8) on loopback whose access log (its stdout) is kept in a file,
so every upstream fetch a proxy makes can be counted. In front of them:

  registryd   twistd -n registryd --config CONF, CONF having one [[upstream]]
              with default = true (docker registry-mirrors style: /v2/<repo>/...)
  reference   a second docker-registry with proxy.remoteurl set to its upstream

Both are measured in the same run with the shared ``regbench.py`` (its
``coalesce`` subcommand), wrk and skopeo; every figure is printed for both,
with the ratio registryd / reference.

Figures
  cold_256M_c16_wall_s           16 clients GET one fresh 256 MiB blob through the proxy at once: wall time, s
  cold_256M_c16_first_byte_s     ... the first client's time to first byte, s
  cold_256M_c16_upstream_gets    ... GETs of that blob in the upstream's access log (target: 1)
  cached_get_256M_once_s         one more GET of that blob, now cached, s
  cached_256M_c16_wall_s         the same 16 clients (reading and hashing as they do cold) GET that blob once
                                 it is cached: the clients' own floor on this machine, s (cold wall time
                                 near it: the fill costs the clients nothing)
  cached_get_256M_c{1,8}_MBps    wrk GET of the cached blob at concurrency 1 and 8, MB/s
  image_pull_cold_s              skopeo copy of a fresh 1 x 64 MiB + 20 x 1 MiB image through the
                                 proxy to an OCI layout (median of 3), s
  image_pull_warm_s              the same pull repeated once it is cached (median of 3), s
  image_cold_upstream_blob_gets  blob GETs the upstream saw during one cold image pull (22 blobs)
  rss_idle_MiB, rss_peak_MiB     proxy VmRSS after start, VmHWM at the end (registryd: its whole process
                                 tree, the supervisor and every worker, added up)
  pss_idle_MiB                   the tree's PSS after start (shared pages counted once)
  rss_idle_largest_MiB           the largest process of the tree after start (a worker; target <= 60)
  rss_cold_peak_MiB              the tree's RSS sampled during the cold 16-client phase: its peak
  rss_cold_rise_MiB              the largest rise of one process above its idle RSS during that phase
                                 (target: <= 20 MiB per worker)

--client curl makes each cold client a curl piped into sha256sum, instead of regbench.py
coalesce's threads (hashlib); coreutils' sha256sum costs about 3 times the CPU here.

--workers N runs registryd with [server] workers = N (default: its own default, one per CPU).
The load average before and after the run is printed and kept with the figures: the machine
may be shared, so ratios within one run are what count.

--quick uses a 32 MiB blob, 8 clients, 2 s wrk runs and one 1 x 16 MiB + 10 x 256 KiB
image: a CI smoke test that finishes in under a minute.

Only the stdlib is used (plus bench_core.py next to this file), and skopeo,
wrk and docker-registry on PATH. Loopback only.
"""
import argparse
import datetime
import hashlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_core as core  # noqa: E402  (the colleague's core benchmark: servers, runner, report)
import process_tree  # noqa: E402
import startup  # noqa: E402  (results path and file, SIGTERM)
from bench_core import (  # noqa: E402
    DEFAULT_REFERENCE, DEFAULT_REGBENCH_DIR, Registryd, Server, find_twistd, fmt, log, parse_records,
    print_table, run_group, summarize, tail,
)

PHASES = ("cold", "warm", "image")
PROXIES = ("registryd", "reference")
SETTINGS = {
    # blob_mib is fixed at 256 inside regbench.py coalesce (used by the full run).
    "full": {"blob_mib": 256, "clients": 16, "seconds": 10, "image": ["64M"] + ["1M"] * 20, "runs": 3},
    "quick": {"blob_mib": 32, "clients": 8, "seconds": 2, "image": ["16M"] + ["256K"] * 10, "runs": 1},
}
REPO_COLD = "regbench/cold"      # the repository regbench.py coalesce pushes to
REPO_IMAGE = "bench/image"

_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')


# --------------------------------------------------------------------------
# Servers


class DockerRegistry(Server):
    """A docker-registry with a generated config (never Debian's): upstream,
    or pull-through proxy of ``remote_url``. Its stdout (the access log) goes
    to ``access.log``, its own log (stderr) to ``server.log``."""

    def __init__(self, name, workdir, binary, remote_url=None):
        super().__init__(name, workdir)
        self.access_log = os.path.join(self.dir, "access.log")
        self.accessf = None
        self.config = os.path.join(self.dir, "config.yml")
        text = ("version: 0.1\n"
                "log:\n"
                "  level: error\n"
                "storage:\n"
                "  filesystem:\n"
                f"    rootdirectory: {self.data}\n"
                "  delete:\n"
                "    enabled: true\n"
                "http:\n"
                f"  addr: 127.0.0.1:{self.port}\n")
        if remote_url:
            text += f"proxy:\n  remoteurl: {remote_url}\n"
        with open(self.config, "w") as f:
            f.write(text)
        self.cwd = self.dir
        self.cmd = [binary, "serve", self.config]

    def start(self):
        self.logf = open(self.log_path, "ab")
        self.accessf = open(self.access_log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.accessf, stderr=self.logf, stdin=subprocess.DEVNULL,
                                     cwd=self.cwd, start_new_session=True)

    def stop(self):
        super().stop()
        if self.accessf:
            self.accessf.close()
            self.accessf = None

    def log_size(self):
        try:
            return os.path.getsize(self.access_log)
        except OSError:
            return 0

    def requests_since(self, offset):
        """Requests in the access log after byte ``offset``, counted as
        'METHOD kind status' (kind: blob, manifest, upload, other)."""
        counts = {}
        try:
            with open(self.access_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode("latin-1")
        except OSError:
            return counts
        for m in _ACCESS.finditer(text):
            method, path, status = m.groups()
            kind = ("upload" if "/blobs/uploads" in path else "blob" if "/blobs/" in path
                    else "manifest" if "/manifests/" in path else "other")
            key = f"{method} {kind} {status}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def layer_digests(self, repo):
        """Blob digests linked in ``repo`` of this registry's storage, newest first."""
        d = os.path.join(self.data, "docker", "registry", "v2", "repositories", repo, "_layers", "sha256")
        try:
            names = [(os.path.getmtime(os.path.join(d, n)), n) for n in os.listdir(d)]
        except OSError:
            return []
        return ["sha256:" + n for _, n in sorted(names, reverse=True)]


class RegistrydProxy(Registryd):
    """registryd with one default upstream (docker registry-mirrors style)."""

    def __init__(self, workdir, twistd, upstream_port, workers=None):
        super().__init__(workdir, twistd)
        self.config = os.path.join(self.dir, "registryd.toml")
        with open(self.config, "w") as f:
            if workers is not None:
                f.write(f"[server]\nworkers = {workers}\n")
            f.write("[[upstream]]\n"
                    'namespace = "upstream.test"\n'
                    f'url = "http://127.0.0.1:{upstream_port}"\n'
                    "default = true\n")
        i = self.cmd.index("registryd")
        self.cmd[i + 1:i + 1] = ["--config", self.config]


class Side:
    """One proxy under test and the upstream only it talks to."""

    def __init__(self, name, proxy, upstream):
        self.name, self.proxy, self.upstream = name, proxy, upstream
        self.cold_digest = None


def blob_gets(counts):
    return sum(n for k, n in counts.items() if k.startswith("GET blob "))


# --------------------------------------------------------------------------
# Measurements


def worker_cmd(args, kind, *rest):
    return [sys.executable, os.path.abspath(__file__), "_worker", args.regbench_dir, kind, *map(str, rest)]


def cpu_now(side):
    """CPU seconds so far of the proxy's process tree, its upstream, and this script's waited-for
    children (the client workers): taken around a phase, they say who spent the 2 cores."""
    times = os.times()
    return {"proxy": process_tree.cpu_seconds(side.proxy.proc.pid),
            "upstream": process_tree.cpu_seconds(side.upstream.proc.pid),
            "clients": times.children_user + times.children_system}


def cpu_since(side, before):
    return {k: round(v - before[k], 2) for k, v in cpu_now(side).items()}


def run_worker(cmd, side, timeout):
    env = dict(os.environ, TMPDIR=side.proxy.tmp)
    rc, out, err = run_group(cmd, timeout, env=env)
    error = None
    if rc != 0:
        error = (f"exit status {rc}: " if rc is not None else "") + summarize(err)
    return parse_records(out), error


def keys_of(args):
    b, c = f"{args.blob_mib}M", args.clients
    return {
        "cold": [f"cold_{b}_c{c}_wall_s", f"cold_{b}_c{c}_first_byte_s", f"cold_{b}_c{c}_upstream_gets",
                 f"cached_get_{b}_once_s", f"cached_{b}_c{c}_wall_s"],
        "warm": [f"cached_get_{b}_c1_MBps", f"cached_get_{b}_c8_MBps"],
        "image": ["image_pull_cold_s", "image_pull_warm_s", "image_cold_upstream_blob_gets"],
    }


def labels_of(args):
    b, c = f"{args.blob_mib}M", args.clients
    img = core.describe_image(args.image)
    k = keys_of(args)
    return dict(zip(k["cold"] + k["warm"] + k["image"], [
        f"cold GET {b}, {c} clients: wall",
        f"cold GET {b}, {c} clients: 1st byte",
        f"cold GET {b}: upstream GETs (want 1)",
        f"cached GET {b}, once",
        f"cached GET {b}, {c} clients: wall",
        f"cached GET {b}, c=1 (wrk)",
        f"cached GET {b}, c=8 (wrk)",
        f"image pull cold {img}",
        "image pull warm (cached)",
        "image cold pull: upstream blob GETs",
    ]), rss_idle_MiB="proxy RSS idle (whole tree)", rss_peak_MiB="proxy RSS peak (VmHWM, tree)",
        pss_idle_MiB="proxy PSS idle (whole tree)", rss_idle_largest_MiB="largest process RSS idle",
        rss_cold_peak_MiB=f"tree RSS during cold {c} clients: peak",
        rss_cold_rise_MiB=f"one process's rise during cold {c} cl.")


def measure_cold(args, side):
    """Fresh blob pushed to the upstream only, then N clients at once through the proxy."""
    up, px = side.upstream, side.proxy
    offset = up.log_size()
    cmd = worker_cmd(args, "coalesce", px.hostport, up.hostport, up.access_log, args.blob_mib, args.clients,
                     args.client)
    cpu = cpu_now(side)
    records, error = run_worker(cmd, side, 900)
    cpu = cpu_since(side, cpu)   # the push to the upstream and the one cached GET included
    counts = up.requests_since(offset)
    keys = keys_of(args)["cold"]
    figs = {}
    cold = next((r for r in records if r.get("metric", "").startswith("pullthrough_cold_")), None)
    warm = next((r for r in records if r.get("metric", "").startswith("pullthrough_warm_")), None)
    digest = (cold or {}).get("digest") or next(iter(up.layer_digests(REPO_COLD)), None)
    side.cold_digest = digest
    if cold is not None:
        details = {k: cold.get(k) for k in ("clients", "ok", "slowest_s", "client_errors") if k in cold}
        bad = None
        if cold.get("ok") != cold.get("clients"):
            bad = f"only {cold.get('ok')} of {cold.get('clients')} clients got the whole blob with status 200"
            if cold.get("client_errors"):
                bad += f" ({'; '.join(cold['client_errors'][:3])})"
        figs[keys[0]] = dict(value=cold.get("wall_s"), cpu_s=cpu, **details)
        figs[keys[1]] = {"value": cold.get("first_byte_s")}
        if bad:
            figs[keys[0]]["error"] = figs[keys[1]]["error"] = bad
        figs[keys[2]] = {"value": cold.get("upstream_gets"), "upstream_requests": counts}
    else:
        # the worker died: the access log still says how often the blob was fetched
        figs[keys[2]] = {"value": blob_gets(counts) if digest else None, "upstream_requests": counts,
                         "note": "counted by bench_mirror from the access log (worker failed)"}
    if warm is not None:
        figs[keys[3]] = {"value": warm.get("value"), "bytes": warm.get("bytes")}
        if warm.get("bytes") != args.blob_mib << 20:
            figs[keys[3]]["error"] = f"got {warm.get('bytes')} of {args.blob_mib << 20} bytes"
    return figs, error, {"digest": digest, "upstream_requests": counts}


def measure_floor(args, side):
    """The cold test's clients once more, on the blob now cached: their own floor (outside the
    cold test's memory sampling: what it measures is the fill, not a crowd of cached reads)."""
    key = keys_of(args)["cold"][4]
    cpu = cpu_now(side)
    crowd, error = run_worker(worker_cmd(args, "crowd", side.proxy.hostport, side.cold_digest, args.clients,
                                         args.client),
                              side, 900)
    done = next((r for r in crowd if r.get("metric") == "crowd"), None)
    if done is None:
        return {key: {"value": None, "error": error or "no result"}}
    figure = {"value": done["wall_s"], "ok": done["ok"], "clients": done["clients"], "cpu_s": cpu_since(side, cpu)}
    if done["ok"] != done["clients"]:
        figure["error"] = f"only {done['ok']} of {done['clients']} clients got the whole blob"
    return {key: figure}


def measure_warm(args, side):
    up, px = side.upstream, side.proxy
    if not side.cold_digest:
        return {}, "no cached blob (the cold phase failed)", {}
    offset = up.log_size()
    url = f"http://{px.hostport}/v2/{REPO_COLD}/blobs/{side.cold_digest}"
    records, error = run_worker(worker_cmd(args, "warm", url, args.blob_mib, args.seconds), side,
                                4 * args.seconds + 120)
    figs = core.to_figures(records)
    counts = up.requests_since(offset)
    return figs, error, {"upstream_requests": counts, "url": url}


def timed_skopeo(cmd, side, timeout=900):
    env = dict(os.environ, TMPDIR=side.proxy.tmp)
    t0 = time.monotonic()
    rc, out, err = run_group(cmd, timeout, env=env)
    took = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError((f"exit status {rc}: " if rc is not None else "") + summarize(err))
    return round(took, 3)


def image_runs(args, sides, workdir, state):
    """Generator over image runs: pushes each fresh image to every upstream,
    then yields (run index, tag) so the caller pulls through each proxy."""
    for i in range(args.runs):
        layout = os.path.join(workdir, "images", f"img{i}")
        tag = f"t{i}"
        rc, out, err = run_group([sys.executable, os.path.join(args.regbench_dir, "mkimage.py"), layout, tag,
                                  *args.image], 600)
        if rc != 0:
            raise RuntimeError(f"mkimage.py: {summarize(err)}")
        for side in sides:
            if side.name in state["broken"]:
                continue
            try:
                took = timed_skopeo(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                                     f"docker://{side.upstream.hostport}/{REPO_IMAGE}:{tag}"], side)
                state["push"].setdefault(side.name, []).append(took)
            except RuntimeError as e:
                state["broken"][side.name] = f"push to its upstream failed: {e}"
        yield i, tag
        shutil.rmtree(layout, ignore_errors=True)


def pull_image(args, side, tag, workdir, i):
    """Cold then warm skopeo pull of one tag through the proxy."""
    up, px = side.upstream, side.proxy
    rec = {}
    os.makedirs(os.path.join(workdir, "pulls"), exist_ok=True)
    for kind in ("cold", "warm"):
        out = os.path.join(workdir, "pulls", f"{side.name}-{i}-{kind}")
        offset = up.log_size()
        try:
            rec[kind] = timed_skopeo(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                      f"docker://{px.hostport}/{REPO_IMAGE}:{tag}", f"oci:{out}:{tag}"], side)
        finally:
            time.sleep(0.2)  # let the upstream's access log catch up
            rec[f"{kind}_upstream_requests"] = up.requests_since(offset)
            shutil.rmtree(out, ignore_errors=True)
    return rec


# --------------------------------------------------------------------------
# Worker (runs as a subprocess): the --quick cold test (regbench.py coalesce
# with a blob size and robust clients), and the warm wrk runs with regbench's
# own wrk helper.


def crowd_get(regbench, proxy, digest, want, size, clients, client="threads"):
    """``clients`` GET the blob at once, each reading and hashing all of it; returns their
    (status, right, first byte s, s, error) and the wall time. ``size`` None: any length whose
    hash is ``want``. ``client``: "threads" as regbench.py coalesce (issue 15's measure), or
    "curl" (curl piped into sha256sum, one pair of processes per client)."""
    if client == "curl":
        return crowd_curl(proxy, digest, want, size, clients)
    return crowd_threads(regbench, proxy, digest, want, size, clients)


def crowd_threads(regbench, proxy, digest, want, size, clients):
    """regbench.py coalesce's clients: threads of this process reading 64 KiB at a time and
    hashing with hashlib (OpenSSL: SHA extensions where the CPU has them, without the GIL)."""
    results = [None] * clients
    barrier = threading.Barrier(clients)

    def fetch(i):
        first = None
        t0 = time.monotonic()
        try:
            c = regbench.conn(proxy)
            barrier.wait()
            t0 = time.monotonic()
            c.request("GET", f"/v2/{REPO_COLD}/blobs/{digest}")
            r = c.getresponse()
            h, n = hashlib.sha256(), 0
            while chunk := r.read(1 << 16):
                if first is None:
                    first = time.monotonic() - t0
                h.update(chunk)
                n += len(chunk)
            whole = size is None or n == size
            err = None if r.status == 200 and whole else f"status {r.status}, {n} bytes"
            results[i] = (r.status, h.hexdigest() == want and whole, first, time.monotonic() - t0, err)
        except Exception as e:  # a reset connection is a result, not a crash
            barrier.abort()  # never leave the others waiting for this one
            results[i] = (None, False, first, time.monotonic() - t0, f"{type(e).__name__}: {e}")

    start = time.monotonic()
    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - start


def crowd_curl(proxy, digest, want, size, clients):
    """Each client is curl piped into sha256sum, separate processes like real pullers
    (coreutils' sha256sum hashes without the CPU's SHA extensions: about 3 times the CPU of
    the threads' hashlib here, so the clients' own floor is higher)."""
    url = f"http://{proxy}/v2/{REPO_COLD}/blobs/{digest}"
    # curl's -w line goes to stderr; the body to stdout, straight into sha256sum.
    form = "%{stderr}%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n"
    start = time.monotonic()
    running = []
    for _ in range(clients):
        curl = subprocess.Popen(["curl", "-sS", "--max-time", "600", "-o", "-", "-w", form, url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        hasher = subprocess.Popen(["sha256sum"], stdin=curl.stdout, stdout=subprocess.PIPE)
        curl.stdout.close()    # sha256sum holds the pipe now
        running.append((curl, hasher))
    results = []
    for curl, hasher in running:
        hashed = hasher.communicate()[0].decode().split(" ", 1)[0]
        written = curl.communicate()[1].decode().strip().splitlines()
        try:
            code, n, first, total = written[-1].split()
            status, n = int(code), int(n)
        except (IndexError, ValueError):
            results.append((None, False, None, time.monotonic() - start, f"curl: {' '.join(written)[:200]}"))
            continue
        whole = size is None or n == size
        err = None if status == 200 and whole else f"status {status}, {n} bytes"
        results.append((status, hashed == want and whole, float(first), float(total), err))
    return results, time.monotonic() - start


def worker(argv):
    bench_dir, kind, *rest = argv
    sys.path.insert(0, bench_dir)
    import regbench  # noqa: E402  (the shared measurement script)

    if kind == "coalesce":
        proxy, upstream, log_path, mib, clients, client = rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), rest[5]
        data = os.urandom(mib << 20)
        digest = regbench.push_blob(upstream, REPO_COLD, data)
        want, size = hashlib.sha256(data).hexdigest(), len(data)
        del data
        before = regbench.count_gets(log_path, digest)
        results, wall = crowd_get(regbench, proxy, digest, want, size, clients, client)
        time.sleep(1)
        firsts = [r[2] for r in results if r[2] is not None]
        regbench.emit(metric=f"pullthrough_cold_{mib}M", clients=clients,
                      ok=sum(1 for r in results if r[0] == 200 and r[1]), wall_s=round(wall, 3),
                      first_byte_s=round(min(firsts), 3) if firsts else None,
                      slowest_s=round(max(r[3] for r in results), 3),
                      upstream_gets=regbench.count_gets(log_path, digest) - before, digest=digest,
                      client_errors=sorted({r[4] for r in results if r[4]}))
        t0 = time.monotonic()
        c = regbench.conn(proxy)
        c.request("GET", f"/v2/{REPO_COLD}/blobs/{digest}")
        r = c.getresponse()
        n = 0
        while chunk := r.read(1 << 20):
            n += len(chunk)
        regbench.emit(metric=f"pullthrough_warm_{mib}M_s", value=round(time.monotonic() - t0, 3),
                      bytes=n if r.status == 200 else 0, status=r.status)
    elif kind == "crowd":
        proxy, digest, clients, client = rest[0], rest[1], int(rest[2]), rest[3]
        results, wall = crowd_get(regbench, proxy, digest, digest.split(":", 1)[1], None, clients, client)
        regbench.emit(metric="crowd", clients=clients, wall_s=round(wall, 3),
                      ok=sum(1 for r in results if r[0] == 200 and r[1]),
                      client_errors=sorted({r[4] for r in results if r[4]}))
    elif kind == "warm":
        url, mib, seconds = rest[0], int(rest[1]), int(rest[2])
        for c in (1, 8):
            mbps, rps, bad = regbench.wrk_mbps(url, c, seconds)
            regbench.emit(metric=f"cached_get_{mib}M_c{c}_MBps", value=mbps, requests_per_s=rps, non2xx=bad)
    else:
        raise SystemExit(f"unknown worker {kind}")
    return 0


# --------------------------------------------------------------------------
# Report


def show(v):
    """bench_core's number format, but counts print as counts ("1", not "1.00")."""
    return str(v) if isinstance(v, int) else fmt(v)


def unit_of(key):
    return "GETs" if key.endswith("_gets") else core.unit_of(key)


def compare(args, result, keys, labels):
    rows = []
    for key in keys:
        row = {"figure": key, "label": labels.get(key, key), "unit": unit_of(key), "better": core.better_of(key)}
        for name, px in result["proxies"].items():
            f = px["figures"].get(key)
            if f is None or f.get("value") is None or f.get("error"):
                row[name] = None
                row[f"{name}_error"] = (f or {}).get("error") or px["phase_errors"].get(phase_of(args, key)) or \
                    px.get("start_error") or ("interrupted" if result.get("interrupted") else "not measured")
            else:
                row[name] = f["value"]
        core.add_ratio(row)
        a, b = row.get("registryd"), row.get("reference")
        if a is not None and b == 0 and a > 0:
            row["winner"] = "reference" if row["better"] == "lower" else "registryd"
        rows.append(row)
    return rows


def phase_of(args, key):
    for p, ks in keys_of(args).items():
        if key in ks:
            return p
    return "rss"


def checks(args, result):
    """Pass/fail of what a pull-through cache must do, per proxy."""
    out = []
    kc = keys_of(args)["cold"]
    for name, px in result["proxies"].items():
        figs, ex = px["figures"], px["extra"]
        if kc[2] in figs and figs[kc[2]].get("value") is not None:
            n = figs[kc[2]]["value"]
            out.append((name, n == 1, f"cold blob fetched from upstream {n} time(s) for {args.clients} clients"
                                      f" (target 1)"))
        if kc[0] in figs and figs[kc[0]].get("ok") is not None:
            ok = figs[kc[0]]["ok"]
            out.append((name, ok == args.clients, f"{ok} of {args.clients} cold clients got the whole, correct blob"))
        if "warm" in ex and "upstream_requests" in ex["warm"]:
            n = blob_gets(ex["warm"]["upstream_requests"])
            out.append((name, n == 0, f"upstream blob GETs while wrk read the cached blob: {n} (target 0)"))
        rise = figs.get("rss_cold_rise_MiB", {}).get("value")
        if name == "registryd" and rise is not None:
            out.append((name, rise <= 20, f"largest RSS rise of one process during the cold clients: {rise} MiB "
                                          "(target <= 20)"))
        largest = figs.get("rss_idle_largest_MiB", {}).get("value")
        if name == "registryd" and largest is not None:
            out.append((name, largest <= 60, f"largest process idle: {largest} MiB RSS (target <= 60 per worker)"))
        runs = ex.get("image", {}).get("runs", [])
        if runs:
            warm = [blob_gets(r.get("warm_upstream_requests", {})) for r in runs if "warm" in r]
            if warm:
                out.append((name, not any(warm), f"upstream blob GETs in warm image pulls: {warm} (target 0)"))
            blobs = len(args.image) + 1
            cold = [blob_gets(r.get("cold_upstream_requests", {})) for r in runs if "cold" in r]
            if cold:
                out.append((name, all(c == blobs for c in cold),
                            f"upstream blob GETs in cold image pulls: {cold} (the image has {blobs} blobs)"))
    return [{"proxy": n, "ok": ok, "what": w} for n, ok, w in out]


# --------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Benchmark registryd's pull-through cache against the reference registry's, side by side.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PHASES),
                    help="comma-separated subset of: cold,warm,image (default: all). RSS is always "
                         "reported. warm implies an unreported cold.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: 32 MiB blob, 8 clients, 2 s wrk runs, one small image (under a minute)")
    ap.add_argument("--output", default=None,
                    help="JSON results file (default benchmarks/results/mirror-<UTC time>.json)")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (storage, configs, logs)")
    ap.add_argument("--seconds", type=int, default=None, help="duration of each wrk run (default 10, quick 2)")
    ap.add_argument("--clients", type=int, default=None, help="clients of the cold test (default 16, quick 8)")
    ap.add_argument("--client", choices=("threads", "curl"), default="threads",
                    help="the cold test's clients: threads of one process as regbench.py coalesce (default), "
                         "or curl | sha256sum processes")
    ap.add_argument("--runs", type=int, default=None,
                    help="image pulls per proxy, a fresh image each (default 3, quick 1)")
    ap.add_argument("--proxies", default=",".join(PROXIES), help="which to run: registryd,reference (default both)")
    ap.add_argument("--workers", type=int, default=None,
                    help="registryd's [server] workers (default: its default, one per CPU)")
    ap.add_argument("--twistd", default=None, help="twistd to start registryd with (default: next to python)")
    ap.add_argument("--reference-bin", default=DEFAULT_REFERENCE,
                    help=f"docker-registry for the upstreams and the reference proxy (default {DEFAULT_REFERENCE})")
    ap.add_argument("--regbench-dir", default=DEFAULT_REGBENCH_DIR,
                    help="folder holding regbench.py and mkimage.py (default $REGBENCH_DIR or benchmarks/tools)")
    ap.add_argument("--start-timeout", type=float, default=30, help="seconds to wait for GET /v2/ (default 30)")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.phases if p not in PHASES]
    if bad or not args.phases:
        ap.error(f"--only: unknown {','.join(bad)} (choose from {','.join(PHASES)})")
    args.phases = [p for p in PHASES if p in args.phases]
    args.proxies = [s.strip() for s in args.proxies.split(",") if s.strip()]
    if not args.proxies or any(s not in PROXIES for s in args.proxies):
        ap.error(f"--proxies: choose from {','.join(PROXIES)}")
    s = SETTINGS["quick" if args.quick else "full"]
    args.blob_mib, args.image = s["blob_mib"], s["image"]
    for opt in ("seconds", "clients", "runs"):
        if getattr(args, opt) is None:
            setattr(args, opt, s[opt])
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be at least 1")
    for f in ("regbench.py", "mkimage.py"):
        if not os.path.exists(os.path.join(args.regbench_dir, f)):
            ap.error(f"{f} not found in {args.regbench_dir} (use --regbench-dir or $REGBENCH_DIR)")
    return args


def start_all(args, sides, result):
    """Upstreams first (the reference proxy panics at start-up if its upstream
    does not answer), then the proxies; idle RSS once both are up."""
    for role in ("upstream", "proxy"):
        for side in sides.values():
            info = result["proxies"][side.name]
            if "start_error" in info:
                continue
            srv = getattr(side, role)
            log(f"starting {side.name} {role} on {srv.hostport}: {' '.join(srv.cmd)}")
            try:
                srv.start()
            except OSError as e:
                info["start_error"] = f"{role}: cannot start: {e}"
                continue
        for side in sides.values():
            info = result["proxies"][side.name]
            if "start_error" in info:
                continue
            srv = getattr(side, role)
            where = info if role == "proxy" else info["upstream"]
            try:
                where["ready_s"] = round(srv.wait_ready(args.start_timeout), 2)
            except RuntimeError as e:
                info["start_error"] = f"{role} did not start: {e}"
                where["log_tail"] = tail(srv.log_path)
                log(f"{side.name} {role} FAILED to start: {e}")
                for line in where["log_tail"][-8:]:
                    log(f"  {side.name} {role}| {line}")
                srv.stop()
    time.sleep(1)
    for side in sides.values():
        info = result["proxies"][side.name]
        if "start_error" not in info and side.proxy.alive():
            mem = side.proxy.memory()
            info["figures"]["rss_idle_MiB"] = {"value": mem.get("VmRSS"), "pid": side.proxy.proc.pid}
            info["memory_after"]["idle"] = mem
            idle = info["memory_tree"]["idle"] = process_tree.snapshot(side.proxy.proc.pid)
            info["figures"]["pss_idle_MiB"] = {"value": idle["pss_MiB"]}
            info["figures"]["rss_idle_largest_MiB"] = {
                "value": max((p["rss_MiB"] for p in idle["processes"]), default=None),
                "processes": idle["processes"]}


def dead(side, info):
    """None if both of a side's servers run, else why not (and keep their log tails)."""
    if "start_error" in info:
        return info["start_error"]
    for role, srv, where in (("proxy", side.proxy, info), ("upstream", side.upstream, info["upstream"])):
        if not srv.alive():
            where.setdefault("log_tail", tail(srv.log_path))
            return f"{role} exited with status {srv.proc.returncode}"
    return None


def run_phases(args, sides, result, workdir):
    plan = list(args.phases)
    if "warm" in plan and "cold" not in plan:
        plan.insert(0, "cold(setup)")
    order = list(sides)
    for i, phase in enumerate(plan):
        real = phase.split("(")[0]
        names = order if i % 2 == 0 else order[::-1]
        if real == "image":
            run_image_phase(args, [sides[n] for n in names], result, workdir)
            continue
        for name in names:
            side, info = sides[name], result["proxies"][name]
            why = dead(side, info)
            if why:
                info["phase_errors"][real] = why
                continue
            log(f"{name}: {phase} ...")
            t0 = time.monotonic()
            if real == "cold":
                with process_tree.Sampler(side.proxy.proc.pid) as sampler:
                    figs, error, extra = measure_cold(args, side)
                if phase == real and "idle" in info["memory_tree"]:
                    rises = process_tree.rise(info["memory_tree"]["idle"], sampler)
                    info["memory_tree"]["cold"] = rises
                    figs["rss_cold_peak_MiB"] = {"value": sampler.peak_tree}
                    figs["rss_cold_rise_MiB"] = {
                        "value": max((r["rise_MiB"] for r in rises if r["rise_MiB"] is not None), default=None),
                        "processes": rises}
                if phase == real and error is None and side.cold_digest:
                    figs.update(measure_floor(args, side))
            else:
                figs, error, extra = measure_warm(args, side)
            why = dead(side, info)
            if why:
                error = (error + "; " if error else "") + why
            if phase == real:
                info["figures"].update(figs)
                info["extra"][real] = extra
                if error:
                    info["phase_errors"][real] = error
            elif error or not side.cold_digest:
                info["phase_errors"]["warm"] = f"setup (cold pull) failed: {error or 'no blob'}"
            info["memory_after"][phase] = side.proxy.memory()
            shown = ", ".join(f"{k}={show(v.get('value'))}" for k, v in figs.items()) or "no figures"
            log(f"{name}: {phase} done in {time.monotonic() - t0:.1f} s: {shown}"
                + (f"  ERROR: {error}" if error else ""))
            if error:
                info.setdefault("log_tail", tail(side.proxy.log_path))


def run_image_phase(args, sides, result, workdir):
    state = {"push": {}, "broken": {}}
    for side in sides:
        why = dead(side, result["proxies"][side.name])
        if why:
            state["broken"][side.name] = why
    runs = {s.name: [] for s in sides}
    log(f"image: {args.runs} run(s) of a fresh {core.describe_image(args.image)} image through each proxy ...")
    try:
        for i, tag in image_runs(args, sides, workdir, state):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                if side.name in state["broken"]:
                    continue
                try:
                    rec = pull_image(args, side, tag, workdir, i)
                except RuntimeError as e:
                    state["broken"][side.name] = f"skopeo pull through the proxy failed: {e}"
                    continue
                finally:
                    why = dead(side, result["proxies"][side.name])
                    if why:
                        state["broken"][side.name] = why
                runs[side.name].append(rec)
                log(f"{side.name}: image run {i}: cold {rec['cold']} s ({blob_gets(rec['cold_upstream_requests'])} "
                    f"upstream blob GETs), warm {rec['warm']} s")
    except RuntimeError as e:  # mkimage failed: nothing to pull for anyone
        for side in sides:
            state["broken"].setdefault(side.name, str(e))
    for side in sides:
        info = result["proxies"][side.name]
        rs = runs[side.name]
        info["extra"]["image"] = {"runs": rs, "push_to_upstream_s": state["push"].get(side.name, [])}
        if side.name in state["broken"]:
            info["phase_errors"]["image"] = state["broken"][side.name]
            info.setdefault("log_tail", tail(side.proxy.log_path))
            log(f"{side.name}: image FAILED: {state['broken'][side.name]}")
            continue
        if len(rs) == args.runs:
            for kind in ("cold", "warm"):
                vals = [r[kind] for r in rs]
                info["figures"][f"image_pull_{kind}_s"] = {"value": round(statistics.median(vals), 3), "runs": vals}
            gets = [blob_gets(r["cold_upstream_requests"]) for r in rs]
            info["figures"]["image_cold_upstream_blob_gets"] = {"value": int(statistics.median_low(gets)),
                                                                "runs": gets}
        info["memory_after"]["image"] = side.proxy.memory()


def main(argv):
    if argv[:1] == ["_worker"]:
        return worker(argv[1:])
    args = parse_args(argv)
    output = startup.results_path(args.output, "mirror")
    startup.interrupt_on_sigterm()
    # Ctrl-C stops the run cleanly even when started from a script with '&'
    # (which leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    missing = [t for t in ("skopeo", "wrk") if not shutil.which(t)]
    if missing:
        log(f"warning: not on PATH: {', '.join(missing)}; figures that need them will fail")

    workdir = tempfile.mkdtemp(prefix="bench-mirror-")
    sides = {}
    result = {
        "benchmark": "mirror",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "params": {"quick": args.quick, "phases": args.phases, "blob_MiB": args.blob_mib, "clients": args.clients,
                   "seconds": args.seconds, "image": core.describe_image(args.image), "image_runs": args.runs,
                   "regbench_dir": args.regbench_dir, "workers": args.workers, "client": args.client},
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                 "loadavg_start": process_tree.loadavg()},
        "proxies": {},
    }
    rc, out, err = run_group([args.reference_bin, "--version"], 10) if os.path.exists(args.reference_bin) \
        else (None, "", "")
    result["reference_version"] = (out or err or "").strip()
    interrupted = False
    try:
        for name in args.proxies:
            up = DockerRegistry(f"upstream-of-{name}", workdir, args.reference_bin)
            if name == "registryd":
                px = RegistrydProxy(workdir, args.twistd or find_twistd(), up.port, args.workers)
            else:
                px = DockerRegistry("reference", workdir, args.reference_bin, f"http://{up.hostport}")
            sides[name] = Side(name, px, up)
            result["proxies"][name] = {
                "cmd": px.cmd, "port": px.port, "config": px.config,
                "upstream": {"cmd": up.cmd, "port": up.port, "access_log": up.access_log},
                "figures": {}, "phase_errors": {}, "memory_after": {}, "memory_tree": {}, "extra": {},
            }
        start_all(args, sides, result)
        run_phases(args, sides, result, workdir)
        for name, side in sides.items():
            if side.proxy.alive():
                result["proxies"][name]["figures"]["rss_peak_MiB"] = {"value": side.proxy.memory().get("VmHWM")}
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping servers")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stop everything even if Ctrl-C is pressed again
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, side in sides.items():
            for role in ("proxy", "upstream"):
                srv = getattr(side, role)
                srv.stop()
                info = result["proxies"][name]
                where = info if role == "proxy" else info["upstream"]
                if srv.proc is not None:
                    where["exit_status"] = srv.proc.returncode
                if (info["phase_errors"] or "start_error" in info) and "log_tail" not in where:
                    where["log_tail"] = tail(srv.log_path)
        if args.keep_temp:
            log(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["host"]["loadavg_end"] = process_tree.loadavg()
    result["interrupted"] = interrupted
    keys = ["rss_idle_MiB", "pss_idle_MiB", "rss_idle_largest_MiB"]
    for p in args.phases:
        keys += keys_of(args)[p]
        if p == "cold":
            keys += ["rss_cold_peak_MiB", "rss_cold_rise_MiB"]
    keys.append("rss_peak_MiB")
    result["comparison"] = compare(args, result, keys, labels_of(args))
    result["checks"] = checks(args, result)
    shown = [{**r, **{s: show(r[s]) for s in result["proxies"] if r.get(s) is not None}}
             for r in result["comparison"]]
    print_table(shown, list(result["proxies"]))
    print(f"\nregistryd workers: {args.workers if args.workers is not None else 'default'}; load average "
          f"(1, 5, 15 min) at start {result['host']['loadavg_start']}, at end {result['host']['loadavg_end']}")
    for name, px in result["proxies"].items():
        for p in px["memory_tree"].get("cold", []):
            print(f"  {name} {p['role']} pid {p['pid']}: idle {show(p['idle_MiB'])} MiB, peak during cold "
                  f"{show(p['peak_MiB'])} MiB (+{show(p['rise_MiB'])})")
    if result["checks"]:
        print("\nchecks:")
        for c in result["checks"]:
            print(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['proxy']:<10} {c['what']}")
    startup.write_results(output, result)
    if interrupted:
        return 130
    complete = all(r.get(s) is not None for r in result["comparison"] for s in result["proxies"])
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
