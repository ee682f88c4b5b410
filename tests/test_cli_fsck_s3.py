"""``registryd fsck [--repair]`` on the S3 driver, through its console script.

Each test gets a fresh bucket (under a prefix) that a registryd running in
process on that bucket filled as test_cli_ls.py fills its data directory
(pushes, and a pull through a fake upstream), then damages it and runs the
command with a TOML config naming the bucket, as an operator does.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from typing import Any, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from terminal import run_with_terminal_stderr
from conftest import RunningRegistry
from fake_upstream import FakeUpstream
from oci_client import OCI_MANIFEST, Client, digest_of
from registryd.admin.fsck import StoreFsck
from registryd.config import StorageSettings, UpstreamConfig
from registryd.digest import parse_digest
from registryd.storage.s3 import S3Client
from registryd.storage.layout import blob_key, trash_key
from registryd.storage.s3.driver import S3Driver
from test_cli_ls import NS, REGISTRYD, Filled, _fill
from support.wait import sleep

PREFIX = "site/"
SECRET_ENV = "REGISTRYD_TEST_S3_SECRET"


@attrs.define
class Bucket:
    """The test's bucket: a client on it, what the registry put there, and a config naming it."""

    client: S3Client
    filled: Filled
    config: str
    registry: RunningRegistry


def block(coroutine: Any) -> Any:
    """Wait for ``coroutine`` in a (synchronous) fixture."""
    return pytest_twisted.blockon(Deferred.fromCoroutine(coroutine))


def write_config(path: str, client: S3Client, data_dir: str, extra: str = "") -> str:
    settings = client.settings
    with open(path, "w") as f:
        f.write(f'data_dir = "{data_dir}"\n{extra}\n'
                f'[storage]\ndriver = "s3"\n\n'
                f'[storage.s3]\nendpoint = "{settings.endpoint}"\nbucket = "{settings.bucket}"\n'
                f'region = "{settings.region}"\nprefix = "{PREFIX}"\n'
                f'access_key_id = "{settings.access_key_id}"\nsecret_access_key_env = "{SECRET_ENV}"\n\n'
                f'[[upstream]]\nnamespace = "{NS}"\nurl = "http://127.0.0.1:9"\n')
    return path


@pytest.fixture
def bucket(ceph_s3: Any, make_registry: Any, tmp_path: Any) -> Iterator[Bucket]:
    from twisted.internet import reactor

    client: S3Client = block(ceph_s3.new_bucket(prefix=PREFIX))
    fake = FakeUpstream(reactor).start()
    try:
        registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake.url),),
                                 storage=StorageSettings("s3", s3=client.settings))
        filled = Filled()
        block(_fill(registry.url, fake, filled))
        config = write_config(str(tmp_path / "registryd.toml"), client, str(tmp_path / "fsck-node"))
        yield Bucket(client, filled, config, registry)
    finally:
        pytest_twisted.blockon(fake.close())
        block(client.close())


def fsck(bucket: Bucket, *args: str, config: str | None = None,
         secret: str | None = None) -> subprocess.CompletedProcess[str]:
    """The console script with ``config`` (default: the bucket's); the secret comes from the environment."""
    env = {**os.environ, SECRET_ENV: secret if secret is not None else bucket.client.settings.secret_access_key}
    return subprocess.run([REGISTRYD, "fsck", "--config", config or bucket.config, *args], capture_output=True,
                          text=True, timeout=120, env=env)


def fsck_json(bucket: Bucket, *args: str, config: str | None = None) -> tuple[int, dict[str, Any]]:
    result = fsck(bucket, "--json", *args, config=config)
    assert result.stderr == "", result.stderr
    return result.returncode, json.loads(result.stdout)


async def objects(client: S3Client, prefix: str = "") -> dict[str, str]:
    """Key -> sha256 of the content, for every object under ``prefix`` (they are all small here)."""
    found = {}
    async for entry in client.list_objects(prefix):
        data = await client.get_small(entry.key, 1024 * 1024)
        assert data is not None
        found[entry.key] = hashlib.sha256(data).hexdigest()
    return found


