"""End-to-end: the real skopeo (Debian's 1.9.3) against an in-process registryd.

Deterministic OCI layouts (see ``oci_layout``) are copied into the registry
and back out, and every manifest and blob is compared byte for byte.

The registry runs on this process's reactor, so every test is ``async`` and
skopeo runs in a thread (see ``skopeo_cli``); a plain ``subprocess.run``
here would deadlock. If skopeo is missing these tests fail, they do not skip.

Set ``REGISTRYD_E2E_REFERENCE=1`` to run the same tests against the
reference registry (distribution 2.8, which has no referrers API) instead.
"""
from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, urljoin

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from . import oci_layout as oci
from .reference_registry import reference_registry  # noqa: F401  (dev aid, see module docstring)
from .skopeo_cli import Skopeo, SkopeoError

pytestmark = pytest.mark.timeout(120)

REF_ENV = "REGISTRYD_E2E_REFERENCE"


# -- fixtures ----------------------------------------------------------------

@pytest.fixture
def target(request: Any) -> Any:
    """The registry under test: registryd, or the reference when asked for."""
    if os.environ.get(REF_ENV):
        return request.getfixturevalue("reference_registry")
    return request.getfixturevalue("registry")


@pytest.fixture
def skopeo(tmp_path: Any) -> Skopeo:
    """skopeo with a throw-away configuration (its first call fails if skopeo is missing)."""
    return Skopeo(tmp_path / "skopeo")


@pytest.fixture
def http() -> HTTPClient:
    """A treq client that keeps no connection open after a test."""
    from twisted.internet import reactor

    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


@pytest.fixture
def layout(tmp_path: Any) -> oci.OCILayout:
    return oci.OCILayout(tmp_path / "src")


# -- helpers -----------------------------------------------------------------

def docker_ref(target: Any, repo: str, ref: str = "latest") -> str:
    separator = "@" if ref.startswith("sha256:") else ":"
    return f"docker://{target.host}/{repo}{separator}{ref}"


def docker_repo(target: Any, repo: str) -> str:
    """A repository reference without tag, as ``skopeo list-tags`` wants it."""
    return f"docker://{target.host}/{repo}"


def expected_blobs(*items: Any) -> dict[str, bytes]:
    """Digest -> bytes of every manifest, index, config and layer given."""
    found: dict[str, bytes] = {}
    for item in items:
        if isinstance(item, oci.ImageIndex):
            found[item.digest] = item.index.data
            found.update(expected_blobs(*item.images))
        elif isinstance(item, (oci.Image, oci.Artifact)):
            found[item.digest] = item.manifest.data
            found.update({blob.digest: blob.data for blob in item.blobs()})
        else:
            raise TypeError(item)
    return found


def assert_pulled(out: Any, tag: str, root_digest: str, want: dict[str, bytes]) -> None:
    """The layout at ``out`` tags ``root_digest`` and holds exactly ``want``."""
    desc = oci.resolve_tag(out, tag)
    assert desc["digest"] == root_digest
    got = oci.referenced_digests(out, root_digest)
    assert sorted(got) == sorted(want)
    for digest, data in want.items():
        assert got[digest] == data, f"{digest} differs after the round trip"


def image_with_layers(prefix: str, sizes: list[int], architecture: str = "amd64",
                      variant: str | None = None, base: list[oci.Layer] | None = None) -> oci.Image:
    layers = list(base or []) + oci.sample_layers(prefix, sizes=sizes)
    return oci.make_image(layers, architecture=architecture, variant=variant)


async def body(response: Any) -> bytes:
    return await treq.content(response)


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


async def push_blob_http(http: HTTPClient, target: Any, repo: str, blob: oci.Blob) -> None:
    """POST + PUT monolithic upload (distribution-spec "pushing blobs")."""
    response = await http.head(f"{target.url}/v2/{repo}/blobs/{blob.digest}")
    await body(response)
    if response.code == 200:
        return
    response = await http.post(f"{target.url}/v2/{repo}/blobs/uploads/")
    await body(response)
    assert response.code == 202, f"POST blobs/uploads/ -> {response.code}"
    location = urljoin(target.url + "/", header(response, "Location") or "")
    separator = "&" if "?" in location else "?"
    response = await http.put(f"{location}{separator}digest={quote(blob.digest)}", data=blob.data,
                              headers=Headers({"Content-Type": ["application/octet-stream"]}))
    text = await body(response)
    assert response.code == 201, f"PUT upload -> {response.code} {text!r}"


