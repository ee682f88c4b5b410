"""``registryd export`` and ``registryd import`` through the console script, on both drivers.

A real ``twistd -n registryd`` fills the source data directory over HTTP
(once per module) and serves what was imported; the real skopeo reads what
export writes and writes layouts import takes; the reference registry is the
upstream of the mirror case. Those tests block: every server is a process of
its own.

The S3 tests (at the end) run the commands on buckets of the session's Ceph,
beside a registryd running in this process on the same bucket: the commands
run in a thread, so the reactor keeps serving meanwhile.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from typing import Any, Callable

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from terminal import run_with_terminal_stderr
from conftest import start_twistd, stop_process
from e2e import oci_layout as oci
from e2e.skopeo_cli import Skopeo, find_skopeo
from oci_client import Client
from registryd.admin.export import HIGH_WATER, BlobConsumer
from registryd.admin.oci_layout import ContentError, DirectoryWriter
from registryd.config import StorageSettings
from registryd.digest import parse_digest
from syncclient import push_blob, request, sha256
from test_cli_ls import REGISTRYD, files_under, run
import upstreams
from upstreams import push_image as push_upstream_image

reference_upstream = upstreams.reference_upstream   # the fixture, for this module's tests

ARM64 = {"os": "linux", "architecture": "arm64"}


@attrs.frozen
class Source:
    """The data directory a registryd filled, and what was pushed into it."""

    data_dir: str
    app: oci.Image
    big: oci.Image
    multi: oci.ImageIndex
    artifact: oci.Artifact

    @property
    def refs(self) -> list[str]:
        return ["team/app:1.0", "team/big:2.0", "team/multi:1.0", f"team/app@{self.artifact.digest}"]


def listing(root: str) -> dict[str, int]:
    """Every file (its size) and directory (-1) under ``root``: what "unchanged" means."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root) + "/"] = -1
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = os.path.getsize(path)
    return found


def put_manifest(host: str, repo: str, reference: str, blob: oci.Blob) -> None:
    reply = request(host, "PUT", f"/v2/{repo}/manifests/{reference}", blob.data, {"Content-Type": blob.media_type})
    assert reply.status == 201, reply.body


def push(host: str, repo: str, reference: str, image: oci.Image | oci.Artifact) -> None:
    for blob in image.blobs():
        push_blob(host, repo, blob.data)
    put_manifest(host, repo, reference, image.manifest)


@pytest.fixture(scope="module")
def source(tmp_path_factory: Any) -> Source:
    data_dir = str(tmp_path_factory.mktemp("source") / "data")
    process, server = start_twistd(data_dir)
    try:
        app = oci.make_image(oci.sample_layers("app", 1))
        # One layer of 3 MiB: blobs are copied in 1 MiB chunks.
        big = oci.make_image(oci.sample_layers("big", 3, sizes=[3 << 20, 5000, 700]))
        children = [oci.make_image(oci.sample_layers(f"multi-{arch}", 1), architecture=arch)
                    for arch in ("amd64", "arm64")]
        multi = oci.make_index(children)
        artifact = oci.make_artifact(app.manifest)
        push(server.host, "team/app", "1.0", app)
        push(server.host, "team/big", "2.0", big)
        for child in children:
            push(server.host, "team/multi", child.digest, child)
        put_manifest(server.host, "team/multi", "1.0", multi.index)
        push(server.host, "team/app", artifact.digest, artifact)
    finally:
        stop_process(process)
    return Source(data_dir, app, big, multi, artifact)


def image_file(tmp_path: Any, lines: list[str]) -> str:
    path = str(tmp_path / "images.txt")
    with open(path, "w") as f:
        f.write("# images for the edge site\n\n" + "\n".join(f"  {line}  # wanted" for line in lines) + "\n")
    return path


