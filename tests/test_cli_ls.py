"""``registryd ls`` through its console script, against a real data directory and a real S3 bucket.

The data directory is filled once per module by a registryd running in
process (pushes, a pull through a fake upstream), then stopped; each test
works on its own copy. test_cli_fsck.py uses the same fixtures. A bucket on
the session's Ceph is filled the same way, once, by a registryd with
``[storage] driver = "s3"``; ls only reads it. ``write_s3_config`` is the
config file test_cli_gc.py and test_cli_prune.py give the command for S3.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from conftest import free_port
from fake_upstream import FakeUpstream
from oci_client import (
    OCI_CONFIG,
    OCI_MANIFEST,
    OCI_NONDISTRIBUTABLE_LAYER,
    Client,
    Image,
    descriptor,
    digest_of,
    encode,
)
from registryd.units import human_size
from registryd.config import Config, StorageSettings, UpstreamConfig
from registryd.service import RegistryService
from registryd.storage.s3 import S3Settings

REGISTRYD = os.path.join(os.path.dirname(sys.executable), "registryd")
NS = "mirror.test:5000"
MIRROR_FOLDER = "mirror.test_5000"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The console script as an operator runs it (stdout and stderr are pipes)."""
    return subprocess.run([REGISTRYD, *args], capture_output=True, text=True, timeout=timeout)


def blob_file(data_dir: str, digest: str) -> str:
    algorithm, hexpart = digest.split(":")
    return os.path.join(data_dir, "blobs", algorithm, hexpart[:2], hexpart)


def files_under(root: str, skip: str | None = None) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (``skip``: a top-level folder)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        if directory == root and skip in dirs:
            dirs.remove(skip)
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@attrs.define
class Filled:
    """What the template data directory holds."""

    data_dir: str = ""
    app_v1: Image | None = None
    app_v2: Image | None = None
    artifact: Image | None = None
    children: list[Image] = attrs.field(factory=list)
    index: Image | None = None
    foreign: str = ""               # digest of a manifest with a non-distributable layer
    foreign_config: bytes = b""
    mirror_manifest: str = ""
    mirror_config: str = ""
    mirror_layer: str = ""
    mirror_sizes: dict[str, int] = attrs.field(factory=dict)
    bucket: Any = None              # the S3Client of the bucket, for the S3 template


async def _fill(url: str, fake: FakeUpstream, filled: Filled) -> None:
    client = Client(url)
    filled.app_v1 = await client.push_image("team/app", "v1", seed="1")
    filled.app_v2 = await client.push_image("team/app", "v2", seed="2")
    reply = await client.push_manifest("team/app", "latest", filled.app_v2.body, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    filled.artifact = await client.push_image("team/app", seed="sig", artifact_type="application/x.sig",
                                              subject=filled.app_v1.descriptor())
    filled.children = [await client.push_image("team/multi", seed=f"arch{i}") for i in range(2)]
    filled.index = await client.push_index("team/multi", filled.children, "1.0")

    # A Windows-style image: its foreign layer is never pushed, and need not be.
    config = json.dumps({"os": "windows"}).encode()
    await client.push_blob("team/foreign", config)
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(OCI_NONDISTRIBUTABLE_LAYER, b"not here", urls=["https://example.com/l"])]}
    body = encode(document)
    reply = await client.push_manifest("team/foreign", "ltsc", body, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    filled.foreign, filled.foreign_config = digest_of(body), config

    # Pull a manifest and its config through the mirror; the layer stays upstream.
    image = fake.add_image("lib/tool", "1.0", layer_sizes=[3000])
    reply = await client.get(f"/v2/lib/tool/manifests/1.0?ns={NS}", headers={"Accept": image["media_type"]})
    assert reply.status == 200, str(reply)
    filled.mirror_manifest = reply.header("Docker-Content-Digest") or ""
    manifest = json.loads(reply.body)
    filled.mirror_config = manifest["config"]["digest"]
    filled.mirror_layer = manifest["layers"][0]["digest"]
    reply = await client.get(f"/v2/lib/tool/blobs/{filled.mirror_config}?ns={NS}")
    assert reply.status == 200, str(reply)
    filled.mirror_sizes = {filled.mirror_manifest: len(image["manifest"]),
                           filled.mirror_config: manifest["config"]["size"]}


async def _build(data_dir: str, filled: Filled, storage: StorageSettings = StorageSettings()) -> None:
    from twisted.internet import reactor

    fake = FakeUpstream(reactor).start()
    config = Config(listen=("tcp:0:interface=127.0.0.1",), data_dir=data_dir,
                    upstreams=(UpstreamConfig(namespace=NS, url=fake.url),), storage=storage)
    service = RegistryService(config, reactor)
    service.prepare_storage()
    service.privilegedStartService()
    service.startService()
    try:
        await _fill(f"http://127.0.0.1:{service.ports[0].getHost().port}", fake, filled)
    finally:
        await service.stopService()
        await fake.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: Any) -> Filled:
    """A data directory filled by a real registryd, which is stopped again."""
    data_dir = str(tmp_path_factory.mktemp("template") / "data")
    filled = Filled(data_dir=data_dir)
    pytest_twisted.blockon(Deferred.fromCoroutine(_build(data_dir, filled)))
    return filled


