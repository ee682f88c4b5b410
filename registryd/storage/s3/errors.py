"""What the S3 client raises: an answer we did not want, or no answer at all.

``S3Error`` carries the endpoint's own status and code (``NoSuchKey``,
``PreconditionFailed``, ``SignatureDoesNotMatch``...), parsed from the XML
error document. ``S3Unavailable`` means the store could not be reached or
stopped talking (refused, reset, DNS, TLS, timeouts): the caller may try
again later. Both print as one line.
"""
from __future__ import annotations

from registryd.storage.driver import TooLarge

# Codes for answers without a body (HEAD) or with one we cannot read.
_STATUS_CODES = {
    301: "PermanentRedirect", 304: "NotModified", 400: "BadRequest", 403: "AccessDenied",
    404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict", 411: "MissingContentLength",
    412: "PreconditionFailed", 416: "InvalidRange", 429: "SlowDown", 500: "InternalError",
    501: "NotImplemented", 503: "ServiceUnavailable",
}


class S3Error(Exception):
    """The endpoint answered with an error status."""

    def __init__(self, status: int, code: str | None, message: str = "", key: str | None = None,
                 operation: str = "") -> None:
        self.status = status
        self.code = code or _STATUS_CODES.get(status, f"HTTP{status}")
        self.message = " ".join(message.split())
        self.key = key
        self.operation = operation
        super().__init__(str(self))

    def __str__(self) -> str:
        where = " ".join(part for part in (self.operation, self.key) if part)
        text = f"S3 {where}: " if where else "S3: "
        text += f"{self.status} {self.code}"
        return f"{text}: {self.message}" if self.message else text

    @property
    def retryable(self) -> bool:
        """True for the endpoint's transient refusals (overload, internal errors)."""
        return self.status >= 500 or self.status == 429 or self.code == "SlowDown"


class S3Unavailable(Exception):
    """The object store could not be reached, or stopped answering."""


class ObjectTooLarge(S3Error, TooLarge):
    """A small object (``get_small``) was larger than the caller accepts."""

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(200, "ObjectTooLarge", f"larger than {limit} bytes", key, "GET")
