"""Upstream repositories for the sync tests and benchmark, pushed by skopeo.

Images are tiny and share a base layer: each tag is the base plus a
one-file layer of its own, with a config whose ``created`` is given (so
``keep_latest`` by creation time has something to order). They are written
to an OCI layout (tests/e2e/oci_layout.py) and pushed with ``skopeo copy``,
a few at once, to any registry (docker-registry or registryd).

Seeding a docker-registry takes seconds: ``seed`` does it once into a
directory, ``load_into`` copies that into a test's own upstream (stop,
copy the storage folder, start: a fraction of a second).
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
from typing import Any, Iterable

import attrs

from e2e.oci_layout import (
    OCI_CONFIG, OCI_MANIFEST, Blob, Image, Layer, OCILayout, canonical_json, make_layer,
)
from e2e.skopeo_cli import Skopeo, find_skopeo

BASE = make_layer("base/os-release", b"registryd sync test base\n" * 40)


@attrs.frozen
class TagSpec:
    repository: str
    tag: str
    created: str = "2024-01-01T00:00:00Z"
    salt: str = ""      # changes the image (a tag that moved)


def make_tagged_image(spec: TagSpec) -> Image:
    """The base layer and one layer of its own, created at ``spec.created``."""
    own = make_layer(f"app/{spec.repository}/{spec.tag}", f"{spec.repository}:{spec.tag}{spec.salt}\n".encode())
    layers: tuple[Layer, ...] = (BASE, own)
    config_doc = {"created": spec.created, "architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}}
    config = Blob(OCI_CONFIG, canonical_json(config_doc))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
                "layers": [layer.blob.descriptor() for layer in layers]}
    return Image(Blob(OCI_MANIFEST, canonical_json(manifest), platform={"architecture": "amd64", "os": "linux"}),
                 config, layers)


def push_tags(host: str, specs: Iterable[TagSpec], workdir: str, creds: str | None = None,
              workers: int = 4) -> dict[tuple[str, str], str]:
    """Push every tag to ``host`` (plain http) with skopeo; (repository, tag) -> manifest digest."""
    specs = list(specs)
    os.makedirs(workdir, exist_ok=True)
    layout = OCILayout(os.path.join(workdir, "layout"))
    skopeo = Skopeo(os.path.join(workdir, "skopeo"))
    digests = {}
    refs = []
    for n, spec in enumerate(specs):
        image = layout.add_image(make_tagged_image(spec), f"ref{n}")
        digests[(spec.repository, spec.tag)] = image.manifest.digest
        refs.append((f"ref{n}", spec))

    def copy(item: tuple[str, TagSpec]) -> None:
        ref, spec = item
        argv = [find_skopeo(), *skopeo.global_args, "copy", "-q", "--dest-tls-verify=false",
                *(["--dest-creds", creds] if creds else []),
                f"oci:{layout.root}:{ref}", f"docker://{host}/{spec.repository}:{spec.tag}"]
        for attempt in range(3):
            # docker-registry may answer 500 when pushes of a shared layer race on its disk: try again.
            done = subprocess.run(argv, env=skopeo.env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
            if done.returncode == 0 or b"500" not in done.stderr:
                break
        assert done.returncode == 0, done.stderr.decode(errors="replace")

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(copy, refs))
    return digests


def load_into(upstream: Any, seeded_data_dir: str) -> None:
    """Give a test's docker-registry the repositories seeded once (it is restarted on them)."""
    upstream.stop()
    shutil.rmtree(upstream.data_dir)
    shutil.copytree(seeded_data_dir, upstream.data_dir)
    upstream.start()


def version_tags(repository: str, count: int) -> list[TagSpec]:
    """``1.0.0`` ... ``1.0.<count-1>``, created in that order."""
    return [TagSpec(repository, f"1.0.{i}", f"2024-01-{1 + i % 28:02d}T00:00:{i:02d}Z") for i in range(count)]


def build_tags(repository: str, count: int) -> list[TagSpec]:
    """``build-00`` ...: names that are no versions, created in an order their names do not tell."""
    order = sorted(range(count), key=lambda i: (i * 7) % count)
    return [TagSpec(repository, f"build-{i:02d}", f"2024-03-01T00:{rank:02d}:00Z") for rank, i in enumerate(order)]
