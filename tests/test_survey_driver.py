"""The survey and the eviction over a storage driver, on the memory driver: milliseconds, no server.

The same code runs on the data directory (tests/test_upkeep.py) and on a
bucket (tests/test_s3_survey.py); here each rule is checked on its own,
with times set by the memory driver's clock instead of sleeps.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from registryd.digest import Digest, parse_digest
from registryd.storage.driver import finish
from registryd.storage.guard import BlobGuard
from registryd.storage.memory import MemoryDriver
from registryd.upkeep.eviction import Eviction, evict, plan_eviction
from registryd.upkeep.survey import Survey, take_survey

NS = "upstream.test:5000"
FOLDER = "upstream.test_5000"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def blob_key(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


class Layout:
    """Writes a registryd store onto a driver, key by key, as the API would leave it."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.driver = MemoryDriver(self.clock)

    def at(self, when: float) -> Layout:
        self.clock.now = when
        return self

    def put(self, key: str, data: bytes = b"") -> None:
        finish(self.driver.write(key, data))

    def blob(self, data: bytes) -> Digest:
        digest = digest_of(data)
        self.put(blob_key(digest), data)
        return digest

    def root(self, upstream: bool) -> str:
        return f"mirror/{FOLDER}/" if upstream else "repositories/"

    def image(self, name: str, layers: list[bytes], upstream: bool = True, tag: str | None = "v1",
              subject: Digest | None = None) -> tuple[Digest, list[Digest]]:
        """A manifest naming ``layers`` (each stored and linked), its revision, and a tag."""
        blobs = [self.blob(layer) for layer in layers]
        document: dict[str, Any] = {"schemaVersion": 2, "layers": [{"digest": str(d), "size": 1} for d in blobs]}
        if subject is not None:
            document["subject"] = {"digest": str(subject), "size": 1}
        manifest = self.blob(json.dumps(document).encode())
        base = f"{self.root(upstream)}{name}"
        for digest in blobs:
            self.put(f"{base}/_blobs/sha256/{digest.hex}")
        self.put(f"{base}/_manifests/revisions/sha256/{manifest.hex}", b'{"mediaType": "x"}')
        if tag is not None:
            self.put(f"{base}/_manifests/tags/{tag}", str(manifest).encode())
        if subject is not None:
            self.put(f"{base}/_referrers/sha256/{subject.hex}/sha256-{manifest.hex}", b"{}")
        return manifest, blobs

    def pull(self, name: str, manifest: Digest) -> None:
        self.put(f"mirror/{FOLDER}/{name}/_pulls/sha256/{manifest.hex}")

    def link(self, name: str, digest: Digest) -> None:
        self.put(f"mirror/{FOLDER}/{name}/_blobs/sha256/{digest.hex}")

    def keys(self, prefix: str = "") -> list[str]:
        async def listing() -> list[str]:
            return [entry.key async for entry in self.driver.list(prefix)]
        return finish(listing())

    def survey(self) -> Survey:
        return finish(take_survey(self.driver, {FOLDER: NS}, clock=self.clock))

    def evict(self, max_size: int, guard: BlobGuard | None) -> tuple[Survey, Eviction]:
        survey = self.survey()
        return survey, finish(evict(self.driver, survey, plan_eviction(survey, max_size), guard))


def test_the_survey_counts_local_mirror_and_unreferenced_bytes() -> None:
    store = Layout()
    shared = b"s" * 100
    local_manifest, _ = store.at(10).image("team/app", [shared], upstream=False)
    a, (_, a_layer) = store.at(20).image("lib/a", [shared, b"a" * 1000])
    b, (b_layer,) = store.at(30).image("lib/b", [b"b" * 2000])
    store.at(40).pull("lib/a", a)                      # a was pulled after b was cached
    loose = store.at(50).blob(b"l" * 300)
    store.link("lib/c", loose)                         # a blob-only pull
    orphan = store.blob(b"o" * 7)
    store.at(60)

    survey = store.survey()

    sizes = {digest: size for digest, size in survey.blob_sizes.items()}
    assert survey.taken_at == 60
    assert survey.local == {local_manifest, digest_of(shared)}
    assert survey.local_bytes == sizes[local_manifest] + 100
    assert survey.mirror_only() == {a, a_layer, b, b_layer, loose}
    assert survey.mirror_bytes == sizes[a] + 1000 + sizes[b] + 2000 + 300
    assert survey.total_bytes == survey.local_bytes + survey.mirror_bytes + 7 and orphan in sizes
    assert [(m.repository.name, m.digest, m.last_used) for m in survey.manifests] == [
        (f"{NS}/lib/a", a, 40.0), (f"{NS}/lib/b", b, 30.0)]
    assert [(link.repository.name, link.digest, link.last_used) for link in survey.links] == [
        (f"{NS}/lib/c", loose, 50.0)]


