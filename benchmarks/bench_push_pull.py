#!/usr/bin/env python3
"""A big push while clients pull a cached blob: registryd against the reference registry.

Issue 15's target: "A 1 GiB push while 8 clients pull a cached blob: their
throughput drops by less than 20%; reactor lag p99 under 10 ms in every
worker." For each server, in the same run:

  1. a blob (256 MiB; 16 with --quick) is pushed, so it is cached;
  2. wrk GETs it with 8 connections for --seconds: the throughput alone;
  3. the same wrk run while a 1 GiB blob (64 MiB with --quick) is pushed in one
     streamed PATCH (then PUT ?digest=), again and again until wrk is done, so
     the whole run is under the push: the throughput during the push;
  4. registryd only: its registryd_reactor_lag_seconds histogram, per worker
     process, over step 3: the p99 (as the histogram's bucket bound, in ms).

Figures
  pull_alone_c8_MBps          step 2, MB/s
  pull_during_push_c8_MBps    step 3, MB/s
  pull_drop_pct               100 * (1 - step 3 / step 2): target < 20
  push_during_pulls_MBps      the pushes' own rate during step 3, MB/s
  reactor_lag_p99_ms          the largest per-worker p99 bound in step 3 (registryd only): target < 10
  reactor_lag_p99_alone_ms    the same over step 2, without the push: what the machine's load alone costs
  reactor_lag_p99_idle_ms     the same over --seconds / 2 of no traffic at all, before step 2
  runq_wait_ms_per_s          registryd only: how long per second its busiest worker's reactor thread was
                              runnable but waiting for a CPU (/proc/<pid>/task/<pid>/schedstat) over
                              step 3 (runq_wait_alone_ms_per_s: over step 2): lag that is the machine's
                              scheduling, not a long step of ours (a step of ours is CPU time, not a wait)

--workers N sets registryd's [server] workers. The load average is printed with
the figures: on a shared machine, ratios within one run are what count.

Stdlib only (plus bench_core.py next to this file), wrk and docker-registry on PATH. Loopback only.
"""
import argparse
import datetime
import glob
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_core as core  # noqa: E402
import process_tree  # noqa: E402
import startup  # noqa: E402  (results path and file)

SETTINGS = {"full": {"blob_mib": 256, "push_mib": 1024, "seconds": 10},
            "quick": {"blob_mib": 16, "push_mib": 64, "seconds": 2}}
LAG = "registryd_reactor_lag_seconds"
BLOCK = 1 << 20
KEYS = ["pull_alone_c8_MBps", "pull_during_push_c8_MBps", "pull_drop_pct", "push_during_pulls_MBps",
        "reactor_lag_p99_idle_ms", "reactor_lag_p99_alone_ms", "reactor_lag_p99_ms",
        "runq_wait_alone_ms_per_s", "runq_wait_ms_per_s"]
LABELS = {"pull_alone_c8_MBps": "cached blob GET, c=8, alone",
          "pull_during_push_c8_MBps": "... while a {push} blob is pushed",
          "pull_drop_pct": "pull throughput drop (target < 20)",
          "push_during_pulls_MBps": "the push's rate meanwhile",
          "reactor_lag_p99_idle_ms": "reactor lag p99, worst worker, idle",
          "reactor_lag_p99_alone_ms": "reactor lag p99, worst worker, no push",
          "reactor_lag_p99_ms": "reactor lag p99, worst worker (< 10)",
          "runq_wait_alone_ms_per_s": "reactor waiting for a CPU, no push",
          "runq_wait_ms_per_s": "reactor waiting for a CPU, pushing"}
UNITS = {"pull_drop_pct": "%", "reactor_lag_p99_ms": "ms", "reactor_lag_p99_alone_ms": "ms",
         "reactor_lag_p99_idle_ms": "ms", "runq_wait_alone_ms_per_s": "ms/s", "runq_wait_ms_per_s": "ms/s"}
#: Figures only registryd has (the reference exports no reactor lag).
REGISTRYD_ONLY = ("reactor_lag_p99_idle_ms", "reactor_lag_p99_alone_ms", "reactor_lag_p99_ms",
                  "runq_wait_alone_ms_per_s", "runq_wait_ms_per_s")