@pytest.fixture
def store(template: Filled, tmp_path: Any) -> Iterator[Filled]:
    """This test's own copy of the template data directory."""
    data_dir = str(tmp_path / "data")
    shutil.copytree(template.data_dir, data_dir, symlinks=True)
    yield attrs.evolve(template, data_dir=data_dir)


@pytest.fixture(scope="module")
def s3_template(ceph_s3: Any, tmp_path_factory: Any) -> Iterator[Filled]:
    """A bucket (under a prefix) filled by a real registryd on the S3 driver, which is stopped again."""
    bucket = pytest_twisted.blockon(Deferred.fromCoroutine(ceph_s3.new_bucket(prefix="site-a/")))
    filled = Filled(data_dir=str(tmp_path_factory.mktemp("s3template") / "data"), bucket=bucket)
    try:
        storage = StorageSettings("s3", s3=bucket.settings)
        pytest_twisted.blockon(Deferred.fromCoroutine(_build(filled.data_dir, filled, storage)))
        yield filled
    finally:
        pytest_twisted.blockon(Deferred.fromCoroutine(bucket.close()))


def write_s3_config(tmp_path: Any, settings: S3Settings, data_dir: str | None = None) -> str:
    """A config file for the bucket of ``settings``; the secret is in a credentials file beside it.

    ``data_dir`` (for tmp/ only) defaults to one that does not exist: nothing may need it.
    """
    credentials = tmp_path / "s3-credentials"
    credentials.write_text(f"{settings.access_key_id}:{settings.secret_access_key}\n")
    path = tmp_path / "registryd-s3.toml"
    path.write_text(
        f'data_dir = "{data_dir or tmp_path / "node-data"}"\n\n'
        f'[storage]\ndriver = "s3"\n\n'
        f'[storage.s3]\nendpoint = "{settings.endpoint}"\nbucket = "{settings.bucket}"\n'
        f'region = "{settings.region}"\nprefix = "{settings.prefix}"\ncredentials_file = "{credentials}"\n'
        f'max_attempts = {settings.max_attempts}\nidle_timeout = 30\n\n'
        f'[[upstream]]\nnamespace = "{NS}"\nurl = "http://127.0.0.1:9"\n')
    return str(path)


async def bucket_objects(bucket: Any) -> dict[str, tuple[int, str]]:
    """Every key in the bucket (under its prefix) -> (size, ETag)."""
    return {entry.key: (entry.size, entry.etag) async for entry in bucket.list_objects("")}


def write_config(tmp_path: Any, data_dir: str) -> str:
    path = str(tmp_path / "registryd.toml")
    with open(path, "w") as f:
        f.write(f'data_dir = "{data_dir}"\n\n[[upstream]]\nnamespace = "{NS}"\nurl = "http://127.0.0.1:9"\n')
    return path


