#!/usr/bin/env python3
"""Disk used on a node that mirrors an image through registryd and then runs it.

usage: bench_node_disk.py [--quick] [--size 1G] [--output FILE]

Two nodes, side by side in one run, each with a private containerd (as
root) and a registryd that mirrors one upstream (Debian's docker-registry,
holding a synthetic image of ``--size`` bytes made by mkimage.py):

* ``containerd``: registryd with ``[storage] driver = "containerd"`` over the
  node's containerd; the node's containerd pulls the image through it.
  The fill lands in containerd's content store, where the pull finds it:
  one copy.
* ``filesystem``: registryd on its filesystem store; the node's containerd
  pulls the image through it: a copy in registryd's data directory and one
  in containerd's content store.

Each pull is ``ctr images pull`` (unpacked with the native snapshotter, the
"run" part: its snapshots are the same size on both nodes and are reported
apart). Measured: the bytes on disk (allocated blocks) of containerd's
content folder plus registryd's data directory, and their ratio. Only the
stdlib, bench_core.py next to this file, skopeo, ctr, containerd and
docker-registry are used.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core  # noqa: E402
import process_tree  # noqa: E402

NAMESPACE = "k8s.io"
REPO_TAG = "bench/app:1"


def disk_bytes(root):
    """Bytes allocated to the files under ``root`` (what ``du`` says, not their lengths)."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


def add_upstream(config, upstream):
    with open(config, "a") as f:
        f.write(f'\n[[upstream]]\nnamespace = "upstream.test"\nurl = "http://{upstream.hostport}"\ndefault = true\n')


def run(cmd, timeout=1800):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def settled(paths, seconds=1.0, timeout=120):
    """Wait until the bytes under ``paths`` stop changing (a fill finishing behind the pull)."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = sum(disk_bytes(p) for p in paths)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            break
        time.sleep(0.2)
    return last


def _children_cpu():
    """CPU seconds of this script's waited-for children (ctr)."""
    times = os.times()
    return times.children_user + times.children_system


def measure_node(kind, workdir, args, upstream):
    """Mirror and run the image on one node; its figures."""
    node_dir = os.path.join(workdir, kind)
    os.makedirs(node_dir)
    twistd = args.twistd or bench_core.find_twistd()
    node = bench_core.RegistrydContainerd(node_dir, twistd, args.containerd_bin)
    registry = node
    try:
        if kind == "containerd":
            add_upstream(os.path.join(node.dir, "registryd.toml"), upstream)
            node.start()
        else:
            node.start_containerd()
            registry = bench_core.Registryd(node_dir, twistd)
            config = os.path.join(registry.dir, "registryd.toml")
            add_upstream(config, upstream)
            registry.cmd += ["--config", config]
            registry.start()
        registry.wait_ready(args.start_timeout)
        t0 = time.monotonic()
        cpu0 = {"containerd": process_tree.cpu_seconds(node.containerd.pid),
                "registryd": process_tree.cpu_seconds(registry.proc.pid), "ctr": _children_cpu()}
        run(["ctr", "--address", node.socket, "-n", NAMESPACE, "images", "pull", "--plain-http",
             "--snapshotter", "native", f"{registry.hostport}/{REPO_TAG}"])
        pull_s = time.monotonic() - t0
        cpu = {"containerd": process_tree.cpu_seconds(node.containerd.pid) - cpu0["containerd"],
               "registryd": process_tree.cpu_seconds(registry.proc.pid) - cpu0["registryd"],
               "ctr": _children_cpu() - cpu0["ctr"]}
        content = os.path.join(node.containerd_root, "io.containerd.content.v1.content")
        snapshots = os.path.join(node.containerd_root, "io.containerd.snapshotter.v1.native")
        settled([content, registry.data])
        figures = {"content_bytes": disk_bytes(content), "registryd_data_bytes": disk_bytes(registry.data),
                   "snapshot_bytes": disk_bytes(snapshots), "pull_s": round(pull_s, 2),
                   "pull_cpu_s": {name: round(value, 2) for name, value in cpu.items()}}
        figures["node_bytes"] = figures["content_bytes"] + figures["registryd_data_bytes"]
        return figures
    finally:
        if registry is not node:
            registry.stop()
        node.stop()


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 16 MiB image (smoke test)")
    ap.add_argument("--size", default=None, help="image size, in layers of at most 256M (default 1G, quick 16M)")
    ap.add_argument("--output", default=None, help="results JSON (default benchmarks/results/node-disk-<UTC>.json)")
    ap.add_argument("--twistd", default=None, help="twistd to start registryd with (default: next to python)")
    ap.add_argument("--containerd-bin", default=bench_core.DEFAULT_CONTAINERD)
    ap.add_argument("--reference-bin", default=bench_core.DEFAULT_REFERENCE)
    ap.add_argument("--regbench-dir", default=bench_core.DEFAULT_REGBENCH_DIR)
    ap.add_argument("--start-timeout", type=float, default=30)
    args = ap.parse_args(argv)
    size = _parse_size(args.size or ("16M" if args.quick else "1G"))
    layer = 256 << 20
    sizes = [str(min(layer, size - i)) for i in range(0, size, layer)]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    output = args.output or os.path.join(bench_core.HERE, "results", f"node-disk-{stamp}.json")
    workdir = tempfile.mkdtemp(prefix="bench-node-disk-")
    upstream = bench_core.Reference(workdir, args.reference_bin)
    result = {"image_bytes": size, "layers": len(sizes)}
    try:
        upstream.start()
        upstream.wait_ready(args.start_timeout)
        layout = os.path.join(workdir, "image")
        run([sys.executable, os.path.join(args.regbench_dir, "mkimage.py"), layout, "1", *sizes])
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1",
             f"docker://{upstream.hostport}/{REPO_TAG}"])
        for kind in ("containerd", "filesystem"):
            bench_core.log(f"{kind}: mirror {size} bytes through registryd and pull them into containerd")
            result[kind] = measure_node(kind, workdir, args, upstream)
    finally:
        upstream.stop()
        subprocess.run(["rm", "-rf", workdir], check=False)
    ctrd, fs = result["containerd"]["node_bytes"], result["filesystem"]["node_bytes"]
    result["containerd_vs_filesystem"] = round(ctrd / fs, 3) if fs else None
    result["copies_containerd"] = round(ctrd / size, 2)
    result["copies_filesystem"] = round(fs / size, 2)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    mib = 1 << 20
    print(f"image {size / mib:.0f} MiB ({len(sizes)} layers); bytes on the node after mirror + pull "
          f"(containerd content + registryd data dir; snapshots apart):")
    for kind in ("containerd", "filesystem"):
        r = result[kind]
        print(f"  {kind:10s} {r['node_bytes'] / mib:9.1f} MiB = content {r['content_bytes'] / mib:.1f} + "
              f"registryd {r['registryd_data_bytes'] / mib:.1f} ({r['node_bytes'] / size:.2f} copies); "
              f"snapshots {r['snapshot_bytes'] / mib:.1f} MiB; pull {r['pull_s']} s")
        print("  " + " " * 10 + "   CPU during the pull: " + ", ".join(
            f"{name} {seconds} s" for name, seconds in r["pull_cpu_s"].items()))
    print(f"  containerd/filesystem: {result['containerd_vs_filesystem']}  -> {output}")
    # One copy on the containerd node, two on the other: anything else is a measurement gone wrong.
    return 0 if result["copies_containerd"] < 1.5 < result["copies_filesystem"] else 1


def _parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