def _conn(hostport, timeout=600):
    host, port = hostport.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _location(response):
    loc = response.getheader("Location")
    return "/" + loc.split("/", 3)[3] if loc.startswith("http") else loc


def push_stream(hostport, repo, mib, seed):
    """Push ``mib`` MiB of fresh bytes in one streamed PATCH, then PUT ?digest= (never all in memory).
    Returns the digest."""
    h = hashlib.sha256()
    block = os.urandom(BLOCK)

    def body():
        for i in range(mib):
            chunk = struct.pack(">QQ", seed, i) + block[16:]
            h.update(chunk)
            yield chunk

    c = _conn(hostport)
    c.request("POST", f"/v2/{repo}/blobs/uploads/")
    r = c.getresponse()
    r.read()
    if r.status != 202:
        raise RuntimeError(f"POST upload: {r.status}")
    c.request("PATCH", _location(r), body=body(), headers={"Content-Type": "application/octet-stream",
                                                           "Content-Length": str(mib * BLOCK)})
    r = c.getresponse()
    r.read()
    if r.status != 202:
        raise RuntimeError(f"PATCH upload: {r.status}")
    loc = _location(r)
    digest = "sha256:" + h.hexdigest()
    c.request("PUT", loc + ("&" if "?" in loc else "?") + "digest=" + digest, body=b"",
              headers={"Content-Length": "0"})
    r = c.getresponse()
    r.read()
    if r.status != 201:
        raise RuntimeError(f"PUT upload: {r.status}")
    c.close()
    return digest


def wrk_mbps(url, conns, seconds):
    rc, out, err = core.run_group(["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{seconds}s", url],
                                  seconds + 60)
    if rc != 0:
        raise RuntimeError(f"wrk: {core.summarize(err) or rc}")
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m is None or bad:
        raise RuntimeError(f"wrk: {'non-2xx answers' if bad else 'no transfer rate'}")
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1, "GB": 1e3}[m.group(2)]
    return round(float(m.group(1)) * scale * 1.048576, 1)


# --------------------------------------------------------------------------
# Reactor lag, per worker process


def _buckets_of_file(path):
    """{le: count} (not cumulative) of the lag histogram in one process's prometheus_client file."""
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    used = struct.unpack_from("i", data, 0)[0]
    pos = 8
    while pos < used:
        size = struct.unpack_from("i", data, pos)[0]
        pos += 4
        key = data[pos:pos + size].decode()
        pos += size + (8 - (size + 4) % 8)
        value = struct.unpack_from("d", data, pos)[0]
        pos += 16
        name, sample, labels, _ = json.loads(key)
        if name == LAG and sample == LAG + "_bucket":
            out[float(labels["le"])] = out.get(float(labels["le"]), 0) + value
    return out


def _buckets_of_text(hostport):
    """{le: count} (not cumulative) from a single process's /metrics."""
    c = _conn(hostport, 30)
    c.request("GET", "/metrics")
    r = c.getresponse()
    text = r.read().decode()
    if r.status != 200:
        raise RuntimeError(f"GET /metrics: {r.status}")
    cumulative = sorted((float(le), float(v)) for le, v in
                        re.findall(LAG + r'_bucket\{le="([^"]+)"\} (\S+)', text))
    out, below = {}, 0.0
    for le, v in cumulative:
        out[le], below = v - below, v
    return out


def lag_buckets(server, workers):
    """{process: {le: count}}: each worker's file on a node of workers, else the one process's /metrics."""
    files = glob.glob(os.path.join(server.data, "run", "metrics", "histogram_*.db"))
    if workers != 1 and files:
        return {os.path.basename(p)[len("histogram_"):-3]: _buckets_of_file(p) for p in files}
    return {"single": _buckets_of_text(server.hostport)}


def p99_ms(before, after):
    """The bucket bound under which 99 % of the observations between two readings fell, in ms."""
    les = sorted(set(before) | set(after))
    counts = [after.get(le, 0) - before.get(le, 0) for le in les]
    total = sum(counts)
    if total <= 0:
        return None, 0
    seen = 0.0
    for le, n in zip(les, counts):
        seen += n
        if seen >= 0.99 * total:
            return (None if le == float("inf") else round(le * 1000, 1)), int(total)
    return None, int(total)


def reactor_threads(server, workers):
    """The processes whose main thread runs a reactor: each worker, or the one process."""
    return (core._children(server.proc.pid) if workers != 1 else []) or [server.proc.pid]