# -- tests -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_image_round_trip(target: Any, skopeo: Skopeo, layout: oci.OCILayout, tmp_path: Any) -> None:
    """oci: -> registry -> oci: keeps the manifest digest and every blob's bytes."""
    # One layer of 3 MiB of incompressible bytes, so the upload is more than
    # a single read on the server.
    image = layout.add_image(image_with_layers("app", [1024, 3 * 1024 * 1024, 7000]), tag="v1")
    ref = docker_ref(target, "e2e/app", "v1")

    pushed = await skopeo.copy_digest(f"oci:{layout.root}:v1", ref, "--preserve-digests")
    assert pushed == image.digest
    assert await skopeo.inspect_raw(ref) == image.manifest.data
    assert await skopeo.inspect_raw(docker_ref(target, "e2e/app", image.digest)) == image.manifest.data

    out = tmp_path / "out"
    await skopeo.copy(ref, f"oci:{out}:v1", "--preserve-digests")
    assert_pulled(out, "v1", image.digest, expected_blobs(image))

    # By digest too.
    out_digest = tmp_path / "out-digest"
    await skopeo.copy(docker_ref(target, "e2e/app", image.digest), f"oci:{out_digest}:pinned", "--preserve-digests")
    assert_pulled(out_digest, "pinned", image.digest, expected_blobs(image))


@pytest_twisted.ensureDeferred
async def test_image_round_trip_twistd(twistd_registry: Any, skopeo: Skopeo, layout: oci.OCILayout,
                                       tmp_path: Any) -> None:
    """The same round trip against ``twistd -n registryd`` (the packaged entry point)."""
    image = layout.add_image(image_with_layers("twistd", [1500, 256 * 1024]), tag="v1")
    ref = docker_ref(twistd_registry, "e2e/twistd", "v1")
    pushed = await skopeo.copy_digest(f"oci:{layout.root}:v1", ref, "--preserve-digests")
    assert pushed == image.digest
    out = tmp_path / "out"
    await skopeo.copy(ref, f"oci:{out}:v1", "--preserve-digests")
    assert_pulled(out, "v1", image.digest, expected_blobs(image))


@pytest_twisted.ensureDeferred
async def test_image_round_trip_two_workers(skopeo: Skopeo, layout: oci.OCILayout, tmp_path: Any) -> None:
    """The same round trip against a node of two worker processes ([server] workers = 2):
    skopeo's parallel blob uploads and downloads land on both."""
    from twisted.internet.threads import deferToThread

    from conftest import start_twistd, stop_process

    config = tmp_path / "workers.toml"
    config.write_text("[server]\nworkers = 2\n")
    # Off the reactor: start_twistd blocks until the port answers.
    process, node = await deferToThread(start_twistd, str(tmp_path / "data"), "--config", str(config))
    try:
        image = layout.add_image(image_with_layers("workers", [1500, 300_000, 2 * 1024 * 1024, 4096, 80_000]), tag="v1")
        ref = docker_ref(node, "e2e/workers", "v1")
        pushed = await skopeo.copy_digest(f"oci:{layout.root}:v1", ref, "--preserve-digests")
        assert pushed == image.digest
        for attempt in range(3):
            out = tmp_path / f"out{attempt}"
            await skopeo.copy(ref, f"oci:{out}:v1", "--preserve-digests")
            assert_pulled(out, "v1", image.digest, expected_blobs(image))
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            assert len(f.read().split()) == 2, "not two worker processes"
    finally:
        stop_process(process)