def _size(data_dir: str, *digests: str) -> int:
    return sum(os.path.getsize(blob_file(data_dir, d)) for d in set(digests))


# --- tests ------------------------------------------------------------------------


def test_help() -> None:
    result = run("ls", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("--json", "--config FILE", "--data-dir DIR", "only reads", "running",
                  "LAST PULL is when a manifest", "GET or HEAD", "exit status"):
        assert words in text, words
    assert "ls" in run("--help").stdout


def test_json_lists_local_and_mirrored_repositories(store: Filled) -> None:
    result = run("ls", "--data-dir", store.data_dir, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)
    assert document["data_dir"] == store.data_dir
    repos = {r["name"]: r for r in document["repositories"]}
    assert list(repos) == ["team/app", "team/foreign", "team/multi", f"{NS}/lib/tool"]

    app = repos["team/app"]
    assert app["kind"] == "local" and app["upstream"] is None and app["last_pull"] is None
    assert app["tags"] == ["latest", "v1", "v2"]
    assert app["manifests"] == 3  # v1, v2 (also latest), the artifact
    images = [store.app_v1, store.app_v2, store.artifact]
    expected = [i.digest for i in images if i] + [digest_of(b) for i in images if i for b in i.blobs]
    assert app["size"] == _size(store.data_dir, *expected)
    assert app["blobs_absent"] == 0

    foreign = repos["team/foreign"]
    assert foreign["size"] == _size(store.data_dir, store.foreign, digest_of(store.foreign_config))

    multi = repos["team/multi"]
    assert multi["tags"] == ["1.0"] and multi["manifests"] == 3

    tool = repos[f"{NS}/lib/tool"]
    assert tool["kind"] == "mirror" and tool["upstream"] == NS and tool["repository"] == "lib/tool"
    assert tool["tags"] == ["1.0"] and tool["manifests"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tool["last_pull"])   # pulled through the mirror
    # Only what is cached counts: the manifest and the config, not the layer.
    assert tool["size"] == sum(store.mirror_sizes.values())
    assert tool["blobs"] == 2 and tool["blobs_absent"] == 1

    blobs = files_under(os.path.join(store.data_dir, "blobs"))
    assert document["store"]["blobs"] == len(blobs)
    assert document["store"]["size"] == sum(os.path.getsize(os.path.join(store.data_dir, "blobs", p)) for p in blobs)


def test_table_for_people(store: Filled) -> None:
    result = run("ls", "-d", store.data_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TYPE", "MANIFESTS", "SIZE", "LAST", "PULL", "TAGS"]
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert rows["team/app"].split()[1:3] == ["local", "3"]
    assert rows["team/app"].endswith("latest, v1, v2")
    assert f"mirror:{NS}" in rows[f"{NS}/lib/tool"]
    assert " - " in rows["team/app"]  # last pull: never pulled
    assert re.search(r" \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", rows[f"{NS}/lib/tool"])
    assert "4 repositories (3 local, 1 mirrored)" in lines[-1]


def test_config_file_names_the_data_directory(store: Filled, tmp_path: Any) -> None:
    config = write_config(tmp_path, store.data_dir)
    by_config = run("ls", "--config", config, "--json")
    assert by_config.returncode == 0, by_config.stderr
    by_dir = run("ls", "--data-dir", store.data_dir, "--json")
    assert json.loads(by_config.stdout) == json.loads(by_dir.stdout)


def test_a_listing_needs_no_upstream_secret_but_the_server_does(store: Filled, tmp_path: Any) -> None:
    """The upstream's token is only in the server's environment: ls lists anyway (issue 14; it
    used to stop with exit 3 and "environment variable ... is not set"); twistd still refuses
    to start without it, in one line."""
    config = write_config(tmp_path, store.data_dir)
    with open(config, "a") as f:
        f.write('username = "robot"\npassword_env = "REGISTRYD_TEST_UNSET_TOKEN"\n')
    env = {k: v for k, v in os.environ.items() if k != "REGISTRYD_TEST_UNSET_TOKEN"}
    listed = subprocess.run([REGISTRYD, "ls", "-c", config, "--json"], capture_output=True, text=True, timeout=60,
                            env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == json.loads(run("ls", "--data-dir", store.data_dir, "--json").stdout)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    served = subprocess.run([twistd, "-n", "--pidfile=", "registryd", "-c", config, "--listen",
                             f"tcp:{free_port()}:interface=127.0.0.1"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert served.returncode == 1
    assert (served.stderr + served.stdout).strip().splitlines()[-1] == (
        f"registryd: config file {config}: 'upstream[0].password_env': environment variable "
        f"REGISTRYD_TEST_UNSET_TOKEN is not set")
    assert "Traceback" not in served.stderr + served.stdout


def test_empty_store(tmp_path: Any) -> None:
    data_dir = tmp_path / "data"
    for sub in ("blobs", "repositories", "uploads", "tmp"):
        (data_dir / sub).mkdir(parents=True)
    result = run("ls", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0 repositories")
    assert json.loads(run("ls", "-d", str(data_dir), "--json").stdout)["repositories"] == []


def many_repositories(tmp_path: Any, count: int) -> str:
    """A data directory with ``count`` repositories that have no manifest yet."""
    data_dir = tmp_path / "many"
    for sub in ("blobs", "uploads", "tmp"):
        (data_dir / sub).mkdir(parents=True)
    for i in range(count):
        (data_dir / "repositories" / "team" / f"an-application-with-a-long-name-{i:04d}" / "_manifests" / "tags").mkdir(parents=True)
    return str(data_dir)


def test_a_thousand_repositories(tmp_path: Any) -> None:
    """Store calls that answer at once do not pile up on one stack (it overflowed past ~150)."""
    data_dir = many_repositories(tmp_path, 1000)
    result = run("ls", "-d", data_dir, "--json", timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads(result.stdout)["repositories"]) == 1000


def test_a_reader_that_stops_early_is_no_error(tmp_path: Any) -> None:
    """``registryd ls --json | head``: no BrokenPipeError traceback, the status a closed pipe gives."""
    data_dir = many_repositories(tmp_path, 1000)
    for args in (["--json"], []):
        with subprocess.Popen([REGISTRYD, "ls", "-d", data_dir, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as process:
            assert process.stdout is not None and process.stderr is not None
            assert process.stdout.read(10)
            process.stdout.close()
            stderr = process.stderr.read().decode()
            assert process.wait(30) == 141, stderr
        assert stderr == ""


def test_errors_are_one_line(tmp_path: Any) -> None:
    missing = str(tmp_path / "nowhere")
    result = run("ls", "--data-dir", missing)
    assert result.returncode == 3
    assert result.stderr == f"registryd ls: the data directory {missing} does not exist\n"
    assert result.stdout == ""

    result = run("ls", "--data-dir", str(tmp_path))
    assert result.returncode == 3
    assert result.stderr.startswith("registryd ls: ") and "not a registryd data directory" in result.stderr
    assert result.stderr.count("\n") == 1

    bad = tmp_path / "bad.toml"
    bad.write_text("data_dir = 3\n")
    result = run("ls", "--config", str(bad))
    assert result.returncode == 3
    assert result.stderr.startswith("registryd ls: config file") and result.stderr.count("\n") == 1

    result = run("ls", "--bogus")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "registryd: error: unrecognized arguments: --bogus"
    result = run("ls", "--data-dir")
    assert result.returncode == 2
    assert "expected one argument" in result.stderr.splitlines()[-1]


# --- the S3 driver: the same command on a bucket --------------------------------------


def _local(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in document["repositories"] if r["kind"] == "local"]


def _blob_objects(objects: dict[str, tuple[int, str]]) -> dict[str, int]:
    return {key: size for key, (size, _) in objects.items() if key.startswith("blobs/")}


@pytest_twisted.ensureDeferred
async def test_s3_json_lists_the_bucket(s3_template: Filled, template: Filled, tmp_path: Any) -> None:
    settings = s3_template.bucket.settings
    before = await bucket_objects(s3_template.bucket)
    result = run("ls", "--config", write_s3_config(tmp_path, settings), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)
    location = f"s3://{settings.bucket}/site-a/"
    assert document["data_dir"] == location and document["store"]["location"] == location
    assert document["driver"] == "s3"
    repos = {r["name"]: r for r in document["repositories"]}
    assert list(repos) == ["team/app", "team/foreign", "team/multi", f"{NS}/lib/tool"]

    # Sizes from what was pushed, not from what the store says.
    images = [i for i in (s3_template.app_v1, s3_template.app_v2, s3_template.artifact) if i]
    sizes = {i.digest: len(i.body) for i in images} | {digest_of(b): len(b) for i in images for b in i.blobs}
    app = repos["team/app"]
    assert app["kind"] == "local" and app["tags"] == ["latest", "v1", "v2"] and app["manifests"] == 3
    assert app["size"] == sum(sizes.values()) and app["blobs"] == len(sizes) - 3 and app["blobs_absent"] == 0
    assert app["last_pull"] is None
    # The same content as in the data directory: the same listing, whichever driver holds it.
    on_disk = json.loads(run("ls", "-d", template.data_dir, "--json").stdout)
    assert _local(document) == _local(on_disk)

    tool = repos[f"{NS}/lib/tool"]
    assert tool["kind"] == "mirror" and tool["upstream"] == NS and tool["repository"] == "lib/tool"
    assert tool["tags"] == ["1.0"] and tool["manifests"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tool["last_pull"])   # pulled through the mirror
    assert tool["size"] == sum(s3_template.mirror_sizes.values())
    assert tool["blobs"] == 2 and tool["blobs_absent"] == 1

    blobs = _blob_objects(before)
    assert document["store"]["blobs"] == len(blobs) > len(sizes)
    assert document["store"]["size"] == sum(blobs.values())
    # ls only reads: not one object written, and no local file (S3Appendable makes its spool folder).
    assert await bucket_objects(s3_template.bucket) == before
    assert files_under(str(tmp_path / "node-data")) == {}


@pytest_twisted.ensureDeferred
async def test_s3_table_names_the_bucket(s3_template: Filled, tmp_path: Any) -> None:
    settings = s3_template.bucket.settings
    blobs = _blob_objects(await bucket_objects(s3_template.bucket))
    result = run("ls", "-c", write_s3_config(tmp_path, settings))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TYPE", "MANIFESTS", "SIZE", "LAST", "PULL", "TAGS"]
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert rows["team/multi"].split()[1:3] == ["local", "3"] and rows["team/multi"].endswith(" 1.0")
    assert f"mirror:{NS}" in rows[f"{NS}/lib/tool"]
    assert lines[-1] == (f"4 repositories (3 local, 1 mirrored) in s3://{settings.bucket}/site-a/; "
                         f"blob store: {len(blobs)} blobs, {human_size(sum(blobs.values()))}")


def test_s3_errors_are_one_line(s3_template: Filled, tmp_path: Any) -> None:
    settings = s3_template.bucket.settings
    location = f"s3://{settings.bucket}/site-a/"
    refused = run("ls", "-c", write_s3_config(tmp_path, attrs.evolve(settings, secret_access_key="wrong" * 8)))
    assert refused.returncode == 3 and refused.stdout == ""
    assert refused.stderr.startswith(f"registryd ls: {location}: object store: S3 GET ") and " 403 " in refused.stderr
    assert refused.stderr.count("\n") == 1

    nobody = attrs.evolve(settings, endpoint=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    unreachable = run("ls", "-c", write_s3_config(tmp_path, nobody), "--json")
    assert unreachable.returncode == 3 and unreachable.stdout == ""
    assert unreachable.stderr.startswith(f"registryd ls: {location}: object store: ")
    assert unreachable.stderr.count("\n") == 1
