"""What ``[[sync]]`` jobs list, so that eviction and prune never drop it.

Each job writes, at the end of each run, the manifests it keeps in the
mirror cache (every synced image, its children and its referrers) to
``_registryd/sync/<job>/pins.json`` in the store, on either driver. The
survey (and so ``[mirror] max_size`` eviction) and prune read the pins of
the jobs the config names: content a job lists is never evicted or pruned
while that job lists it; once it drops out of the job (a tag no longer
selected, the job removed from the config), it is ordinary cache again.
"""
from __future__ import annotations

import json
from typing import Iterable, Mapping

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage.driver import Driver

SYNC_PREFIX = "_registryd/sync/"
PINS_LIMIT = 64 * 1024 * 1024

#: (upstream namespace, repository as the upstream names it, manifest digest)
Pin = tuple[str, str, Digest]


def job_key(job: str, name: str) -> str:
    """A key of job ``job``'s own: ``_registryd/sync/<job>/<name>``."""
    return f"{SYNC_PREFIX}{job}/{name}"


def encode_pins(namespace: str, pinned: Mapping[str, Iterable[Digest]]) -> bytes:
    document = {"upstream": namespace,
                "repositories": {remote: sorted(str(d) for d in digests) for remote, digests in sorted(pinned.items())}}
    return json.dumps(document, indent=1).encode()


async def write_pins(driver: Driver, job: str, namespace: str, pinned: Mapping[str, Iterable[Digest]]) -> None:
    """Replace job ``job``'s pins: ``pinned`` maps a repository (upstream name) to its manifests."""
    await driver.write(job_key(job, "pins.json"), encode_pins(namespace, pinned))


def decode_pins(data: bytes) -> set[Pin]:
    """The pins of one document; an unreadable one pins nothing (the next run writes it again)."""
    try:
        document = json.loads(data)
        namespace = document["upstream"]
        return {(namespace, remote, parse_digest(digest))
                for remote, digests in document["repositories"].items() for digest in digests}
    except (ValueError, KeyError, TypeError, AttributeError, RegistryError):
        return set()


async def read_pins(driver: Driver, jobs: Iterable[str]) -> set[Pin]:
    """Every manifest the named jobs list."""
    pins: set[Pin] = set()
    for job in jobs:
        data = await driver.read(job_key(job, "pins.json"), PINS_LIMIT)
        if data is not None:
            pins |= decode_pins(data)
    return pins
