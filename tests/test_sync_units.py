"""Units of the [[sync]] jobs: tag ordering, the schedule, the settings, the state, pins in eviction."""
from __future__ import annotations

import email.utils

import pytest

from registryd.config import ConfigError, parse_settings
from registryd.digest import digest_of
from registryd.sync.job import created_time
from registryd.sync.upstream import retry_after_seconds
from registryd.sync.referrers import referrer_tags
from registryd.sync.schedule import LastRun, next_run
from registryd.sync.state import JobState, RunSummary
from registryd.sync.versions import all_versions, newest
from registryd.sync_settings import SyncJob, sync_jobs
from registryd.upkeep.eviction import plan_eviction
from registryd.upkeep.pins import decode_pins, encode_pins
from registryd.upkeep.survey import MirrorManifest, Survey, SurveyedRepository


def job(**table: object) -> SyncJob:
    return sync_jobs("sync", [{"name": "j", "upstream": "up.test", "repositories": ["lib/*"], **table}])[0]


# --- which tags are newest ------------------------------------------------------------

def test_versions_order_numerically_with_pre_releases_before_their_release() -> None:
    tags = ["1.0.9", "1.0.10", "1.0.2", "v1.1.0", "1.1.0-rc.1", "2.0.0-alpha"]
    assert newest(tags, 4) == ["2.0.0-alpha", "v1.1.0", "1.1.0-rc.1", "1.0.10"]
    assert newest(tags, 0) == ["2.0.0-alpha", "v1.1.0", "1.1.0-rc.1", "1.0.10", "1.0.9", "1.0.2"]


def test_tags_that_are_not_all_versions_order_by_creation_time() -> None:
    tags = ["latest", "1.0", "build-b", "build-a"]
    assert not all_versions(tags)
    created = {"latest": 40.0, "1.0": 10.0, "build-b": 20.0, "build-a": 30.0}
    assert newest(tags, 2, created) == ["latest", "build-a"]
    assert newest(tags, 4, {"build-b": 1.0}) == ["build-b", "latest", "build-a", "1.0"]   # unknown: oldest


def test_a_config_created_time_reads_rfc3339_with_nanoseconds() -> None:
    assert created_time(b'{"created": "2024-01-02T03:04:05.123456789Z"}') == pytest.approx(1704164645.123456)
    assert created_time(b'{"created": "2024-01-02T03:04:05+01:00"}') == 1704161045.0
    assert created_time(b'{"created": "yesterday"}') is None
    assert created_time(b"[]") is None


# --- when a job runs ---------------------------------------------------------------------

def test_an_interval_job_runs_an_interval_after_its_last_start() -> None:
    every = job(interval=60)
    assert next_run(every, LastRun(100.0, 150.0), 155.0) == 160.0
    assert next_run(every, LastRun(100.0, 300.0), 301.0) == 160.0    # a long run: the next at once


def test_a_continuous_job_polls_a_period_after_its_last_run_ended() -> None:
    polling = job(continuous=True, poll_interval=30)
    assert next_run(polling, LastRun(100.0, 150.0), 155.0) == 180.0


def test_a_job_that_never_ran_or_was_cut_off_runs_at_once() -> None:
    assert next_run(job(), LastRun(), 500.0) == 500.0
    assert next_run(job(), LastRun(100.0, None), 500.0) == 500.0


# --- the settings --------------------------------------------------------------------------

def test_tags_are_chosen_by_include_and_exclude_expressions() -> None:
    chosen = job(include_tags=[r"v\d+\.\d+", "stable"], exclude_tags=[r"v0\..*"])
    assert [t for t in ["v1.2", "v1.2-rc", "v0.9", "stable", "latest"] if chosen.selects_tag(t)] == ["v1.2", "stable"]
    assert job().selects_tag("anything")


def _settings(**table: object) -> dict[str, object]:
    return parse_settings({"upstream": [{"namespace": "up.test", "url": "http://127.0.0.1:1"}],
                           "sync": [{"name": "j", "upstream": "up.test", "repositories": ["lib/*"], **table}]})