async def snapshot(client: S3Client) -> dict[str, str]:
    """Every object but the quarantine's."""
    return {key: digest for key, digest in (await objects(client)).items() if not key.startswith("quarantine/")}


async def quarantined(client: S3Client) -> dict[str, str]:
    """Original key -> hash, for every quarantined object."""
    found = {}
    for key, digest in (await objects(client, "quarantine/")).items():
        stamp, _, original = key[len("quarantine/"):].partition("/")
        assert stamp and original
        if original != "fsck.json":
            assert original not in found
            found[original] = digest
    return found


def kinds(report: dict[str, Any]) -> list[str]:
    return sorted(p["kind"] for p in report["problems"])


def key_of(digest: str) -> str:
    return blob_key(parse_digest(digest))


def revision_key(repo: str, digest: str) -> str:
    algorithm, hexpart = digest.split(":")
    return f"repositories/{repo}/_manifests/revisions/{algorithm}/{hexpart}"


def link_key(repo: str, digest: str) -> str:
    return f"repositories/{repo}/_blobs/{digest.replace(':', '/')}"


def tag_key(repo: str, tag: str) -> str:
    return f"repositories/{repo}/_manifests/tags/{tag}"


async def repair_and_recheck(bucket: Bucket, before: dict[str, str]) -> dict[str, Any]:
    """--repair (exit 1: there was damage); nothing is lost, only moved; a second fsck is clean."""
    status, report = fsck_json(bucket, "--repair")
    assert status == 1 and report["clean"] is False
    assert report["repaired"], report
    assert re.fullmatch(r"quarantine/\d{8}T\d{6}Z(-\d+)?", report["quarantine"]), report["quarantine"]
    moved = await quarantined(bucket.client)
    assert {m["path"] for m in report["repaired"]} == set(moved)
    for entry in report["repaired"]:
        assert entry["moved_to"] == f"{report['quarantine']}/{entry['path']}"
    remaining = await snapshot(bucket.client)
    assert not set(remaining) & set(moved)
    assert {**remaining, **moved} == before, "fsck --repair must only move"
    document = json.loads(await bucket.client.get_small(f"{report['quarantine']}/fsck.json", 1 << 20) or b"")
    assert document == {"moved": report["repaired"], "findings": report["problems"]}

    again = fsck(bucket)
    assert again.returncode == 0, again.stdout
    assert again.stdout.splitlines()[-1].endswith(": clean")
    return report


# --- tests ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_clean_bucket(bucket: Bucket) -> None:
    before = await snapshot(bucket.client)
    result = fsck(bucket)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # no progress bar: stderr is no terminal; no log lines either
    lines = result.stdout.splitlines()
    # The same content as test_cli_fsck's data directory, and the same lines.
    assert lines == [f"info: {NS}/lib/tool: 1 blob not cached yet (fetched from {NS} on demand)", lines[1]]
    assert re.fullmatch(r"20 blobs \(5\.\d KiB\) re-hashed; 4 repositories \(3 local, 1 mirrored\), "
                        r"8 manifests, 6 tags checked: clean", lines[1]), lines[1]

    status, report = fsck_json(bucket)
    settings = bucket.client.settings
    assert status == 0 and report["clean"] is True and report["exit_status"] == 0
    assert set(report) == {"data_dir", "clean", "exit_status", "checked", "problems", "info", "repaired",
                           "quarantine"}
    assert report["data_dir"] == f"s3://{settings.bucket}/{PREFIX}"
    assert report["problems"] == [] and report["repaired"] == [] and report["quarantine"] is None
    sizes = [entry.size async for entry in bucket.client.list_objects("blobs/")]
    assert report["checked"] == {"blobs": len(sizes), "bytes": sum(sizes), "repositories": 4, "local": 3,
                                 "mirrored": 1, "manifests": 8, "tags": 6}
    # The mirror's layer was never pulled: information, not damage. The
    # foreign layer of team/foreign is not mentioned at all.
    assert report["info"] == [{
        "severity": "info", "kind": "not-cached", "repository": f"{NS}/lib/tool",
        "message": f"1 blob not cached yet (fetched from {NS} on demand)", "digests": [bucket.filled.mirror_layer],
    }]
    # --repair of a clean bucket moves nothing and makes no quarantine folder.
    result = fsck(bucket, "--repair")
    assert result.returncode == 0 and result.stdout.splitlines()[-1].endswith(": clean")
    assert await snapshot(bucket.client) == before
    assert await objects(bucket.client, "quarantine/") == {}


