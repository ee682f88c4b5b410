"""fsck's reader and repair over a storage driver, on the memory driver: milliseconds, no server.

The same StoreFsck runs ``registryd fsck`` on a data directory
(tests/test_cli_fsck.py) and on a bucket (tests/test_cli_fsck_s3.py).
"""
from __future__ import annotations

import io
import json
from typing import Any

from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, descriptor, digest_of, encode
from registryd.admin.fsck import StoreFsck
from registryd.storage.driver import finish
from registryd.storage.memory import MemoryDriver

NS = "upstream.test:5000"


def blob_key(digest: str) -> str:
    algorithm, hexpart = digest.split(":")
    return f"blobs/{algorithm}/{hexpart[:2]}/{hexpart}"


class Store:
    """A registryd store on a MemoryDriver, written key by key as the API leaves it."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.driver = MemoryDriver(lambda: self.now)

    def put(self, key: str, data: bytes = b"") -> None:
        finish(self.driver.write(key, data))

    def get(self, key: str) -> bytes | None:
        return finish(self.driver.read(key, 1 << 20))

    def keys(self, prefix: str = "") -> list[str]:
        async def listing() -> list[str]:
            return [entry.key async for entry in self.driver.list(prefix)]
        return finish(listing())

    def blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.put(blob_key(digest), data)
        return digest

    def image(self, repo: str, tag: str, seed: str) -> dict[str, Any]:
        config, layer = f'{{"seed": "{seed}"}}'.encode(), f"layer {seed}".encode() * 50
        body = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                       "layers": [descriptor(OCI_LAYER, layer)]})
        digests = [self.blob(config), self.blob(layer)]
        manifest = self.blob(body)
        for digest in digests:
            self.put(f"repositories/{repo}/_blobs/{digest.replace(':', '/')}")
        self.put(f"repositories/{repo}/_manifests/revisions/{manifest.replace(':', '/')}",
                 json.dumps({"mediaType": OCI_MANIFEST}).encode())
        self.put(f"repositories/{repo}/_manifests/tags/{tag}", manifest.encode())
        return {"digest": manifest, "config": digests[0], "layer": digests[1], "layer_data": layer}

    def fsck(self, repair: bool = False) -> tuple[StoreFsck, str | None, list[dict[str, str]]]:
        checker = StoreFsck(self.driver, {NS.replace(":", "_"): NS}, 86400, 3600, stream=io.StringIO(),
                            progress=False, clock=lambda: self.now)
        quarantine, moved = finish(checker.run(repair))
        return checker, quarantine, moved


def problems(checker: StoreFsck) -> list[str]:
    return [f.line() for f in checker.findings if f.severity == "damage"]


def test_a_clean_store_is_clean_and_counted() -> None:
    store = Store()
    store.image("team/app", "v1", "1")
    store.image("team/app", "v2", "2")
    store.image("team/other", "latest", "3")
    checker, quarantine, moved = store.fsck(repair=True)
    assert problems(checker) == [] and checker.findings == [] and (quarantine, moved) == (None, [])
    assert checker.counts == {"blobs": 9, "bytes": checker.counts["bytes"], "repositories": 2, "local": 2,
                              "mirrored": 0, "manifests": 3, "tags": 3}
    assert checker.summary().endswith("3 manifests, 3 tags checked: clean")
    assert store.keys("quarantine/") == []


def test_a_corrupted_blob_is_damage_and_a_repair_quarantines_it_with_what_uses_it() -> None:
    store = Store()
    one = store.image("team/app", "v1", "1")
    two = store.image("team/app", "v2", "2")
    store.put(blob_key(one["layer"]), b"corrupt " + one["layer_data"])

    checker, _, _ = store.fsck()

    lines = problems(checker)
    assert len(lines) == 2 and checker.damaged
    assert lines[0].startswith(f"damage: blob {one['layer']}: its content hashes to sha256:")
    assert lines[1] == (f"damage: team/app@{one['digest']} (tags: v1): references blob {one['layer']}, "
                        f"whose content is corrupted")
    assert [f.kind for f in checker.findings] == ["blob-corrupt", "manifest-blob-corrupt"]
    assert checker.findings[0].document()["path"] == blob_key(one["layer"])

    before = {key: store.get(key) for key in store.keys()}
    checker, quarantine, moved = store.fsck(repair=True)

    assert quarantine is not None and quarantine.startswith("quarantine/")
    expected = ["repositories/team/app/_manifests/tags/v1",
                f"repositories/team/app/_manifests/revisions/{one['digest'].replace(':', '/')}",
                f"repositories/team/app/_blobs/{one['layer'].replace(':', '/')}", blob_key(one["layer"])]
    assert [m["path"] for m in moved] == expected                     # what points at something goes first
    for entry in moved:
        assert entry["moved_to"] == f"{quarantine}/{entry['path']}"
        assert store.get(entry["moved_to"]) == before[entry["path"]] and store.get(entry["path"]) is None
    assert json.loads(store.get(f"{quarantine}/fsck.json") or b"")["moved"] == moved
    again, _, _ = store.fsck()
    assert problems(again) == [] and store.get("repositories/team/app/_manifests/tags/v2") == two["digest"].encode()


def test_a_tag_pointing_at_a_missing_manifest_is_dangling() -> None:
    store = Store()
    image = store.image("team/app", "v1", "1")
    ghost = digest_of(b"never pushed")
    store.put("repositories/team/app/_manifests/tags/ghost", ghost.encode())
    store.put("repositories/team/app/_manifests/tags/garbage", b"not a digest\n")

    checker, _, _ = store.fsck()

    assert problems(checker) == [
        "damage: team/app:garbage: the tag file does not hold a digest: b'not a digest\\n'",
        f"damage: team/app:ghost: points at {ghost}, which is not in the repository"]
    assert [(f.kind, f.tag, f.digest) for f in checker.findings] == [
        ("tag-invalid", "garbage", None), ("tag-dangling", "ghost", ghost)]
    _, _, moved = store.fsck(repair=True)
    assert sorted(m["path"] for m in moved) == ["repositories/team/app/_manifests/tags/garbage",
                                                "repositories/team/app/_manifests/tags/ghost"]
    assert store.get("repositories/team/app/_manifests/tags/v1") == image["digest"].encode()


def test_a_manifest_whose_content_is_missing_goes_with_its_tag_and_mirrored_gaps_are_information() -> None:
    store = Store()
    image = store.image("team/app", "v1", "1")
    finish(store.driver.delete(blob_key(image["digest"])))
    folder = f"mirror/{NS.replace(':', '_')}/lib/tool"
    cached = digest_of(b"a layer never fetched")
    store.put(f"{folder}/_blobs/{cached.replace(':', '/')}")

    checker, _, _ = store.fsck()

    assert problems(checker) == [f"damage: team/app@{image['digest']} (tags: v1): the manifest's content is "
                                 f"missing from the blob store"]
    assert [(f.kind, f.repository, f.digests) for f in checker.findings if f.severity == "info"] == [
        ("not-cached", f"{NS}/lib/tool", (cached,))]


def test_a_repair_leaves_alone_a_blob_written_again_since_the_check() -> None:
    store = Store()
    image = store.image("team/app", "v1", "1")
    store.put(blob_key(image["layer"]), b"corrupt")
    checker = StoreFsck(store.driver, {}, 86400, 3600, stream=io.StringIO(), progress=False)
    finish(checker.check())
    store.put(blob_key(image["layer"]), image["layer_data"])         # mended by a push meanwhile

    quarantine, moved = finish(checker.repair())

    assert blob_key(image["layer"]) not in [m["path"] for m in moved]
    assert store.get(blob_key(image["layer"])) == image["layer_data"]
    assert quarantine is not None
