"""The retention policy (registryd.upkeep.retention) over the in-memory store, pushes at known times.

Every push writes through the store's own interface, as the API's push
does (content blob, links, revision with its referrer entry, then tags),
on a MemoryDriver whose clock the test moves: "pushed an hour later" and
"ten days old" are clock moves, not sleeps.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted

from registryd.digest import Digest, digest_of
from registryd.manifests import OCI_INDEX, OCI_MANIFEST, parse_manifest
from registryd.retention_rules import RetentionRule, parse_retention_rules
from registryd.storage.memory import MemoryDriver
from registryd.storage.memory_store import DriverStore
from registryd.threads import InlinePool
from registryd.upkeep.retention import SUBJECT_REMOVED, TAGS_REMOVED, UNTAGGED, Retention
from support.clock import WallClock

HOUR = 3600.0
DAY = 86400.0
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY = "application/vnd.oci.empty.v1+json"


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@pytest.fixture
def store(tmp_path: Any, clock: WallClock) -> DriverStore:
    return DriverStore(str(tmp_path), InlinePool(), MemoryDriver(clock=clock))


def rules(*tables: dict[str, Any]) -> tuple[RetentionRule, ...]:
    """Rules as the config file gives them (through the schema's checks)."""
    return parse_retention_rules("retention", list(tables))


async def put(store: DriverStore, name: str, data: bytes) -> Digest:
    digest = digest_of(data)
    await store.blobs.put(digest, data)
    await store.repositories.link_blob(name, digest)
    return digest


async def push_manifest(store: DriverStore, name: str, document: dict[str, Any], tags: list[str]) -> Digest:
    """A manifest PUT: its content, its revision and referrer entry, then its tags."""
    body = json.dumps(document).encode()
    digest = await put(store, name, body)
    manifest = parse_manifest(body, document["mediaType"])
    await store.repositories.add_manifest(name, digest, document["mediaType"], tags,
                                          manifest.referrer_entry(digest, len(body)))
    return digest


async def push_image(store: DriverStore, name: str, seed: str, tags: list[str] | None = None,
                     subject: Digest | None = None) -> Digest:
    config = await put(store, name, json.dumps({"seed": seed}).encode())
    layer = await put(store, name, f"layer {seed}".encode())
    document: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": str(config), "size": 1},
        "layers": [{"mediaType": LAYER, "digest": str(layer), "size": 1}]}
    if subject is not None:
        document["artifactType"] = "application/vnd.example.signature"
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": str(subject), "size": 1}
    return await push_manifest(store, name, document, tags or [])


async def push_index(store: DriverStore, name: str, children: list[Digest], tags: list[str]) -> Digest:
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": str(child), "size": 1,
                               "platform": {"architecture": f"arch{i}", "os": "linux"}}
                              for i, child in enumerate(children)]}
    return await push_manifest(store, name, document, tags)


async def state(store: DriverStore, name: str) -> tuple[dict[str, Digest | None], set[Digest]]:
    """The repository's tags (-> digest) and manifest revisions."""
    repos = store.repositories
    tags = {tag: await repos.resolve_tag(name, tag) for tag in await repos.tags(name) or []}
    return tags, set(await repos.revisions(name))


async def every_key(store: DriverStore) -> dict[str, tuple[int, str, float | None]]:
    """The whole store: every key with its size, version and time."""
    return {entry.key: (entry.size, entry.version, entry.modified) async for entry in store.objects.list("")}


def retention(store: DriverStore, clock: WallClock, *tables: dict[str, Any]) -> Retention:
    return Retention(store.repositories, store.blobs, rules(*tables), store.location(), clock=clock)


def removed(report: dict[str, Any], kind: str) -> list[Any]:
    return [entry.get("tag") or entry["digest"] for entry in report["removed"] if entry["kind"] == kind]