@pytest_twisted.ensureDeferred
async def test_corrupted_blob(bucket: Bucket) -> None:
    filled = bucket.filled
    assert filled.app_v1 is not None
    good = filled.app_v1.blobs[1]
    layer = digest_of(good)
    corrupt = bytes([good[0] ^ 0x01]) + good[1:]
    await bucket.client.put_object(key_of(layer), corrupt)
    before = await snapshot(bucket.client)

    result = fsck(bucket)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"damage: blob {layer}: its content hashes to {digest_of(corrupt)}" in lines
    assert (f"damage: team/app@{filled.app_v1.digest} (tags: v1): references blob {layer}, "
            f"whose content is corrupted") in lines
    assert lines[-1].endswith("checked: 2 problems")
    assert await snapshot(bucket.client) == before, "fsck without --repair must not write"

    status, report = fsck_json(bucket)
    assert status == 1 and report["clean"] is False and report["exit_status"] == 1
    assert kinds(report) == ["blob-corrupt", "manifest-blob-corrupt"]
    problem = next(p for p in report["problems"] if p["kind"] == "blob-corrupt")
    assert problem == {"severity": "damage", "kind": "blob-corrupt", "digest": layer, "path": key_of(layer),
                       "message": f"its content hashes to {digest_of(corrupt)}"}

    report = await repair_and_recheck(bucket, before)
    # Tags go first, the blob last: what points at something before what it points at.
    assert [(m["kind"], m["path"]) for m in report["repaired"]] == [
        ("tag", tag_key("team/app", "v1")),
        ("revision", revision_key("team/app", filled.app_v1.digest)),
        ("link", link_key("team/app", layer)),
        ("blob", key_of(layer)),
    ]
    assert (await quarantined(bucket.client))[key_of(layer)] == hashlib.sha256(corrupt).hexdigest()

    # The rest of the repository is served as before; pushing v1 again restores it.
    client = Client(bucket.registry.url)
    assert (await client.get("/v2/team/app/manifests/v2", headers={"Accept": OCI_MANIFEST})).status == 200
    assert (await client.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})).status == 404
    await client.push_image("team/app", "v1", seed="1")
    assert fsck(bucket).returncode == 0


@pytest_twisted.ensureDeferred
async def test_missing_layer_of_a_local_image(bucket: Bucket) -> None:
    filled = bucket.filled
    assert filled.app_v2 is not None
    layer = digest_of(filled.app_v2.blobs[1])
    await bucket.client.delete_object(key_of(layer))
    before = await snapshot(bucket.client)

    result = fsck(bucket)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert (f"damage: team/app@{filled.app_v2.digest} (tags: latest, v2): references blob {layer}, "
            f"whose content is missing") in lines
    assert f"damage: team/app blob link {layer}: blob {layer} is linked, but its content is missing" in lines

    status, report = fsck_json(bucket)
    assert status == 1 and kinds(report) == ["link-dangling", "manifest-blob-missing"]
    dangling = next(p for p in report["problems"] if p["kind"] == "link-dangling")
    assert dangling["path"] == link_key("team/app", layer) and dangling["repository"] == "team/app"

    report = await repair_and_recheck(bucket, before)
    reasons = {m["path"]: m["reason"] for m in report["repaired"]}
    assert reasons[tag_key("team/app", "latest")] == f"pointed at damaged manifest {filled.app_v2.digest}"
    assert set(reasons) == {tag_key("team/app", "latest"), tag_key("team/app", "v2"),
                            revision_key("team/app", filled.app_v2.digest), link_key("team/app", layer)}


