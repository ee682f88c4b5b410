#!/usr/bin/env python3
"""Side-by-side S3 storage benchmark: registryd against the reference registry.

Both registries keep everything in the same radosgw (a one-node Ceph started
with ``scripts/ceph/start-ceph.sh`` on free loopback ports, or an endpoint
given with ``--s3-endpoint``), each in a bucket of its own. Each registry runs
as two nodes on its bucket, as two nodes of one deployment would:

  registryd            twistd -n registryd --config CONF   ([storage] driver = "s3")
  registryd-redirect   the same with [storage] redirect = true: blob GETs answer
                       307 with a presigned radosgw URL
  reference            docker-registry serve config.yml (storage.s3, redirect.disable: true)
  reference-redirect   the same with redirect.disable: false

Images and blobs are pushed through the streaming node; pulls and blob GETs go
through both nodes. Measured with the shared ``regbench.py`` (skopeo, wrk) and
``hey`` (which follows the 307 to radosgw, as docker, containerd and skopeo
do); every figure is printed for both registries with the ratio
registryd / reference.

Figures
  push_big_s, push_many_s         skopeo push of a 1 x 256 MiB and a 50 x 1 MiB image (median of 3), s
  pull_big_s, pull_many_s         skopeo pull of the same images from the streaming node, s
  pull_big_redirect_s, ...        the same from the redirecting node (skopeo follows the 307), s
  blob_get_256M_c{1,8}_MBps       wrk GET of a 256 MiB blob from the streaming node, c=1 and 8, MB/s
  blob_get_256M_redirect_c{1,8}_MBps
                                  hey GET of that blob from the redirecting node, following the
                                  307 to radosgw: whole round trip, MB/s
  rss_idle_MiB, rss_peak_MiB      VmRSS after start / VmHWM at the end, streaming node
  rss_idle_redirect_MiB, ...      the same for the redirecting node
  radosgw alone (no ratio):       hey GET of the presigned URL itself, c=1 and 8, MB/s (not with --quick)

--hot-cache SIZE gives registryd's streaming node a local hot blob cache
([storage] cache_size): its first blob GET fills the cache, the rest are sent
from the local file, so the streamed blob figures then compare a cached
registryd node with the reference streaming from the bucket.

--quick uses a 1 x 16 MiB and a 5 x 256 KiB image (one run each), a 16 MiB
blob and 1 s load runs: a CI smoke test that takes well under a minute once
Ceph is up.

Only the stdlib is used (plus bench_core.py next to this file), and skopeo,
wrk, hey and docker-registry on PATH; the Ceph packages when no --s3-endpoint
is given. Loopback only.
"""
import argparse
import datetime
import hashlib
import hmac
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_core as core  # noqa: E402  (servers, runner, number format, table)
import startup  # noqa: E402  (SIGTERM, the results file)
from bench_core import (  # noqa: E402
    DEFAULT_REFERENCE, DEFAULT_REGBENCH_DIR, Server, find_twistd, fmt, log, parse_records, print_table, run_group,
    registryd_environment, summarize, tail,
)

#: The repository's one-node Ceph launcher, as tests/ceph.py finds it.
DEFAULT_S3_TOOLS = os.environ.get("REGISTRYD_S3_TOOLS") or os.path.normpath(
    os.path.join(REPO, "scripts", "ceph"))
#: The S3 user start-ceph.sh creates (the same constants as tests/ceph.py).
CEPH_ACCESS_KEY = "CIACCESSKEY0000000"
CEPH_SECRET_KEY = "cisecretkey0000000000000000000000000000"
CEPH_REGION = "us-east-1"
CEPH_PORT_RANGE = 100         # start-ceph.sh binds OSD and mgr within [PMIN, PMIN + 100)
CEPH_MAX_DIR = 60             # admin socket paths must stay below 108 bytes

PHASES = ("push", "pull", "blobget")
REGISTRIES = ("registryd", "reference")
NODES = ("stream", "redirect")
SETTINGS = {
    "full": {"images": {"big": ["256M"], "many": ["1M"] * 50}, "runs": 3, "blob_mib": 256, "seconds": 10},
    "quick": {"images": {"big": ["16M"], "many": ["256K"] * 5}, "runs": 1, "blob_mib": 16, "seconds": 1},
}
CONCURRENCY = (1, 8)
BLOB_REPO = "regbench/s3blob"
PART_MIB = 16   # registryd's default part_size; the reference's chunksize is set to match


# --------------------------------------------------------------------------
# S3: the few bucket operations the benchmark needs (create, empty, delete),
# signed with AWS SigV4 by hand so that the script stays stdlib-only.


def _quote(text, safe="-_.~"):
    return urllib.parse.quote(text, safe=safe)