def schedstat(pids):
    """{pid: (ns on a CPU, ns runnable waiting for one)} of each process's main thread."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
                on_cpu, waiting = f.read().split()[:2]
            out[pid] = (int(on_cpu), int(waiting))
        except (OSError, ValueError):
            pass
    return out


def runq_wait_ms_per_s(before, after, seconds):
    """The busiest reactor's wait for a CPU between two schedstat readings, ms per second."""
    waits = [(after[p][1] - before[p][1]) / 1e6 / seconds for p in after if p in before]
    return round(max(waits), 1) if waits else None


# --------------------------------------------------------------------------


def measure(args, name, server):
    figs, extra = {}, {}
    repo = "bench/pushpull"
    digest = push_stream(server.hostport, repo, args.blob_mib, seed=1)
    url = f"http://{server.hostport}/v2/{repo}/blobs/{digest}"
    wrk_mbps(url, 8, 1)     # warm the page cache and the server's caches
    pids = reactor_threads(server, args.workers) if name == "registryd" else []
    if name == "registryd":
        # No traffic at all: the lag that is only the machine's scheduling.
        lag_idle = lag_buckets(server, args.workers)
        time.sleep(max(1.0, args.seconds / 2))
        lag_alone = lag_buckets(server, args.workers)
        figs["reactor_lag_p99_idle_ms"], extra["reactor_lag_p99_ms_idle_per_process"] = _worst_lag(
            lag_idle, lag_alone)
    else:
        lag_alone = None
    sched, started = schedstat(pids), time.monotonic()
    figs["pull_alone_c8_MBps"] = wrk_mbps(url, 8, args.seconds)
    if pids:
        figs["runq_wait_alone_ms_per_s"] = runq_wait_ms_per_s(sched, schedstat(pids), time.monotonic() - started)
    stop = threading.Event()
    pushes, errors = [], []

    def pusher():
        seed = 2
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                push_stream(server.hostport, "bench/big", args.push_mib, seed)
            except (OSError, RuntimeError) as e:
                errors.append(str(e))
                return
            pushes.append(time.monotonic() - t0)
            seed += 1

    lag_before = lag_buckets(server, args.workers) if name == "registryd" else None
    if lag_before is not None:
        # The same pulls without the push: what the machine's own load costs the reactor.
        figs["reactor_lag_p99_alone_ms"], extra["reactor_lag_p99_ms_alone_per_process"] = _worst_lag(
            lag_alone, lag_before)
    thread = threading.Thread(target=pusher, daemon=True)
    sched, started = schedstat(pids), time.monotonic()
    thread.start()
    try:
        figs["pull_during_push_c8_MBps"] = wrk_mbps(url, 8, args.seconds)
    finally:
        stop.set()
    thread.join()     # the push under way finishes: its time counts in its rate
    elapsed = time.monotonic() - started
    if pids:
        figs["runq_wait_ms_per_s"] = runq_wait_ms_per_s(sched, schedstat(pids), elapsed)
    if errors:
        raise RuntimeError(f"push failed: {errors[0]}")
    figs["push_during_pulls_MBps"] = round(len(pushes) * args.push_mib * 1.048576 / elapsed, 1)
    extra["pushes_s"] = [round(p, 2) for p in pushes]
    figs["pull_drop_pct"] = round(100 * (1 - figs["pull_during_push_c8_MBps"] / figs["pull_alone_c8_MBps"]), 1)
    if lag_before is not None:
        figs["reactor_lag_p99_ms"], extra["reactor_lag_p99_ms_per_process"] = _worst_lag(
            lag_before, lag_buckets(server, args.workers))
    return {k: {"value": v} for k, v in figs.items()}, extra


