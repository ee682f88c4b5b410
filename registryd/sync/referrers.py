"""What is attached to an image (signatures, SBOMs, attestations), to copy along with it.

Two ways an upstream tells, both asked for each synced manifest:

* the referrers API of the distribution spec (``GET /v2/<name>/referrers/<digest>``):
  an index of every manifest whose ``subject`` is that digest. A registry
  without it answers 404 (distribution 2.8 does): it is not asked again in
  that run.
* the tag schema, for registries without it: a tag ``<alg>-<hex>`` holds an
  index of the referrers of ``<alg>:<hex>``, and cosign's ``<alg>-<hex>.sig``,
  ``.att`` and ``.sbom`` tags its signatures, attestations and SBOMs. These
  are looked up in the repository's tag list (already fetched), so they cost
  a request only when present.

Each attached manifest is copied as any other (its blobs, its own
referrers); a tag-schema one keeps its tag in the mirror too, so clients
that look for it by tag (cosign) find it there.
"""
from __future__ import annotations

import re
import attrs

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.json_documents import load_json
from registryd.mirror.cache import next_page
from registryd.sync.upstream import PatientUpstream

#: Tags of the tag schema: an index of referrers, or cosign's signature, attestation, SBOM.
referrer_tags = re.compile(r"^(sha256-[0-9a-f]{64}|sha512-[0-9a-f]{128})(\.(sig|att|sbom))?$")
_SUFFIXES = ("", ".sig", ".att", ".sbom")
_INDEX = "application/vnd.oci.image.index.v1+json"
_LIMIT = 4 * 1024 * 1024


@attrs.frozen
class Attached:
    """A manifest attached to another: its digest, and the tag-schema tag it was found by (or None)."""

    digest: Digest
    tag: str | None = None


async def referrers_of(run: PatientUpstream, remote: str, subject: Digest, tags: set[str]) -> list[Attached]:
    """Every manifest attached to ``subject`` in ``remote`` (``run``: the run's upstream; ``tags``: the
    repository's upstream tags)."""
    found: dict[Digest, Attached] = {}
    if run.referrers_api:
        for digest in await _from_api(run, remote, subject):
            found.setdefault(digest, Attached(digest))
    prefix = f"{subject.algorithm}-{subject.hex}"
    for suffix in _SUFFIXES:
        tag = prefix + suffix
        if tag in tags:
            tagged = await run.head_manifest(remote, tag)
            if tagged is not None and tagged != subject:
                found[tagged] = Attached(tagged, tag)
    return list(found.values())


async def _from_api(run: PatientUpstream, remote: str, subject: Digest) -> list[Digest]:
    digests: list[Digest] = []
    path: str | None = f"/v2/{remote}/referrers/{subject}"
    while path is not None:
        status, body, response = await run.get(path, remote, {"Accept": _INDEX}, _LIMIT)
        if status != 200:
            run.referrers_api = False    # no such API here: the tag schema only, for the rest of the run
            return digests
        try:
            manifests = load_json(body).get("manifests")
            if not isinstance(manifests, list):
                raise ValueError("no manifests")
            for entry in manifests:
                digests.append(parse_digest(entry["digest"]))
        except (ValueError, AttributeError, KeyError, TypeError, RegistryError):
            run.referrers_api = False
            return digests
        path = next_page(response)
    return digests
