"""Which storage failures mean "the store is unavailable", not "this request is wrong".

An object store that is down, frozen, overloaded, or has lost its bucket or
our credentials fails every request alike. The API answers those with 503
and ``Retry-After`` and logs one line, where any other failure is a bug
worth a traceback.
"""
from __future__ import annotations

from registryd.storage.containerd.errors import ContainerdUnavailable
from registryd.storage.s3.errors import S3Error, S3Unavailable

#: What a store's own failures raise (a disk's, an object store's), beside bugs.
STORE_ERRORS: tuple[type[Exception], ...] = (OSError, S3Error, S3Unavailable, ContainerdUnavailable)
#: An object store's failures only (a disk's OSError is reported with its path elsewhere).
OBJECT_STORE_ERRORS: tuple[type[Exception], ...] = (S3Error, S3Unavailable, ContainerdUnavailable)

#: Seconds a client is asked to wait before trying again.
RETRY_AFTER = 5
#: S3 refusals that no request can get past: the bucket or our access is gone.
_UNUSABLE = frozenset({"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                       "AccountProblem", "AllAccessDisabled"})


def outage_reason(error: BaseException) -> str | None:
    """One line saying why the store cannot serve, or None if ``error`` is something else."""
    if isinstance(error, ContainerdUnavailable):
        return f"containerd unavailable: {error}"
    if isinstance(error, S3Unavailable):
        return f"object store unavailable: {error}"
    if isinstance(error, S3Error) and (error.retryable or error.code in _UNUSABLE):
        return f"object store unavailable: {error}"
    return None