@pytest_twisted.ensureDeferred
async def test_dangling_and_unreadable_tags(bucket: Bucket) -> None:
    ghost = digest_of(b"never pushed")
    await bucket.client.put_object(tag_key("team/app", "ghost"), ghost.encode())
    await bucket.client.put_object(tag_key("team/multi", "garbage"), b"not a digest\n")
    before = await snapshot(bucket.client)

    result = fsck(bucket)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"damage: team/app:ghost: points at {ghost}, which is not in the repository" in lines
    assert "damage: team/multi:garbage: the tag file does not hold a digest: b'not a digest\\n'" in lines

    status, report = fsck_json(bucket)
    assert status == 1
    assert [(p["kind"], p["repository"], p["tag"], p["path"]) for p in report["problems"]] == [
        ("tag-dangling", "team/app", "ghost", tag_key("team/app", "ghost")),
        ("tag-invalid", "team/multi", "garbage", tag_key("team/multi", "garbage"))]

    report = await repair_and_recheck(bucket, before)
    assert {m["path"] for m in report["repaired"]} == {tag_key("team/app", "ghost"),
                                                      tag_key("team/multi", "garbage")}


@pytest_twisted.ensureDeferred
async def test_junk_keys(bucket: Bucket) -> None:
    """Junk where the store keeps its content is information and left alone, as in a data
    directory; a junk referrer entry is damage (the referrers API would list it), as on disk."""
    filled = bucket.filled
    assert filled.app_v1 is not None
    junk = {
        "blobs/sha256/zz/not-a-digest": b"junk",
        "repositories/team/app/_manifests/revisions/sha256/not-a-digest": b"{}",
        "repositories/team/app/notes.txt": b"junk",
        "junk.txt": b"junk",
        "backup/one": b"1",
        "backup/two": b"2",
    }
    for key, body in junk.items():
        await bucket.client.put_object(key, body)
    bad_entry = f"repositories/team/app/_referrers/sha256/{filled.app_v1.digest.split(':')[1]}/not-an-entry"
    await bucket.client.put_object(bad_entry, b"{}")
    before = await snapshot(bucket.client)

    status, report = fsck_json(bucket)
    assert status == 1
    assert [(p["kind"], p["path"], p["message"]) for p in report["problems"]] == [
        ("referrer-invalid", bad_entry, "unexpected entry name")]
    assert {i["path"]: i["message"] for i in report["info"] if i["kind"] == "unexpected"} == {
        "blobs/sha256/zz/not-a-digest": "not a blob where blobs are stored; left alone",
        "repositories/team/app/_manifests/revisions/sha256/not-a-digest":
            "not part of the repository layout; left alone",
        "repositories/team/app/notes.txt": "not part of any repository; left alone",
        "junk.txt": "not part of registryd's layout; left alone",
        "backup/": "2 objects outside registryd's layout; left alone",
    }
    lines = fsck(bucket).stdout.splitlines()
    assert "info: junk.txt: not part of registryd's layout; left alone" in lines
    assert f"damage: team/app referrer entry {bad_entry}: unexpected entry name" in lines

    report = await repair_and_recheck(bucket, before)
    assert [m["path"] for m in report["repaired"]] == [bad_entry]
    assert set(junk) <= set(await snapshot(bucket.client))


