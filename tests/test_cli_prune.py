"""``registryd prune`` (then ``registryd gc``) through the console script, on a
data directory, and on an S3 bucket, whose mirror cache a real registryd filled
from a fake upstream."""
from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from fake_upstream import FakeUpstream, fake_upstream  # noqa: F401  (fixture)
from oci_client import Client
from registryd.config import StorageSettings, UpstreamConfig
from registryd.digest import parse_digest
from registryd.storage.layout import blob_key
from registryd.storage.pulls import PullRecorder
from support.clock import WallClock
from test_cli_ls import blob_file, bucket_objects, files_under, run, write_s3_config
from support.cli import run_main

NS = "mirror.test:5000"
DAY = 86400


def mirror_dir(data_dir: str, repo: str) -> str:
    return os.path.join(data_dir, "mirror", NS.replace(":", "_"), repo)


def age(root: str, seconds: float) -> None:
    then = time.time() - seconds
    for directory, _, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(directory, name), (then, then))


def test_help() -> None:
    result = run("prune", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("--older-than DURATION", "--pattern GLOB", "--dry-run", "--json", "--config FILE",
                  "<namespace>/<repository>", "** across", "Local (pushed) repositories are never touched",
                  "registryd gc", "--unused-for", "nobody pulled", "GET or HEAD", "alongside a running server",
                  "exit status", "2 bad arguments"):
        assert words in text, words
    assert "prune" in run("--help").stdout


async def cache_three_images(client: Client, fake_upstream: FakeUpstream) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Pull lib/old, lib/keep and other/x through the mirror: each one's manifest digest, and every digest it has."""
    manifests: dict[str, str] = {}
    images: dict[str, set[str]] = {}
    for repo, seed in (("lib/old", "old"), ("lib/keep", "keep"), ("other/x", "x")):
        image = fake_upstream.add_image(repo, "1.0", layer_sizes=[2000], seed=seed)
        reply = await client.get(f"/v2/{repo}/manifests/1.0?ns={NS}", headers={"Accept": image["media_type"]})
        assert reply.status == 200, str(reply)
        manifest = json.loads(reply.body)
        blobs = {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}
        for digest in blobs:
            assert (await client.get(f"/v2/{repo}/blobs/{digest}?ns={NS}")).status == 200
        manifests[repo] = reply.header("Docker-Content-Digest") or ""
        images[repo] = blobs | {manifests[repo]}
    return manifests, images


@pytest_twisted.ensureDeferred
async def test_prune_old_mirror_content_then_gc(make_registry: Any, fake_upstream: FakeUpstream) -> None:
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    client = Client(registry.url)
    manifests, images = await cache_three_images(client, fake_upstream)
    local = await client.push_image("lib/old", "1.0", seed="local")   # a local repository of the same name
    await registry.service.stopService()
    data_dir = registry.data_dir

    # Everything was cached 10 days ago; the upstream confirmed lib/keep:1.0 just now.
    age(data_dir, 10 * DAY)
    os.utime(os.path.join(mirror_dir(data_dir, "lib/keep"), "_manifests", "tags", "1.0"))
    old_manifest = next(d for d in images["lib/old"]
                        if os.path.exists(os.path.join(mirror_dir(data_dir, "lib/old"), "_manifests",
                                                       "revisions", *d.split(":"))))
    pattern = f"{NS}/lib/*"

    before = files_under(data_dir)
    dry = run("prune", "-d", data_dir, "--older-than", "7d", "--pattern", pattern, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert files_under(data_dir) == before
    assert dry.stdout.splitlines()[:2] == [f"would remove tag {NS}/lib/old:1.0 -> {old_manifest}",
                                           f"would remove manifest {NS}/lib/old@{old_manifest}"]

    result = run("prune", "-d", data_dir, "--older-than", "7d", "--pattern", pattern)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        f"removed tag {NS}/lib/old:1.0 -> {old_manifest}",
        f"removed manifest {NS}/lib/old@{old_manifest}",
        "1 tag, 1 manifest and 0 referrer entries removed in 1 of 2 matching mirrored repositories",
        "blobs are not removed by prune: run `registryd gc` to reclaim the space of those no longer referenced",
    ]
    assert not os.path.exists(os.path.join(mirror_dir(data_dir, "lib/old"), "_manifests", "tags", "1.0"))
    removed = set(before) - set(files_under(data_dir))
    # The tag, the revision and the manifest's pull time.
    assert len(removed) == 3 and all(path.startswith("mirror/") for path in removed)
    assert sum("/_pulls/" in path for path in removed) == 1
    # Nothing left to do at that age; blobs are all still there.
    again = json.loads(run("prune", "-d", data_dir, "--older-than", "7d", "-p", pattern, "--json").stdout)
    assert again["removed"] == [] and again["repositories_matched"] == 2
    assert all(os.path.exists(blob_file(data_dir, d)) for digests in images.values() for d in digests)

    # gc then reclaims exactly lib/old's manifest, config and layer.
    report = json.loads(run("gc", "-d", data_dir, "--delay", "1d", "--json").stdout)
    assert {b["digest"] for b in report["removed_blobs"]} == images["lib/old"]
    for repo in ("lib/keep", "other/x"):
        assert all(os.path.exists(blob_file(data_dir, d)) for d in images[repo])
    assert os.path.exists(blob_file(data_dir, local.digest))

    # '**' across components: the rest of the mirror cache, whatever its age; local stays.
    report = json.loads(run("prune", "-d", data_dir, "--pattern", "**", "--json").stdout)
    assert report["counts"] == {"tag": 2, "manifest": 2, "referrer": 0}
    assert {r["repository"] for r in report["removed"]} == {f"{NS}/lib/keep", f"{NS}/other/x"}
    listing = json.loads(run("ls", "-d", data_dir, "--json").stdout)
    assert [(r["name"], r["tags"]) for r in listing["repositories"] if r["kind"] == "local"] == [("lib/old", ["1.0"])]
    assert all(r["tags"] == [] and r["manifests"] == 0
               for r in listing["repositories"] if r["kind"] == "mirror")


@pytest_twisted.ensureDeferred
async def test_prune_unused_for_goes_by_last_pull(make_registry: Any, fake_upstream: FakeUpstream) -> None:
    """Both images were cached ten days ago; one was pulled (by digest) just now and stays."""
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    clock = WallClock()
    registry.service.api.pulls = PullRecorder(clock=clock)
    client = Client(registry.url)
    digests = {}
    for repo in ("lib/idle", "lib/busy"):
        image = fake_upstream.add_image(repo, "1.0", layer_sizes=[500], seed=repo)
        reply = await client.get(f"/v2/{repo}/manifests/1.0?ns={NS}", headers={"Accept": image["media_type"]})
        assert reply.status == 200, str(reply)
        digests[repo] = reply.header("Docker-Content-Digest")
    age(registry.data_dir, 10 * DAY)
    clock.advance(1.1)   # pulls are recorded at most once a second
    reply = await client.get(f"/v2/lib/busy/manifests/{digests['lib/busy']}?ns={NS}")
    assert reply.status == 200
    marker = os.path.join(mirror_dir(registry.data_dir, "lib/busy"), "_pulls", *digests["lib/busy"].split(":"))
    for _ in range(100):
        if os.path.exists(marker) and os.path.getmtime(marker) > time.time() - DAY:
            break
        await deferLater(reactor, 0.05, lambda: None)
    else:
        raise AssertionError("the pull was not recorded")
    await registry.service.stopService()
    listing = {r["name"]: r for r in json.loads(run("ls", "-d", registry.data_dir, "--json").stdout)["repositories"]}
    assert listing[f"{NS}/lib/busy"]["last_pull"] is not None
    report = json.loads(run("prune", "-d", registry.data_dir, "--unused-for", "7d", "--json").stdout)
    assert {(r["kind"], r["repository"]) for r in report["removed"]} == {("tag", f"{NS}/lib/idle"),
                                                                          ("manifest", f"{NS}/lib/idle")}
    assert report["unused_for"] == 7 * DAY
    listing = {r["name"]: r for r in json.loads(run("ls", "-d", registry.data_dir, "--json").stdout)["repositories"]}
    assert listing[f"{NS}/lib/busy"]["tags"] == ["1.0"] and listing[f"{NS}/lib/idle"]["tags"] == []


def test_errors(tmp_path: Any) -> None:
    data_dir = str(tmp_path / "data")
    os.makedirs(os.path.join(data_dir, "mirror"))
    result = run("prune", "-d", data_dir)
    assert result.returncode == 2
    assert result.stderr.startswith("registryd prune: give --older-than") and result.stderr.count("\n") == 1
    for bad in (["--older-than", "7 days"], ["--older-than", "-1d"], ["--unused-for", "soon"]):
        result = run_main("prune", "-d", data_dir, *bad)
        assert result.returncode == 2, bad
        assert "usage: registryd" in result.stderr
    missing = str(tmp_path / "nothing")
    result = run("prune", "-d", missing, "--older-than", "1d")
    assert result.returncode == 3
    assert result.stderr == f"registryd prune: the data directory {missing} does not exist\n"
    result = run("prune", "-d", data_dir, "--older-than", "1d")
    assert result.returncode == 0 and "in 0 of 0 matching" in result.stdout


@pytest_twisted.ensureDeferred
async def test_s3_prune_then_gc_on_the_bucket(make_registry: Any, fake_upstream: FakeUpstream,  # noqa: F811
                                              ceph_s3: Any, tmp_path: Any) -> None:
    """The same command on a bucket: the config's [storage] driver = "s3", no server involved."""
    bucket = await ceph_s3.new_bucket()
    try:
        registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),),
                                 storage=StorageSettings("s3", s3=bucket.settings))
        client = Client(registry.url)
        manifests, images = await cache_three_images(client, fake_upstream)
        local = await client.push_image("lib/old", "1.0", seed="local")   # a local repository of the same name
        await deferLater(reactor, 2.1, lambda: None)   # LastModified is to the second (and pull times land)
        config = write_s3_config(tmp_path, bucket.settings)
        folder = f"mirror/{NS.replace(':', '_')}"
        old = manifests["lib/old"]

        # Cached seconds ago: nothing is older than an hour.
        young = run("prune", "-c", config, "--older-than", "1h", "--pattern", "**", "--json")
        assert young.returncode == 0, young.stderr
        report = json.loads(young.stdout)
        assert report["removed"] == [] and report["repositories_matched"] == 3
        assert report["data_dir"] == f"s3://{bucket.settings.bucket}/"

        before = await bucket_objects(bucket)
        dry = run("prune", "-c", config, "--pattern", f"{NS}/lib/old", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [
            f"would remove tag {NS}/lib/old:1.0 -> {old}",
            f"would remove manifest {NS}/lib/old@{old}",
            "1 tag, 1 manifest and 0 referrer entries would be removed in 1 of 1 matching mirrored repository",
            "blobs are not removed by prune: run `registryd gc` to reclaim the space of those no longer referenced",
        ]
        assert await bucket_objects(bucket) == before

        result = run("prune", "-c", config, "--pattern", f"{NS}/lib/old")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout.splitlines()[:2] == [f"removed tag {NS}/lib/old:1.0 -> {old}",
                                                  f"removed manifest {NS}/lib/old@{old}"]
        path = old.replace(":", "/")
        # The tag, the revision and the manifest's pull time; nothing else.
        assert set(before) - set(await bucket_objects(bucket)) == {
            f"{folder}/lib/old/_manifests/tags/1.0", f"{folder}/lib/old/_manifests/revisions/{path}",
            f"{folder}/lib/old/_pulls/{path}"}
        assert "repositories/lib/old/_manifests/tags/1.0" in before

        # gc then reclaims exactly lib/old's manifest, config and layer.
        report = json.loads(run("gc", "-c", config, "--delay", "0", "--json").stdout)
        assert {b["digest"] for b in report["removed_blobs"]} == images["lib/old"]
        left = await bucket_objects(bucket)
        for digest in images["lib/keep"] | images["other/x"] | {local.digest}:
            assert blob_key(parse_digest(digest)) in left, digest

        # --older-than: everything cached over a second ago, in every matching repository; local stays.
        report = json.loads(run("prune", "-c", config, "--older-than", "1s", "--json").stdout)
        assert report["counts"] == {"tag": 2, "manifest": 2, "referrer": 0} and report["older_than"] == 1
        assert {r["repository"] for r in report["removed"]} == {f"{NS}/lib/keep", f"{NS}/other/x"}
        listing = json.loads(run("ls", "-c", config, "--json").stdout)
        assert [(r["name"], r["tags"]) for r in listing["repositories"] if r["kind"] == "local"] == [("lib/old", ["1.0"])]
        mirrored = [r for r in listing["repositories"] if r["kind"] == "mirror"]
        assert {r["name"] for r in mirrored} == {f"{NS}/lib/keep", f"{NS}/other/x"}   # their blob links remain
        assert all(r["tags"] == [] and r["manifests"] == 0 for r in mirrored)
    finally:
        await bucket.close()
