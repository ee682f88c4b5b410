"""containerd's failures, as registryd's storage layer tells them apart (no gRPC import here:
registryd.storage.outage reads these on every failed request)."""
from __future__ import annotations


class ContainerdUnavailable(Exception):
    """containerd does not answer (its socket is gone, the call timed out): a 503, not a bug."""


class ContainerdError(Exception):
    """containerd refused a call for a reason that is not "not found" or "already exists"."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details