@pytest_twisted.ensureDeferred
async def test_trash_and_expired_uploads_are_information(bucket: Bucket, tmp_path: Any) -> None:
    """A referenced blob a collection set aside is there (the collection puts it back); an upload
    session past its expiry is the servers' to remove. Neither is damage."""
    filled = bucket.filled
    assert filled.app_v1 is not None
    layer = parse_digest(digest_of(filled.app_v1.blobs[1]))
    await bucket.client.copy_object(blob_key(layer), trash_key("run1", layer))
    await bucket.client.delete_object(blob_key(layer))
    location = await Client(bucket.registry.url).start_upload("team/app")
    upload_id = location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    config = write_config(str(tmp_path / "expiry.toml"), bucket.client, str(tmp_path / "node"),
                          "\n[uploads]\nexpiry = 1\n")
    await sleep(2.1)  # past the expiry, whichever way S3's one-second LastModified rounds

    status, report = fsck_json(bucket, config=config)
    assert status == 0, report["problems"]
    info = {i["kind"]: i for i in report["info"] if i["kind"] != "not-cached"}
    assert set(info) == {"trash", "upload-expired"}
    assert info["trash"]["path"] == "trash/run1/"
    assert info["trash"]["message"].startswith(f"1 blob ({len(filled.app_v1.blobs[1])} B) set aside by a "
                                               f"garbage collection in progress")
    assert info["upload-expired"]["path"] == f"uploads/{upload_id}/"
    assert info["upload-expired"]["message"].endswith("past upload_expiry (1 s): a server removes it")
    # With the default expiry (a day) the session is no news.
    status, report = fsck_json(bucket)
    assert status == 0 and {i["kind"] for i in report["info"]} == {"not-cached", "trash"}
    # Trash older than a collection can run is what a stopped one left (LastModified cannot be
    # backdated: a clock two hours ahead makes it old).
    checker = StoreFsck(S3Driver(bucket.client), {}, 86400, 3600, progress=False, clock=lambda: time.time() + 7200)
    await checker.check()
    trash = next(f for f in checker.findings if f.kind == "trash")
    assert re.fullmatch(r"1 blob \(\d+ B\) set aside on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ by a garbage collection "
                        r"that stopped: the next collection puts back what is still referenced and purges the rest",
                        trash.message), trash.message
    assert not checker.damaged


@pytest_twisted.ensureDeferred
async def test_a_repair_leaves_alone_what_was_mended_meanwhile(bucket: Bucket) -> None:
    """Between the check and the moves a node may write again: the repair looks right before each move."""
    filled = bucket.filled
    assert filled.app_v1 is not None and filled.app_v2 is not None
    good = filled.app_v1.blobs[1]
    layer = digest_of(good)
    await bucket.client.put_object(key_of(layer), b"corrupt " + good)
    ghost = digest_of(b"never pushed")
    await bucket.client.put_object(tag_key("team/app", "ghost"), ghost.encode())
    await bucket.client.put_object(tag_key("team/app", "stale"), ghost.encode())

    checker = StoreFsck(S3Driver(bucket.client), {NS.replace(":", "_"): NS}, 86400, 3600, progress=False)
    await checker.check()
    assert sorted(f.kind for f in checker.findings if f.severity == "damage") == [
        "blob-corrupt", "manifest-blob-corrupt", "tag-dangling", "tag-dangling"]
    # Mended before the repair: the blob written again whole, one tag pointed at a real manifest.
    await sleep(1.1)  # a new Last-Modified
    await bucket.client.put_object(key_of(layer), good)
    await bucket.client.put_object(tag_key("team/app", "ghost"), filled.app_v2.digest.encode())
    quarantine, moved = await checker.repair()

    # The blob and the ghost tag changed since the check: left alone. The stale tag is still dangling.
    # The image over the blob was judged on the blob as it was (as on the filesystem): it goes too,
    # which leaves the store consistent; pushing it again restores it.
    assert quarantine is not None
    assert [m["path"] for m in moved] == [tag_key("team/app", "stale"), tag_key("team/app", "v1"),
                                          revision_key("team/app", filled.app_v1.digest),
                                          link_key("team/app", layer)]
    assert await bucket.client.get_small(key_of(layer), 1 << 20) == good
    assert await bucket.client.get_small(tag_key("team/app", "ghost"), 100) == filled.app_v2.digest.encode()
    assert json.loads(await bucket.client.get_small(f"{quarantine}/fsck.json", 1 << 20) or b"")["moved"] == moved
    assert fsck(bucket).returncode == 0


