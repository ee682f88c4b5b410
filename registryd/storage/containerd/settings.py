"""The ``[storage.containerd]`` table: which containerd, which namespace, under which name.

::

    [storage.containerd]
    socket = "/run/containerd/containerd.sock"   # containerd's gRPC socket
    namespace = "k8s.io"                         # the kubelet's
    hostname = "node1.example"                   # pushed team/app:1.0 is image node1.example/team/app:1.0
    read_only = false                            # true: serve the node's images, accept no push or delete
                                                 # (a pull-through cache still fills containerd)
    foreign_names = false                        # true: pushes and deletes may change images named
                                                 # after another registry (docker.io/library/x)
    content_dir = "/var/lib/containerd/io.containerd.content.v1.content"
    timeout = 30                                 # seconds one call may take
"""
from __future__ import annotations

import re
import socket as sockets

import attrs

from registryd.schema import SettingError, not_empty, positive, setting

#: containerd's namespace grammar (its ``namespaces.Validate``).
_NAMESPACE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
#: A registry host as image names start with it: host[:port], lowercase.
_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[0-9]{1,5})?$")
DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_CONTENT_DIR = "/var/lib/containerd/io.containerd.content.v1.content"


def machine_hostname() -> str:
    """The machine's host name, lowercase: the default name pushed images are recorded under."""
    return sockets.gethostname().lower() or "localhost"


def _namespace(where: str, value: str) -> str:
    if len(value) > 76 or not _NAMESPACE.match(value):
        raise SettingError(f"'{where}' must be a containerd namespace such as k8s.io or default, not {value!r}")
    return value


def _hostname(where: str, value: str) -> str:
    if not _HOST.match(value.lower()):
        raise SettingError(f"'{where}' must be a registry host such as node1.example or node1:5000, "
                           f"not {value!r}")
    return value.lower()


def _socket(where: str, value: str) -> str:
    value = not_empty(where, value)
    if not value.startswith("/"):
        raise SettingError(f"'{where}' must be an absolute path to containerd's socket, not {value!r}")
    return value


def _content_dir(where: str, value: str) -> str:
    if value and not value.startswith("/"):
        raise SettingError(f"'{where}' must be an absolute path (or \"\" to always read through the "
                           f"content service), not {value!r}")
    return value.rstrip("/")


@attrs.frozen
class ContainerdSettings:
    """``[storage.containerd]``, after validation."""

    socket: str = setting(DEFAULT_SOCKET, str, _socket, "containerd's gRPC socket")
    namespace: str = setting("k8s.io", str, _namespace, "the containerd namespace served (the kubelet's)")
    hostname: str = setting(kind=str, check=_hostname, factory=machine_hostname,
                            doc="pushed images are named <hostname>/<repository>; default: this machine's name")
    read_only: bool = setting(False, bool, doc="serve the node's images, accept no push or delete")
    foreign_names: bool = setting(False, bool, doc="pushes and deletes may change images named after "
                                                   "another registry's host (docker.io/library/x)")
    content_dir: str = setting(DEFAULT_CONTENT_DIR, str, _content_dir,
                               "containerd's content folder: blobs are sent from its files when readable")
    timeout: int = setting(30, int, positive, "seconds one call to containerd may take")
