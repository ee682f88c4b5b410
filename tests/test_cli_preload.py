"""``registryd preload`` through its console script, against Debian's
docker-registry as the upstream; what it loaded is then served by a real
``twistd -n registryd`` that is offline (and the upstream stopped)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import bcrypt
import pytest
import pytest_twisted

from conftest import free_port, start_twistd, stop_process
from registryd.admin.image_list import ImageListError, ImageRef, parse_lines, parse_reference
from registryd.units import human_size
from support.pki import issue, make_ca
from syncclient import request
from upstreams import blob_path, client_for, manifest_path, push_image, push_index, reference_upstream  # noqa: F401

REGISTRYD = os.path.join(os.path.dirname(sys.executable), "registryd")
NS = "upstream.test"
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def preload(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "REGISTRYD_PASSWORD"}
    environment.update(env or {})
    return subprocess.run([REGISTRYD, "preload", *args], capture_output=True, text=True, timeout=120,
                          env=environment)


def write_config(path: Any, upstreams: list[dict[str, Any]], extra: str = "") -> str:
    lines = []
    for upstream in upstreams:
        lines.append("[[upstream]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in upstream.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)
    return str(path)


def blobs_of(image: dict[str, Any]) -> list[str]:
    return [image["config"]["digest"], *(layer["digest"] for layer in image["layers"])]


def blob_file(data_dir: Any, digest: str) -> str:
    algorithm, hexpart = digest.split(":")
    return os.path.join(str(data_dir), "blobs", algorithm, hexpart[:2], hexpart)


def pull(host: str, repo: str, reference: str, headers: dict[str, str] | None = None) -> int:
    """Pull a whole image from a registryd like a client (index children too);
    every digest is checked. Returns the number of blobs."""
    headers = {"Accept": ACCEPT, **(headers or {})}
    reply = request(host, "GET", f"/v2/{repo}/manifests/{reference}", headers=headers)
    assert reply.status == 200, (repo, reference, reply.body)
    digest = reply.header("docker-content-digest")
    assert digest == "sha256:" + hashlib.sha256(reply.body).hexdigest()
    document = reply.json()
    if "manifests" in document:
        return sum(pull(host, repo, child["digest"], headers) for child in document["manifests"])
    digests = [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]
    for blob in digests:
        reply = request(host, "GET", f"/v2/{repo}/blobs/{blob}", headers=headers)
        assert reply.status == 200, (repo, blob, reply.body)
        assert "sha256:" + hashlib.sha256(reply.body).hexdigest() == blob
    return len(digests)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- help and references -------------------------------------------------------


def test_help() -> None:
    result = preload("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("--image-file FILE", "--image REF", "--platform OS/ARCH[/VARIANT]", "--jobs N", "--url URL",
                  "--user USER", "--password-file FILE", "REGISTRYD_PASSWORD", "--ca-file FILE", "--insecure",
                  "--config FILE", "--data-dir DIR", "--json", "running registryd", "the store itself", "the bucket",
                  "127.0.0.1 only", "alongside running servers", "docker.io/library/alpine:3.19",
                  "# comments", "exit status", "1 some image failed", "3 preload could not start"):
        assert words in text, words
    assert "preload" in subprocess.run([REGISTRYD, "--help"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("text, name, reference", [
    ("alpine", "alpine", "latest"),
    ("alpine:3.19", "alpine", "3.19"),
    ("docker.io/library/alpine:3.19", "docker.io/library/alpine", "3.19"),
    ("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app", "latest"),
    ("127.0.0.1:5000/team/app:v2", "127.0.0.1:5000/team/app", "v2"),
    ("127.0.0.1:5000/team/app@sha256:" + "a" * 64, "127.0.0.1:5000/team/app", "sha256:" + "a" * 64),
    ("team/app:v1@sha256:" + "b" * 64, "team/app", "sha256:" + "b" * 64),
])
def test_references(text: str, name: str, reference: str) -> None:
    assert parse_reference(text) == ImageRef(name, reference)


@pytest.mark.parametrize("text, message", [
    ("Alpine:3", "'Alpine' is not a valid repository name"),
    ("alpine:-x", "'-x' is not a valid tag"),
    ("alpine@sha256:abc", "sha256 needs 64"),
    ("alpine@md5:" + "a" * 32, "unsupported algorithm"),
    ("bad host:5000/app", "is not one image reference"),
    ("127.0.0.1:port/app", "is not a registry host[:port]"),
    ("team//app", "is not a valid repository name"),
    ("127.0.0.1:5000/Team/app", "'127.0.0.1:5000/Team/app' is not a valid repository name"),
])
def test_bad_references(text: str, message: str) -> None:
    with pytest.raises(ImageListError) as caught:
        parse_reference(text)
    assert message in str(caught.value)


def test_image_file_lines() -> None:
    lines = ["# edge site\n", "\n", "alpine:3.19  # base\n", "  docker.io/library/busybox\n", "alpine:3.19\n"]
    assert parse_lines(lines, "f") == [ImageRef("alpine", "3.19"), ImageRef("docker.io/library/busybox", "latest"),
                                       ImageRef("alpine", "3.19")]
    with pytest.raises(ImageListError) as caught:
        parse_lines(["alpine\n", "Bad\n", "x y\n"], "images.txt")
    assert str(caught.value).startswith("images.txt:2: 'Bad' is not a valid repository name")
    assert str(caught.value).endswith("(and 1 more bad lines)")


# --- data-directory mode ---------------------------------------------------------


def test_preload_the_data_dir_then_serve_it_offline(reference_upstream: Any, tmp_path: Any) -> None:
    """An image, a 2-platform index and a multi-layer image, preloaded with a
    fresh data directory; each blob is fetched from upstream once, a second
    run fetches nothing, and an offline registryd serves all of it."""
    up = reference_upstream("open")
    app = push_image(up, "lib/app", "v1", layer_sizes=[2000, 300_000])
    children = [push_image(up, "lib/multi", None, layer_sizes=[1500 + i]) for i in range(2)]
    index = push_index(up, "lib/multi", "1.0", children)
    big = push_image(up, "lib/big", "v3", layer_sizes=[1024, 3 << 20, 70_000, 10])
    data_dir = tmp_path / "data"
    (data_dir / "tmp").mkdir(parents=True)
    in_flight = data_dir / "tmp" / "fill-of-a-running-server"
    in_flight.write_bytes(b"half a blob")
    upstream = {"namespace": NS, "url": up.url, "default": True}
    # The edge site's config says offline; preload contacts upstreams anyway.
    config = write_config(tmp_path / "registryd.toml", [upstream], "[mirror]\noffline = true\n")
    image_file = tmp_path / "images.txt"
    image_file.write_text(f"# the edge site's images\nupstream.test/lib/app:v1\n\nlib/multi:1.0   # by the default "
                          f"upstream\n{NS}/lib/big@{big['digest']}\n")

    result = preload("-c", config, "-d", str(data_dir), "--image-file", str(image_file), "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    app_size = sum(b["size"] for b in [app["config"], *app["layers"]])
    multi_size = sum(b["size"] for c in children for b in [c["config"], *c["layers"]])
    big_size = sum(b["size"] for b in [big["config"], *big["layers"]])
    assert sorted(lines[:3]) == sorted([
        f"ok upstream.test/lib/app:v1 {app['digest']} 1 manifest, 3 blobs, {human_size(app_size)}",
        f"ok lib/multi:1.0 {index['digest']} 3 manifests, 4 blobs, {human_size(multi_size)}",
        f"ok {NS}/lib/big@{big['digest']} {big['digest']} 1 manifest, 5 blobs, {human_size(big_size)}",
    ])
    assert lines[3] == (f"preloaded 3 of 3 images (5 manifests, 12 blobs, "
                        f"{human_size(app_size + multi_size + big_size)})")
    assert result.stderr == ""
    assert in_flight.read_bytes() == b"half a blob", "preload must never empty tmp/"
    images = [("lib/app", app), *(("lib/multi", c) for c in children), ("lib/big", big)]
    for repo, image in images:
        for digest in blobs_of(image):
            assert up.count("GET", blob_path(repo, digest)) == 1, (repo, digest)
            assert os.path.isfile(blob_file(data_dir, digest))

    again = preload("-c", config, "-d", str(data_dir), "--image-file", str(image_file))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[-1] == lines[3]
    for repo, image in images:
        for digest in blobs_of(image):
            assert up.count("GET", blob_path(repo, digest)) == 1, "a second preload fetched again"

    up.stop()
    process, server = start_twistd(str(data_dir), "--config", config)
    try:
        assert pull(server.host, f"{NS}/lib/app", "v1") == 3
        assert pull(server.host, "lib/multi", "1.0") == 4
        assert pull(server.host, f"{NS}/lib/big", big["digest"]) == 5
        assert pull(server.host, f"{NS}/lib/multi", index["digest"]) == 4
    finally:
        stop_process(process)


def test_platform_fetches_only_that_child(reference_upstream: Any, tmp_path: Any) -> None:
    up = reference_upstream("open")
    amd64, arm64 = (push_image(up, "lib/multi", None, layer_sizes=[3000 + i]) for i in range(2))
    index = push_index(up, "lib/multi", "1.0", [amd64, arm64])
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = write_config(tmp_path / "registryd.toml", [{"namespace": NS, "url": up.url}])

    result = preload("-c", config, "-d", str(data_dir), "--image", f"{NS}/lib/multi:1.0",
                     "--platform", "linux/arm64", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["mode"] == "data-dir" and document["platforms"] == ["linux/arm64"]
    assert (document["preloaded"], document["failed"]) == (1, 0)
    [image] = document["images"]
    assert image["ok"] and image["error"] is None
    assert image["digest"] == index["digest"]
    assert (image["manifests"], image["blobs"]) == (2, 2)
    assert image["bytes"] == document["bytes"] == sum(b["size"] for b in [arm64["config"], *arm64["layers"]])
    assert up.count("GET", manifest_path("lib/multi", arm64["digest"])) == 1
    assert up.count("GET", manifest_path("lib/multi", amd64["digest"])) == 0
    for digest in blobs_of(arm64):
        assert os.path.isfile(blob_file(data_dir, digest))
    for digest in blobs_of(amd64):
        assert up.count("GET", blob_path("lib/multi", digest)) == 0
        assert not os.path.exists(blob_file(data_dir, digest))

    missing = preload("-c", config, "-d", str(data_dir), "--image", f"{NS}/lib/multi:1.0",
                      "--platform", "linux/s390x", "--platform", "windows/amd64")
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert missing.stdout.splitlines()[0] == (
        f"FAILED {NS}/lib/multi:1.0: the index has no manifest for linux/s390x, windows/amd64 "
        f"(it has linux/amd64, linux/arm64)")


def test_a_failed_image_leaves_the_others(reference_upstream: Any, tmp_path: Any) -> None:
    """Unknown tag and digest, a blob the upstream lost, an unreachable
    upstream, a local name: each its own FAILED line; the good image is ok."""
    up = reference_upstream("open")
    good = push_image(up, "lib/app", "v1")
    broken = push_image(up, "lib/broken", "v1", layer_sizes=[5000])
    lost = broken["layers"][0]["digest"]
    client_for(up).expect(202, "DELETE", f"/v2/lib/broken/blobs/{lost}")
    down = f"127.0.0.1:{free_port()}"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = write_config(tmp_path / "registryd.toml", [{"namespace": NS, "url": up.url},
                                                        {"namespace": "down.test", "url": f"http://{down}"}])
    unknown = "sha256:" + "0" * 64
    refs = [f"{NS}/lib/app:v1", f"{NS}/lib/app:nope", f"{NS}/lib/app@{unknown}", f"{NS}/lib/broken:v1",
            "down.test/lib/app:v1", "team/local:1"]
    result = preload("-c", config, "-d", str(data_dir), *(f"--image={ref}" for ref in refs))
    assert result.returncode == 1, result.stdout + result.stderr
    *reports, summary = result.stdout.splitlines()
    outcome = dict(report_of(line) for line in reports)
    assert sorted(outcome) == sorted(refs)
    size = human_size(good["config"]["size"] + good["layers"][0]["size"])
    assert outcome[f"{NS}/lib/app:v1"] == f"ok {good['digest']} 1 manifest, 2 blobs, {size}"
    assert outcome[f"{NS}/lib/app:nope"] == "manifest nope: 404 MANIFEST_UNKNOWN: manifest unknown to registry"
    assert outcome[f"{NS}/lib/app@{unknown}"] == (f"manifest {unknown}: 404 MANIFEST_UNKNOWN: "
                                                  f"manifest unknown to registry")
    assert outcome[f"{NS}/lib/broken:v1"] == f"blob {lost}: 404 BLOB_UNKNOWN: blob unknown to registry"
    assert outcome["down.test/lib/app:v1"].startswith(
        "manifest v1: 503 UNAVAILABLE: upstream down.test is unavailable and nothing is cached: ")
    assert "refused" in outcome["down.test/lib/app:v1"].lower()
    assert outcome["team/local:1"] == ("not a mirrored repository (no [[upstream]] namespace or default "
                                       "upstream serves it)")
    assert summary == f"preloaded 1 of 6 images (1 manifest, 2 blobs, {size}); 5 failed"


@pytest_twisted.ensureDeferred
async def test_preload_into_an_s3_bucket(reference_upstream: Any, ceph_s3: Any, tmp_path: Any,
                                         monkeypatch: Any) -> None:
    """Without --url on the S3 driver: the private server fills the bucket; the data
    directory keeps only tmp/, and a node on the bucket then serves it offline.
    (The commands run as blocking subprocesses: nothing in this process serves meanwhile.)"""
    up = reference_upstream("open")
    app = push_image(up, "lib/app", "v1", layer_sizes=[2000, 6 << 20])
    bucket = await ceph_s3.new_bucket(prefix="edge/")
    settings = bucket.settings
    storage = (f'[storage]\ndriver = "s3"\n[storage.s3]\nendpoint = "{settings.endpoint}"\n'
               f'bucket = "{settings.bucket}"\nprefix = "edge/"\nregion = "{settings.region}"\n'
               f'access_key_id = "{settings.access_key_id}"\nsecret_access_key_env = "TEST_S3_SECRET"\n')
    config = write_config(tmp_path / "registryd.toml", [{"namespace": NS, "url": up.url}],
                          "[mirror]\noffline = true\n" + storage)
    data_dir = tmp_path / "node"
    env = {"TEST_S3_SECRET": settings.secret_access_key}
    try:
        result = preload("-c", config, "-d", str(data_dir), "--image", f"{NS}/lib/app:v1", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        size = human_size(sum(b["size"] for b in [app["config"], *app["layers"]]))
        assert result.stdout.splitlines() == [f"ok {NS}/lib/app:v1 {app['digest']} 1 manifest, 3 blobs, {size}",
                                              f"preloaded 1 of 1 image (1 manifest, 3 blobs, {size})"]
        assert os.listdir(data_dir) == ["tmp"]
        for digest in blobs_of(app):
            algorithm, hexpart = digest.split(":")
            key = f"blobs/{algorithm}/{hexpart[:2]}/{hexpart}"
            assert await bucket.head_object(key) is not None, (digest, result.stderr)
        again = preload("-c", config, "-d", str(data_dir), "--image", f"{NS}/lib/app:v1", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        for digest in blobs_of(app):
            assert up.count("GET", blob_path("lib/app", digest)) == 1, "a second preload fetched again"
        up.stop()
        monkeypatch.setenv("TEST_S3_SECRET", settings.secret_access_key)  # the node inherits it
        process, server = start_twistd(str(tmp_path / "other-node"), "--config", config)
        try:
            assert pull(server.host, f"{NS}/lib/app", "v1") == 3
        finally:
            stop_process(process)
    finally:
        await bucket.close()


def report_of(line: str) -> tuple[str, str]:
    """``ok REF rest`` -> (REF, "ok rest"); ``FAILED REF: reason`` -> (REF, reason)."""
    if line.startswith("FAILED "):
        ref, reason = line[len("FAILED "):].split(": ", 1)
        return ref, reason
    status, ref, rest = line.split(" ", 2)
    assert status == "ok", line
    return ref, f"ok {rest}"


# --- through a running registryd ------------------------------------------------------


def test_url_mode_with_basic_auth_then_restart_offline(reference_upstream: Any, tmp_path: Any) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1", layer_sizes=[4000, 200_000])
    children = [push_image(up, "lib/multi", None, layer_sizes=[700 + i]) for i in range(2)]
    push_index(up, "lib/multi", "2.0", children)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"alice-Secret-1", bcrypt.gensalt(rounds=4)).decode() + "\n")
    password_file = tmp_path / "password"
    password_file.write_text("alice-Secret-1\n")
    upstream = {"namespace": up.host, "url": up.url}
    auth = f'[auth]\nhtpasswd = "{htpasswd}"\n'
    config = write_config(tmp_path / "registryd.toml", [upstream], auth)
    data_dir = str(tmp_path / "data")
    refs = [f"--image={up.host}/lib/app:v1", f"--image={up.host}/lib/app@{image['digest']}",
            f"--image={up.host}/lib/multi:2.0"]

    process, server = start_twistd(data_dir, "--config", config)
    try:
        anonymous = preload("--url", server.url, *refs)
        assert anonymous.returncode == 3
        assert one_line(anonymous.stderr) == f"registryd preload: {server.url} needs credentials: give --user"
        wrong = preload("--url", server.url, "--user", "alice", *refs, env={"REGISTRYD_PASSWORD": "nope"})
        assert wrong.returncode == 3
        assert one_line(wrong.stderr) == f"registryd preload: {server.url} refused the credentials of alice"
        assert up.count("GET", r"/v2/lib/.*") == 0

        result = preload("--url", server.url + "/", "--user", "alice", "--password-file", str(password_file), *refs)
        assert result.returncode == 0, result.stdout + result.stderr
        *reports, summary = result.stdout.splitlines()
        outcome = dict(report_of(line) for line in reports)
        assert len(reports) == 3 and all(o.startswith("ok ") for o in outcome.values()), result.stdout
        assert outcome[f"{up.host}/lib/app@{image['digest']}"].startswith(f"ok {image['digest']} 1 manifest, 3 blobs")
        assert outcome[f"{up.host}/lib/multi:2.0"].startswith("ok sha256:")
        assert summary.startswith("preloaded 3 of 3 images (4 manifests, 7 blobs, ")
        for repo, pushed in [("lib/app", image), *(("lib/multi", c) for c in children)]:
            for digest in blobs_of(pushed):
                assert up.count("GET", blob_path(repo, digest)) == 1, (repo, digest)

        by_env = preload("--url", server.url, "--user", "alice", "--json", *refs,
                         env={"REGISTRYD_PASSWORD": "alice-Secret-1"})
        assert by_env.returncode == 0, by_env.stdout + by_env.stderr
        document = json.loads(by_env.stdout)
        assert document["mode"] == "url" and document["url"] == server.url and document["preloaded"] == 3
    finally:
        stop_process(process)

    up.stop()
    offline = write_config(tmp_path / "offline.toml", [upstream], auth + "[mirror]\noffline = true\n")
    process, server = start_twistd(data_dir, "--config", offline)
    try:
        credentials = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-Secret-1").decode()}
        assert pull(server.host, f"{up.host}/lib/app", "v1", credentials) == 3
        assert pull(server.host, f"{up.host}/lib/multi", "2.0", credentials) == 4
    finally:
        stop_process(process)


def test_url_mode_over_tls(reference_upstream: Any, tmp_path: Any) -> None:
    """--ca-file trusts the registryd's CA; without it the certificate is
    refused (exit 3); --insecure skips the check."""
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1")
    ca = make_ca("preload test CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    cert, key = issue(ca, "registryd", hosts=["127.0.0.1"]).write(str(tmp_path), "server")
    config = write_config(tmp_path / "registryd.toml", [{"namespace": NS, "url": up.url}])
    tls_port = free_port()
    process, _ = start_twistd(str(tmp_path / "data"), "--config", config,
                              "--listen", f"tls:{tls_port}:interface=127.0.0.1:cert={cert}:key={key}")
    url = f"https://127.0.0.1:{tls_port}"
    try:
        untrusted = preload("--url", url, "--image", f"{NS}/lib/app:v1")
        assert untrusted.returncode == 3, untrusted.stdout + untrusted.stderr
        assert one_line(untrusted.stderr) == f"registryd preload: cannot reach {url}: TLS: certificate verify failed"
        for trust in (("--ca-file", str(ca_file)), ("--insecure",)):
            result = preload("--url", url, *trust, "--image", f"{NS}/lib/app:v1")
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.startswith(f"ok {NS}/lib/app:v1 {image['digest']} 1 manifest, 2 blobs, ")
        bad_ca = preload("--url", url, "--ca-file", str(tmp_path / "nothing.pem"), "--image", "a")
        assert bad_ca.returncode == 2
        assert one_line(bad_ca.stderr).startswith(f"registryd preload: cannot use --ca-file {tmp_path}/nothing.pem")
    finally:
        stop_process(process)
    for digest in blobs_of(image):
        assert up.count("GET", blob_path("lib/app", digest)) == 1


# --- usage and start-up errors --------------------------------------------------------------


def test_a_bad_line_stops_everything(tmp_path: Any) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = write_config(tmp_path / "registryd.toml", [{"namespace": NS, "url": f"http://127.0.0.1:{free_port()}"}])
    image_file = tmp_path / "images.txt"
    image_file.write_text(f"{NS}/lib/app:v1\n# fine\n{NS}/lib/App:v1\n")
    result = preload("-c", config, "-d", str(data_dir), "--image-file", str(image_file))
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(
        f"registryd preload: {image_file}:3: '{NS}/lib/App' is not a valid repository name")
    assert result.stdout == ""
    assert os.listdir(data_dir) == [], "nothing may be fetched or created"

    for args, message in [
        ((), "give --image-file FILE or --image REF"),
        (("--image-file", str(tmp_path / "missing.txt")), f"cannot read {tmp_path / 'missing.txt'}: No such file"),
        (("--image", "a", "--jobs", "0"), "--jobs must be at least 1, not 0"),
        (("--image", "a", "--user", "alice"), "--user goes with --url"),
        (("--image", "a", "--url", "http://127.0.0.1:1", "-d", str(data_dir)), "--config and --data-dir are for"),
        (("--image", "a", "--url", "ftp://x"), "--url must be http(s)://host[:port]"),
        (("--image", "a", "--url", "http://127.0.0.1:1", "--user", "alice"), "--user needs a password"),
    ]:
        result = preload(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in one_line(result.stderr), (args, result.stderr)
    bad_platform = preload("--image", "a", "--platform", "linux")
    assert bad_platform.returncode == 2 and "is not OS/ARCH" in bad_platform.stderr


def test_cannot_start(tmp_path: Any) -> None:
    config = write_config(tmp_path / "registryd.toml", [{"namespace": NS, "url": "http://127.0.0.1:1"}])
    bad = tmp_path / "bad.toml"
    bad.write_text("[mirror]\nofline = true\n")
    no_upstream = tmp_path / "empty.toml"
    no_upstream.write_text("")
    stranger = tmp_path / "home"
    (stranger / "documents").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    closed = f"http://127.0.0.1:{free_port()}"
    for args, message in [
        (("-c", config, "-d", str(tmp_path / "missing")), f"the data directory {tmp_path / 'missing'} does not exist"),
        (("-c", str(bad), "-d", str(tmp_path / "data")), "unknown key 'mirror.ofline'"),
        (("-c", str(no_upstream), "-d", str(tmp_path / "data")), "the config has no [[upstream]]"),
        (("-c", config, "-d", str(stranger)), "is not a registryd data directory"),
        (("--url", closed), f"cannot reach {closed}: connection refused"),
    ]:
        result = preload("--image", f"{NS}/lib/app", *args)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert message in one_line(result.stderr), (args, result.stderr)
        assert result.stdout == ""
    assert os.listdir(tmp_path / "data") == []