@pytest_twisted.ensureDeferred
async def test_keep_latest_by_push_time_and_keep_tags(store: DriverStore, clock: WallClock) -> None:
    """Five tags pushed an hour apart, a pinned old one, and v1 pushed again last: the two newest
    pushes (by the tag's write time, not its name or its manifest's age) and the pinned tag stay."""
    digests = {}
    stable = await push_image(store, "team/app", "stable", ["stable"])
    for version in range(1, 6):
        clock.advance(HOUR)
        digests[f"v{version}"] = await push_image(store, "team/app", f"v{version}", [f"v{version}"])
    clock.advance(HOUR)
    await store.repositories.set_tags("team/app", digests["v1"], ["v1"])     # v1 pushed again, newest now
    other = await push_image(store, "other/app", "other", ["old"])
    before_other = await state(store, "other/app")

    report = await retention(store, clock, {"repositories": ["team/*"], "keep_latest": 2,
                                            "keep_tags": ["stab*"]}).run()

    tags, revisions = await state(store, "team/app")
    assert tags == {"stable": stable, "v1": digests["v1"], "v5": digests["v5"]}
    assert revisions == {stable, digests["v1"], digests["v5"]}
    assert removed(report, "tag") == ["v2", "v3", "v4"]
    assert set(removed(report, "manifest")) == {str(digests[v]) for v in ("v2", "v3", "v4")}
    assert {entry["reason"] for entry in report["removed"] if entry["kind"] == "manifest"} == {TAGS_REMOVED}
    assert report["counts"] == {"tag": 3, "manifest": 3} and report["repositories_matched"] == 1
    assert report["repositories"] == [{"repository": "team/app", "tags_removed": 3, "manifests_removed": 3,
                                       "tags_kept": 3, "manifests_kept": 3}]
    assert await state(store, "other/app") == before_other and other in before_other[1]
    # Blobs are gc's business.
    assert all([await store.blobs.size(digests[v]) is not None for v in digests])
    # Applied again: nothing more to do.
    assert (await retention(store, clock, {"repositories": ["team/*"], "keep_latest": 2,
                                           "keep_tags": ["stab*"]}).run())["removed"] == []


@pytest_twisted.ensureDeferred
async def test_what_kept_tags_need_stays_and_only_old_untagged_manifests_go(store: DriverStore,
                                                                            clock: WallClock) -> None:
    """A kept index's children and the referrers of kept manifests (recursively) are not untagged
    garbage, however old; an untagged image goes once older than untagged_after, not before."""
    children = [await push_image(store, "team/app", f"child{i}") for i in range(2)]
    index = await push_index(store, "team/app", children, ["multi"])
    signature = await push_image(store, "team/app", "sig", subject=index)
    countersigned = await push_image(store, "team/app", "sig-of-sig", subject=signature)
    image_signature = await push_image(store, "team/app", "child-sig", subject=children[0])
    old_untagged = await push_image(store, "team/app", "forgotten")
    clock.advance(10 * DAY)
    young_untagged = await push_image(store, "team/app", "by-digest")
    clock.advance(HOUR)
    kept_before = {index, *children, signature, countersigned, image_signature, young_untagged}

    report = await retention(store, clock, {"repositories": ["team/**"], "keep_latest": 1,
                                            "untagged_after": "7d"}).run()

    tags, revisions = await state(store, "team/app")
    assert tags == {"multi": index}
    assert revisions == kept_before
    assert [(e["kind"], e["digest"], e["reason"]) for e in report["removed"]] == [
        ("manifest", str(old_untagged), UNTAGGED)]
    referrers = await store.repositories.referrers("team/app", index)
    assert [entry["digest"] for entry in referrers] == [str(signature)]