@pytest_twisted.ensureDeferred
async def test_index_missing_a_manifest_and_mirrored_damage(bucket: Bucket) -> None:
    filled = bucket.filled
    assert filled.index is not None and len(filled.children) == 2
    await bucket.client.delete_object(revision_key("team/multi", filled.children[1].digest))
    await bucket.client.delete_object(key_of(filled.mirror_manifest))
    before = await snapshot(bucket.client)

    status, report = fsck_json(bucket)
    assert status == 1
    assert kinds(report) == ["child-missing", "manifest-missing"]
    child = next(p for p in report["problems"] if p["kind"] == "child-missing")
    assert child["digest"] == filled.index.digest and filled.children[1].digest in child["message"]

    report = await repair_and_recheck(bucket, before)
    folder = f"mirror/{NS.replace(':', '_')}/lib/tool"
    hexpart = filled.mirror_manifest.split(":")[1]
    assert {m["path"] for m in report["repaired"]} == {
        revision_key("team/multi", filled.index.digest), tag_key("team/multi", "1.0"),
        f"{folder}/_manifests/revisions/sha256/{hexpart}", f"{folder}/_manifests/tags/1.0"}
    # The manifest went, and with it what it named; the mirror fetches it again when asked.
    # Only the config was ever fetched (so linked), and it is intact: nothing is "not cached".
    status, report = fsck_json(bucket)
    assert status == 0 and [i["kind"] for i in report["info"]] == []


@pytest_twisted.ensureDeferred
async def test_errors_are_one_line_and_status_3(bucket: Bucket, tmp_path: Any) -> None:
    wrong = fsck(bucket, secret="not-the-secret")
    assert wrong.returncode == 3, wrong.stdout + wrong.stderr
    assert wrong.stderr.startswith(f"registryd fsck: s3://{bucket.client.settings.bucket}/{PREFIX}: ")
    assert wrong.stderr.count("\n") == 1 and wrong.stdout == ""

    settings = bucket.client.settings
    with open(bucket.config) as f:
        text = f.read()
    gone = tmp_path / "gone.toml"
    gone.write_text(text.replace(f'bucket = "{settings.bucket}"', 'bucket = "no-such-bucket-here"'))
    result = fsck(bucket, "--repair", config=str(gone))
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"registryd fsck: s3://no-such-bucket-here/{PREFIX}: ")
    assert "NoSuchBucket" in result.stderr

    closed = tmp_path / "closed.toml"
    closed.write_text(text.replace(f'endpoint = "{settings.endpoint}"', 'endpoint = "http://127.0.0.1:9"'))
    result = fsck(bucket, config=str(closed))
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr

    unset = subprocess.run([REGISTRYD, "fsck", "--config", bucket.config], capture_output=True, text=True,
                           timeout=60, env={k: v for k, v in os.environ.items() if k != SECRET_ENV})
    assert unset.returncode == 3 and unset.stderr.count("\n") == 1
    assert SECRET_ENV in unset.stderr


@pytest_twisted.ensureDeferred
async def test_a_push_between_runs_is_more_to_check(bucket: Bucket) -> None:
    """fsck reads a bucket a node keeps serving: a manifest pushed between runs is simply checked too."""
    assert fsck(bucket).returncode == 0
    await Client(bucket.registry.url).push_image("live/app", "one", seed="live")
    status, report = fsck_json(bucket)
    assert status == 0 and report["checked"]["repositories"] == 5 and report["checked"]["tags"] == 7



@pytest_twisted.ensureDeferred
async def test_progress_bar_only_on_a_terminal(bucket: Bucket) -> None:
    status, out, seen = run_with_terminal_stderr([REGISTRYD, "fsck", "-c", bucket.config], env={**os.environ, SECRET_ENV: bucket.client.settings.secret_access_key})
    assert status == 0
    assert b"registryd fsck: re-hashing blobs [" in seen and re.search(rb"\d+/20, [^/]+/5\.\d KiB", seen), seen
    assert b"registryd fsck: checking repositories [" in seen
    assert seen.endswith(b"\r\x1b[K"), seen[-40:]  # erased at the end
    assert "re-hashing" not in out and out.splitlines()[-1].endswith(": clean")