class S3Admin:
    def __init__(self, endpoint, access_key, secret_key, region):
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--s3-endpoint must be http://host:port, not {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self.host = parts.netloc
        self.access_key, self.secret_key, self.region = access_key, secret_key, region

    def request(self, method, path, query=None, body=b"", expect=(200,)):
        query = query or {}
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload_hash = hashlib.sha256(body).hexdigest()
        uri = _quote(path, safe="/-_.~")
        qs = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
        headers = {"host": self.host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, uri, qs, "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                               signed, payload_hash])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self.secret_key).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        host, port = self.host.rsplit(":", 1) if ":" in self.host else (self.host, "80")
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            c.request(method, uri + (f"?{qs}" if qs else ""), body=body or None,
                      headers={k: v for k, v in headers.items() if k != "host"})
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        if r.status not in expect:
            raise RuntimeError(f"S3 {method} {path}: {r.status} {data[:300]!r}")
        return r.status, data

    def create_bucket(self, bucket):
        self.request("PUT", f"/{bucket}")

    def warm_up(self, bucket):
        """Write into the bucket once, plainly and by multipart, and clean up.

        radosgw creates its data pools on the first object and the first
        multipart upload (several seconds on a fresh Ceph), and whichever
        registry wrote first would pay for it.
        """
        key = "bench-warm-up"
        self.request("PUT", f"/{bucket}/{key}", body=b"x" * 1024)
        _, data = self.request("POST", f"/{bucket}/{key}", {"uploads": ""})
        upload_id = ET.fromstring(data).findtext("{*}UploadId")
        self.request("PUT", f"/{bucket}/{key}", {"partNumber": "1", "uploadId": upload_id}, body=b"y" * 1024)
        self.request("DELETE", f"/{bucket}/{key}", {"uploadId": upload_id}, expect=(204,))
        self.request("DELETE", f"/{bucket}/{key}", expect=(204,))

    def bucket_bytes(self, bucket):
        """(objects, bytes) in the bucket."""
        n = size = 0
        for _, s in self._list(bucket):
            n, size = n + 1, size + s
        return n, size

    def _list(self, bucket):
        token = None
        while True:
            query = {"list-type": "2", "max-keys": "1000"}
            if token:
                query["continuation-token"] = token
            _, data = self.request("GET", f"/{bucket}", query)
            root = ET.fromstring(data)
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            for item in root.iter(f"{ns}Contents"):
                yield item.findtext(f"{ns}Key"), int(item.findtext(f"{ns}Size") or 0)
            token = root.findtext(f"{ns}NextContinuationToken")
            if root.findtext(f"{ns}IsTruncated") != "true" or not token:
                return

    def delete_bucket(self, bucket):
        """Abort unfinished multipart uploads, delete every object, then the bucket."""
        _, data = self.request("GET", f"/{bucket}", {"uploads": ""}, expect=(200, 404))
        root = ET.fromstring(data) if data else None
        if root is not None:
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            for up in root.iter(f"{ns}Upload"):
                self.request("DELETE", f"/{bucket}/{up.findtext(f'{ns}Key')}",
                             {"uploadId": up.findtext(f"{ns}UploadId")}, expect=(204, 404))
        for key, _ in list(self._list(bucket)):
            self.request("DELETE", f"/{bucket}/{key}", expect=(204, 404))
        self.request("DELETE", f"/{bucket}", expect=(204, 404))


class Ceph:
    """A one-node Ceph with radosgw started with start-ceph.sh on free ports."""

    def __init__(self, tools_dir, workdir):
        self.start_script = os.path.join(tools_dir, "start-ceph.sh")
        self.stop_script = os.path.join(tools_dir, "stop-ceph.sh")
        self.dir = os.path.join(workdir, "ceph")
        if len(self.dir) > CEPH_MAX_DIR:
            self.dir = tempfile.mkdtemp(prefix="bench-s3-ceph-", dir="/tmp")
            self.own_dir = True
        else:
            os.makedirs(self.dir)
            self.own_dir = False
        self.env = None
        self.endpoint = None
        self.rgw = None

    def start(self, timeout=240):
        errors = []
        for attempt in range(3):  # a free port can be taken before a daemon binds it
            rgw = _free_port()
            env = dict(os.environ, CEPH_DIR=os.path.join(self.dir, f"cluster{attempt}"), RGW_PORT=str(rgw),
                       MON1=str(_free_port()), MON2=str(_free_port()), PMIN=str(_free_range()))
            self.env, self.endpoint = env, f"http://127.0.0.1:{rgw}"
            log_path = os.path.join(self.dir, f"start{attempt}.log")
            with open(log_path, "wb") as f:
                proc = subprocess.Popen(["bash", self.start_script], env=env, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    rc = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    core._killpg(proc)
                    proc.wait()
                    rc = None
                except BaseException:
                    core._killpg(proc)
                    proc.wait()
                    self.stop()
                    raise
            if rc == 0 and _wait_answers(self.endpoint, 60):
                return self.endpoint
            errors.append(f"attempt {attempt}: start-ceph.sh exit status {rc}: "
                          + " | ".join(tail(log_path, 4)))
            self.stop()
        raise RuntimeError("Ceph did not start: " + "; ".join(errors))

    def restart_rgw_nodelay(self, timeout=60):
        """Restart the radosgw start-ceph.sh started, its beast frontend with
        ``tcp_nodelay=1``, and record its PID where stop-ceph.sh looks.

        Ceph 16's beast leaves Nagle on: on a kept-alive connection a response
        whose headers and body go out in two writes waits for the client's
        delayed ACK, about 40 ms for every small GET or LIST (HEAD and big
        bodies are hardly touched). That is a property of the object store,
        not of a registry; this takes it out when asked to.
        """
        d = self.env["CEPH_DIR"]
        pid_file = os.path.join(d, "rgw.pid")
        with open(pid_file) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        port = self.env["RGW_PORT"]
        with open(os.path.join(d, "log", "rgw-nodelay.out"), "ab") as f:
            self.rgw = subprocess.Popen(
                ["radosgw", "-c", os.path.join(d, "ceph.conf"), "-n", "client.rgw.a", "-f",
                 "--rgw_frontends", f"beast endpoint=127.0.0.1:{port} tcp_nodelay=1"],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        with open(pid_file, "w") as f:
            f.write(str(self.rgw.pid))
        if not _wait_answers(self.endpoint, timeout):
            raise RuntimeError(f"radosgw with tcp_nodelay=1 did not answer on {self.endpoint} in {timeout} s")

    def stop(self):
        if self.env is not None:
            subprocess.run(["bash", self.stop_script], env=self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120, check=False)
            self.env = None
        if self.rgw is not None:  # reap the radosgw restarted here (stop-ceph.sh killed it)
            try:
                self.rgw.wait(10)
            except subprocess.TimeoutExpired:
                self.rgw.kill()
                self.rgw.wait()
            self.rgw = None

    def remove(self):
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _free_port():
    return core.free_port()


def _port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_range():
    """The first of CEPH_PORT_RANGE free ports, below the kernel's ephemeral range."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - CEPH_PORT_RANGE)
        if all(_port_is_free(p) for p in range(base, base + CEPH_PORT_RANGE)):
            return base
    raise RuntimeError(f"no {CEPH_PORT_RANGE} consecutive free ports for the Ceph daemons")


def _wait_answers(endpoint, timeout):
    parts = urllib.parse.urlsplit(endpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------
# Servers: two nodes per registry on the registry's bucket.


class RegistrydNode(Server):
    def __init__(self, name, workdir, twistd, s3, bucket, redirect, hot_cache=None):
        super().__init__(name, workdir)
        self.config = os.path.join(self.dir, "registryd.toml")
        with open(self.config, "w") as f:
            f.write(registryd_config(s3, bucket, redirect, hot_cache))
        self.cwd = REPO
        self.env = registryd_environment()
        self.cmd = [twistd, "-n", "--pidfile=", "registryd", "--config", self.config,
                    "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--data-dir", self.data]


class ReferenceNode(Server):
    def __init__(self, name, workdir, binary, s3, bucket, redirect):
        super().__init__(name, workdir)
        self.config = os.path.join(self.dir, "config.yml")
        with open(self.config, "w") as f:
            f.write(reference_config(s3, bucket, redirect, self.port))
        self.cwd = self.dir
        self.cmd = [binary, "serve", self.config]

    def start(self):
        # No AWS_* variable reaches the reference: its aws-sdk-go reads them
        # (AWS_CA_BUNDLE, set on some hosts, makes 2.8 panic at start-up:
        # "LoadCustomCABundleError ... HTTPClient's transport unsupported
        # type"), and the config alone must say where and who it is.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.cwd, env=env, start_new_session=True)


def registryd_config(s3, bucket, redirect, hot_cache=None):
    return ("[storage]\n"
            'driver = "s3"\n'
            f"redirect = {'true' if redirect else 'false'}\n"
            + (f'cache_size = "{hot_cache}"\n' if hot_cache else "")
            + "\n"
            "[storage.s3]\n"
            f'endpoint = "{s3.endpoint}"\n'
            f'bucket = "{bucket}"\n'
            f'region = "{s3.region}"\n'
            f'access_key_id = "{s3.access_key}"\n'
            f'secret_access_key = "{s3.secret_key}"\n'
            f"part_size = {PART_MIB << 20}\n")


def reference_config(s3, bucket, redirect, port):
    # Debian's /etc/docker/registry/config.yml is never used. No blob
    # descriptor cache (as in bench_core), so every node reads the bucket.
    return ("version: 0.1\n"
            "log:\n"
            "  level: error\n"
            "storage:\n"
            "  s3:\n"
            f"    regionendpoint: {s3.endpoint}\n"
            "    forcepathstyle: true\n"
            "    secure: false\n"
            "    v4auth: true\n"
            f"    region: {s3.region}\n"
            f"    bucket: {bucket}\n"
            f"    accesskey: {s3.access_key}\n"
            f"    secretkey: {s3.secret_key}\n"
            f"    chunksize: {PART_MIB << 20}\n"
            "  delete:\n"
            "    enabled: true\n"
            "  redirect:\n"
            f"    disable: {'false' if redirect else 'true'}\n"
            "http:\n"
            f"  addr: 127.0.0.1:{port}\n")


class Deployment:
    """One registry under test: its bucket, its two nodes, and a TMPDIR its
    workers share (regbench's push leaves the tag stamp there for the pulls)."""

    def __init__(self, name, bucket, nodes, tmp):
        self.name, self.bucket, self.nodes, self.tmp = name, bucket, nodes, tmp
        self.blob = None          # (digest, redirect Location) from the blobget phase


# --------------------------------------------------------------------------
# Measurements


def worker_cmd(args, kind, *rest):
    return [sys.executable, os.path.abspath(__file__), "_worker", args.regbench_dir, kind, *map(str, rest)]


def regbench_cmd(args, sub, *rest):
    return [sys.executable, os.path.join(args.regbench_dir, "regbench.py"), sub, *map(str, rest)]


def run_worker(cmd, dep, timeout):
    env = dict(os.environ, TMPDIR=dep.tmp)
    rc, out, err = run_group(cmd, timeout, env=env)
    error = None
    if rc != 0:
        error = (f"exit status {rc}: " if rc is not None else "") + summarize(err)
    return parse_records(out), error


def with_suffix(key, suffix):
    """pull_big_s -> pull_big_redirect_s; blob_get_256M_c1_MBps -> blob_get_256M_redirect_c1_MBps."""
    if not suffix:
        return key
    m = re.match(r"^(blob_get_\d+M)(_.*)$", key)
    if m:
        return f"{m.group(1)}_{suffix}{m.group(2)}"
    for unit in ("_MiB", "_s"):
        if key.endswith(unit):
            return key[:-len(unit)] + f"_{suffix}" + unit
    return f"{key}_{suffix}"


def keys_of(args):
    b = f"{args.blob_mib}M"
    return {
        "push": ["push_big_s", "push_many_s"],
        "pull": ["pull_big_s", "pull_many_s", "pull_big_redirect_s", "pull_many_redirect_s"],
        "blobget": [f"blob_get_{b}_c{c}_MBps" for c in CONCURRENCY]
        + [f"blob_get_{b}_redirect_c{c}_MBps" for c in CONCURRENCY],
    }


def labels_of(args):
    big, many = (core.describe_image(v) for v in args.images.values())
    b = f"{args.blob_mib}M"
    labels = {
        "push_big_s": f"push {big} image (skopeo)",
        "push_many_s": f"push {many} image (skopeo)",
        "pull_big_s": f"pull {big}, streamed",
        "pull_many_s": f"pull {many}, streamed",
        "pull_big_redirect_s": f"pull {big}, redirected",
        "pull_many_redirect_s": f"pull {many}, redirected",
        "rss_idle_MiB": "RSS idle, streaming node",
        "rss_idle_redirect_MiB": "RSS idle, redirecting node",
        "rss_peak_MiB": "RSS peak (VmHWM), streaming node",
        "rss_peak_redirect_MiB": "RSS peak (VmHWM), redirecting node",
    }
    for c in CONCURRENCY:
        labels[f"blob_get_{b}_c{c}_MBps"] = f"blob GET {b}, streamed, c={c} (wrk)"
        labels[f"blob_get_{b}_redirect_c{c}_MBps"] = f"blob GET {b}, 307+radosgw, c={c} (hey)"
    return labels


def phase_timeout(args, phase):
    if args.quick:
        return 120
    return {"push": 1800, "pull": 1200}.get(phase, 8 * args.seconds + 600)


def measure(args, phase, dep, node_name):
    """Run one phase on one node; returns (figures, error, extra)."""
    node = dep.nodes[node_name]
    suffix = "" if node_name == "stream" else "redirect"
    t = phase_timeout(args, phase)
    extra = {}
    if phase in ("push", "pull"):
        if args.quick or args.runs != 3:
            cmd = worker_cmd(args, phase, node.hostport, args.runs, json.dumps(args.images))
        else:  # regbench's own push/pull: 1 x 256 MiB and 50 x 1 MiB, 3 runs
            cmd = regbench_cmd(args, phase, node.hostport)
        records, error = run_worker(cmd, dep, t)
        figs = core.to_figures(records)
    else:
        if node_name == "redirect" and not dep.blob:
            return {}, "no blob to fetch (the streaming node's blobget failed)", extra
        cmd = worker_cmd(args, "blobget", node.hostport, args.blob_mib, args.seconds,
                         dep.blob[0] if node_name == "redirect" else "-", args.s3.endpoint)
        records, error = run_worker(cmd, dep, t)
        figs = {}
        for r in records:
            m = r.get("metric")
            if m == "blob":
                dep.blob = (r["digest"], None)
                extra["blob"] = {"digest": r["digest"], "push_s": r.get("push_s")}
            elif m == "redirect":
                dep.blob = (dep.blob[0] if dep.blob else r["digest"], r.get("location"))
                extra["redirect"] = {k: v for k, v in r.items() if k not in ("metric", "location")}
            elif m and "non2xx" in r:  # wrk
                figs.update(core.to_figures([r]))
            elif m and "codes" in r:   # hey
                figs[m] = hey_figure(r)
    return {with_suffix(k, suffix): v for k, v in figs.items()}, error, extra


def hey_figure(r):
    d = {k: r.get(k) for k in ("value", "requests_per_s", "codes", "errors", "size_per_request") if k in r}
    bad = {k: v for k, v in (r.get("codes") or {}).items() if k != "200"}
    if bad or r.get("errors") or not r.get("codes"):
        d["error"] = f"responses {r.get('codes')}, errors {r.get('errors')}"
    elif r.get("size_per_request") not in (None, r.get("expected_size")):
        d["error"] = f"{r.get('size_per_request')} bytes per response, not {r.get('expected_size')}"
    return d


# --------------------------------------------------------------------------
# Worker (runs as a subprocess with its own timeout and process group).


def hey_mbps(url, conns, seconds, size):
    """hey GET of a large object for ``seconds``, following redirects (hey's
    default): MB/s (10^6 bytes, the unit regbench's wrk figure is in)."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(conns), "-t", "0", "-disable-compression", url]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    codes = {k: int(v) for k, v in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = []
    if "Error distribution:" in out:
        errors = [line.strip() for line in out.split("Error distribution:", 1)[1].splitlines() if line.strip()]
    per = re.search(r"Size/request:\s+(\d+) bytes", out)
    return {"value": round(rps * size / 1e6, 1), "requests_per_s": rps, "codes": codes, "errors": errors[:5],
            "size_per_request": int(per.group(1)) if per else None, "expected_size": size}


def get_whole(hostport, path, want, size):
    """One plain GET, no redirect followed: (status, response, whether it was 200 with the right body)."""
    host, port = hostport.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request("GET", path)
    r = c.getresponse()
    h, n = hashlib.sha256(), 0
    while chunk := r.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    c.close()
    return r.status, r, r.status == 200 and n == size and h.hexdigest() == want


def worker(argv):
    bench_dir, kind, *rest = argv
    sys.path.insert(0, bench_dir)
    import regbench  # noqa: E402  (the shared measurement script)

    stamp_file = os.path.join(tempfile.gettempdir(), "bench-s3-last-push")
    if kind == "push":
        hostport, runs_n, images = rest[0], int(rest[1]), json.loads(rest[2])
        core.skopeo_push(regbench, bench_dir, hostport, images, runs_n, stamp_file, "s3")
    elif kind == "pull":
        core.skopeo_pull(regbench, rest[0], json.loads(rest[2]), stamp_file, "s3")
    elif kind == "blobget":
        hostport, mib, seconds, digest, endpoint = rest[0], int(rest[1]), int(rest[2]), rest[3], rest[4]
        size = mib << 20
        if digest == "-":
            # Streaming node: push a fresh blob, check one GET, then wrk (regbench's helper).
            data = os.urandom(size)
            t0 = time.monotonic()
            digest = regbench.push_blob(hostport, BLOB_REPO, data)
            regbench.emit(metric="blob", digest=digest, push_s=round(time.monotonic() - t0, 3))
            want = hashlib.sha256(data).hexdigest()
            del data
            status, r, ok = get_whole(hostport, f"/v2/{BLOB_REPO}/blobs/{digest}", want, size)
            if not ok:
                raise SystemExit(f"GET of the blob from the streaming node: status {status}, "
                                 f"Location {r.getheader('Location')}, body wrong or incomplete")
            url = f"http://{hostport}/v2/{BLOB_REPO}/blobs/{digest}"
            for c in CONCURRENCY:
                mbps, rps, bad = regbench.wrk_mbps(url, c, seconds)
                regbench.emit(metric=f"blob_get_{mib}M_c{c}_MBps", value=mbps, requests_per_s=rps, non2xx=bad)
        else:
            # Redirecting node: the answer must be a 307 to the object store,
            # and the URL must give the blob; then hey, which follows it.
            want = digest.split(":", 1)[1]
            status, r, _ = get_whole(hostport, f"/v2/{BLOB_REPO}/blobs/{digest}", want, size)
            location = r.getheader("Location") or ""
            if status not in (301, 302, 303, 307, 308) or not location.startswith(endpoint.rstrip("/") + "/"):
                raise SystemExit(f"expected a redirect to {endpoint}: status {status}, Location {location[:120]!r}")
            parts = urllib.parse.urlsplit(location)
            t0 = time.monotonic()
            s3_status, _, ok = get_whole(parts.netloc, parts.path + ("?" + parts.query if parts.query else ""),
                                         want, size)
            regbench.emit(metric="redirect", digest=digest, status=status, location=location,
                          location_path=parts.path, object_store_status=s3_status,
                          direct_get_s=round(time.monotonic() - t0, 3), ok=ok)
            if not ok:
                raise SystemExit(f"GET of the redirect location: status {s3_status}, body wrong or incomplete")
            url = f"http://{hostport}/v2/{BLOB_REPO}/blobs/{digest}"
            for c in CONCURRENCY:
                regbench.emit(metric=f"blob_get_{mib}M_c{c}_MBps", **hey_mbps(url, c, seconds, size))
    elif kind == "direct":
        url, mib, seconds = rest[0], int(rest[1]), int(rest[2])
        for c in CONCURRENCY:
            regbench.emit(metric=f"radosgw_get_{mib}M_c{c}_MBps", **hey_mbps(url, c, seconds, mib << 20))
    else:
        raise SystemExit(f"unknown worker {kind}")
    return 0


# --------------------------------------------------------------------------
# Report


def compare(args, result, keys, labels):
    rows = []
    for key in keys:
        row = {"figure": key, "label": labels.get(key, key), "unit": core.unit_of(key), "better": core.better_of(key)}
        for name, reg in result["registries"].items():
            f = reg["figures"].get(key)
            if f is None or f.get("value") is None or f.get("error"):
                row[name] = None
                row[f"{name}_error"] = (f or {}).get("error") or reg["phase_errors"].get(phase_of(args, key)) or \
                    reg.get("start_error") or ("interrupted" if result.get("interrupted") else "not measured")
            else:
                row[name] = f["value"]
        rows.append(core.add_ratio(row))
    return rows


def phase_of(args, key):
    for p, ks in keys_of(args).items():
        if key in ks:
            return p
    return "rss"


def _nodelay_text(value):
    return {True: "on (--rgw-nodelay)", False: "off (Ceph 16's default)"}.get(value, "unknown (given endpoint)")


def markdown(result, rows):
    names = list(result["registries"])
    out = [f"# S3 benchmark {result['started']}", "",
           f"radosgw {result['s3']['endpoint']} ({'started by the script' if result['s3']['started'] else 'given'}), "
           f"radosgw beast tcp_nodelay {_nodelay_text(result['s3'].get('rgw_tcp_nodelay'))}, "
           f"{'quick' if result['params']['quick'] else 'full'} run, {result['host']['cpus']} CPUs; "
           + (f"registryd's streaming node with a hot blob cache of {result['params']['hot_cache']}; "
              if result['params'].get('hot_cache') else "") +
           "ratio = registryd / reference.", "",
           "| figure | unit | " + " | ".join(names) + " | ratio | better |",
           "|---|---|" + "---|" * len(names) + "---|---|"]
    for r in rows:
        vals = [fmt(r[n]) if r.get(n) is not None else "FAILED" for n in names]
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        out.append(f"| {r['label']} | {r['unit']} | " + " | ".join(vals) + f" | {ratio} | {r['better']} |")
    base = result.get("radosgw_direct") or {}
    if base.get("figures"):
        out += ["", "radosgw alone (hey GET of the presigned URL, no registry): "
                + ", ".join(f"{k} = {fmt(v.get('value'))}" for k, v in base["figures"].items())]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------


class S3Target:
    def __init__(self, endpoint, access_key, secret_key, region, started):
        self.endpoint, self.access_key, self.secret_key = endpoint.rstrip("/"), access_key, secret_key
        self.region, self.started = region, started


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Benchmark registryd against the reference registry, both on S3 (radosgw), side by side.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PHASES),
                    help="comma-separated subset of: push,pull,blobget (default: all). RSS is always reported. "
                         "pull implies an unreported push.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: 1x16M and 5x256K images, 16 MiB blob, 1 s load runs")
    ap.add_argument("--seconds", type=int, default=None, help="duration of each wrk/hey run (default 10, quick 1)")
    ap.add_argument("--runs", type=int, default=None, help="pushes and pulls per image (default 3, quick 1)")
    ap.add_argument("--output", default=None, help="JSON results file (default $TMPDIR/registryd-bench/s3-<UTC time>.json, never "
                                                   "inside the checkout; a Markdown table is written next to it)")
    ap.add_argument("--registries", default=",".join(REGISTRIES),
                    help="which to run: registryd,reference (default both)")
    ap.add_argument("--s3-endpoint", default=None,
                    help="use this radosgw (http://host:port) instead of starting a Ceph; buckets made here are "
                         "deleted at the end")
    ap.add_argument("--s3-access-key", default=CEPH_ACCESS_KEY, help="(default: start-ceph.sh's test user)")
    ap.add_argument("--s3-secret-key", default=os.environ.get("BENCH_S3_SECRET_KEY", CEPH_SECRET_KEY),
                    help="(default $BENCH_S3_SECRET_KEY, else start-ceph.sh's test user)")
    ap.add_argument("--s3-region", default=CEPH_REGION, help=f"(default {CEPH_REGION})")
    ap.add_argument("--s3-tools-dir", default=DEFAULT_S3_TOOLS,
                    help="folder holding start-ceph.sh and stop-ceph.sh (default $REGISTRYD_S3_TOOLS or "
                         "scripts/ceph)")
    ap.add_argument("--rgw-nodelay", action="store_true",
                    help="restart the radosgw this script starts with beast tcp_nodelay=1 (Ceph 16's default leaves "
                         "Nagle on: about 40 ms per small GET on a kept-alive connection); not with --s3-endpoint")
    ap.add_argument("--hot-cache", default=None, metavar="SIZE",
                    help="give registryd's streaming node a local hot blob cache of SIZE ([storage] cache_size, "
                         "e.g. 2GiB)")
    ap.add_argument("--twistd", default=None, help="twistd to start registryd with (default: next to python)")
    ap.add_argument("--reference-bin", default=DEFAULT_REFERENCE,
                    help=f"reference registry (default {DEFAULT_REFERENCE})")
    ap.add_argument("--regbench-dir", default=DEFAULT_REGBENCH_DIR,
                    help="folder holding regbench.py and mkimage.py (default $REGBENCH_DIR or benchmarks/tools)")
    ap.add_argument("--start-timeout", type=float, default=30, help="seconds to wait for GET /v2/ (default 30)")
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temp dir (configs, server logs, Ceph logs) and, on a given endpoint, the buckets")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.phases if p not in PHASES]
    if bad or not args.phases:
        ap.error(f"--only: unknown {','.join(bad)} (choose from {','.join(PHASES)})")
    args.phases = [p for p in PHASES if p in args.phases]
    args.registries = [s.strip() for s in args.registries.split(",") if s.strip()]
    if not args.registries or any(s not in REGISTRIES for s in args.registries):
        ap.error(f"--registries: choose from {','.join(REGISTRIES)}")
    s = SETTINGS["quick" if args.quick else "full"]
    args.images, args.blob_mib = s["images"], s["blob_mib"]
    for opt in ("seconds", "runs"):
        if getattr(args, opt) is None:
            setattr(args, opt, s[opt])
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be at least 1")
    for f in ("regbench.py", "mkimage.py"):
        if not os.path.exists(os.path.join(args.regbench_dir, f)):
            ap.error(f"{f} not found in {args.regbench_dir} (use --regbench-dir or $REGBENCH_DIR)")
    if args.rgw_nodelay and args.s3_endpoint:
        ap.error("--rgw-nodelay restarts a radosgw this script started: not with --s3-endpoint")
    if args.s3_endpoint is None and not os.path.exists(os.path.join(args.s3_tools_dir, "start-ceph.sh")):
        ap.error(f"start-ceph.sh not found in {args.s3_tools_dir} (use --s3-tools-dir, or --s3-endpoint)")
    return args


def dead(dep, info):
    if "start_error" in info:
        return info["start_error"]
    for node_name, node in dep.nodes.items():
        if not node.alive():
            info["nodes"][node_name].setdefault("log_tail", tail(node.log_path))
            return f"{node_name} node exited with status {node.proc.returncode}"
    return None


def start_all(args, deps, result):
    for dep in deps.values():
        info = result["registries"][dep.name]
        for node_name, node in dep.nodes.items():
            log(f"starting {node.name} on {node.hostport}: {' '.join(node.cmd)}")
            try:
                node.start()
            except OSError as e:
                info["start_error"] = f"{node_name} node: cannot start: {e}"
    for dep in deps.values():
        info = result["registries"][dep.name]
        for node_name, node in dep.nodes.items():
            if "start_error" in info or node.proc is None:
                continue
            try:
                info["nodes"][node_name]["ready_s"] = round(node.wait_ready(args.start_timeout), 2)
                log(f"{node.name} ready in {info['nodes'][node_name]['ready_s']} s")
            except RuntimeError as e:
                info["start_error"] = f"{node_name} node did not start: {e}"
                info["nodes"][node_name]["log_tail"] = tail(node.log_path)
                log(f"{node.name} FAILED to start: {e}")
                for line in info["nodes"][node_name]["log_tail"][-8:]:
                    log(f"  {node.name}| {line}")
    time.sleep(1)
    for dep in deps.values():
        info = result["registries"][dep.name]
        if "start_error" in info:
            for node in dep.nodes.values():
                node.stop()
            continue
        for node_name, node in dep.nodes.items():
            mem = node.memory()
            info["figures"][with_suffix("rss_idle_MiB", "" if node_name == "stream" else "redirect")] = {
                "value": mem.get("VmRSS"), "pid": node.proc.pid}
            info["memory_after"].setdefault("idle", {})[node_name] = mem


def run_phases(args, deps, result):
    plan = list(args.phases)
    if "pull" in plan and "push" not in plan:
        plan.insert(0, "push(setup)")
    order = list(deps)
    for i, phase in enumerate(plan):
        real = phase.split("(")[0]
        for name in (order if i % 2 == 0 else order[::-1]):
            dep, info = deps[name], result["registries"][name]
            nodes = ["stream"] if real == "push" else list(NODES)
            for node_name in nodes:
                why = dead(dep, info)
                if why:
                    info["phase_errors"].setdefault(real, why)
                    break
                if real == "pull" and "push" in info["phase_errors"]:
                    info["phase_errors"]["pull"] = "skipped: push failed, nothing to pull"
                    break
                node = dep.nodes[node_name]
                log(f"{node.name}: {phase} ...")
                t0 = time.monotonic()
                figs, error, extra = measure(args, real, dep, node_name)
                why = dead(dep, info)
                if why:
                    error = (error + "; " if error else "") + why
                if phase == real:
                    info["figures"].update(figs)
                    if extra:
                        info["extra"].setdefault(real, {})[node_name] = extra
                    if error:
                        info["phase_errors"][real] = (info["phase_errors"].get(real, "") + "; " if
                                                      real in info["phase_errors"] else "") + f"{node_name}: {error}"
                elif error:
                    info["phase_errors"]["pull"] = f"setup push failed: {error}"
                info["memory_after"].setdefault(phase, {})[node_name] = node.memory()
                shown = ", ".join(f"{k}={fmt(v.get('value'))}" for k, v in figs.items()) or "no figures"
                log(f"{node.name}: {phase} done in {time.monotonic() - t0:.1f} s: {shown}"
                    + (f"  ERROR: {error}" if error else ""))
                if error:
                    info["nodes"][node_name].setdefault("log_tail", tail(node.log_path))


def measure_direct(args, deps, result):
    """radosgw alone: hey on a presigned URL one of the redirecting nodes gave."""
    location = next((d.blob[1] for d in deps.values() if d.blob and d.blob[1]), None)
    if location is None:
        return
    log("radosgw alone: hey GET of the presigned URL ...")
    dep = next(iter(deps.values()))
    records, error = run_worker(worker_cmd(args, "direct", location, args.blob_mib, args.seconds), dep,
                                phase_timeout(args, "blobget"))
    figs = {r["metric"]: hey_figure(r) for r in records if r.get("metric")}
    result["radosgw_direct"] = {"figures": figs, "error": error,
                                "url_path": urllib.parse.urlsplit(location).path}
    log("radosgw alone: " + ", ".join(f"{k}={fmt(v.get('value'))}" for k, v in figs.items())
        + (f"  ERROR: {error}" if error else ""))


def default_output(stamp):
    """Where results go without --output: never into the checkout (a run leaves nothing for git to see)."""
    return os.path.join(tempfile.gettempdir(), "registryd-bench", f"s3-{stamp}.json")


def main(argv):
    if argv[:1] == ["_worker"]:
        return worker(argv[1:])
    args = parse_args(argv)
    began = time.monotonic()
    stamp = startup.utc_stamp()
    output = args.output or default_output(stamp)
    startup.interrupt_on_sigterm()
    signal.signal(signal.SIGINT, signal.default_int_handler)

    missing = [t for t in ("skopeo", "wrk", "hey") if not shutil.which(t)]
    if missing:
        log(f"warning: not on PATH: {', '.join(missing)}; figures that need them will fail")

    workdir = tempfile.mkdtemp(prefix="bench-s3-")
    result = {
        "benchmark": "s3",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "params": {"quick": args.quick, "phases": args.phases, "seconds": args.seconds, "runs": args.runs,
                   "images": {k: core.describe_image(v) for k, v in args.images.items()}, "blob_MiB": args.blob_mib,
                   "part_MiB": PART_MIB, "regbench_dir": args.regbench_dir, "hot_cache": args.hot_cache},
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "registries": {},
    }
    rc, out, err = run_group([args.reference_bin, "--version"], 10) if os.path.exists(args.reference_bin) \
        else (None, "", "")
    result["reference_version"] = (out or err or "").strip()
    ceph = None
    admin = None
    setup_done = None
    deps = {}
    buckets = []
    interrupted = False
    fatal = None
    try:
        if args.s3_endpoint:
            s3 = S3Target(args.s3_endpoint, args.s3_access_key, args.s3_secret_key, args.s3_region, False)
        else:
            ceph = Ceph(args.s3_tools_dir, workdir)
            log(f"starting Ceph (start-ceph.sh) in {ceph.dir} ...")
            t0 = time.monotonic()
            endpoint = ceph.start()
            if args.rgw_nodelay:
                ceph.restart_rgw_nodelay()
            log(f"Ceph up in {time.monotonic() - t0:.1f} s: {endpoint}"
                + (" (radosgw restarted with tcp_nodelay=1)" if args.rgw_nodelay else ""))
            s3 = S3Target(endpoint, CEPH_ACCESS_KEY, CEPH_SECRET_KEY, CEPH_REGION, True)
        args.s3 = s3
        ceph_up = time.monotonic()
        result["s3"] = {"endpoint": s3.endpoint, "started": s3.started, "region": s3.region,
                        "rgw_tcp_nodelay": args.rgw_nodelay if s3.started else None,
                        "start_s": round(ceph_up - began, 1)}
        admin = S3Admin(s3.endpoint, s3.access_key, s3.secret_key, s3.region)
        suffix = f"{stamp.lower()}-{os.getpid()}"
        for name in args.registries:
            bucket = f"bench-{name}-{suffix}"
            t0 = time.monotonic()
            admin.create_bucket(bucket)
            buckets.append(bucket)
            admin.warm_up(bucket)
            result.setdefault("s3", {}).setdefault("bucket_setup_s", {})[bucket] = round(time.monotonic() - t0, 2)
            tmp = os.path.join(workdir, f"{name}-tmp")
            os.makedirs(tmp)
            nodes = {}
            for node_name in NODES:
                node_id = name if node_name == "stream" else f"{name}-redirect"
                if name == "registryd":
                    redirect = node_name == "redirect"
                    nodes[node_name] = RegistrydNode(node_id, workdir, args.twistd or find_twistd(), s3, bucket,
                                                     redirect, None if redirect else args.hot_cache)
                else:
                    nodes[node_name] = ReferenceNode(node_id, workdir, args.reference_bin, s3, bucket,
                                                     node_name == "redirect")
            deps[name] = Deployment(name, bucket, nodes, tmp)
            result["registries"][name] = {
                "bucket": bucket,
                "nodes": {n: {"cmd": node.cmd, "port": node.port, "config": node.config} for n, node in nodes.items()},
                "figures": {}, "phase_errors": {}, "memory_after": {}, "extra": {},
            }
        setup_done = time.monotonic()
        start_all(args, deps, result)
        run_phases(args, deps, result)
        if "blobget" in args.phases and not args.quick:
            measure_direct(args, deps, result)
        for name, dep in deps.items():
            info = result["registries"][name]
            for node_name, node in dep.nodes.items():
                if node.alive():
                    info["figures"][with_suffix("rss_peak_MiB", "" if node_name == "stream" else "redirect")] = {
                        "value": node.memory().get("VmHWM")}
            try:
                info["bucket_usage"] = dict(zip(("objects", "bytes"), admin.bucket_bytes(dep.bucket)))
            except (RuntimeError, OSError, ET.ParseError) as e:
                info["bucket_usage"] = {"error": str(e)}
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping servers")
    except (RuntimeError, OSError, ValueError) as e:
        fatal = str(e)
        log(f"FAILED: {fatal}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # clean up even if Ctrl-C is pressed again
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, dep in deps.items():
            info = result["registries"][name]
            for node_name, node in dep.nodes.items():
                node.stop()
                if node.proc is not None:
                    info["nodes"][node_name]["exit_status"] = node.proc.returncode
                if (info["phase_errors"] or "start_error" in info) and "log_tail" not in info["nodes"][node_name]:
                    info["nodes"][node_name]["log_tail"] = tail(node.log_path)
        if ceph is not None:
            log("stopping Ceph ...")
            ceph.stop()
            if not args.keep_temp:
                ceph.remove()
        elif admin is not None and not args.keep_temp:
            for bucket in buckets:  # a shared endpoint (e.g. the test session's) keeps nothing of ours
                try:
                    admin.delete_bucket(bucket)
                except (RuntimeError, OSError, ET.ParseError) as e:
                    log(f"could not delete bucket {bucket}: {e}")
        if args.keep_temp:
            log(f"temp dir kept: {workdir}" + (f" (Ceph in {ceph.dir})" if ceph else ""))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    if setup_done is not None:  # servers, phases, clean-up: what --quick keeps well under a minute
        result["benchmark_s"] = round(time.monotonic() - setup_done, 1)
    result["interrupted"] = interrupted
    if fatal:
        result["error"] = fatal
    keys = ["rss_idle_MiB", "rss_idle_redirect_MiB"]
    for p in args.phases:
        keys += keys_of(args)[p]
    keys += ["rss_peak_MiB", "rss_peak_redirect_MiB"]
    labels = labels_of(args)
    rows = compare(args, result, keys, labels)
    result["comparison"] = rows
    print_table(rows, list(result["registries"]))
    direct = (result.get("radosgw_direct") or {}).get("figures")
    if direct:
        print("\nradosgw alone (hey GET of the presigned URL, no registry in the path): "
              + ", ".join(f"c={k.rsplit('_c', 1)[1].split('_')[0]} {fmt(v.get('value'))} MB/s"
                          for k, v in direct.items()))
    if fatal:
        print(f"\nFAILED: {fatal}")
    if "s3" in result:
        print(f"\nradosgw {result['s3']['endpoint']}: beast tcp_nodelay "
              f"{_nodelay_text(result['s3'].get('rgw_tcp_nodelay'))}")
    timing = [f"{result['elapsed_s']} s in all"]
    if "s3" in result:
        timing.append(f"S3 {'started' if result['s3']['started'] else 'reached'} in {result['s3']['start_s']} s")
        timing.append(f"buckets made in {sum(result['s3'].get('bucket_setup_s', {}).values()):.1f} s")
    if "benchmark_s" in result:
        timing.append(f"servers, measurements and clean-up {result['benchmark_s']} s")
    print("\n" + ", ".join(timing))
    startup.write_results(output, result, announce=False)
    md = os.path.splitext(output)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(result, rows) if "s3" in result else f"# S3 benchmark: FAILED\n\n{fatal}\n")
    print(f"\nresults written to {output} and {md}")
    if interrupted:
        return 130
    complete = not fatal and bool(result["registries"]) and all(
        r.get(s) is not None for r in rows for s in result["registries"])
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
