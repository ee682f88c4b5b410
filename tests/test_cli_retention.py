"""``[[retention]]`` through a real ``twistd -n registryd`` process: images pushed by the tests'
OCI client, ``registryd retention --dry-run`` then for real (beside the server, and inside it with
``--url``), the server's scheduled run, then ``registryd gc`` reclaiming exactly the freed blobs
while pulls of the kept tags still work."""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Iterator

import pytest
import pytest_twisted

from conftest import RunningRegistry, start_twistd, stop_process
from oci_client import Client, Image, digest_of
from registryd.config import StorageSettings
from registryd.retention_rules import parse_retention_rules
from registryd.storage.layout import blob_key
from registryd.digest import parse_digest
from support.wait import sleep, wait_until
from test_cli_ls import bucket_objects, files_under, run, write_s3_config
from test_twistd import last_line, run_twistd

JSON = {"Content-Type": "application/json"}
DAY = 86400

RULES = """
[gc]
interval = 0

[[retention]]
repositories = ["team/*"]
keep_latest = 2
keep_tags = ["stable"]
untagged_after = "7d"
interval = {interval}
"""


def write_config(tmp_path: Any, interval: str = "0", rules: str = RULES) -> str:
    path = str(tmp_path / "registryd.toml")
    with open(path, "w") as f:
        f.write(rules.replace("{interval}", interval))
    return path


@pytest.fixture
def server(tmp_path: Any) -> Iterator[tuple[RunningRegistry, str]]:
    """A registryd process with the rules (applied only on demand: interval 0), and its config file."""
    config = write_config(tmp_path)
    process, running = start_twistd(str(tmp_path / "data"), "--config", config)
    yield running, config
    stop_process(process)


def blobs_of(image: Image) -> set[str]:
    """The manifest and the blobs it names."""
    return {image.digest, *(digest_of(blob) for blob in image.blobs)}


def backdate_revision(data_dir: str, repo: str, digest: str, seconds: float) -> None:
    algorithm, hexpart = digest.split(":")
    path = os.path.join(data_dir, "repositories", repo, "_manifests", "revisions", algorithm, hexpart)
    then = time.time() - seconds
    os.utime(path, (then, then))


async def pull(client: Client, repo: str, reference: str) -> int:
    """Pull like a client: the manifest, then every manifest and blob it names (recursively); 200 if all came."""
    reply = await client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ", ".join([
        "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json"])})
    if reply.status != 200:
        return reply.status
    document = json.loads(reply.body)
    for child in document.get("manifests", []):
        status = await pull(client, repo, child["digest"])
        if status != 200:
            return status
    for blob in [document["config"], *document["layers"]] if "config" in document else []:
        got = await client.get(f"/v2/{repo}/blobs/{blob['digest']}")
        if got.status != 200 or digest_of(got.body) != blob["digest"]:
            return got.status if got.status != 200 else 500
    return 200


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} is not on /metrics"
    return float(match[1])