@pytest_twisted.ensureDeferred
async def test_untagged_manifests_stay_unless_every_matching_rule_says_when(store: DriverStore,
                                                                            clock: WallClock) -> None:
    old = await push_image(store, "team/app", "old")
    await push_image(store, "team/app", "tagged", ["v1"])
    clock.advance(30 * DAY)
    both = retention(store, clock, {"repositories": ["team/**"], "untagged_after": 7 * DAY},
                     {"repositories": ["team/app"], "keep_latest": 5})
    assert (await both.run())["removed"] == []
    one = retention(store, clock, {"repositories": ["team/**"], "untagged_after": "7d"},
                    {"repositories": ["team/app"], "untagged_after": "40d"})
    assert (await one.run())["removed"] == []
    clock.advance(11 * DAY)
    assert removed(await one.run(), "manifest") == [str(old)]


@pytest_twisted.ensureDeferred
async def test_a_tag_is_kept_when_any_matching_rule_keeps_it(store: DriverStore, clock: WallClock) -> None:
    for version in range(1, 6):
        clock.advance(60)
        await push_image(store, "team/app", f"v{version}", [f"v{version}"])
        await push_image(store, "team/web", f"w{version}", [f"w{version}"])
    report = await retention(store, clock, {"repositories": ["team/*"], "keep_latest": 1},
                             {"repositories": ["team/app"], "keep_latest": 3},
                             {"repositories": ["team/web"], "keep_latest": 5, "keep_tags": ["v1"]}).run()
    assert set((await state(store, "team/app"))[0]) == {"v3", "v4", "v5"}
    assert set((await state(store, "team/web"))[0]) == {"w1", "w2", "w3", "w4", "w5"}
    assert removed(report, "tag") == ["v1", "v2"]


@pytest_twisted.ensureDeferred
async def test_referrers_of_a_removed_manifest_go_with_it_recursively(store: DriverStore,
                                                                      clock: WallClock) -> None:
    """v1 leaves by keep_latest: its (newer, untagged) signature, the signature's own referrer and
    its tag-schema tags go with it; v2's stay, and its .sig tag counts toward no keep_latest."""
    v1 = await push_image(store, "team/app", "v1", ["v1"])
    clock.advance(HOUR)
    v2 = await push_image(store, "team/app", "v2", ["v2"])
    clock.advance(HOUR)
    sig1 = await push_image(store, "team/app", "sig1", subject=v1)
    att1 = await push_image(store, "team/app", "att1", subject=sig1)
    cosign1 = await push_image(store, "team/app", "cosign1", [f"sha256-{v1.hex}.sig"])
    sig2 = await push_image(store, "team/app", "sig2", subject=v2)
    cosign2 = await push_image(store, "team/app", "cosign2", [f"sha256-{v2.hex}.sig", f"sha256-{v2.hex}"])

    report = await retention(store, clock, {"repositories": ["team/app"], "keep_latest": 1,
                                            "untagged_after": "30d"}).run()

    tags, revisions = await state(store, "team/app")
    assert tags == {"v2": v2, f"sha256-{v2.hex}.sig": cosign2, f"sha256-{v2.hex}": cosign2}
    assert revisions == {v2, sig2, cosign2}
    assert removed(report, "tag") == [f"sha256-{v1.hex}.sig", "v1"]
    manifests = [(e["digest"], e["reason"]) for e in report["removed"] if e["kind"] == "manifest"]
    assert sorted(manifests) == sorted([(str(v1), TAGS_REMOVED), (str(sig1), SUBJECT_REMOVED),
                                        (str(att1), SUBJECT_REMOVED), (str(cosign1), TAGS_REMOVED)])
    # Referrers go before their subject: the referrers API never lists a manifest that is gone.
    order = [digest for digest, _ in manifests]
    assert order.index(str(att1)) < order.index(str(sig1)) < order.index(str(v1))
    assert await store.repositories.referrers("team/app", v1) == []
    assert await store.repositories.referrers("team/app", sig1) == []
    assert [e["digest"] for e in await store.repositories.referrers("team/app", v2)] == [str(sig2)]


