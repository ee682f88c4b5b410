"""``registryd fsck [--repair]`` through its console script, on damaged copies of
a data directory a real registryd filled (fixtures from test_cli_ls.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest

from terminal import run_with_terminal_stderr
from oci_client import OCI_MANIFEST, digest_of
from support.cli import run_main
from test_cli_ls import (  # noqa: F401  (fixtures)
    NS,
    REGISTRYD,
    Filled,
    blob_file,
    files_under,
    run,
    store,
    template,
)


def fsck(data_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run("fsck", "--data-dir", data_dir, *args)


def fsck_json(data_dir: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = fsck(data_dir, "--json", *args)
    assert result.stderr == "", result.stderr
    return result.returncode, json.loads(result.stdout)


def revision_file(data_dir: str, repo: str, digest: str) -> str:
    algorithm, hexpart = digest.split(":")
    return os.path.join(data_dir, "repositories", repo, "_manifests", "revisions", algorithm, hexpart)


def tag_file(data_dir: str, repo: str, tag: str) -> str:
    return os.path.join(data_dir, "repositories", repo, "_manifests", "tags", tag)


def quarantined(data_dir: str) -> dict[str, str]:
    """Relative path (as it was in the data directory) -> hash, for every quarantined file."""
    found: dict[str, str] = {}
    root = os.path.join(data_dir, "quarantine")
    for stamp in os.listdir(root):
        for rel, digest in files_under(os.path.join(root, stamp)).items():
            if rel != "fsck.json":
                assert rel not in found
                found[rel] = digest
    return found


def repair_and_recheck(data_dir: str, before: dict[str, str]) -> dict[str, Any]:
    """--repair (exit 1: there was damage); nothing is lost; a second fsck is clean."""
    status, report = fsck_json(data_dir, "--repair")
    assert status == 1 and report["clean"] is False
    assert report["repaired"], report
    assert report["quarantine"].startswith("quarantine/")
    moved = quarantined(data_dir)
    assert {m["path"] for m in report["repaired"]} == set(moved)
    for entry in report["repaired"]:
        assert entry["moved_to"] == os.path.join(report["quarantine"], entry["path"])
    remaining = files_under(data_dir, skip="quarantine")
    assert not set(remaining) & set(moved)
    assert {**remaining, **moved} == before, "fsck --repair must only rename"
    with open(os.path.join(data_dir, report["quarantine"], "fsck.json")) as f:
        assert json.load(f)["moved"] == report["repaired"]

    again = fsck(data_dir)
    assert again.returncode == 0, again.stdout
    assert again.stdout.splitlines()[-1].endswith(": clean")
    return report


def kinds(report: dict[str, Any]) -> list[str]:
    return sorted(p["kind"] for p in report["problems"])


def flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0x01]))


# --- tests ------------------------------------------------------------------------


def test_help() -> None:
    result = run("fsck", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("--repair", "--json", "--config FILE", "--data-dir DIR", "re-hash", "quarantine",
                  "running server", "only reads", "only renames", "not cached", "Non-distributable",
                  "exit status", "0 the store is clean", "1 damage was found", "2 bad arguments", "3 the check"):
        assert words in text, words
    assert "fsck" in run("--help").stdout


def test_clean_store(store: Filled) -> None:
    before = files_under(store.data_dir)
    result = fsck(store.data_dir)
    assert result.returncode == 0, result.stdout
    assert result.stderr == ""  # no progress bar: stderr is no terminal
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0] == f"info: {NS}/lib/tool: 1 blob not cached yet (fetched from {NS} on demand)"
    assert re.fullmatch(r"20 blobs \(5\.\d KiB\) re-hashed; 4 repositories \(3 local, 1 mirrored\), "
                        r"8 manifests, 6 tags checked: clean", lines[1]), lines[1]

    status, report = fsck_json(store.data_dir)
    assert status == 0 and report["clean"] is True and report["exit_status"] == 0
    assert report["problems"] == [] and report["repaired"] == [] and report["quarantine"] is None
    assert report["checked"] == {"blobs": len(files_under(os.path.join(store.data_dir, "blobs"))),
                                 "bytes": report["checked"]["bytes"], "repositories": 4, "local": 3,
                                 "mirrored": 1, "manifests": 8, "tags": 6}
    # The mirror's layer was never pulled: information, not damage. The
    # foreign layer of team/foreign is not mentioned at all.
    assert report["info"] == [{
        "severity": "info", "kind": "not-cached", "repository": f"{NS}/lib/tool",
        "message": f"1 blob not cached yet (fetched from {NS} on demand)", "digests": [store.mirror_layer],
    }]
    assert files_under(store.data_dir) == before
    assert not os.path.exists(os.path.join(store.data_dir, "quarantine"))


def test_corrupted_blob(store: Filled) -> None:
    assert store.app_v1 is not None and store.app_v2 is not None
    layer = digest_of(store.app_v1.blobs[1])
    flip_a_byte(blob_file(store.data_dir, layer))
    before = files_under(store.data_dir)

    result = fsck(store.data_dir)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    corrupt = [line for line in lines if line.startswith(f"damage: blob {layer}: its content hashes to sha256:")]
    assert len(corrupt) == 1
    assert (f"damage: team/app@{store.app_v1.digest} (tags: v1): references blob {layer}, "
            f"whose content is corrupted") in lines
    assert lines[-1].endswith("checked: 2 problems")
    assert files_under(store.data_dir) == before, "fsck without --repair must not write"

    status, report = fsck_json(store.data_dir)
    assert status == 1 and report["clean"] is False
    assert kinds(report) == ["blob-corrupt", "manifest-blob-corrupt"]
    blob_problem = next(p for p in report["problems"] if p["kind"] == "blob-corrupt")
    assert blob_problem["digest"] == layer
    assert blob_problem["path"] == os.path.relpath(blob_file(store.data_dir, layer), store.data_dir)

    report = repair_and_recheck(store.data_dir, before)
    moved = {m["path"] for m in report["repaired"]}
    assert moved == {
        os.path.relpath(blob_file(store.data_dir, layer), store.data_dir),
        f"repositories/team/app/_blobs/{layer.replace(':', '/')}",
        os.path.relpath(revision_file(store.data_dir, "team/app", store.app_v1.digest), store.data_dir),
        "repositories/team/app/_manifests/tags/v1",
    }
    # The rest of the repository is untouched.
    listing = json.loads(run("ls", "-d", store.data_dir, "--json").stdout)
    app = next(r for r in listing["repositories"] if r["name"] == "team/app")
    assert app["tags"] == ["latest", "v2"] and app["manifests"] == 2


def test_missing_blob(store: Filled) -> None:
    assert store.app_v2 is not None
    layer = digest_of(store.app_v2.blobs[1])
    os.unlink(blob_file(store.data_dir, layer))
    before = files_under(store.data_dir)

    result = fsck(store.data_dir)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert (f"damage: team/app@{store.app_v2.digest} (tags: latest, v2): references blob {layer}, "
            f"whose content is missing") in lines
    assert f"damage: team/app blob link {layer}: blob {layer} is linked, but its content is missing" in lines

    status, report = fsck_json(store.data_dir)
    assert status == 1 and kinds(report) == ["link-dangling", "manifest-blob-missing"]

    report = repair_and_recheck(store.data_dir, before)
    reasons = {m["path"]: m["reason"] for m in report["repaired"]}
    assert reasons["repositories/team/app/_manifests/tags/latest"] == \
        f"pointed at damaged manifest {store.app_v2.digest}"
    assert set(reasons) == {"repositories/team/app/_manifests/tags/latest",
                            "repositories/team/app/_manifests/tags/v2",
                            os.path.relpath(revision_file(store.data_dir, "team/app", store.app_v2.digest),
                                            store.data_dir),
                            f"repositories/team/app/_blobs/{layer.replace(':', '/')}"}


def test_dangling_and_unreadable_tags(store: Filled) -> None:
    ghost = digest_of(b"never pushed")
    with open(tag_file(store.data_dir, "team/app", "ghost"), "w") as f:
        f.write(ghost)
    with open(tag_file(store.data_dir, "team/multi", "garbage"), "w") as f:
        f.write("not a digest\n")
    before = files_under(store.data_dir)

    result = fsck(store.data_dir)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"damage: team/app:ghost: points at {ghost}, which is not in the repository" in lines
    assert "damage: team/multi:garbage: the tag file does not hold a digest: b'not a digest\\n'" in lines

    status, report = fsck_json(store.data_dir)
    assert status == 1
    assert [(p["kind"], p["repository"], p["tag"]) for p in report["problems"]] == [
        ("tag-dangling", "team/app", "ghost"), ("tag-invalid", "team/multi", "garbage")]

    report = repair_and_recheck(store.data_dir, before)
    assert {m["path"] for m in report["repaired"]} == {"repositories/team/app/_manifests/tags/ghost",
                                                      "repositories/team/multi/_manifests/tags/garbage"}


def test_bad_manifest_json(store: Filled) -> None:
    # Content that matches its digest (so the blob itself is fine) but is no manifest.
    body = b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'", "config": '
    digest = digest_of(body)
    os.makedirs(os.path.dirname(blob_file(store.data_dir, digest)), exist_ok=True)
    with open(blob_file(store.data_dir, digest), "wb") as f:
        f.write(body)
    os.makedirs(os.path.dirname(revision_file(store.data_dir, "team/app", digest)), exist_ok=True)
    with open(revision_file(store.data_dir, "team/app", digest), "w") as f:
        json.dump({"mediaType": OCI_MANIFEST}, f)
    with open(tag_file(store.data_dir, "team/app", "broken"), "w") as f:
        f.write(digest)
    # And a revision file that is not JSON at all, for an existing manifest.
    assert store.children
    with open(revision_file(store.data_dir, "team/multi", store.children[0].digest), "w") as f:
        f.write("{oops")
    before = files_under(store.data_dir)

    result = fsck(store.data_dir)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"damage: team/app@{digest} (tags: broken): the manifest does not parse: "
                               f"not valid JSON") for line in lines), lines
    assert (f"damage: team/multi@{store.children[0].digest}: the revision file is not JSON "
            f'{{"mediaType": ...}}') in lines
    # The index over that manifest is damaged with it.
    assert store.index is not None
    assert (f"damage: team/multi@{store.index.digest} (tags: 1.0): references manifest "
            f"{store.children[0].digest}, which is damaged") in lines

    status, report = fsck_json(store.data_dir)
    assert kinds(report) == ["child-damaged", "manifest-invalid", "revision-invalid"]

    report = repair_and_recheck(store.data_dir, before)
    moved = {m["path"] for m in report["repaired"]}
    assert "repositories/team/app/_manifests/tags/broken" in moved
    assert "repositories/team/multi/_manifests/tags/1.0" in moved
    # The content blob is intact, so it stays (garbage collection's business).
    assert os.path.exists(blob_file(store.data_dir, digest))


def test_index_missing_a_manifest(store: Filled) -> None:
    assert store.index is not None and len(store.children) == 2
    os.unlink(revision_file(store.data_dir, "team/multi", store.children[1].digest))
    before = files_under(store.data_dir)
    status, report = fsck_json(store.data_dir)
    assert status == 1
    assert [(p["kind"], p["digest"]) for p in report["problems"]] == [("child-missing", store.index.digest)]
    assert store.children[1].digest in report["problems"][0]["message"]
    repair_and_recheck(store.data_dir, before)


def test_mirrored_repository_damage(store: Filled) -> None:
    flip_a_byte(blob_file(store.data_dir, store.mirror_config))
    os.unlink(blob_file(store.data_dir, store.mirror_manifest))
    before = files_under(store.data_dir)

    status, report = fsck_json(store.data_dir)
    assert status == 1
    assert kinds(report) == ["blob-corrupt", "manifest-missing"]

    report = repair_and_recheck(store.data_dir, before)
    folder = f"mirror/{NS.replace(':', '_')}/lib/tool"
    hexpart = store.mirror_manifest.split(":")[1]
    assert {m["path"] for m in report["repaired"]} == {
        os.path.relpath(blob_file(store.data_dir, store.mirror_config), store.data_dir),
        f"{folder}/_manifests/revisions/sha256/{hexpart}",
        f"{folder}/_manifests/tags/1.0",
    }
    # What is gone from the cache is "not cached" now: the mirror fetches it again. (Only
    # the config was ever fetched, so only it is linked; the layer went with the manifest.)
    status, report = fsck_json(store.data_dir)
    assert status == 0
    assert report["info"][0]["kind"] == "not-cached"
    assert set(report["info"][0]["digests"]) == {store.mirror_config}


def test_arguments_and_errors(store: Filled, tmp_path: Any) -> None:
    missing = str(tmp_path / "nowhere")
    result = fsck(missing)
    assert result.returncode == 3
    assert result.stderr == f"registryd fsck: the data directory {missing} does not exist\n"
    result = run("fsck", "--repair", "--data-dir", missing)
    assert result.returncode == 3 and result.stderr.count("\n") == 1
    assert not os.path.exists(missing)

    bad = tmp_path / "bad.toml"
    bad.write_text("[registry]\nbogus = 1\n")
    result = run_main("fsck", "--config", str(bad))
    assert result.returncode == 3
    assert result.stderr == f"registryd fsck: config file {bad}: unknown key 'registry.bogus'\n"

    for args in (["--bogus"], ["--data-dir"], ["--repair=yes"], ["extra"]):
        result = run_main("fsck", *args)
        assert result.returncode == 2, args
        assert result.stderr.splitlines()[-1].startswith("registryd"), result.stderr
        assert result.stdout == ""


def test_unreadable_blob_is_an_error_not_damage(store: Filled) -> None:
    assert store.app_v1 is not None
    path = blob_file(store.data_dir, store.app_v1.digest)
    os.chmod(path, 0)
    try:
        command = [REGISTRYD, "fsck", "--data-dir", store.data_dir, "--repair"]
        if os.geteuid() == 0:
            # Root reads any file: drop the capabilities that let it.
            command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 3
        assert result.stderr == f"registryd fsck: cannot read {path}: permission denied (run as the user " \
                                f"registryd runs as, or root)\n"
        assert os.path.exists(path) and not os.path.exists(os.path.join(store.data_dir, "quarantine"))
    finally:
        os.chmod(path, 0o644)


def test_progress_bar_only_on_a_terminal(store: Filled) -> None:
    status, out, seen = run_with_terminal_stderr([REGISTRYD, "fsck", "-d", store.data_dir])
    assert status == 0
    assert b"registryd fsck: re-hashing blobs [" in seen and b"%" in seen
    assert seen.endswith(b"\r\x1b[K"), seen[-40:]  # erased at the end
    assert "re-hashing" not in out and out.splitlines()[-1].endswith(": clean")


def test_alongside_a_running_server(tmp_path: Any) -> None:
    """ls and fsck read a store a running twistd serves; a push between runs shows up."""
    from conftest import start_twistd, stop_process
    from oci_client import OCI_CONFIG, OCI_LAYER, descriptor, encode
    from syncclient import push_blob, request

    data_dir = str(tmp_path / "data")
    process, running = start_twistd(data_dir)
    try:
        for tag in ("one", "two"):
            config, layer = f'{{"tag": "{tag}"}}'.encode(), f"layer {tag}".encode() * 100
            push_blob(running.host, "live/app", config)
            push_blob(running.host, "live/app", layer)
            body = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(OCI_CONFIG, config), "layers": [descriptor(OCI_LAYER, layer)]})
            reply = request(running.host, "PUT", f"/v2/live/app/manifests/{tag}", body,
                            {"Content-Type": OCI_MANIFEST})
            assert reply.status == 201, reply.body
            status, report = fsck_json(data_dir)
            assert status == 0 and report["problems"] == [], report
            listing = json.loads(run("ls", "-d", data_dir, "--json").stdout)
            assert listing["repositories"][-1]["tags"][-1] == tag
        assert request(running.host, "GET", "/v2/live/app/manifests/one").status == 200
    finally:
        stop_process(process)