@pytest_twisted.ensureDeferred
async def test_inspect_and_list_tags(target: Any, skopeo: Skopeo, layout: oci.OCILayout) -> None:
    image = layout.add_image(image_with_layers("inspect", [2000, 3000, 4000]), tag="v1")
    src = f"oci:{layout.root}:v1"
    for tag in ("v1", "v2", "latest"):
        await skopeo.copy(src, docker_ref(target, "e2e/inspect", tag), "--preserve-digests")

    info = await skopeo.inspect(docker_ref(target, "e2e/inspect", "v1"))
    assert info["Digest"] == image.digest
    assert info["Layers"] == [layer.blob.digest for layer in image.layers]
    assert (info["Architecture"], info["Os"]) == ("amd64", "linux")
    assert sorted(info["RepoTags"]) == ["latest", "v1", "v2"]

    raw = json.loads(await skopeo.inspect_raw(docker_ref(target, "e2e/inspect", "v2")))
    assert raw["mediaType"] == oci.OCI_MANIFEST
    assert raw["config"]["digest"] == image.config.digest
    assert [layer["digest"] for layer in raw["layers"]] == info["Layers"]

    # --config --raw fetches the config blob itself.
    config = await skopeo.inspect_raw(docker_ref(target, "e2e/inspect", "latest"), "--config")
    assert oci.sha256_digest(config) == image.config.digest
    assert config == image.config.data

    tags = await skopeo.list_tags(docker_repo(target, "e2e/inspect"))
    assert sorted(tags["Tags"]) == ["latest", "v1", "v2"]
    assert tags["Repository"] == f"{target.host}/e2e/inspect"


@pytest_twisted.ensureDeferred
async def test_delete(target: Any, skopeo: Skopeo, layout: oci.OCILayout) -> None:
    """skopeo delete resolves the tag and DELETEs the manifest by digest."""
    one = layout.add_image(image_with_layers("delete-one", [1500, 2500]), tag="one")
    two = layout.add_image(image_with_layers("delete-two", [1600]), tag="two")
    await skopeo.copy(f"oci:{layout.root}:one", docker_ref(target, "e2e/delete", "v1"), "--preserve-digests")
    await skopeo.copy(f"oci:{layout.root}:two", docker_ref(target, "e2e/delete", "v2"), "--preserve-digests")

    await skopeo.delete(docker_ref(target, "e2e/delete", "v1"))

    for ref in (docker_ref(target, "e2e/delete", "v1"), docker_ref(target, "e2e/delete", one.digest)):
        with pytest.raises(SkopeoError) as failed:
            await skopeo.inspect_raw(ref)
        assert "manifest unknown" in failed.value.result.text.lower(), failed.value.result.text

    # The other image in the repository is untouched.
    assert await skopeo.inspect_raw(docker_ref(target, "e2e/delete", "v2")) == two.manifest.data
    tags = await skopeo.list_tags(docker_repo(target, "e2e/delete"))
    assert tags["Tags"] == ["v2"]

    # Deleting again: the manifest is unknown now.
    with pytest.raises(SkopeoError):
        await skopeo.delete(docker_ref(target, "e2e/delete", one.digest))


@pytest_twisted.ensureDeferred
async def test_multi_arch_index_round_trip(target: Any, skopeo: Skopeo, layout: oci.OCILayout,
                                           tmp_path: Any) -> None:
    """--all copies the index and every platform; no digest changes."""
    base = oci.sample_layers("multi-base", sizes=[5000])
    amd64 = image_with_layers("multi-amd64", [1100, 2200], "amd64", base=base)
    arm64 = image_with_layers("multi-arm64", [1300, 2400], "arm64", variant="v8", base=base)
    index = layout.add_index(oci.make_index([amd64, arm64]), tag="v1")
    ref = docker_ref(target, "e2e/multi", "v1")

    pushed = await skopeo.copy_digest(f"oci:{layout.root}:v1", ref, "--all", "--preserve-digests")
    assert pushed == index.digest
    raw = await skopeo.inspect_raw(ref)
    assert raw == index.index.data
    for image in (amd64, arm64):
        assert await skopeo.inspect_raw(docker_ref(target, "e2e/multi", image.digest)) == image.manifest.data

    # Platform selection reads the index, then the arm64 manifest and config.
    info = await skopeo.inspect(ref, "--override-arch", "arm64", "--override-os", "linux")
    assert info["Architecture"] == "arm64"
    assert info["Layers"] == [layer.blob.digest for layer in arm64.layers]

    out = tmp_path / "out"
    await skopeo.copy(ref, f"oci:{out}:v1", "--all", "--preserve-digests")
    assert_pulled(out, "v1", index.digest, expected_blobs(index))