@pytest_twisted.ensureDeferred
async def test_a_kept_referrer_keeps_its_subject(store: DriverStore, clock: WallClock) -> None:
    """An SBOM under a pinned tag needs the image it describes: v1's tag goes, its manifest stays."""
    v1 = await push_image(store, "team/app", "v1", ["v1"])
    sbom = await push_image(store, "team/app", "sbom", ["sbom-v1"], subject=v1)
    clock.advance(HOUR)
    v2 = await push_image(store, "team/app", "v2", ["v2"])
    report = await retention(store, clock, {"repositories": ["team/app"], "keep_latest": 1,
                                            "keep_tags": ["sbom-*"], "untagged_after": 0}).run()
    assert removed(report, "tag") == ["v1"] and removed(report, "manifest") == []
    assert await state(store, "team/app") == ({"sbom-v1": sbom, "v2": v2}, {v1, v2, sbom})


@pytest_twisted.ensureDeferred
async def test_a_dry_run_changes_nothing_and_reports_what_the_run_removes(store: DriverStore,
                                                                          clock: WallClock) -> None:
    children = [await push_image(store, "team/app", f"c{i}") for i in range(2)]
    await push_index(store, "team/app", children, ["v1"])
    for version in range(2, 5):
        clock.advance(HOUR)
        image = await push_image(store, "team/app", f"v{version}", [f"v{version}"])
        await push_image(store, "team/app", f"sig{version}", subject=image)
    await push_image(store, "team/app", "loose")
    clock.advance(10 * DAY)
    policy = retention(store, clock, {"repositories": ["**"], "keep_latest": 1, "untagged_after": "1d"})
    before = await every_key(store)

    dry = await policy.run(dry_run=True)
    assert await every_key(store) == before
    assert dry["dry_run"] is True and dry["counts"] == {"tag": 3, "manifest": 8}
    for entry in dry["removed"]:
        assert entry["path"] in before, entry

    report = await policy.run()
    assert report["removed"] == dry["removed"] and report["dry_run"] is False
    after = await every_key(store)
    for entry in report["removed"]:
        assert entry["path"] not in after, entry


@pytest_twisted.ensureDeferred
async def test_a_tag_pushed_during_the_run_keeps_what_it_needs(store: DriverStore, clock: WallClock,
                                                                monkeypatch: Any) -> None:
    """While the run removes tags, a client tags v1's index again: the index and its children stay."""
    children = [await push_image(store, "team/app", f"c{i}") for i in range(2)]
    v1 = await push_index(store, "team/app", children, ["v1"])
    clock.advance(HOUR)
    v2 = await push_image(store, "team/app", "v2", ["v2"])
    repos = store.repositories
    delete_tag = repos.delete_tag

    async def delete_then_push(name: str, tag: str) -> bool:
        done = await delete_tag(name, tag)
        await repos.set_tags(name, v1, ["rescued"])
        return done

    monkeypatch.setattr(repos, "delete_tag", delete_then_push)
    report = await retention(store, clock, {"repositories": ["team/app"], "keep_latest": 1}).run()
    assert removed(report, "tag") == ["v1"] and removed(report, "manifest") == []
    tags, revisions = await state(store, "team/app")
    assert tags == {"v2": v2, "rescued": v1} and revisions == {v1, v2, *children}


@pytest_twisted.ensureDeferred
async def test_a_tag_written_again_since_the_scan_stays(store: DriverStore, clock: WallClock,
                                                         monkeypatch: Any) -> None:
    v1 = await push_image(store, "team/app", "v1", ["v1"])
    clock.advance(HOUR)
    await push_image(store, "team/app", "v2", ["v2"])
    repos = store.repositories
    revisions = repos.revisions

    async def push_during_scan(name: str) -> dict[Digest, float]:
        found = await revisions(name)
        clock.advance(1)
        await repos.set_tags(name, v1, ["v1"])     # pushed again just after its tag was read
        return found

    monkeypatch.setattr(repos, "revisions", push_during_scan)
    report = await retention(store, clock, {"repositories": ["team/app"], "keep_latest": 1}).run()
    assert report["removed"] == []
    assert set((await state(store, "team/app"))[0]) == {"v1", "v2"}
