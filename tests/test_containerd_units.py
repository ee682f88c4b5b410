"""The containerd store's pure parts: image names, GC labels, the [storage.containerd] table,
and how gRPC failures become registryd's (no daemon: the e2e tier runs a real one)."""
from __future__ import annotations

import json
import socket

import grpc
import pytest
import pytest_twisted

from registryd.config import ConfigError, load_config
from registryd.digest import digest_of
from registryd.storage.containerd.blobs import READ_CHUNK, StreamedBlobSource
from registryd.storage.containerd.client import AlreadyExists, NotFound, translate
from registryd.storage.containerd.errors import ContainerdError, ContainerdUnavailable
from registryd.storage.containerd.labels import gc_labels, references
from registryd.storage.containerd.names import (
    ImageName, LocalNaming, MirrorNaming, parse_image_name, source_label,
)
from registryd.storage.interface import BlobGone
from registryd.storage.outage import outage_reason

D1 = digest_of(b"one")
D2 = digest_of(b"two")
D3 = digest_of(b"three")


# -- names --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,parsed", [
    ("registry.example/team/app:1.0", ImageName("registry.example/team/app", tag="1.0")),
    ("localhost:5000/app:v1", ImageName("localhost:5000/app", tag="v1")),
    (f"docker.io/library/alpine@{D1}", ImageName("docker.io/library/alpine", digest=D1)),
    ("localhost:5000/app", None),                 # the port is no tag
    ("docker.io/library/alpine@sha256:short", None),
    ("node/app:bad/tag", None),
    ("import-2024-01-01:", None),
])
def test_image_names_are_taken_apart(name: str, parsed: ImageName | None) -> None:
    assert parse_image_name(name) == parsed


def test_local_names_are_the_hostname_or_a_host_of_their_own() -> None:
    local = LocalNaming("registry.example")
    assert local.image_repository("team/app") == "registry.example/team/app"
    assert local.image_repository("docker.io/library/alpine") == "docker.io/library/alpine"
    assert local.repository("registry.example/team/app") == "team/app"
    assert local.repository("docker.io/library/alpine") == "docker.io/library/alpine"
    # No host, or a name no repository can have: not served.
    assert local.repository("library/alpine") is None
    assert local.repository("registry.example/Team/App") is None
    assert local.repository("localhost:5000/app") is None


def test_a_name_that_starts_with_another_host_is_foreign() -> None:
    local = LocalNaming("registry.example:5000")
    assert local.foreign_host("docker.io/library/alpine") == "docker.io"
    assert local.foreign_host("localhost/app") == "localhost"
    assert local.foreign_host("quay.io:443/team/app") == "quay.io:443"
    # Its own host name, or no host at all: recorded under registryd's own name.
    assert local.foreign_host("registry.example:5000/team/app") is None
    assert local.foreign_host("team/app") is None and local.foreign_host("app") is None
    assert local.foreign_host("my_team/app") is None


def test_mirror_names_are_under_their_namespace() -> None:
    hub = MirrorNaming("docker.io")
    assert hub.image_repository("library/alpine") == "docker.io/library/alpine"
    assert hub.repository("docker.io/library/alpine") == "library/alpine"
    assert hub.repository("quay.io/library/alpine") is None
    assert source_label("docker.io/library/alpine") == ("containerd.io/distribution.source.docker.io",
                                                        "library/alpine")


# -- labels -------------------------------------------------------------------------------

def test_gc_labels_name_config_layers_and_child_manifests() -> None:
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": str(D1), "size": 1},
                           "layers": [{"digest": str(D2), "size": 2}, {"digest": str(D3), "size": 3}]}).encode()
    assert gc_labels(manifest) == {"containerd.io/gc.ref.content.config": str(D1),
                                   "containerd.io/gc.ref.content.l.0": str(D2),
                                   "containerd.io/gc.ref.content.l.1": str(D3)}
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": str(D1), "size": 1},
        {"digest": "not a digest"}]}).encode()
    assert gc_labels(index) == {"containerd.io/gc.ref.content.m.0": str(D1)}
    assert references(index).manifests == ((D1, "application/vnd.oci.image.manifest.v1+json"),)
    assert gc_labels(b"not json") == {} and references(b"[1]").blobs == ()


# -- [storage.containerd] -----------------------------------------------------------------

def write(tmp_path: object, text: str) -> str:
    path = f"{tmp_path}/registryd.toml"
    with open(path, "w") as f:
        f.write(text)
    return path


def test_containerd_table_defaults(tmp_path: object) -> None:
    config = load_config(write(tmp_path, '[storage]\ndriver = "containerd"\n'))
    settings = config.storage.containerd
    assert settings is not None
    assert (settings.socket, settings.namespace, settings.read_only, settings.foreign_names) == \
        ("/run/containerd/containerd.sock", "k8s.io", False, False)
    assert settings.hostname == socket.gethostname().lower()


