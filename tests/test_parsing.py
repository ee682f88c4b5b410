"""Fast unit tests of the parsers: digests, names, tags, manifests."""
from __future__ import annotations

import hashlib
import json

import pytest

from registryd.digest import digest_of, parse_digest
from registryd.errors import RegistryError
from registryd.manifests import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, parse_manifest
from registryd.names import check_name, is_tag

SHA256 = "sha256:" + hashlib.sha256(b"x").hexdigest()
SHA512 = "sha512:" + hashlib.sha512(b"x").hexdigest()


@pytest.mark.parametrize("text", [SHA256, SHA512])
def test_valid_digests(text: str) -> None:
    assert str(parse_digest(text)) == text


@pytest.mark.parametrize("text", [
    "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + "a" * 64, "md5:" + "a" * 32,
    "sha256", "", "sha256:", ":abc", "sha256:../../etc/passwd", "SHA256:" + "a" * 64,
])
def test_invalid_digests(text: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_digest(text)
    assert info.value.code == "DIGEST_INVALID"
    assert info.value.status == 400


def test_digest_of_both_algorithms() -> None:
    assert str(digest_of(b"x")) == SHA256
    assert str(digest_of(b"x", "sha512")) == SHA512


@pytest.mark.parametrize("name", ["a", "library/alpine", "a-b/c_d/e__f/g.h", "a--b", "x" * 255, "0/1/2/3/4/5"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", [
    "A", "a/", "/a", "a//b", "..", "a/../b", "a/./b", ".a", "a_", "a___b", "a/-b", "_catalog",
    "x" * 256, "a b", "a%2Fb", "a\\b", "",
])
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as info:
        check_name(name)
    assert info.value.code == "NAME_INVALID"


@pytest.mark.parametrize("tag, ok", [
    ("latest", True), ("v1.0-rc_1", True), ("_x", True), ("a" * 128, True),
    ("a" * 129, False), (".x", False), ("-x", False), ("a/b", False), ("a:b", False), ("", False),
])
def test_tags(tag: str, ok: bool) -> None:
    assert is_tag(tag) is ok


def descriptor(media_type: str = "application/octet-stream", data: bytes = b"x") -> dict:
    return {"mediaType": media_type, "size": len(data), "digest": str(digest_of(data))}


def image(**extra) -> dict:
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": descriptor("application/vnd.oci.image.config.v1+json", b"c"),
                "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", b"l")]}
    document.update(extra)
    return document


def test_image_manifest_lists_its_blobs() -> None:
    manifest = parse_manifest(json.dumps(image()).encode(), OCI_MANIFEST)
    assert manifest.media_type == OCI_MANIFEST
    assert [str(d) for d in manifest.blobs] == [str(digest_of(b"c")), str(digest_of(b"l"))]
    assert manifest.artifact_type == "application/vnd.oci.image.config.v1+json"
    assert manifest.subject is None


def test_non_distributable_layers_are_not_required() -> None:
    document = image(layers=[descriptor("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", b"f")])
    manifest = parse_manifest(json.dumps(document).encode(), OCI_MANIFEST)
    assert [str(d) for d in manifest.blobs] == [str(digest_of(b"c"))]


def test_artifact_with_subject() -> None:
    document = image(artifactType="application/example", subject=descriptor(OCI_MANIFEST, b"s"),
                     annotations={"a": "b"})
    manifest = parse_manifest(json.dumps(document).encode(), OCI_MANIFEST)
    assert manifest.artifact_type == "application/example"
    assert str(manifest.subject) == str(digest_of(b"s"))
    assert manifest.annotations == {"a": "b"}


def test_index_children_and_missing_media_type() -> None:
    document = {"schemaVersion": 2, "manifests": [descriptor(OCI_MANIFEST, b"m")]}
    manifest = parse_manifest(json.dumps(document).encode(), None)
    assert manifest.media_type == OCI_INDEX
    assert [str(d) for d in manifest.children] == [str(digest_of(b"m"))]


@pytest.mark.parametrize("data, content_type", [
    (b"not json", OCI_MANIFEST),
    (b"[]", OCI_MANIFEST),
    (json.dumps(image(schemaVersion=1)).encode(), OCI_MANIFEST),
    (json.dumps(image()).encode(), DOCKER_MANIFEST),  # mediaType disagrees with Content-Type
    (json.dumps(image(mediaType="application/x-unknown")).encode(), "application/x-unknown"),
    (json.dumps(image(config={"mediaType": "x", "size": -1, "digest": SHA256})).encode(), OCI_MANIFEST),
    (json.dumps(image(layers=[{"mediaType": "x", "size": 1, "digest": "md5:00"}])).encode(), OCI_MANIFEST),
    (json.dumps(image(layers="x")).encode(), OCI_MANIFEST),
    (json.dumps(image(annotations={"a": 1})).encode(), OCI_MANIFEST),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(), OCI_INDEX),
])
def test_invalid_manifests(data: bytes, content_type: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_manifest(data, content_type)
    assert info.value.code == "MANIFEST_INVALID"