def _worst_lag(before, after):
    """The worst process's p99 between two readings, and every process's."""
    per = {proc: p99_ms(before.get(proc, {}), buckets) for proc, buckets in after.items()}
    measured = [p for p, n in per.values() if n]
    worst = max(measured) if measured and None not in measured else None
    return worst, {proc: {"p99_ms": p, "ticks": n} for proc, (p, n) in per.items()}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 16 MiB blob, 64 MiB pushes, 2 s runs")
    ap.add_argument("--seconds", type=int, default=None, help="each wrk run (default 10, quick 2)")
    ap.add_argument("--workers", type=int, default=None, help="registryd's [server] workers (default: its own)")
    ap.add_argument("--servers", default="registryd,reference")
    ap.add_argument("--output", default=None, help="JSON results (default benchmarks/results/push-pull-<time>.json)")
    ap.add_argument("--twistd", default=None)
    ap.add_argument("--reference-bin", default=core.DEFAULT_REFERENCE)
    ap.add_argument("--start-timeout", type=float, default=30)
    args = ap.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    args.blob_mib, args.push_mib = s["blob_mib"], s["push_mib"]
    args.seconds = args.seconds or s["seconds"]
    args.servers = [x for x in args.servers.split(",") if x]
    return args


def main(argv):
    args = parse_args(argv)
    output = startup.results_path(args.output, "push-pull")
    workdir = tempfile.mkdtemp(prefix="bench-push-pull-")
    result = {"benchmark": "push-pull", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "params": {"quick": args.quick, "seconds": args.seconds, "blob_MiB": args.blob_mib,
                         "push_MiB": args.push_mib, "workers": args.workers},
              "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                       "loadavg_start": process_tree.loadavg()},
              "servers": {}}
    servers = {}
    try:
        for name in args.servers:
            srv = (core.Registryd(workdir, args.twistd or core.find_twistd(), args.workers) if name == "registryd"
                   else core.Reference(workdir, args.reference_bin))
            servers[name] = srv
            info = result["servers"][name] = {"cmd": srv.cmd, "figures": {}, "extra": {}}
            srv.start()
            try:
                srv.wait_ready(args.start_timeout)
            except RuntimeError as e:
                info["error"] = str(e)
                info["log_tail"] = core.tail(srv.log_path)
        for name in args.servers:
            srv, info = servers[name], result["servers"][name]
            if "error" in info:
                continue
            core.log(f"{name}: cached pulls alone, then during {args.push_mib} MiB pushes ...")
            try:
                info["figures"], info["extra"] = measure(args, name, srv)
            except (OSError, RuntimeError) as e:
                info["error"] = str(e)
                info["log_tail"] = core.tail(srv.log_path)
            core.log(f"{name}: " + ", ".join(f"{k}={core.fmt(v['value'])}" for k, v in info["figures"].items()))
    finally:
        for srv in servers.values():
            srv.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result["host"]["loadavg_end"] = process_tree.loadavg()
    rows = []
    for key in KEYS:
        row = {"figure": key, "label": LABELS[key].format(push=f"{args.push_mib} MiB"),
               "unit": UNITS.get(key, core.unit_of(key)), "better": core.better_of(key)}
        for name in args.servers:
            value = result["servers"][name]["figures"].get(key, {}).get("value")
            row[name] = value
            if value is None and (name == "registryd" or key not in REGISTRYD_ONLY):
                row[f"{name}_error"] = result["servers"][name].get("error", "not measured")
        core.add_ratio(row)
        rows.append(row)
    result["comparison"] = rows
    shown = [{**r, **{n: "n/a" for n in args.servers if n != "registryd" and r["figure"] in REGISTRYD_ONLY}}
             for r in rows]
    core.print_table(shown, args.servers)
    print(f"\nregistryd workers: {args.workers if args.workers is not None else 'default'}; load average "
          f"(1, 5, 15 min) at start {result['host']['loadavg_start']}, at end {result['host']['loadavg_end']}")
    lag = result["servers"].get("registryd", {}).get("extra", {}).get("reactor_lag_p99_ms_per_process", {})
    alone = result["servers"].get("registryd", {}).get("extra", {}).get("reactor_lag_p99_ms_alone_per_process", {})
    idle = result["servers"].get("registryd", {}).get("extra", {}).get("reactor_lag_p99_ms_idle_per_process", {})
    for proc, v in lag.items():
        print(f"  registryd {proc}: reactor lag p99 <= {v['p99_ms']} ms over {v['ticks']} ticks during the push, "
              f"<= {alone.get(proc, {}).get('p99_ms')} ms without it, "
              f"<= {idle.get(proc, {}).get('p99_ms')} ms without any traffic")
    startup.write_results(output, result)
    complete = all(r.get(f"{s}_error") is None for r in rows for s in args.servers)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