def test_eviction_takes_the_least_recently_used_first_with_its_tags_and_pull_marker() -> None:
    store = Layout()
    shared = b"s" * 100
    store.at(10).image("team/app", [shared], upstream=False)
    a, a_blobs = store.at(20).image("lib/a", [shared, b"a" * 1000])
    b, b_blobs = store.at(30).image("lib/b", [b"b" * 1000])
    c, c_blobs = store.at(40).image("lib/c", [b"c" * 1000])
    store.at(50).pull("lib/b", b)        # now a, then c, are the least recently used
    store.at(60)

    survey, done = store.evict(1500, BlobGuard(clock=store.clock))

    assert (done.manifests, done.kept, done.gone, done.left) == (2, 0, 0, {})
    assert store.keys(f"mirror/{FOLDER}/lib/a/_manifests") == [] == store.keys(f"mirror/{FOLDER}/lib/c/_manifests")
    assert store.keys(f"mirror/{FOLDER}/lib/b/_manifests") == [
        f"mirror/{FOLDER}/lib/b/_manifests/revisions/sha256/{b.hex}", f"mirror/{FOLDER}/lib/b/_manifests/tags/v1"]
    assert store.keys(f"mirror/{FOLDER}/lib/b/_pulls") == [f"mirror/{FOLDER}/lib/b/_pulls/sha256/{b.hex}"]
    gone = {a, a_blobs[1], c, *c_blobs}
    assert done.blobs == len(gone) and done.bytes == sum(survey.blob_sizes[d] for d in gone)
    stored = set(store.survey().blob_sizes)
    assert not gone & stored
    assert {b, *b_blobs, a_blobs[0]} <= stored        # b stays whole, and the local layer a shared
    assert store.survey().mirror_bytes <= 1500


def test_a_manifest_pulled_after_the_survey_stays_with_its_blobs() -> None:
    store = Layout()
    a, a_blobs = store.at(10).image("lib/a", [b"a" * 1000])
    b, b_blobs = store.at(20).image("lib/b", [b"b" * 1000])
    survey = store.at(30).survey()
    plan = plan_eviction(survey, 1)
    assert [m.digest for m in plan.manifests] == [a, b]
    store.at(31).pull("lib/a", a)

    done = finish(evict(store.driver, survey, plan, BlobGuard(clock=store.clock)))

    assert (done.manifests, done.kept) == (1, 1)
    assert done.kept_back == {a, *a_blobs}
    stored = set(store.survey().blob_sizes)
    assert {a, *a_blobs} <= stored and not {b, *b_blobs} & stored


def test_without_a_guard_that_sees_every_claim_the_freed_blobs_are_left_to_a_collection() -> None:
    """A bucket every node shares: manifests and blob-only links go, blobs stay for the collector."""
    store = Layout()
    a, a_blobs = store.at(10).image("lib/a", [b"a" * 1000], subject=None)
    loose = store.at(11).blob(b"l" * 500)
    store.link("lib/l", loose)
    store.at(20)

    survey, done = store.evict(1, None)

    assert (done.manifests, done.links, done.blobs) == (1, 1, 0)
    assert done.left == {d: survey.blob_sizes[d] for d in (a, *a_blobs, loose)}
    assert set(store.survey().blob_sizes) == {a, *a_blobs, loose}
    assert store.keys(f"mirror/{FOLDER}/lib/l/") == [] and store.keys(f"mirror/{FOLDER}/lib/a/_manifests") == []


def test_a_blob_claimed_since_the_survey_is_not_deleted_and_a_referrer_entry_goes() -> None:
    store = Layout()
    base, _ = store.at(5).image("lib/base", [b"base" * 10], tag="v0")
    signature, (layer,) = store.at(10).image("lib/app", [b"sig" * 100], tag=None, subject=base)
    store.pull("lib/base", base)
    store.pull("lib/base", base)
    store.at(50).pull("lib/base", base)     # base is used last
    guard = BlobGuard(clock=store.clock)
    survey = store.at(60).survey()
    plan = plan_eviction(survey, survey.mirror_bytes - 1)
    assert [m.digest for m in plan.manifests] == [signature]
    store.at(61)
    guard.claim([layer])                    # a push of the same layer, say

    done = finish(evict(store.driver, survey, plan, guard))

    assert (done.manifests, done.blobs) == (1, 1)
    assert store.keys(f"mirror/{FOLDER}/lib/app/_referrers") == []
    assert layer in store.survey().blob_sizes and signature not in store.survey().blob_sizes


def test_a_claim_made_while_a_freed_blob_moves_to_the_trash_puts_it_back() -> None:
    """No lock spans the move: the claims are looked at once the blob is in the trash."""
    store = Layout()
    base, _ = store.at(5).image("lib/base", [b"base" * 10], tag="v0")
    signature, (layer,) = store.at(10).image("lib/app", [b"sig" * 100], tag=None, subject=base)
    store.at(50).pull("lib/base", base)
    guard = BlobGuard(clock=store.clock)
    survey = store.at(60).survey()
    plan = plan_eviction(survey, survey.mirror_bytes - 1)
    assert layer in plan.blobs
    store.at(61)
    real_move = store.driver.move

    async def claim_during_the_move(src: str, dst: str, **options: Any) -> bool:
        if src.endswith(layer.hex):
            guard.claim([layer])            # a manifest naming the layer, pushed just now
        return await real_move(src, dst, **options)

    store.driver.move = claim_during_the_move  # type: ignore[method-assign]
    done = finish(evict(store.driver, survey, plan, guard))

    assert done.blobs == 1                  # the signature's own document went; the layer came back
    assert layer in store.survey().blob_sizes and signature not in store.survey().blob_sizes
    assert store.keys("trash") == []