@pytest.mark.parametrize("table, message", [
    ({"upstream": "other.test"}, "'sync[0].upstream' 'other.test' is not the namespace of an [[upstream]]"),
    ({"include_tags": ["v(1"]}, "'sync[0].include_tags[0]' 'v(1' is not a regular expression"),
    ({"platforms": ["linux"]}, "'sync[0].platforms[0]': 'linux' is not OS/ARCH"),
    ({"repositories": []}, "'sync[0].repositories' must name at least one repository"),
    ({"repositories": ["Lib/App"]}, "'sync[0].repositories[0]' 'Lib/App' is not a repository name or glob"),
    ({"keep_latest": -1}, "'sync[0].keep_latest' must not be negative"),
    ({"interval": 0}, "'sync[0].interval' must be greater than zero"),
    ({"name": "Bad Name"}, "'sync[0].name' must be 1 to 64 of"),
    ({"schedule": "daily"}, "unknown key 'sync[0].schedule'"),
])
def test_a_bad_sync_table_is_refused_with_one_line(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(**table)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_two_jobs_may_not_share_a_name() -> None:
    with pytest.raises(ConfigError, match="another \\[\\[sync\\]\\] job is named 'j'"):
        sync_jobs("sync", [{"name": "j", "upstream": "u", "repositories": ["a"]}] * 2)


def test_platforms_choose_index_children() -> None:
    chosen = job(platforms=["linux/arm64/v8"]).platforms[0]
    assert chosen.matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert not chosen.matches({"os": "linux", "architecture": "amd64"})
    assert chosen.matches(None)     # a child that names no platform


# --- talking to the upstream ---------------------------------------------------------------

def test_retry_after_is_seconds_or_an_http_date() -> None:
    assert retry_after_seconds("3", 0.0) == 3.0
    assert retry_after_seconds(email.utils.formatdate(1000.0, usegmt=True), 990.0) == 10.0
    assert retry_after_seconds("soon", 0.0) is None and retry_after_seconds(None, 0.0) is None


def test_tag_schema_tags_are_recognised() -> None:
    hex64 = "a" * 64
    for tag in (f"sha256-{hex64}", f"sha256-{hex64}.sig", f"sha256-{hex64}.att", f"sha256-{hex64}.sbom"):
        assert referrer_tags.match(tag)
    for tag in ("sha256-abc.sig", f"sha256-{hex64}.txt", "v1"):
        assert not referrer_tags.match(tag)


# --- kept in the store -----------------------------------------------------------------------

def test_state_and_pins_read_back_and_garbage_is_a_fresh_start() -> None:
    state = JobState(RunSummary(1.0, 3.5, 2, 100, 1, ["x"]), 7.0, {"a:1": ["sha256:" + "0" * 64]},
                     {"a": {"1": ["sha256:" + "0" * 64]}}, {"sha256:" + "1" * 64: 12.0})
    assert JobState.decode(state.encode()) == state
    assert JobState.decode(b"{not json") == JobState()
    digest = digest_of(b"x")
    assert decode_pins(encode_pins("up.test", {"lib/a": [digest]})) == {("up.test", "lib/a", digest)}
    assert decode_pins(b"[]") == set()


def test_eviction_spares_what_pinned_manifests_keep() -> None:
    shared, own, pinned_layer = digest_of(b"shared"), digest_of(b"own"), digest_of(b"pinned")
    unpinned = digest_of(b"manifest")
    repository = SurveyedRepository("up.test/lib/a", "lib/a", "up.test", "up.test")
    survey = Survey(taken_at=0.0, blob_sizes={shared: 10, own: 10, pinned_layer: 10, unpinned: 1},
                    manifests=[MirrorManifest(repository, unpinned, 0.0, frozenset({unpinned, shared, own}), None)],
                    pinned={shared, pinned_layer})
    plan = plan_eviction(survey, 0)
    assert plan.size_before == 31
    assert [m.digest for m in plan.manifests] == [unpinned] and set(plan.blobs) == {own, unpinned}
