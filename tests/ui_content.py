"""A registry filled for the web UI's tests: local images with a rich config, a multi-arch
index, an artifact that refers to an image, a repository under ``public/``, and an image
pulled through the mirror (from tests/fake_upstream.py)."""
from __future__ import annotations

import base64
import json
from typing import Any

import attrs
import bcrypt

from oci_client import OCI_CONFIG, OCI_EMPTY, OCI_LAYER, OCI_MANIFEST, Client, descriptor, digest_of, encode
from registryd.auth.policy import AccessRule
from registryd.auth.settings import AuthSettings
from registryd.config import UpstreamConfig

SBOM = "application/vnd.example.sbom.v1+json"
SIGNATURE = "application/vnd.example.signature.v1+json"
PASSWORD = "pw"


@attrs.frozen
class Filled:
    app_v1: str                 # digests
    app_v2: str
    multi: str
    multi_children: tuple[str, ...]
    sbom: str
    signature: str
    public: str
    mirrored: dict[str, Any]    # the upstream image (tests/upstreams.build_image)
    app_v1_size: int            # manifest + config + layer, as the tag list shows it


def rich_config(architecture: str = "amd64", variant: str | None = None) -> bytes:
    config: dict[str, Any] = {
        "architecture": architecture, "os": "linux", "created": "2026-11-05T10:20:30Z",
        "config": {"Entrypoint": ["/usr/bin/app"], "Cmd": ["--serve", "--port=8080"],
                   "Env": ["PATH=/usr/bin", "APP_MODE=<production>"], "ExposedPorts": {"8080/tcp": {}},
                   "Labels": {"org.opencontainers.image.title": "app", "team": "platform"},
                   "User": "app", "WorkingDir": "/srv/app"},
        "history": [{"created": "2026-11-05T10:20:00Z", "created_by": "ADD rootfs.tar /"},
                    {"created": "2026-11-05T10:20:30Z", "created_by": "CMD [\"--serve\"]", "empty_layer": True}],
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    if variant:
        config["variant"] = variant
    return json.dumps(config).encode()


async def push_rich(client: Client, repo: str, reference: str | None, layer: bytes,
                    architecture: str = "amd64", variant: str | None = None) -> tuple[str, int]:
    """An image whose config has every field the image page shows; (digest, tag-list size)."""
    config = rich_config(architecture, variant)
    await client.push_blob(repo, config)
    await client.push_blob(repo, layer)
    body = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                   "config": descriptor(OCI_CONFIG, config), "layers": [descriptor(OCI_LAYER, layer)],
                   "annotations": {"org.opencontainers.image.source": "https://example.test/app"}})
    digest = digest_of(body)
    reply = await client.push_manifest(repo, reference or digest, body, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    return digest, len(body) + len(config) + len(layer)


async def push_artifact(client: Client, repo: str, subject: str, subject_size: int, artifact_type: str,
                        content: bytes) -> str:
    empty = b"{}"
    await client.push_blob(repo, empty)
    await client.push_blob(repo, content)
    body = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                   "config": descriptor(OCI_EMPTY, empty), "layers": [descriptor("application/json", content)],
                   "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size},
                   "annotations": {"org.opencontainers.image.created": "2026-11-06T00:00:00Z"}})
    digest = digest_of(body)
    reply = await client.push_manifest(repo, digest, body, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    return digest


async def fill(client: Client, fake: Any) -> Filled:
    """Push the local content, pull the mirrored image (a miss, then a hit)."""
    app_v1, app_v1_size = await push_rich(client, "team/app", "v1", b"app layer one" * 500)
    app_v2, _ = await push_rich(client, "team/app", "v2", b"app layer two" * 900)
    amd64, _ = await push_rich(client, "team/multi", None, b"multi amd64" * 300)
    arm64, _ = await push_rich(client, "team/multi", None, b"multi arm64" * 300, "arm64", "v8")
    children = []
    for digest, arch, variant in ((amd64, "amd64", None), (arm64, "arm64", "v8")):
        body = (await client.get(f"/v2/team/multi/manifests/{digest}")).body
        platform = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        children.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "platform": platform})
    index = encode({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": children})
    reply = await client.push_manifest("team/multi", "latest", index, "application/vnd.oci.image.index.v1+json")
    assert reply.status == 201, str(reply)
    v1_body = (await client.get("/v2/team/app/manifests/v1")).body
    sbom = await push_artifact(client, "team/app", app_v1, len(v1_body), SBOM, b'{"packages": ["libc"]}')
    signature = await push_artifact(client, "team/app", app_v1, len(v1_body), SIGNATURE, b'{"sig": "abc"}')
    public, _ = await push_rich(client, "public/hello", "1.0", b"hello layer" * 100)
    mirrored = fake.add_image("lib/app", "v1", layer_sizes=[30_000], seed="ui")
    for _ in range(2):  # a miss, then a hit
        reply = await client.get("/v2/up.test/lib/app/manifests/v1")
        assert reply.status == 200, str(reply)
        for blob in [mirrored["config"]["digest"], *(layer["digest"] for layer in mirrored["layers"])]:
            assert (await client.get(f"/v2/up.test/lib/app/blobs/{blob}")).status == 200
    return Filled(app_v1, app_v2, digest_of(index), (amd64, arm64), sbom, signature, public, mirrored,
                  app_v1_size)


def upstream(fake: Any) -> UpstreamConfig:
    return UpstreamConfig(namespace="up.test", url=fake.url)


def users_file(tmp_path: Any) -> str:
    path = tmp_path / "htpasswd"
    lines = [f"{user}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}"
             for user in ("admin", "viewer")]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def access_settings(tmp_path: Any) -> dict[str, Any]:
    """admin may do everything; viewer and anonymous users may pull only ``public/**``."""
    return {
        "auth": AuthSettings(htpasswd=users_file(tmp_path), admin_users=("admin",)),
        "access": (AccessRule(("admin",), ("**",), frozenset({"pull", "push", "delete"})),
                   AccessRule(("viewer", "anonymous"), ("public/**",), frozenset({"pull"}))),
    }


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()}