def test_containerd_table_values(tmp_path: object) -> None:
    config = load_config(write(tmp_path, '[storage]\ndriver = "containerd"\n[storage.containerd]\n'
                                         'socket = "/tmp/c.sock"\nnamespace = "default"\n'
                                         'hostname = "Node1.Example:5000"\nread_only = true\n'
                                         'content_dir = ""\nforeign_names = true\n'))
    settings = config.storage.containerd
    assert settings is not None
    assert (settings.socket, settings.namespace, settings.hostname, settings.read_only, settings.content_dir,
            settings.foreign_names) == ("/tmp/c.sock", "default", "node1.example:5000", True, "", True)


@pytest.mark.parametrize("table,message", [
    ('namespace = "k8s io"', "'storage.containerd.namespace' must be a containerd namespace"),
    ('hostname = "a/b"', "'storage.containerd.hostname' must be a registry host"),
    ('socket = "run/containerd.sock"', "'storage.containerd.socket' must be an absolute path"),
    ('read_only = "yes"', "'storage.containerd.read_only' must be"),
    ('foreign_names = 1', "'storage.containerd.foreign_names' must be"),
    ('sockets = "/x"', "unknown key 'storage.containerd.sockets'"),
])
def test_bad_containerd_values_are_one_line(tmp_path: object, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f'[storage]\ndriver = "containerd"\n[storage.containerd]\n{table}\n'))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_containerd_table_needs_the_driver(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match=r'\[storage.containerd\] is only used with storage.driver = "containerd"'):
        load_config(write(tmp_path, '[storage.containerd]\nnamespace = "default"\n'))


# -- gRPC failures ------------------------------------------------------------------------

class Failed(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A failed call as grpcio raises it: an RpcError that is also a Call with a code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None: ...
    def trailing_metadata(self) -> None: ...
    def is_active(self) -> bool: return False
    def time_remaining(self) -> None: ...
    def cancel(self) -> bool: return False
    def add_callback(self, callback: object) -> bool: return False


def test_grpc_failures_become_registryd_errors() -> None:
    method = "/containerd.services.content.v1.Content/Info"
    assert isinstance(translate(method, Failed(grpc.StatusCode.NOT_FOUND, "x")), NotFound)
    assert isinstance(translate(method, Failed(grpc.StatusCode.ALREADY_EXISTS, "x")), AlreadyExists)
    down = translate(method, Failed(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(down, ContainerdUnavailable)
    assert outage_reason(down) == "containerd unavailable: Content.Info: unavailable: connection refused"
    refused = translate(method, Failed(grpc.StatusCode.FAILED_PRECONDITION, "bad"))
    assert isinstance(refused, ContainerdError) and outage_reason(refused) is None


# -- the generated messages ---------------------------------------------------------------

def test_the_compiled_messages_are_the_protos() -> None:
    """containerd_api_pb2 is compiled from containerd_api.proto at build time (setup.py): every
    message, field and field number of the .proto is in the module, and nothing else is
    (an editable tree whose .proto changed without a rebuild fails here)."""
    import os
    import re

    import registryd.storage.containerd.proto as proto
    from registryd.storage.containerd.proto import containerd_api_pb2

    with open(os.path.join(os.path.dirname(proto.__file__), "containerd_api.proto")) as f:
        text = re.sub(r"//[^\n]*", "", f.read())
    declared: dict[str, dict[str, int]] = {}
    for name, body in re.findall(r"message\s+(\w+)\s*\{([^}]*)\}", text):
        declared[name] = {field: int(number) for field, number in re.findall(r"(\w+)\s*=\s*(\d+)\s*;", body)}
    assert len(declared) > 30
    compiled = {
        name: {field.name: field.number for field in message.fields}
        for name, message in containerd_api_pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert compiled == declared


class _Consumer:
    """Takes what a blob source sends."""

    def __init__(self) -> None:
        self.data = b""

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data


class _Content:
    """containerd's content service, holding a blob until ``lose_after`` reads were answered."""

    def __init__(self, blob: bytes, lose_after: int) -> None:
        self.blob, self.reads = blob, lose_after

    async def read(self, ref: str, offset: int, size: int) -> bytes:
        if self.reads == 0:
            raise NotFound(ref)
        self.reads -= 1
        return self.blob[offset:offset + size]


@pytest_twisted.ensureDeferred
async def test_a_blob_deleted_before_its_first_byte_is_gone_and_after_it_is_an_error() -> None:
    """Gone before anything was sent: the request may still be answered (404, a fill again);
    gone midway: the response must be cut, so it is not the same error."""
    blob = b"x" * (READ_CHUNK + 10)
    digest = digest_of(blob)
    with pytest.raises(BlobGone):
        await StreamedBlobSource(_Content(blob, 0), digest, len(blob)).send(_Consumer(), 0, len(blob))
    consumer = _Consumer()
    with pytest.raises(NotFound) as raised:
        await StreamedBlobSource(_Content(blob, 1), digest, len(blob)).send(consumer, 0, len(blob))
    assert not isinstance(raised.value, BlobGone) and len(consumer.data) == READ_CHUNK
    consumer = _Consumer()
    await StreamedBlobSource(_Content(blob, 2), digest, len(blob)).send(consumer, 0, len(blob))
    assert consumer.data == blob