def export(source: Source, output: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run("export", "-d", source.data_dir, "-o", output, *args)


def get(host: str, path: str, accept: str | None = None) -> Any:
    return request(host, "GET", path, headers={"Accept": accept} if accept else {})


def check_pulls(host: str, repo: str, reference: str, manifest: oci.Blob, blobs: list[oci.Blob]) -> None:
    reply = get(host, f"/v2/{repo}/manifests/{reference}", manifest.media_type)
    assert reply.status == 200, (repo, reference, reply.body)
    assert sha256(reply.body) == manifest.digest == reply.header("Docker-Content-Digest")
    for blob in blobs:
        reply = get(host, f"/v2/{repo}/blobs/{blob.digest}")
        assert reply.status == 200 and sha256(reply.body) == blob.digest, (repo, blob.digest)


def check_everything_pulls(host: str, source: Source) -> None:
    for reference in ("1.0", source.app.digest):
        check_pulls(host, "team/app", reference, source.app.manifest, source.app.blobs())
    check_pulls(host, "team/big", "2.0", source.big.manifest, source.big.blobs())
    check_pulls(host, "team/multi", "1.0", source.multi.index, [])
    for child in source.multi.images:
        check_pulls(host, "team/multi", child.digest, child.manifest, child.blobs())
    check_pulls(host, "team/app", source.artifact.digest, source.artifact.manifest, source.artifact.blobs())
    referrers = get(host, f"/v2/team/app/referrers/{source.app.digest}").json()
    assert [d["digest"] for d in referrers["manifests"]] == [source.artifact.digest]
    assert referrers["manifests"][0]["artifactType"] == source.artifact.artifact_type


def skopeo(tmp_path: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """The real skopeo, isolated from the host's configuration (see e2e/skopeo_cli.py)."""
    isolated = Skopeo(tmp_path / "skopeo")
    command = [find_skopeo(), *isolated.global_args, *args]
    result = subprocess.run(command, env=isolated.env, cwd=isolated.workdir, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    return result


def skopeo_copy(tmp_path: Any, src: str, dest: str, *options: str) -> None:
    skopeo(tmp_path, "copy", "--src-tls-verify=false", "--dest-tls-verify=false", *options, src, dest)


def one_line_error(result: subprocess.CompletedProcess[str], command: str, status: int, *words: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith(f"registryd {command}: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


# --- tests ------------------------------------------------------------------------


def test_help() -> None:
    for command, phrases in (
        ("export", ("--image-file FILE", "--image REF", "--output DIR|TAR", "--platform OS/ARCH[/VARIANT]",
                    "--json", "--config FILE", "--data-dir DIR", "ends in .tar", "re-hashed",
                    "org.opencontainers.image.ref.name", "leaves nothing behind", "alongside a running server",
                    "registryd preload", "exit status", "2 bad arguments")),
        ("import", ("--input DIR|TAR", "--repository NAME", "--dry-run", "--json", "--config FILE",
                    "tmp/import-<random>/", "tags last", "safe alongside a running server", "only a tag",
                    "[[upstream]]", "skipped with a warning", "exit status", "1 the layout is invalid")),
    ):
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        for words in phrases:
            assert words in text, (command, words)
        assert command in run("--help").stdout


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_round_trip(source: Source, tmp_path: Any, kind: str) -> None:
    """Everything pushed comes back, byte for byte, from a registryd that never saw a push."""
    output = str(tmp_path / ("layout.tar" if kind == "tar" else "layout"))
    before = listing(source.data_dir)
    result = export(source, output, "--image-file", image_file(tmp_path, source.refs[:2]), "--image", source.refs[2],
                    "--image", source.refs[3])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert listing(source.data_dir) == before, "export wrote into the data directory"
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"exported team/app:1.0 {source.app.digest} (3 blobs, ")
    assert lines[2].startswith(f"exported team/multi:1.0 {source.multi.digest} (7 blobs, ")
    assert lines[2].endswith(", linux/amd64, linux/arm64)")
    total = sum(os.path.getsize(os.path.join(source.data_dir, "blobs", p))
                for p in files_under(os.path.join(source.data_dir, "blobs")))
    assert lines[-1] == (f"4 images, 18 blobs, {total / (1 << 20):.1f} MiB ({total} bytes) written to {output} "
                         f"({'tar' if kind == 'tar' else 'directory'})")
    assert not [n for n in os.listdir(tmp_path) if ".export-" in n], "a temporary sibling was left"

    layout = output
    if kind == "tar":
        with tarfile.open(output) as tar:
            names = tar.getnames()
            assert names[0] == "oci-layout" and names[-1] == "index.json"
            layout = str(tmp_path / "unpacked")
            tar.extractall(layout, filter="data")
    with open(os.path.join(layout, "oci-layout")) as f:
        assert json.load(f) == {"imageLayoutVersion": "1.0.0"}
    index = oci.read_index(layout)
    names = [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]]
    assert names == source.refs
    assert [d["annotations"]["io.containerd.image.name"] for d in index["manifests"]] == names
    assert [d["digest"] for d in index["manifests"]] == [source.app.digest, source.big.digest,
                                                         source.multi.digest, source.artifact.digest]
    for descriptor in index["manifests"]:
        oci.referenced_digests(layout, descriptor["digest"])  # present, and each matches its digest

    # Import into a data directory that does not exist yet (dir), or into the
    # empty one a running registryd serves (tar): pulls work at once.
    fresh = str(tmp_path / "fresh")
    process = None
    try:
        if kind == "tar":
            process, server = start_twistd(fresh)
        result = run("import", "-d", fresh, "-i", output)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"imported team/app:1.0 {source.app.digest} (3 blobs, ")
        assert lines[0].endswith(", 3 new)")
        assert lines[-1].startswith("4 images, 18 blobs, ") and f"({total} bytes) imported into {fresh}" in lines[-1]
        assert lines[-1].endswith(f"18 blobs ({total} bytes) new to it")
        # Exactly what the pushes wrote: the same links, revisions, tags and referrers entries.
        assert files_under(os.path.join(fresh, "repositories")) == \
            files_under(os.path.join(source.data_dir, "repositories"))
        assert files_under(os.path.join(fresh, "blobs")) == files_under(os.path.join(source.data_dir, "blobs"))
        assert os.listdir(os.path.join(fresh, "tmp")) == []
        if process is None:
            process, server = start_twistd(fresh)
        check_everything_pulls(server.host, source)
    finally:
        if process is not None:
            stop_process(process)

    # Again: nothing is new, tags stay where they are.
    again = run("import", "-d", fresh, "-i", output, "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["new_blobs"] == 0 and report["blobs"] == 18 and report["size"] == total
    assert [i["reference"] for i in report["images"]] == source.refs
    assert report["images"][2]["manifests"] == 3 and report["images"][2]["kind"] == "local"


def test_json_and_dry_run(source: Source, tmp_path: Any) -> None:
    output = str(tmp_path / "layout")
    os.mkdir(output)  # an empty directory may be the output
    result = export(source, output, "--image", "team/big:2.0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "directory" and report["output"] == output and report["blobs"] == 5
    (image,) = report["images"]
    assert image["ref_name"] == "team/big:2.0" and image["digest"] == source.big.digest
    assert image["size"] == report["size"] == source.big.manifest.size + sum(b.size for b in source.big.blobs())

    fresh = str(tmp_path / "fresh")
    result = run("import", "-d", fresh, "-i", output, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"would import team/big:2.0 {source.big.digest}")
    assert "would be imported" in result.stdout
    assert not os.path.exists(fresh)

    existing = str(tmp_path / "existing")
    shutil.copytree(source.data_dir, existing)
    before = listing(existing)
    report = json.loads(run("import", "-d", existing, "-i", output, "--dry-run", "--json").stdout)
    assert report["dry_run"] is True and report["new_blobs"] == 0 and report["blobs"] == 5
    assert listing(existing) == before


def test_skopeo_reads_exports_and_writes_imports(source: Source, tmp_path: Any) -> None:
    directory, archive = str(tmp_path / "layout"), str(tmp_path / "layout.tar")
    for output in (directory, archive):
        result = export(source, output, "--image", "team/big:2.0", "--image", "team/multi:1.0")
        assert result.returncode == 0, result.stderr
    target = str(tmp_path / "target")
    process, server = start_twistd(target)
    try:
        # The full reference is the ref name: skopeo splits oci:DIR:REF at the first ':'.
        skopeo_copy(tmp_path, f"oci:{directory}:team/big:2.0", f"docker://{server.host}/copied/big:2.0",
                    "--preserve-digests")
        skopeo_copy(tmp_path, f"oci-archive:{archive}:team/multi:1.0", f"docker://{server.host}/copied/multi:1.0",
                    "--all", "--preserve-digests")
        check_pulls(server.host, "copied/big", "2.0", source.big.manifest, source.big.blobs())
        check_pulls(server.host, "copied/multi", "1.0", source.multi.index, [])

        # skopeo writes only the tag as the ref name: import needs --repository.
        written, written_tar = str(tmp_path / "skopeo-layout"), str(tmp_path / "skopeo-layout.tar")
        skopeo_copy(tmp_path, f"docker://{server.host}/copied/big:2.0", f"oci:{written}:v9", "--preserve-digests")
        skopeo_copy(tmp_path, f"docker://{server.host}/copied/multi:1.0", f"oci-archive:{written_tar}:v1",
                    "--all", "--preserve-digests")
    finally:
        stop_process(process)
    fresh = str(tmp_path / "fresh")
    one_line_error(run("import", "-d", fresh, "-i", written), "import", 2, "'v9' is only a tag",
                   "--repository NAME")
    assert not os.path.exists(fresh)
    result = run("import", "-d", fresh, "-i", written, "--repository", "imported/big")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imported imported/big:v9 {source.big.digest} ")
    result = run("import", "-d", fresh, "-i", written_tar, "--repository", "imported/multi")
    assert result.returncode == 0, result.stderr
    process, server = start_twistd(fresh)
    try:
        check_pulls(server.host, "imported/big", "v9", source.big.manifest, source.big.blobs())
        check_pulls(server.host, "imported/multi", "v1", source.multi.index, [])
        for child in source.multi.images:
            check_pulls(server.host, "imported/multi", child.digest, child.manifest, child.blobs())
    finally:
        stop_process(process)


def test_platform_export_and_partial_import(source: Source, tmp_path: Any) -> None:
    amd64, arm64 = source.multi.images
    output = str(tmp_path / "arm64")
    result = export(source, output, "--image", "team/multi:1.0", "--platform", "linux/arm64")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith(", linux/arm64)"), result.stdout
    blobs = set(os.listdir(os.path.join(output, "blobs", "sha256")))
    hexes = {d.split(":")[1] for d in [source.multi.digest, arm64.digest, *(b.digest for b in arm64.blobs())]}
    assert blobs == hexes  # the index unchanged, only the arm64 image
    assert oci.read_blob(output, source.multi.digest) == source.multi.index.data

    fresh = str(tmp_path / "fresh")
    result = run("import", "-d", fresh, "-i", output)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"registryd import: warning: team/multi:1.0: manifest {amd64.digest} (linux/amd64) "
                             f"of index {source.multi.digest} is not in the layout: skipped\n")
    report = json.loads(run("import", "-d", fresh, "-i", output, "--json").stdout)
    assert report["images"][0]["skipped"] == [amd64.digest] and len(report["warnings"]) == 1
    process, server = start_twistd(fresh)
    try:
        check_pulls(server.host, "team/multi", "1.0", source.multi.index, [])
        check_pulls(server.host, "team/multi", arm64.digest, arm64.manifest, arm64.blobs())
        assert get(server.host, f"/v2/team/multi/manifests/{amd64.digest}", oci.OCI_MANIFEST).status == 404
    finally:
        stop_process(process)

    one_line_error(export(source, str(tmp_path / "none"), "--image", "team/multi:1.0", "--platform", "linux/s390x"),
                   "export", 1, f"no manifest in index {source.multi.digest} is for linux/s390x")
    result = export(source, str(tmp_path / "none"), "--image", "team/multi:1.0", "--platform", "arm64")
    assert result.returncode == 2 and "OS/ARCH" in result.stderr
    assert not os.path.exists(tmp_path / "none")


def test_mirrored_image(reference_upstream: Callable[..., Any], tmp_path: Any) -> None:
    """Exported from a cache filled through registryd; imported into an offline one."""
    up = reference_upstream("open")
    image = push_upstream_image(up, "lib/app", "v1", layer_sizes=[2000, 300_000])
    partial = push_upstream_image(up, "lib/partial", "v1", layer_sizes=[1000])
    upstream = f'[[upstream]]\nnamespace = "{up.host}"\nurl = "{up.url}"\n'
    online = tmp_path / "online.toml"
    online.write_text(upstream)
    data_dir = str(tmp_path / "mirror-data")
    process, server = start_twistd(data_dir, "--config", str(online))
    try:
        base = f"/v2/{up.host}/lib/app"
        reply = get(server.host, f"{base}/manifests/v1", image["media_type"])
        assert reply.status == 200 and sha256(reply.body) == image["digest"]
        for blob in [image["config"], *image["layers"]]:
            assert get(server.host, f"{base}/blobs/{blob['digest']}").status == 200
        # Only the manifest of lib/partial is cached.
        assert get(server.host, f"/v2/{up.host}/lib/partial/manifests/v1", partial["media_type"]).status == 200
    finally:
        stop_process(process)

    ref = f"{up.host}/lib/app:v1"
    output = str(tmp_path / "layout")
    result = run("export", "-c", str(online), "-d", data_dir, "--image", ref, "-o", output)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"exported {ref} {image['digest']} (4 blobs, ")
    assert oci.resolve_tag(output, ref)["digest"] == image["digest"]
    one_line_error(run("export", "-d", data_dir, "--image", f"{up.host}/lib/partial:v1", "-o",
                       str(tmp_path / "partial")),
                   "export", 1, f"{up.host}/lib/partial:v1: blob {partial['config']['digest']} is not cached",
                   f"registryd preload --image {up.host}/lib/partial:v1")
    one_line_error(run("export", "-d", data_dir, "--image", f"{up.host}/lib/app:v2", "-o", str(tmp_path / "v2")),
                   "export", 1, f"unknown image {up.host}/lib/app:v2", "registryd preload")
    assert not os.path.exists(tmp_path / "partial") and not os.path.exists(tmp_path / "v2")

    # Without the config file, the host:port is no namespace: no valid local name either.
    fresh = str(tmp_path / "fresh")
    one_line_error(run("import", "-d", fresh, "-i", output), "import", 1, "bad ref name",
                   "give the config file that lists it as an upstream")
    assert not os.path.exists(fresh)

    offline = tmp_path / "offline.toml"
    offline.write_text(f'data_dir = "{fresh}"\n\n[mirror]\noffline = true\n\n{upstream}')
    up.stop()  # nothing may come from the upstream any more
    result = run("import", "-c", str(offline), "-i", output)
    assert result.returncode == 0, result.stderr
    report = json.loads(run("import", "-c", str(offline), "-i", output, "--json").stdout)
    assert report["images"][0]["kind"] == "mirror" and report["images"][0]["upstream"] == up.host
    folder = os.path.join(fresh, "mirror", up.host.replace(":", "_"), "lib", "app")
    assert os.path.isfile(os.path.join(folder, "_manifests", "tags", "v1"))
    process, server = start_twistd(fresh, "--config", str(offline))
    try:
        reply = get(server.host, f"/v2/{up.host}/lib/app/manifests/v1", image["media_type"])
        assert reply.status == 200 and sha256(reply.body) == image["digest"]
        for blob in [image["config"], *image["layers"]]:
            reply = get(server.host, f"/v2/{up.host}/lib/app/blobs/{blob['digest']}")
            assert reply.status == 200 and sha256(reply.body) == blob["digest"]
    finally:
        stop_process(process)


def test_names_of_the_default_upstream_resolve_with_data_dir_as_with_config(
        reference_upstream: Callable[..., Any], tmp_path: Any) -> None:
    """``alpine:3.20`` means the default upstream's image whether the store is named by -c or by -d."""
    up = reference_upstream("open")
    image = push_upstream_image(up, "lib/app", "v1", layer_sizes=[2000])
    config = tmp_path / "registryd.toml"
    config.write_text(f'[[upstream]]\nnamespace = "{up.host}"\nurl = "{up.url}"\ndefault = true\n')
    data_dir = str(tmp_path / "data")
    process, server = start_twistd(data_dir, "--config", str(config))
    try:
        assert get(server.host, "/v2/lib/app/manifests/v1", image["media_type"]).status == 200
        for blob in [image["config"], *image["layers"]]:
            assert get(server.host, f"/v2/lib/app/blobs/{blob['digest']}").status == 200
    finally:
        stop_process(process)
    images = image_file(tmp_path, ["lib/app:v1"])
    by_config = run("export", "-c", str(config), "-d", data_dir, "--image-file", images,
                    "-o", str(tmp_path / "by-config"))
    assert by_config.returncode == 0, by_config.stderr
    by_data_dir = run("export", "-d", data_dir, "--image-file", images, "-o", str(tmp_path / "by-data-dir"))
    assert by_data_dir.returncode == 0, by_data_dir.stderr
    assert by_data_dir.stdout.splitlines()[0] == by_config.stdout.splitlines()[0]
    assert by_data_dir.stdout.startswith(f"exported {up.host}/lib/app:v1 {image['digest']} "), by_data_dir.stdout


# --- bad input ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_layout(source: Source, tmp_path_factory: Any) -> str:
    output = str(tmp_path_factory.mktemp("good") / "layout")
    result = export(source, output, "--image", "team/app:1.0", "--image", "team/multi:1.0")
    assert result.returncode == 0, result.stderr
    return output


def _edit_index(layout: str, change: Callable[[dict[str, Any]], None]) -> None:
    index = oci.read_index(layout)
    change(index)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)


def _blob_path(layout: str, digest: str) -> str:
    return os.path.join(layout, "blobs", *digest.split(":"))


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))