@pytest_twisted.ensureDeferred
async def test_artifact_round_trip(target: Any, skopeo: Skopeo, layout: oci.OCILayout, tmp_path: Any) -> None:
    """An artifact (artifactType, empty config, subject) survives skopeo both ways.

    skopeo 1.9.3 copies it unchanged with --preserve-digests; only the
    non-raw ``skopeo inspect`` refuses it ("unsupported image-specific
    operation on artifact"), so only ``--raw`` is used here.
    """
    image = layout.add_image(image_with_layers("subject", [1800, 900]), tag="v1")
    artifact = layout.add_artifact(oci.make_artifact(image.manifest), tag="sbom")
    await skopeo.copy(f"oci:{layout.root}:v1", docker_ref(target, "e2e/artifact", "v1"), "--preserve-digests")

    # Pushed by digest: artifacts usually carry no tag.
    by_digest = docker_ref(target, "e2e/artifact", artifact.digest)
    pushed = await skopeo.copy_digest(f"oci:{layout.root}:sbom", by_digest, "--preserve-digests")
    assert pushed == artifact.digest
    assert await skopeo.inspect_raw(by_digest) == artifact.manifest.data
    empty = await skopeo.inspect_raw(by_digest, "--config")
    assert empty == oci.EMPTY_JSON

    out = tmp_path / "out"
    await skopeo.copy(by_digest, f"oci:{out}:sbom", "--preserve-digests")
    assert_pulled(out, "sbom", artifact.digest, expected_blobs(artifact))


@pytest_twisted.ensureDeferred
async def test_referrers_list_artifact_pushed_by_skopeo(target: Any, skopeo: Skopeo, layout: oci.OCILayout,
                                                        http: HTTPClient) -> None:
    """GET /v2/<name>/referrers/<digest> lists artifacts whose subject is the image.

    The first artifact is pushed by skopeo; skopeo cannot show response
    headers, so a second one (another artifactType) is pushed with plain
    HTTP to check the ``OCI-Subject`` header and the artifactType filter.
    """
    repo = "e2e/referrers"
    image = layout.add_image(image_with_layers("referred", [1234]), tag="v1")
    sbom = layout.add_artifact(oci.make_artifact(image.manifest), tag="sbom")
    await skopeo.copy(f"oci:{layout.root}:v1", docker_ref(target, repo, "v1"), "--preserve-digests")
    await skopeo.copy(f"oci:{layout.root}:sbom", docker_ref(target, repo, sbom.digest), "--preserve-digests")

    signature = oci.make_artifact(image.manifest, artifact_type="application/vnd.registryd.e2e.signature.v1",
                                  payload=b"not really a signature",
                                  payload_media_type="application/vnd.registryd.e2e.signature.v1")
    for blob in signature.blobs():
        await push_blob_http(http, target, repo, blob)
    response = await http.put(f"{target.url}/v2/{repo}/manifests/{signature.digest}",
                              data=signature.manifest.data, headers=Headers({"Content-Type": [oci.OCI_MANIFEST]}))
    text = await body(response)
    assert response.code == 201, f"PUT manifest with subject -> {response.code} {text!r}"
    # distribution-spec 1.1: a registry that supports referrers MUST answer
    # a manifest with a subject with OCI-Subject: <subject digest>.
    assert header(response, "OCI-Subject") == image.digest

    url = f"{target.url}/v2/{repo}/referrers/{image.digest}"
    response = await http.get(url)
    listing = json.loads(await body(response))
    assert response.code == 200
    assert (header(response, "Content-Type") or "").startswith(oci.OCI_INDEX)
    assert listing["schemaVersion"] == 2
    assert listing["mediaType"] == oci.OCI_INDEX
    by_digest = {desc["digest"]: desc for desc in listing["manifests"]}
    assert sorted(by_digest) == sorted([sbom.digest, signature.digest])
    for artifact in (sbom, signature):
        desc = by_digest[artifact.digest]
        assert desc["mediaType"] == oci.OCI_MANIFEST
        assert desc["size"] == artifact.manifest.size
        assert desc["artifactType"] == artifact.artifact_type
        assert desc.get("annotations") == artifact.manifest.json()["annotations"]

    response = await http.get(url, params={"artifactType": sbom.artifact_type})
    filtered = json.loads(await body(response))
    assert response.code == 200
    assert header(response, "OCI-Filters-Applied") == "artifactType"
    assert [desc["digest"] for desc in filtered["manifests"]] == [sbom.digest]

    response = await http.get(url, params={"artifactType": "application/vnd.registryd.e2e.none"})
    filtered = json.loads(await body(response))
    assert response.code == 200
    assert header(response, "OCI-Filters-Applied") == "artifactType"
    assert filtered["manifests"] == []

    # No referrers is an empty index, not a 404.
    other = image_with_layers("unreferred", [10])
    response = await http.get(f"{target.url}/v2/{repo}/referrers/{other.digest}")
    empty = json.loads(await body(response))
    assert response.code == 200
    assert empty["manifests"] == []