@pytest_twisted.ensureDeferred
async def test_dry_run_then_for_real_then_gc_and_kept_tags_still_pull(server: tuple[RunningRegistry, str],
                                                                       tmp_path: Any) -> None:
    running, config = server
    data_dir = running.data_dir
    client = Client(running.url)
    stable = await client.push_image("team/app", "stable", seed="stable")
    v1 = await client.push_image("team/app", "v1", seed="v1")
    v1_signature = await client.push_image("team/app", seed="v1-sig", artifact_type="application/vnd.example.sig",
                                           subject=v1.descriptor())
    v2 = await client.push_image("team/app", "v2", seed="v2")
    v3 = await client.push_image("team/app", "v3", seed="v3")
    children = [await client.push_image("team/app", seed=f"child{i}") for i in range(2)]
    v4 = await client.push_index("team/app", children, "v4")
    v4_signature = await client.push_image("team/app", seed="v4-sig", artifact_type="application/vnd.example.sig",
                                           subject=v4.descriptor())
    forgotten = await client.push_image("team/app", seed="forgotten")     # untagged, ten days old
    backdate_revision(data_dir, "team/app", forgotten.digest, 10 * DAY)
    for child in children:                                               # old, but a kept index needs them
        backdate_revision(data_dir, "team/app", child.digest, 10 * DAY)
    fresh = await client.push_image("team/app", seed="fresh")             # untagged, young: stays
    others = [await client.push_image("other/app", f"o{i}", seed=f"o{i}") for i in range(4)]   # no rule
    deep = [await client.push_image("team/app/deep", f"d{i}", seed=f"d{i}") for i in range(4)]  # team/* only
    gone = [v1, v1_signature, v2, forgotten]

    before = files_under(data_dir, skip="uploads")
    dry = run("retention", "-c", config, "-d", data_dir, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert files_under(data_dir, skip="uploads") == before
    assert dry.stdout.splitlines() == [
        f"would remove tag team/app:v1 -> {v1.digest}",
        f"would remove tag team/app:v2 -> {v2.digest}",
        *sorted([f"would remove manifest team/app@{v1_signature.digest} (its subject is removed)",
                 f"would remove manifest team/app@{forgotten.digest} (untagged)",
                 f"would remove manifest team/app@{v2.digest} (no kept tag needs it)"],
                key=lambda line: line.split("@")[1]),
        f"would remove manifest team/app@{v1.digest} (no kept tag needs it)",
        "team/app: 2 tags and 4 manifests would be removed; 3 tags and 7 manifests kept",
        "2 tags and 4 manifests would be removed in 1 of 1 matching repository",
        "blobs are not removed by retention: `registryd gc` (or the server's [gc] interval) reclaims those no "
        "longer referenced",
    ], dry.stdout

    remote_dry = json.loads(run("retention", "--url", running.url, "--dry-run", "--json").stdout)
    local_dry = json.loads(run("retention", "-c", config, "-d", data_dir, "--dry-run", "--json").stdout)
    assert remote_dry["removed"] == local_dry["removed"] and remote_dry["dry_run"] is True
    assert files_under(data_dir, skip="uploads") == before

    result = run("retention", "--url", running.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [line.replace("would remove ", "removed ", 1)
                                          .replace("would be removed", "removed") for line in dry.stdout.splitlines()]
    tags = (await client.get("/v2/team/app/tags/list")).json()["tags"]
    assert sorted(tags) == ["stable", "v3", "v4"]
    for image in gone:
        assert (await client.get(f"/v2/team/app/manifests/{image.digest}")).status == 404
    referrers = (await client.get(f"/v2/team/app/referrers/{v4.digest}")).json()["manifests"]
    assert [entry["digest"] for entry in referrers] == [v4_signature.digest]
    assert (await client.get(f"/v2/team/app/referrers/{v1.digest}")).json()["manifests"] == []
    # Applied again, beside the server this time: nothing left to remove.
    again = json.loads(run("retention", "-c", config, "-d", data_dir, "--json").stdout)
    assert again["removed"] == [] and again["repositories_matched"] == 1

    metrics = (await client.get("/metrics")).body.decode()
    assert metric(metrics, "registryd_retention_removed_tags_total") == 2
    assert metric(metrics, "registryd_retention_removed_manifests_total") == 4
    assert metric(metrics, 'registryd_retention_runs_total{outcome="ok"}') == 1

    # gc then reclaims exactly the blobs only removed manifests named.
    report = json.loads(run("gc", "--url", running.url, "--delay", "0", "--json").stdout)
    assert {blob["digest"] for blob in report["removed_blobs"]} == set().union(*(blobs_of(i) for i in gone))
    for image, repo, reference in [(stable, "team/app", "stable"), (v3, "team/app", "v3"), (v4, "team/app", "v4"),
                                   (v4_signature, "team/app", v4_signature.digest),
                                   (fresh, "team/app", fresh.digest), (others[0], "other/app", "o0"),
                                   (deep[0], "team/app/deep", "d0")]:
        assert await pull(client, repo, reference) == 200, (repo, reference)
    assert sorted((await client.get("/v2/other/app/tags/list")).json()["tags"]) == ["o0", "o1", "o2", "o3"]
    assert sorted((await client.get("/v2/team/app/deep/tags/list")).json()["tags"]) == ["d0", "d1", "d2", "d3"]


@pytest_twisted.ensureDeferred
async def test_the_server_applies_the_rules_on_their_interval(tmp_path: Any) -> None:
    config = write_config(tmp_path, interval="1")
    process, running = start_twistd(str(tmp_path / "data"), "--config", config)
    try:
        client = Client(running.url)
        pushed = [await client.push_image("team/app", f"v{i}", seed=f"v{i}") for i in range(1, 6)]

        async def trimmed() -> bool:
            """Tags go first, then their manifests."""
            if (await client.get("/v2/team/app/tags/list")).json()["tags"] != ["v4", "v5"]:
                return False
            return all([(await client.get(f"/v2/team/app/manifests/{image.digest}")).status == 404
                        for image in pushed[:3]])

        await wait_until(trimmed, 15, "the scheduled run keeping the 2 newest tags and their manifests")
        for image, tag in zip(pushed[3:], ("v4", "v5")):
            assert await pull(client, "team/app", tag) == 200
        async def counted() -> bool:    # the run's counters move once its last removal returned
            text = (await client.get("/metrics")).body.decode()
            return metric(text, "registryd_retention_removed_manifests_total") == 3

        await wait_until(counted, 5, "the run counted on /metrics")
        metrics = (await client.get("/metrics")).body.decode()
        assert metric(metrics, "registryd_retention_removed_tags_total") == 3
        assert metric(metrics, "registryd_retention_removed_manifests_total") == 3
        assert metric(metrics, 'registryd_retention_runs_total{outcome="ok"}') >= 1
        assert metric(metrics, "registryd_retention_last_success_timestamp_seconds") > time.time() - 60
    finally:
        stop_process(process)


@pytest_twisted.ensureDeferred
async def test_the_route_is_for_admins_and_needs_rules(tmp_path: Any) -> None:
    process, running = start_twistd(str(tmp_path / "data"))
    try:
        result = run("retention", "--url", running.url)
        assert result.returncode == 2
        assert result.stderr == (f"registryd retention: {running.url} refused the retention run: 400 this "
                                 f"server's config has no [[retention]] rules\n")
        client = Client(running.url)
        reply = await client.post("/admin/retention", b"x=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert reply.status == 415
    finally:
        stop_process(process)


@pytest.mark.parametrize("text, message", [
    ('[[retention]]\nrepositories = ["team/**"]\n', "'retention[0]' needs keep_latest or untagged_after"),
    ('[[retention]]\nrepositories = ["team/**"]\nuntagged_after = "soon"\n',
     "'retention[0].untagged_after': 'soon' is not a duration"),
])
def test_a_bad_rule_stops_the_server_with_one_line(tmp_path: Any, text: str, message: str) -> None:
    result = run_twistd("--config", write_config(tmp_path, rules=text), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert message in last_line(result)
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "d").exists()


def test_the_command_refuses_a_missing_data_directory(tmp_path: Any) -> None:
    result = run("retention", "-c", write_config(tmp_path), "-d", str(tmp_path / "absent"))
    assert result.returncode == 3
    assert result.stderr == f"registryd retention: the data directory {tmp_path / 'absent'} does not exist\n"


@pytest.mark.s3
@pytest_twisted.ensureDeferred
async def test_on_a_bucket_the_command_applies_the_rules_by_last_modified(make_registry: Any, ceph_s3: Any,
                                                                          tmp_path: Any) -> None:
    """The same policy on S3: push times are LastModified (to the second), so pushes a second apart."""
    bucket = await ceph_s3.new_bucket()
    try:
        rules = parse_retention_rules("retention", [{"repositories": ["team/*"], "keep_latest": 1,
                                                     "untagged_after": "1s", "interval": 0}])
        node = make_registry(storage=StorageSettings("s3", s3=bucket.settings), retention=rules)
        client = Client(node.url)
        v1 = await client.push_image("team/app", "v1", seed="v1")
        signature = await client.push_image("team/app", seed="sig", artifact_type="application/vnd.example.sig",
                                            subject=v1.descriptor())
        await sleep(1.1)
        loose = await client.push_image("team/app", seed="loose")
        await sleep(1.1)
        v2 = await client.push_image("team/app", "v2", seed="v2")
        await sleep(1.1)
        config = write_s3_config(tmp_path, bucket.settings)
        with open(config, "a") as f:
            f.write('\n[[retention]]\nrepositories = ["team/*"]\nkeep_latest = 1\nuntagged_after = "1s"\n')
        before = await bucket_objects(bucket)

        dry = run("retention", "-c", config, "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert await bucket_objects(bucket) == before
        result = run("retention", "-c", config, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["removed"] == json.loads(dry.stdout)["removed"]
        assert [(e["kind"], e.get("tag") or e["digest"]) for e in report["removed"]] == [
            ("tag", "v1"), *sorted([("manifest", loose.digest), ("manifest", signature.digest)]),
            ("manifest", v1.digest)]
        after = await bucket_objects(bucket)
        assert all(entry["path"] in before and entry["path"] not in after for entry in report["removed"])
        assert (await client.get("/v2/team/app/tags/list")).json()["tags"] == ["v2"]

        gone = {d for image in (v1, signature, loose) for d in (image.digest, *map(digest_of, image.blobs))}
        await node.service.upkeep.collect(delay=0)
        after = await bucket_objects(bucket)
        assert not {blob_key(parse_digest(d)) for d in gone} & set(after)
        assert await pull(client, "team/app", "v2") == 200
    finally:
        await bucket.close()
