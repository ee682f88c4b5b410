"""Manifests by digest from memory, tags and revisions checked with a stat.

* SizedLRU: bounded by the size of its values, least recently used dropped first.
* A manifest served from the cache is deleted through the API: the next GET is 404,
  by digest and by tag, at once.
* A tag moved, or a revision deleted, behind the API's back (another process)
  shows on the next GET: what is known is only used while a stat proves it current.
"""
from __future__ import annotations

import os
import time
from typing import Any

import pytest
import pytest_twisted

from oci_client import Client, descriptor, encode
from registryd.digest import parse_digest
from registryd.lru import SizedLRU
from registryd.storage import layout

pytestmark = pytest.mark.timeout(60)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {"Accept": OCI_MANIFEST}


def test_sized_lru_is_bounded_and_drops_the_least_recently_used() -> None:
    lru: SizedLRU[str, bytes] = SizedLRU(10, len)
    lru.put("a", b"aaaa")
    lru.put("b", b"bbbb")
    assert lru.get("a") == b"aaaa"          # a is now the most recently used
    lru.put("c", b"cccc")                   # 12 > 10: b goes, not a
    assert "b" not in lru and lru.get("a") == b"aaaa" and lru.get("c") == b"cccc"
    assert lru.used == 8 and len(lru) == 2
    lru.put("huge", b"x" * 11)              # larger than the whole cache: not kept, nothing dropped
    assert "huge" not in lru and len(lru) == 2
    lru.put("a", b"aaaaaaaa")               # replaced: its old size no longer counts
    assert lru.used == 8 and "c" not in lru
    lru.discard("a")
    assert lru.used == 0 and len(lru) == 0
    empty: SizedLRU[str, bytes] = SizedLRU(0, len)
    empty.put("a", b"a")
    assert len(empty) == 0


async def push_manifest(client: Client, repo: str, tag: str, layer_size: int) -> tuple[str, bytes]:
    config = b"{}"
    layer = os.urandom(layer_size)
    await client.push_blob(repo, config)
    await client.push_blob(repo, layer)
    manifest = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": descriptor("application/vnd.oci.image.config.v1+json", config),
                       "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)]})
    reply = await client.push_manifest(repo, tag, manifest, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    return reply.header("Docker-Content-Digest") or "", manifest


def age(data_dir: str, repo: str, seconds: float = 10) -> None:
    """Date every file of a repository ``seconds`` back: settled, so its values are kept."""
    root = os.path.join(data_dir, "repositories", repo)
    when = time.time() - seconds
    for folder, _, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(folder, name), (when, when))


@pytest_twisted.ensureDeferred
async def test_a_deleted_manifest_is_404_at_once(make_registry: Any) -> None:
    registry = make_registry(manifest_cache_size=1024 * 1024)
    client = Client(registry.url)
    digest, manifest = await push_manifest(client, "c/app", "v1", 100)
    age(registry.data_dir, "c/app")
    for path in ("/v2/c/app/manifests/v1", f"/v2/c/app/manifests/{digest}"):
        for _ in range(2):
            reply = await client.get(path, headers=ACCEPT)
            assert reply.status == 200 and reply.body == manifest
    api = registry.service.api
    assert api.manifest_cache.get(parse_digest(digest)) == manifest      # served from memory now
    assert (await client.delete(f"/v2/c/app/manifests/{digest}")).status == 202
    assert (await client.get(f"/v2/c/app/manifests/{digest}", headers=ACCEPT)).status == 404
    assert (await client.get("/v2/c/app/manifests/v1", headers=ACCEPT)).status == 404
    assert (await client.head(f"/v2/c/app/manifests/{digest}", headers=ACCEPT)).status == 404
    assert api.manifest_cache.get(parse_digest(digest)) is None


@pytest_twisted.ensureDeferred
async def test_changes_by_another_process_show_on_the_next_get(make_registry: Any) -> None:
    registry = make_registry()
    client = Client(registry.url)
    first, manifest1 = await push_manifest(client, "c/other", "latest", 100)
    second, manifest2 = await push_manifest(client, "c/other", "v2", 200)
    age(registry.data_dir, "c/other")
    for _ in range(2):
        assert (await client.get("/v2/c/other/manifests/latest", headers=ACCEPT)).body == manifest1
    # Another process moves the tag: rewrites the file (as the driver does, a new file renamed in).
    tag_file = os.path.join(registry.data_dir, "repositories", "c/other", layout.TAGS, "latest")
    with open(tag_file + ".new", "w") as f:
        f.write(second)
    os.rename(tag_file + ".new", tag_file)
    reply = await client.get("/v2/c/other/manifests/latest", headers=ACCEPT)
    assert reply.body == manifest2 and reply.header("Docker-Content-Digest") == second
    # ... and removes the first manifest's revision: gone at once, though its content is in memory.
    age(registry.data_dir, "c/other")
    assert (await client.get(f"/v2/c/other/manifests/{first}", headers=ACCEPT)).status == 200
    os.remove(os.path.join(registry.data_dir, "repositories", "c/other", layout.revision_key(parse_digest(first))))
    assert (await client.get(f"/v2/c/other/manifests/{first}", headers=ACCEPT)).status == 404