@pytest_twisted.ensureDeferred
async def test_docker_schema2_round_trip(target: Any, skopeo: Skopeo, layout: oci.OCILayout,
                                         tmp_path: Any) -> None:
    """Docker schema 2 manifests: converted by skopeo, and pushed verbatim."""
    image = layout.add_image(image_with_layers("docker", [2100, 3100]), tag="v1")

    # 1. skopeo converts the OCI layout to schema 2 on the way in.
    ref = docker_ref(target, "e2e/docker", "converted")
    pushed = await skopeo.copy_digest(f"oci:{layout.root}:v1", ref, "--format", "v2s2")
    raw = await skopeo.inspect_raw(ref)
    assert oci.sha256_digest(raw) == pushed
    manifest = json.loads(raw)
    assert manifest["mediaType"] == oci.DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == oci.DOCKER_CONFIG
    assert [layer["digest"] for layer in manifest["layers"]] == [layer.blob.digest for layer in image.layers]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {oci.DOCKER_LAYER_GZIP}

    # dir: keeps the schema 2 manifest as the registry served it.
    out = tmp_path / "out-converted"
    await skopeo.copy(ref, f"dir:{out}", "--preserve-digests")
    got_manifest, got_blobs = oci.read_docker_dir(out)
    assert got_manifest == raw
    for layer in image.layers:
        assert got_blobs[layer.blob.digest] == layer.blob.data
    for digest, data in got_blobs.items():
        assert oci.sha256_digest(data) == digest

    # 2. Our own deterministic schema 2 manifest, pushed byte for byte from
    # a dir: image (the oci: transport cannot hold a Docker manifest).
    docker_image = oci.make_docker_image(oci.sample_layers("docker-verbatim", sizes=[1700, 2700]))
    src = tmp_path / "docker-src"
    oci.write_docker_dir(src, docker_image)
    ref = docker_ref(target, "e2e/docker", "verbatim")
    pushed = await skopeo.copy_digest(f"dir:{src}", ref, "--preserve-digests")
    assert pushed == docker_image.digest
    assert await skopeo.inspect_raw(ref) == docker_image.manifest.data
    info = await skopeo.inspect(ref)
    assert info["Digest"] == docker_image.digest
    assert info["Layers"] == [layer.blob.digest for layer in docker_image.layers]

    out = tmp_path / "out-verbatim"
    await skopeo.copy(ref, f"dir:{out}", "--preserve-digests")
    got_manifest, got_blobs = oci.read_docker_dir(out)
    assert got_manifest == docker_image.manifest.data
    assert got_blobs == {blob.digest: blob.data for blob in docker_image.blobs()}

    # Pulling into an OCI layout converts back to OCI, still the same layers.
    out_oci = tmp_path / "out-oci"
    await skopeo.copy(ref, f"oci:{out_oci}:v1")
    desc = oci.resolve_tag(out_oci, "v1")
    converted = json.loads(oci.read_blob(out_oci, desc["digest"]))
    assert converted["mediaType"] == oci.OCI_MANIFEST
    assert [layer["digest"] for layer in converted["layers"]] == info["Layers"]


