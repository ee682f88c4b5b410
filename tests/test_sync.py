"""``[[sync]]`` jobs against real upstreams on loopback: Debian's docker-registry (open and with
token auth, no referrers API: the tag schema) and registryd itself (with the referrers API).

The upstream repositories are pushed by skopeo (tests/sync_upstream.py), signatures and SBOMs by
the ORAS Python SDK. Upstream requests are counted from docker-registry's access log.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from conftest import VENV_BIN
from oci_client import Client
from registryd.config import Config, UpstreamConfig
from registryd.digest import parse_digest
from registryd.sync_settings import SyncJob, sync_jobs
from support.wait import wait_until
from sync_upstream import TagSpec, build_tags, load_into, push_tags, version_tags
from terminal import run_with_terminal_stderr
from upstreams import ReferenceUpstream, reference_upstream, shared_pki  # noqa: F401
from support.ports import free_port

NS = "upstream.test:5000"
ADMIN = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: Any) -> dict[str, Any]:
    """Three repositories pushed once by skopeo into a docker-registry: lib/versions (32 version
    tags and an rc), lib/builds (32 tags that are no versions), other/app (3 tags)."""
    directory = str(tmp_path_factory.mktemp("sync-seed"))
    os.makedirs(os.path.join(directory, "data"))
    up = ReferenceUpstream("open", directory, free_port(), "http", shared_pki(tmp_path_factory))
    up.start()
    try:
        specs = [*version_tags("lib/versions", 32), TagSpec("lib/versions", "1.1.0-rc.1", "2025-01-01T00:00:00Z"),
                 TagSpec("lib/versions", "latest", "2025-01-01T00:00:00Z"),
                 *build_tags("lib/builds", 32), *[TagSpec("other/app", f"v{i}") for i in range(3)]]
        digests = push_tags(up.host, specs, os.path.join(directory, "push"))
    finally:
        up.close()
    return {"data": up.data_dir, "specs": specs, "digests": digests}


def job_table(**overrides: Any) -> dict[str, Any]:
    table = {"name": "base", "upstream": NS, "repositories": ["lib/*"]}
    table.update(overrides)
    return table


def sync_config(up: Any, *tables: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    settings = {"username": up.username, "password": up.password} if up.username else {}
    settings.update(upstream)
    return {"upstreams": (UpstreamConfig(NS, up.url, **settings),),
            "syncs": sync_jobs("sync", list(tables))}


async def run_job(registry: Any, job: str, dry_run: bool = False) -> dict[str, Any]:
    client = Client(registry.url)
    reply = await client.post(f"/admin/sync?job={job}" + ("&dry_run=1" if dry_run else ""), b"{}", headers=ADMIN)
    assert reply.status == 200, reply
    return dict(reply.json())


async def mirror_tags(registry: Any, remote: str) -> list[str]:
    return await registry.service.store.mirror_repositories(NS).tags(remote) or []


def outcomes(document: dict[str, Any]) -> dict[str, str]:
    return {f"{e['repository']}:{e['tag']}": e["outcome"] for e in document["report"]}


@pytest_twisted.ensureDeferred
async def test_a_job_copies_the_selected_tags_of_globbed_repositories_through_token_auth(
        seeded: dict[str, Any], reference_upstream: Any, make_registry: Any) -> None:
    up = reference_upstream("token", allow_anonymous=False)
    load_into(up, seeded["data"])
    registry = make_registry(**sync_config(up, job_table(
        include_tags=[r"1\.\d+\.\d+.*", r"build-\d+"], exclude_tags=[r".*-rc\..*"], keep_latest=5)))
    document = await run_job(registry, "base")
    assert document["errors"] == 0, document["messages"]
    assert sorted(document["repositories"]) == ["lib/builds", "lib/versions"]   # other/app matches no glob
    # Versions: the five highest (the rc excluded, "latest" matches no include pattern).
    assert await mirror_tags(registry, "lib/versions") == sorted(f"1.0.{i}" for i in range(27, 32))
    # Not versions: the five created last.
    builds = sorted((s for s in seeded["specs"] if s.repository == "lib/builds"), key=lambda s: s.created)
    assert await mirror_tags(registry, "lib/builds") == sorted(s.tag for s in builds[-5:])
    assert document["images"] == 10 and set(outcomes(document).values()) == {"copied"}
    # Stored as a pull stores it: pulling every synced image through registryd asks the upstream nothing.
    before = await up.acount(None, r"/v2/.*")
    client = Client(registry.url)
    for remote in ("lib/versions", "lib/builds"):
        for tag in await mirror_tags(registry, remote):
            manifest = await client.get(f"/v2/{NS}/{remote}/manifests/{tag}",
                                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
            assert manifest.status == 200
            assert manifest.header("Docker-Content-Digest") == seeded["digests"][(remote, tag)]
            for descriptor in [manifest.json()["config"], *manifest.json()["layers"]]:
                blob = await client.get(f"/v2/{NS}/{remote}/blobs/{descriptor['digest']}")
                assert blob.status == 200 and len(blob.body) == descriptor["size"]
    assert await up.acount(None, r"/v2/.*") == before
    # A second run finds everything there: HEADs and tag lists only, nothing fetched.
    gets = await up.acount("GET", r"/v2/.*/(manifests|blobs)/.*")
    again = await run_job(registry, "base")
    assert set(outcomes(again).values()) == {"unchanged"} and again["images"] == 0
    assert await up.acount("GET", r"/v2/.*/(manifests|blobs)/.*") == gets