def _rename_ref(name: str) -> Callable[[dict[str, Any]], None]:
    def change(index: dict[str, Any]) -> None:
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = name
        index["manifests"][0]["annotations"].pop("io.containerd.image.name")
    return change


BAD_LAYOUTS: dict[str, tuple[Callable[[str, Source], Any], int, str]] = {
    "not a layout": (lambda d, s: os.unlink(os.path.join(d, "oci-layout")),
                     1, "is not an OCI image layout: it has no oci-layout"),
    "no index.json": (lambda d, s: os.unlink(os.path.join(d, "index.json")), 1, "it has no index.json"),
    "index.json not JSON": (lambda d, s: open(os.path.join(d, "index.json"), "w").write("{\"manifests\": ["),
                            1, "index.json is not valid JSON"),
    "index.json no index": (lambda d, s: open(os.path.join(d, "index.json"), "w").write("[]"),
                            1, "index.json is not an image index"),
    "bad digest": (lambda d, s: _edit_index(d, lambda i: i["manifests"][1].update(digest="sha256:xyz")),
                   1, "index.json manifests[1]: invalid digest"),
    "layer damaged": (lambda d, s: _flip_byte(_blob_path(d, s.app.layers[0].blob.digest)),
                      1, "team/app:1.0"),
    "layer missing": (lambda d, s: os.unlink(_blob_path(d, s.multi.images[1].layers[0].blob.digest)),
                      1, "is missing from the layout"),
    "manifest damaged": (lambda d, s: _flip_byte(_blob_path(d, s.app.digest)), 1, "does not match its digest"),
    "bad ref name": (lambda d, s: _edit_index(d, _rename_ref("Team/App:1.0")), 1, "bad ref name 'Team/App:1.0'"),
    "bad tag": (lambda d, s: _edit_index(d, _rename_ref("team/app:-x")), 1, "'-x' is not a valid tag"),
    "only a tag": (lambda d, s: _edit_index(d, _rename_ref("1.0")), 2, "give --repository NAME"),
    "other digest": (lambda d, s: _edit_index(d, _rename_ref(f"team/app@{s.big.digest}")), 1,
                     "names another digest"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_bad_layouts_change_nothing(case: str, source: Source, good_layout: str, tmp_path: Any) -> None:
    spoil, status, words = BAD_LAYOUTS[case]
    layout = str(tmp_path / "layout")
    shutil.copytree(good_layout, layout)
    spoil(layout, source)
    target = str(tmp_path / "data")
    shutil.copytree(source.data_dir, target)
    shutil.rmtree(os.path.join(target, "repositories", "team", "multi"))  # something is new to it
    before = listing(target)
    for args in ([], ["--dry-run"], ["--json"]):
        one_line_error(run("import", "-d", target, "-i", layout, *args), "import", status, words)
        assert listing(target) == before
    fresh = str(tmp_path / "fresh")
    one_line_error(run("import", "-d", fresh, "-i", layout), "import", status, words)
    assert not os.path.exists(fresh)
    if case == "layer damaged":
        assert f"blob {source.app.layers[0].blob.digest} in the layout does not match its digest" in \
            run("import", "-d", fresh, "-i", layout).stderr


def test_containerd_name_completes_a_tag(source: Source, good_layout: str, tmp_path: Any) -> None:
    """As `docker save` writes it: ref.name is the tag, io.containerd.image.name the whole name."""
    layout = str(tmp_path / "layout")
    shutil.copytree(good_layout, layout)
    _edit_index(layout, lambda i: i["manifests"][0]["annotations"].update(
        {"org.opencontainers.image.ref.name": "1.0", "io.containerd.image.name": "saved/app:1.0"}))
    fresh = str(tmp_path / "fresh")
    result = run("import", "-d", fresh, "-i", layout)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imported saved/app:1.0 {source.app.digest} ")
    # --repository names the repository of the tag instead.
    result = run("import", "-d", fresh, "-i", layout, "--repository", "other/app", "--json")
    assert [i["reference"] for i in json.loads(result.stdout)["images"]] == ["other/app:1.0", "team/multi:1.0"]
    for repo in ("saved/app", "other/app"):
        with open(os.path.join(fresh, "repositories", repo, "_manifests", "tags", "1.0")) as f:
            assert f.read() == source.app.digest


def test_bad_import_arguments(source: Source, good_layout: str, tmp_path: Any) -> None:
    target = str(tmp_path / "data")
    shutil.copytree(source.data_dir, target)
    before = listing(target)
    one_line_error(run("import", "-d", target, "-i", str(tmp_path / "nothing")), "import", 2, "does not exist")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"no tar at all" * 100)
    one_line_error(run("import", "-d", target, "-i", str(junk)), "import", 1,
                   "is not a directory, nor a readable tar file")
    # A tar cut short in the middle of a blob.
    archive = str(tmp_path / "layout.tar")
    assert export(source, archive, "--image", "team/big:2.0").returncode == 0
    with open(archive, "r+b") as f:
        f.truncate(2 << 20)
    one_line_error(run("import", "-d", target, "-i", archive), "import", 1,
                   "nor a readable tar file: unexpected end of data")
    one_line_error(run("import", "-d", target, "-i", good_layout, "--repository", "Bad Name"), "import", 2,
                   "--repository: 'Bad Name' is not a valid repository name")
    not_data = tmp_path / "not-data"
    not_data.mkdir()
    (not_data / "file").write_text("mine")
    one_line_error(run("import", "-d", str(not_data), "-i", good_layout), "import", 3,
                   "is not a registryd data directory")
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("data_dir = 3\n")
    one_line_error(run("import", "-c", str(bad_config), "-i", good_layout), "import", 3, "config file")
    assert listing(target) == before
    assert run("import", "-i", good_layout, "-d", target, "--frobnicate").returncode == 2


def test_bad_export_arguments(source: Source, tmp_path: Any) -> None:
    before = listing(source.data_dir)
    images = image_file(tmp_path, ["team/app:1.0", "Team/App:1.0"])
    one_line_error(export(source, str(tmp_path / "out"), "--image-file", images), "export", 2,
                   f"{images}:4: 'Team/App' is not a valid repository name")
    one_line_error(export(source, str(tmp_path / "out"), "--image", "team/app:-1"), "export", 2,
                   "--image 'team/app:-1'")
    one_line_error(export(source, str(tmp_path / "out")), "export", 2, "no images to export")
    one_line_error(export(source, str(tmp_path / "out"), "--image-file", str(tmp_path / "missing")), "export", 2,
                   "cannot read")
    one_line_error(export(source, str(tmp_path / "out"), "--image", "team/app:2.0"), "export", 1,
                   "unknown image team/app:2.0: team/app has no tag 2.0")
    one_line_error(export(source, str(tmp_path / "out"), "--image", "team/nothing:1.0"), "export", 1,
                   "unknown image team/nothing:1.0: there is no repository team/nothing")
    one_line_error(export(source, str(tmp_path / "out"), "--image", f"team/app@{source.big.digest}"), "export", 1,
                   f"team/app has no manifest {source.big.digest}")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    one_line_error(export(source, str(full), "--image", "team/app:1.0"), "export", 2,
                   "already exists and is not an empty directory")
    existing = tmp_path / "existing.tar"
    existing.write_text("x")
    one_line_error(export(source, str(existing), "--image", "team/app:1.0"), "export", 2, "already exists")
    one_line_error(run("export", "-d", str(tmp_path / "nowhere"), "--image", "team/app:1.0", "-o",
                       str(tmp_path / "out")), "export", 3, "does not exist")
    assert not os.path.exists(tmp_path / "out") and existing.read_text() == "x"
    assert listing(source.data_dir) == before


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_damaged_store_leaves_nothing_behind(damage: str, source: Source, tmp_path: Any) -> None:
    data_dir = str(tmp_path / "data")
    shutil.copytree(source.data_dir, data_dir)
    layer = source.big.layers[0].blob.digest   # the 3 MiB one: found mid-copy
    blob = os.path.join(data_dir, "blobs", "sha256", layer[7:9], layer[7:])
    if damage == "flipped":
        with open(blob, "r+b") as f:
            f.seek(2 << 20)
            f.write(b"\0\0\0\0")
        words = (f"team/big:2.0: blob {layer} is damaged: it does not match its digest", "registryd fsck")
    else:
        os.unlink(blob)
        # The message names the store it looked in (a data directory, or s3://bucket/prefix).
        words = (f"team/big:2.0: blob {layer} is missing from {data_dir} (run `registryd fsck`)",)
    for output in ("layout", "layout.tar"):
        result = run("export", "-d", data_dir, "--image", "team/app:1.0", "--image", "team/big:2.0", "-o",
                     str(tmp_path / output))
        one_line_error(result, "export", 1, *words)
    assert sorted(os.listdir(tmp_path)) == ["data"], "the export left something behind"


def test_progress_bar_only_on_a_terminal(source: Source, tmp_path: Any) -> None:
    status, out, seen = run_with_terminal_stderr([REGISTRYD, "export", "-d", source.data_dir, "--image", "team/big:2.0", "-o",
                                    str(tmp_path / "out.tar")])
    assert status == 0
    assert b"registryd export: copying blobs [" in seen and b"%" in seen
    assert seen.endswith(b"\r\x1b[K"), seen[-40:]
    assert "copying" not in out and out.startswith("exported team/big:2.0 ")


# --- the blob consumer of export, without a reactor ---------------------------------


class FakeProducer:
    """What BlobSource.send registers: records what the consumer asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class ManualPool:
    """An IO pool that runs each call only when the test says: a disk exactly as slow as wanted."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        done: Deferred[Any] = Deferred()
        self.queue.append((fn, args, done))
        return await done

    def step(self) -> None:
        fn, args, done = self.queue.pop(0)
        try:
            result = fn(*args)
        except Exception as e:
            done.errback(e)
        else:
            done.callback(result)


CHUNK = 64 * 1024


def test_blob_consumer_pauses_the_download_while_the_disk_is_behind(tmp_path: Any) -> None:
    data = bytes(range(256)) * ((HIGH_WATER + 3 * CHUNK) // 256)
    digest = parse_digest(sha256(data))
    writer = DirectoryWriter(str(tmp_path / "layout"))
    pool, producer, written = ManualPool(), FakeProducer(), []
    consumer = BlobConsumer(writer.open_blob(digest, len(data)), pool, written.append)
    consumer.registerProducer(producer, True)
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    consumer.write(chunks[0])
    assert len(pool.queue) == 1 and producer.calls == []    # the first write is under way at once
    for i, chunk in enumerate(chunks[1:], start=1):
        consumer.write(chunk)
        # Paused exactly when what waits for the disk reaches HIGH_WATER (the first chunk is being written).
        assert producer.calls == (["pause"] if i * CHUNK >= HIGH_WATER else []), i
    assert len(pool.queue) == 1                             # one write at a time
    pool.step()                                             # the first chunk is on disk; the rest is one batch
    assert producer.calls == ["pause"] and len(pool.queue) == 1
    pool.step()                                             # nothing waits any more
    assert producer.calls == ["pause", "resume"] and written == [CHUNK, len(data) - CHUNK]
    consumer.unregisterProducer()
    finished = Deferred.fromCoroutine(consumer.finish())
    pool.step()                                             # the check and fsync, in the pool too
    assert finished.called and finished.result is None
    writer.commit([])
    assert oci.read_blob(str(tmp_path / "layout"), str(digest)) == data


def test_blob_consumer_stops_the_download_on_bad_content(tmp_path: Any) -> None:
    data = b"x" * 1000
    writer = DirectoryWriter(str(tmp_path / "layout"))
    pool, producer = ManualPool(), FakeProducer()
    consumer = BlobConsumer(writer.open_blob(parse_digest(sha256(data)), len(data) - 1), pool, lambda _: None)
    consumer.registerProducer(producer, True)
    consumer.write(data)                     # one byte more than the descriptor says
    pool.step()
    assert producer.calls == ["stop"]
    consumer.write(b"more")                  # what still arrives after the stop is dropped
    assert pool.queue == []
    settled = Deferred.fromCoroutine(consumer.settle())
    failure = settled.result
    settled.addErrback(lambda _: None)
    assert isinstance(failure.value, ContentError) and "larger than the 999 bytes" in str(failure.value)
    writer.abort()
    assert os.listdir(tmp_path) == []


# --- the S3 driver ----------------------------------------------------------------

#: The environment variable the S3 configs name for the secret (``secret_access_key_env``).
SECRET_ENV = "REGISTRYD_TEST_S3_SECRET"
NS = "mirror.test:5000"


def s3_config(path: Any, settings: Any, data_dir: str, extra: str = "") -> str:
    """A config file for the console script on the bucket of ``settings``; the secret comes
    from the environment (run_s3 sets it), as an operator would keep it out of the file."""
    prefix = f'prefix = "{settings.prefix}"\n' if settings.prefix else ""
    path.write_text(f'data_dir = "{data_dir}"\n\n{extra}'
                    f'[storage]\ndriver = "s3"\n\n[storage.s3]\nendpoint = "{settings.endpoint}"\n'
                    f'bucket = "{settings.bucket}"\nregion = "{settings.region}"\n{prefix}'
                    f'access_key_id = "{settings.access_key_id}"\nsecret_access_key_env = "{SECRET_ENV}"\n')
    return str(path)


def run_s3(secret: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REGISTRYD, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, SECRET_ENV: secret})


async def in_thread(secret: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The console script, run while the reactor goes on serving the registries of this process."""
    return await deferToThread(run_s3, secret, *args)


async def bucket_listing(bucket: Any, prefix: str = "") -> dict[str, tuple[int, str, float | None]]:
    """Every key of the bucket with its size, ETag and LastModified: what "unchanged" means there."""
    return {entry.key: (entry.size, entry.etag, entry.last_modified)
            async for entry in bucket.list_objects(prefix)}


async def push_async(client: Client, repo: str, reference: str, image: oci.Image | oci.Artifact) -> None:
    for blob in image.blobs():
        reply = await client.request("POST", f"/v2/{repo}/blobs/uploads/?digest={blob.digest}", blob.data,
                                     {"Content-Type": "application/octet-stream"})
        assert reply.status == 201, str(reply)
    await put_manifest_async(client, repo, reference, image.manifest)


async def put_manifest_async(client: Client, repo: str, reference: str, blob: oci.Blob) -> None:
    reply = await client.request("PUT", f"/v2/{repo}/manifests/{reference}", blob.data,
                                 {"Content-Type": blob.media_type})
    assert reply.status == 201, str(reply)


async def fill(client: Client, source: Source) -> None:
    """Push into a registry what the ``source`` fixture pushed into its data directory."""
    await push_async(client, "team/app", "1.0", source.app)
    await push_async(client, "team/big", "2.0", source.big)
    for child in source.multi.images:
        await push_async(client, "team/multi", child.digest, child)
    await put_manifest_async(client, "team/multi", "1.0", source.multi.index)
    await push_async(client, "team/app", source.artifact.digest, source.artifact)


async def check_pulls_async(client: Client, repo: str, reference: str, manifest: oci.Blob,
                            blobs: list[oci.Blob]) -> None:
    reply = await client.request("GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": manifest.media_type})
    assert reply.status == 200, str(reply)
    assert sha256(reply.body) == manifest.digest == reply.header("Docker-Content-Digest")
    for blob in blobs:
        reply = await client.request("GET", f"/v2/{repo}/blobs/{blob.digest}")
        assert reply.status == 200 and sha256(reply.body) == blob.digest, (repo, blob.digest)


async def check_everything_pulls_async(client: Client, source: Source) -> None:
    for reference in ("1.0", source.app.digest):
        await check_pulls_async(client, "team/app", reference, source.app.manifest, source.app.blobs())
    await check_pulls_async(client, "team/big", "2.0", source.big.manifest, source.big.blobs())
    await check_pulls_async(client, "team/multi", "1.0", source.multi.index, [])
    for child in source.multi.images:
        await check_pulls_async(client, "team/multi", child.digest, child.manifest, child.blobs())
    await check_pulls_async(client, "team/app", source.artifact.digest, source.artifact.manifest,
                            source.artifact.blobs())
    referrers = (await client.request("GET", f"/v2/team/app/referrers/{source.app.digest}")).json()
    assert [d["digest"] for d in referrers["manifests"]] == [source.artifact.digest]


def unpacked(archive: str, into: str) -> str:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert names[0] == "oci-layout" and names[-1] == "index.json"
        tar.extractall(into, filter="data")
    return into


@pytest_twisted.ensureDeferred
async def test_s3_round_trip(source: Source, ceph_s3: Any, make_registry: Any, tmp_path: Any) -> None:
    """Export from a bucket a registryd on S3 filled, while it serves; import into a fresh bucket
    (with a key prefix) while another one serves it: everything pulls, the metadata is the same."""
    secret = ceph_s3.secret_key
    first = await ceph_s3.new_bucket()
    second = await ceph_s3.new_bucket(prefix="site-b/")
    try:
        node = make_registry(storage=StorageSettings("s3", s3=first.settings))
        await fill(Client(node.url), source)
        before = await bucket_listing(first)
        total = sum(size for key, (size, _, _) in before.items() if key.startswith("blobs/"))
        assert len([key for key in before if key.startswith("blobs/")]) == 18

        # The commands' node has no data directory at all: export needs none on S3.
        cli_dir = str(tmp_path / "cli")
        config = s3_config(tmp_path / "first.toml", first.settings, cli_dir)
        images = image_file(tmp_path, source.refs[:2])
        directory, archive = str(tmp_path / "layout"), str(tmp_path / "layout.tar")
        for output in (directory, archive):
            result = await in_thread(secret, "export", "-c", config, "--image-file", images, "--image", source.refs[2],
                                     "--image", source.refs[3], "-o", output)
            assert result.returncode == 0, result.stderr
            assert result.stderr == ""
            lines = result.stdout.splitlines()
            assert lines[0].startswith(f"exported team/app:1.0 {source.app.digest} (3 blobs, ")
            assert lines[2].startswith(f"exported team/multi:1.0 {source.multi.digest} (7 blobs, ")
            assert lines[2].endswith(", linux/amd64, linux/arm64)")
            kind = "tar" if output.endswith(".tar") else "directory"
            assert lines[-1] == (f"4 images, 18 blobs, {total / (1 << 20):.1f} MiB ({total} bytes) written to "
                                 f"{output} ({kind})")
        assert await bucket_listing(first) == before, "export wrote into the bucket"
        assert not os.path.exists(cli_dir)
        assert not [n for n in os.listdir(tmp_path) if ".export-" in n], "a temporary sibling was left"

        # The same layout, byte for byte, as an export of the data directory the same images were pushed to.
        reference = str(tmp_path / "from-disk")
        assert export(source, reference, "--image-file", images, "--image", source.refs[2],
                      "--image", source.refs[3]).returncode == 0
        assert files_under(directory) == files_under(reference)
        assert files_under(unpacked(archive, str(tmp_path / "unpacked"))) == files_under(reference)
        report = json.loads((await in_thread(secret, "export", "-c", config, "--image", "team/big:2.0", "-o",
                                             str(tmp_path / "big"), "--json")).stdout)
        assert report["store"] == f"s3://{first.settings.bucket}/" and report["blobs"] == 5
        assert report["images"][0]["digest"] == source.big.digest

        # Import into a fresh bucket that a registryd serves already.
        served = make_registry(storage=StorageSettings("s3", s3=second.settings))
        config = s3_config(tmp_path / "second.toml", second.settings, cli_dir)
        result = await in_thread(secret, "import", "-c", config, "-i", archive)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"imported team/app:1.0 {source.app.digest} (3 blobs, ")
        assert lines[0].endswith(", 3 new)")
        location = f"s3://{second.settings.bucket}/site-b/"
        assert lines[-1] == (f"4 images, 18 blobs, {total / (1 << 20):.1f} MiB ({total} bytes) imported into "
                             f"{location}; 18 blobs ({total} bytes) new to it")
        # Exactly what the pushes wrote: the same blobs, links, revisions, tags and referrers entries.
        imported = await bucket_listing(second)
        for prefix in ("blobs/", "repositories/"):
            assert {k: v[0] for k, v in imported.items() if k.startswith(prefix)} == \
                {k: v[0] for k, v in before.items() if k.startswith(prefix)}, prefix
        assert set(imported) == {k for k in before if k.startswith(("blobs/", "repositories/"))}
        # Staged in the node's tmp/ (made as a node has it), removed from there once stored.
        assert [(d, sorted(f)) for d, _, f in os.walk(cli_dir)] == [(cli_dir, []), (os.path.join(cli_dir, "tmp"), [])]
        await check_everything_pulls_async(Client(served.url), source)

        # Again: nothing is new, and no blob is written again.
        again = await in_thread(secret, "import", "-c", config, "-i", directory, "--json")
        assert again.returncode == 0, again.stderr
        report = json.loads(again.stdout)
        assert report["new_blobs"] == 0 and report["blobs"] == 18 and report["size"] == total
        assert report["store"] == location and [i["reference"] for i in report["images"]] == source.refs
        after = await bucket_listing(second, "blobs/")
        assert after == {k: v for k, v in imported.items() if k.startswith("blobs/")}, "a blob was written again"
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_s3_mirrored_images(good_layout: str, source: Source, ceph_s3: Any, tmp_path: Any) -> None:
    """A ref name in an upstream's namespace goes to the bucket's mirror cache, and comes back out of it."""
    secret = ceph_s3.secret_key
    bucket = await ceph_s3.new_bucket()
    try:
        layout = str(tmp_path / "layout")
        shutil.copytree(good_layout, layout)
        _edit_index(layout, _rename_ref(f"{NS}/lib/app:1.0"))
        upstream = f'[[upstream]]\nnamespace = "{NS}"\nurl = "http://127.0.0.1:9"\noffline = true\n\n'
        config = s3_config(tmp_path / "mirror.toml", bucket.settings, str(tmp_path / "cli"), upstream)
        result = await in_thread(secret, "import", "-c", config, "-i", layout, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["images"][0]["kind"] == "mirror" and report["images"][0]["upstream"] == NS
        tag = await bucket.get_small(f"mirror/{NS.replace(':', '_')}/lib/app/_manifests/tags/1.0", 1000)
        assert tag == source.app.digest.encode()
        assert await bucket.head_object("repositories/team/multi/_manifests/tags/1.0") is not None

        # Out again: with the config, and without it (the bucket's mirror/ folder names the namespace).
        plain = s3_config(tmp_path / "plain.toml", bucket.settings, str(tmp_path / "cli"))
        for which, path in (("config", config), ("plain", plain)):
            output = str(tmp_path / which)
            result = await in_thread(secret, "export", "-c", path, "--image", f"{NS}/lib/app:1.0", "-o", output)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith(f"exported {NS}/lib/app:1.0 {source.app.digest} (3 blobs, ")
            assert oci.resolve_tag(output, f"{NS}/lib/app:1.0")["digest"] == source.app.digest
            assert set(oci.referenced_digests(output, source.app.digest)) == \
                {source.app.digest, *(b.digest for b in source.app.blobs())}
        one_line_error(await in_thread(secret, "export", "-c", plain, "--image", f"{NS}/lib/app:2.0", "-o",
                                       str(tmp_path / "none")),
                       "export", 1, f"unknown image {NS}/lib/app:2.0", "in the mirror cache", "registryd preload")
        one_line_error(await in_thread(secret, "export", "-c", plain, "--image", "team/none:1.0", "-o",
                                       str(tmp_path / "none")),
                       "export", 1, "unknown image team/none:1.0: there is no repository team/none")
        assert not os.path.exists(tmp_path / "none")

        # Damage in the bucket is found while the blob streams in, and leaves nothing behind.
        layer = source.multi.images[1].layers[0].blob
        key = f"blobs/sha256/{layer.digest[7:9]}/{layer.digest[7:]}"
        await bucket.put_object(key, bytes([layer.data[0] ^ 1]) + layer.data[1:])
        for output in ("damaged", "damaged.tar"):
            one_line_error(await in_thread(secret, "export", "-c", plain, "--image", "team/multi:1.0", "-o",
                                           str(tmp_path / output)),
                           "export", 1, f"team/multi:1.0: blob {layer.digest} is damaged: it does not match its "
                                        f"digest (run `registryd fsck`)")
        await bucket.delete_object(key)
        one_line_error(await in_thread(secret, "export", "-c", plain, "--image", "team/multi:1.0", "-o",
                                       str(tmp_path / "damaged")),
                       "export", 1, f"blob {layer.digest} is missing from s3://{bucket.settings.bucket}/ "
                                    f"(run `registryd fsck`)")
        # (cli/ is the data directory the import made, for its tmp/.)
        assert sorted(os.listdir(tmp_path)) == ["cli", "config", "layout", "mirror.toml", "plain", "plain.toml"]
    finally:
        await bucket.close()


@pytest_twisted.ensureDeferred
async def test_s3_bad_layouts_change_nothing(source: Source, good_layout: str, ceph_s3: Any,
                                             tmp_path: Any) -> None:
    """Every bad layout of the filesystem test, on a bucket that holds part of the images: every
    failing import (all at once) leaves the bucket exactly as it was, and no staging behind."""
    secret = ceph_s3.secret_key
    bucket, empty = await ceph_s3.new_bucket(), await ceph_s3.new_bucket()
    try:
        config = s3_config(tmp_path / "s3.toml", bucket.settings, str(tmp_path / "node"))
        part = str(tmp_path / "part")
        assert export(source, part, "--image", "team/app:1.0").returncode == 0
        assert (await in_thread(secret, "import", "-c", config, "-i", part)).returncode == 0
        before = await bucket_listing(bucket)
        assert before and not any(key.startswith("repositories/team/multi/") for key in before)

        runs = []
        for case, (spoil, status, words) in sorted(BAD_LAYOUTS.items()):
            layout = str(tmp_path / f"layout-{len(runs)}")
            shutil.copytree(good_layout, layout)
            spoil(layout, source)
            for args in ([], ["--dry-run"], ["--json"]):
                # Each run its own data directory (for tmp/): none exists before, none may be left.
                node = str(tmp_path / f"node-{len(runs)}")
                runs.append((case, status, words, node,
                             in_thread(secret, "import", "-c", config, "-d", node, "-i", layout, *args)))
        empty_config = s3_config(tmp_path / "empty.toml", empty.settings, str(tmp_path / "node-empty"))
        for case, status, words, node, running in runs:
            one_line_error(await running, "import", status, words)
            assert not os.path.exists(node), case
        assert await bucket_listing(bucket) == before

        # A layer that does not match its digest is found while it is staged (the store is open then).
        damaged = str(tmp_path / "damaged")
        shutil.copytree(good_layout, damaged)
        _flip_byte(_blob_path(damaged, source.app.layers[0].blob.digest))
        result = await in_thread(secret, "import", "-c", empty_config, "-i", damaged)
        one_line_error(result, "import", 1, f"blob {source.app.layers[0].blob.digest} in the layout does not "
                                            f"match its digest")
        assert await bucket_listing(empty) == {}
        assert not os.path.exists(tmp_path / "node-empty")
        node = tmp_path / "node-empty"
        (node / "tmp").mkdir(parents=True)   # a node's own data directory: its tmp/ stays, emptied of ours
        one_line_error(await in_thread(secret, "import", "-c", empty_config, "-i", damaged), "import", 1,
                       "does not match its digest")
        assert [name for name in os.listdir(node / "tmp") if name != "uploads"] == []   # no import-<random>/
        assert await bucket_listing(empty) == {}
    finally:
        await bucket.close()
        await empty.close()