@pytest_twisted.ensureDeferred
async def test_shared_blob_cross_repo_mount(target: Any, skopeo: Skopeo, layout: oci.OCILayout,
                                            http: HTTPClient, tmp_path: Any) -> None:
    """A layer already in one repository is mounted, not re-uploaded, into another.

    skopeo remembers where it pushed each blob (its blob-info cache) and, for
    the second push, tries ``POST /v2/<two>/blobs/uploads/?mount=<d>&from=<one>``.
    """
    base = oci.sample_layers("shared-base", sizes=[64 * 1024])
    first = layout.add_image(image_with_layers("shared-one", [1000], base=base), tag="one")
    second = layout.add_image(image_with_layers("shared-two", [2000], base=base), tag="two")
    shared = base[0].blob.digest

    await skopeo.copy(f"oci:{layout.root}:one", docker_ref(target, "e2e/first", "v1"), "--preserve-digests")
    result = await skopeo.copy(f"oci:{layout.root}:two", docker_ref(target, "e2e/second", "v1"),
                               "--preserve-digests", debug=True)
    log = result.text
    assert (f"Trying to mount /v2/e2e/second/blobs/uploads/?from=e2e%2Ffirst&mount={quote(shared, safe='')}"
            in log), log
    assert "mount OK" in log, "registry did not complete the cross-repository mount:\n" + log

    response = await http.head(f"{target.url}/v2/e2e/second/blobs/{shared}")
    await body(response)
    assert response.code == 200
    assert header(response, "Docker-Content-Digest") == shared
    assert header(response, "Content-Length") == str(base[0].blob.size)

    out = tmp_path / "out"
    await skopeo.copy(docker_ref(target, "e2e/second", "v1"), f"oci:{out}:v1", "--preserve-digests")
    assert_pulled(out, "v1", second.digest, expected_blobs(second))

    # Deleting the first image leaves the second one whole.
    await skopeo.delete(docker_ref(target, "e2e/first", "v1"))
    out_again = tmp_path / "out-again"
    await skopeo.copy(docker_ref(target, "e2e/second", "v1"), f"oci:{out_again}:v1", "--preserve-digests")
    assert_pulled(out_again, "v1", second.digest, expected_blobs(second))
    assert first.digest != second.digest


@pytest_twisted.ensureDeferred
async def test_copy_between_repositories(target: Any, skopeo: Skopeo, layout: oci.OCILayout,
                                         tmp_path: Any) -> None:
    """docker:// to docker:// within one registryd, for an image and an index."""
    image = layout.add_image(image_with_layers("copy-image", [4000, 800]), tag="image")
    index = layout.add_index(oci.make_index([
        image_with_layers("copy-amd64", [900], "amd64"),
        image_with_layers("copy-arm64", [950], "arm64", variant="v8"),
    ]), tag="index")
    await skopeo.copy(f"oci:{layout.root}:image", docker_ref(target, "e2e/copy-src", "image"), "--preserve-digests")
    await skopeo.copy(f"oci:{layout.root}:index", docker_ref(target, "e2e/copy-src", "index"),
                      "--all", "--preserve-digests")

    copied = await skopeo.copy_digest(docker_ref(target, "e2e/copy-src", "image"),
                                      docker_ref(target, "e2e/copy-dst/nested", "image"), "--preserve-digests")
    assert copied == image.digest
    copied = await skopeo.copy_digest(docker_ref(target, "e2e/copy-src", "index"),
                                      docker_ref(target, "e2e/copy-dst/nested", "index"), "--all", "--preserve-digests")
    assert copied == index.digest

    tags = await skopeo.list_tags(docker_repo(target, "e2e/copy-dst/nested"))
    assert sorted(tags["Tags"]) == ["image", "index"]
    out = tmp_path / "out"
    await skopeo.copy(docker_ref(target, "e2e/copy-dst/nested", "image"), f"oci:{out}:image", "--preserve-digests")
    await skopeo.copy(docker_ref(target, "e2e/copy-dst/nested", "index"), f"oci:{out}:index",
                      "--all", "--preserve-digests")
    assert_pulled(out, "image", image.digest, expected_blobs(image))
    assert_pulled(out, "index", index.digest, expected_blobs(index))
