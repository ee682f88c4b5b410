"""Registry errors as the OCI distribution spec names them.

Handlers raise these; one place in the web layer turns them into the spec's
JSON error document, so a client never sees anything else.
"""
from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class RegistryError(Exception):
    """An error the client is told about: HTTP status, OCI code, message."""

    status: int
    code: str
    message: str
    detail: Any = None
    headers: dict[str, str] = attrs.field(factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def document(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})


def blob_upload_unknown(upload_id: str) -> RegistryError:
    return RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", {"id": upload_id})


def blob_upload_invalid(why: str) -> RegistryError:
    return RegistryError(400, "BLOB_UPLOAD_INVALID", f"blob upload invalid: {why}")


def digest_invalid(why: str, digest: str | None = None) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", why, {"digest": digest} if digest is not None else None)


def manifest_unknown(reference: str) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", "manifest unknown to registry", {"reference": reference})


def manifest_invalid(why: str) -> RegistryError:
    return RegistryError(400, "MANIFEST_INVALID", f"manifest invalid: {why}")


def manifest_blob_unknown(digest: str) -> RegistryError:
    return RegistryError(400, "MANIFEST_BLOB_UNKNOWN", "manifest references a blob or manifest unknown to the repository",
                         {"digest": digest})


def name_invalid(name: str, why: str = "invalid repository name") -> RegistryError:
    return RegistryError(400, "NAME_INVALID", why, {"name": name})


def name_unknown(name: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})


def range_invalid(size: int, location: str | None = None) -> RegistryError:
    """416 for an upload chunk that does not start where the upload ends."""
    headers = {"Range": f"0-{max(size - 1, 0)}"}
    if location:
        headers["Location"] = location
    return RegistryError(416, "BLOB_UPLOAD_INVALID", "chunk does not continue the upload where it ends",
                         {"size": size}, headers)


def denied(message: str) -> RegistryError:
    return RegistryError(405, "DENIED", message)


def unsupported(message: str, status: int = 405) -> RegistryError:
    return RegistryError(status, "UNSUPPORTED", message)


def too_large(what: str, limit: int) -> RegistryError:
    return RegistryError(413, "SIZE_INVALID", f"{what} is larger than the limit of {limit} bytes", {"limit": limit})


def pagination_invalid(value: str) -> RegistryError:
    return RegistryError(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested", {"n": value})


def not_found() -> RegistryError:
    return RegistryError(404, "UNSUPPORTED", "no such endpoint")


def method_not_allowed(allowed: list[str]) -> RegistryError:
    return RegistryError(405, "UNSUPPORTED", "method not allowed on this endpoint",
                         headers={"Allow": ", ".join(allowed)} if allowed else {})
