"""Push by digest with ``?tag=``: the OCI-Tag answer, and sha512 content end to end.

A push by tag is hashed with sha256 (the digest is the registry's to pick);
a client with sha512 content pushes by its sha512 digest and names the tags
in ``?tag=``. The spec (distribution-spec v1.1, "Pushing Manifests with
Tags"): a registry that supports the tag parameter MUST answer an
``OCI-Tag`` header for each tag it applied.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import pytest_twisted

from oci_client import OCI_INDEX, OCI_MANIFEST, Client, encode, with_query


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest_twisted.ensureDeferred
async def test_push_by_digest_with_tags_answers_one_oci_tag_header_per_tag(
        make_registry: Any, algorithm: str) -> None:
    registry = make_registry()
    client = Client(registry.url)
    image = await client.push_image("lab/app", seed="tags", algorithm=algorithm)
    reply = await client.put(with_query(f"/v2/lab/app/manifests/{image.digest}", tag=["v1", "stable"]),
                             image.body, headers={"Content-Type": OCI_MANIFEST})
    assert reply.status == 201, str(reply)
    assert reply.headers.get("oci-tag") == ["v1", "stable"], str(reply)
    assert reply.header("Docker-Content-Digest") == image.digest
    for tag in ("v1", "stable"):
        pulled = await client.get(f"/v2/lab/app/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
        assert pulled.status == 200 and pulled.body == image.body, str(pulled)
        assert pulled.header("Docker-Content-Digest") == image.digest
    # Without ?tag= there is nothing to announce.
    again = await client.put(f"/v2/lab/app/manifests/{image.digest}", image.body,
                             headers={"Content-Type": OCI_MANIFEST})
    assert again.status == 201 and "oci-tag" not in again.headers, str(again)


@pytest_twisted.ensureDeferred
async def test_sha512_content_end_to_end(make_registry: Any) -> None:
    """Blobs and manifests by sha512, tagged through ?tag=, pulled by tag and digest, with referrers."""
    registry = make_registry()
    client = Client(registry.url)
    image = await client.push_image("lab/app", seed="sha512", algorithm="sha512")
    assert image.digest.startswith("sha512:")
    reply = await client.put(with_query(f"/v2/lab/app/manifests/{image.digest}", tag="v1"),
                             image.body, headers={"Content-Type": OCI_MANIFEST})
    assert reply.status == 201 and reply.headers.get("oci-tag") == ["v1"], str(reply)
    assert reply.location.endswith(f"/v2/lab/app/manifests/{image.digest}")

    for reference in ("v1", image.digest):
        for method in ("GET", "HEAD"):
            pulled = await client.request(method, f"/v2/lab/app/manifests/{reference}",
                                          headers={"Accept": OCI_MANIFEST})
            assert pulled.status == 200, str(pulled)
            assert pulled.header("Docker-Content-Digest") == image.digest
            assert pulled.header("Content-Type") == OCI_MANIFEST
            if method == "GET":
                assert pulled.body == image.body
    manifest = json.loads(image.body)
    for descriptor, data in zip([manifest["config"], *manifest["layers"]], image.blobs):
        assert descriptor["digest"].startswith("sha512:")
        blob = await client.get(f"/v2/lab/app/blobs/{descriptor['digest']}")
        assert blob.status == 200 and blob.body == data, str(blob)
        assert blob.header("Docker-Content-Digest") == descriptor["digest"]
    assert (await client.get("/v2/lab/app/tags/list")).json()["tags"] == ["v1"]

    # A sha512 referrer of the sha512 subject, listed by the referrers API.
    signature = await client.push_image("lab/app", seed="signature", algorithm="sha512",
                                        artifact_type="application/vnd.example.signature",
                                        subject={"mediaType": OCI_MANIFEST, "digest": image.digest,
                                                 "size": len(image.body)})
    assert signature.reply.header("OCI-Subject") == image.digest
    listed = await client.get(f"/v2/lab/app/referrers/{image.digest}")
    assert listed.status == 200 and listed.header("Content-Type") == OCI_INDEX, str(listed)
    assert [(d["digest"], d["artifactType"]) for d in listed.json()["manifests"]] == \
        [(signature.digest, "application/vnd.example.signature")]

    # An index by sha512 over the sha512 image, tagged the same way.
    index = encode({"schemaVersion": 2, "mediaType": OCI_INDEX,
                    "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.body)}]})
    index_digest = "sha512:" + hashlib.sha512(index).hexdigest()
    reply = await client.put(with_query(f"/v2/lab/app/manifests/{index_digest}", tag="multi"), index,
                             headers={"Content-Type": OCI_INDEX})
    assert reply.status == 201 and reply.headers.get("oci-tag") == ["multi"], str(reply)
    pulled = await client.get("/v2/lab/app/manifests/multi", headers={"Accept": OCI_INDEX})
    assert pulled.status == 200 and pulled.body == index
    assert pulled.header("Docker-Content-Digest") == index_digest

    # Deleting by the sha512 digest removes it and its tag.
    assert (await client.delete(f"/v2/lab/app/manifests/{index_digest}")).status == 202
    assert (await client.get("/v2/lab/app/manifests/multi", headers={"Accept": OCI_INDEX})).status == 404
