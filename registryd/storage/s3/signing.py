"""AWS Signature Version 4 for S3, computed by botocore, sent by Twisted.

botocore is used for the signature only: its import costs about 30 MiB of
RSS, so it happens when a Signer is made (S3 is configured), never at module
import. No request goes through botocore's pipeline, so none of its default
CRC checksum trailers are sent (Ceph 16's radosgw rejects them).

A body is signed by its SHA-256 when it is small bytes already in memory;
streamed bodies (files, parts) are sent as ``UNSIGNED-PAYLOAD``, which S3
accepts for every operation, so a 5 GiB part is never read twice.
"""
from __future__ import annotations

import types
from typing import Any, Mapping

#: SigV4 presigned URLs live at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


class Signer:
    """Signs requests for one set of credentials and one region."""

    def __init__(self, access_key_id: str, secret_access_key: str, region: str) -> None:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        self._request_class = AWSRequest
        self._credentials = Credentials(access_key_id, secret_access_key)
        self._region = region
        self._auth = S3SigV4Auth(self._credentials, "s3", region)
        # botocore reads the payload-signing choice from the client config.
        self._sign_payload = {flag: types.SimpleNamespace(s3={"payload_signing_enabled": flag})
                              for flag in (True, False)}

    def sign(self, method: str, url: str, headers: Mapping[str, str], payload: bytes | None) -> dict[str, str]:
        """The headers to send: ``headers`` plus date, content hash and Authorization.

        ``payload`` is the whole body when it is small bytes (signed by its
        hash; ``b""`` for none), or None for a streamed, unsigned body.
        """
        request: Any = self._request_class(method=method, url=url, headers=dict(headers),
                                           data=payload or b"")
        request.context["client_config"] = self._sign_payload[payload is not None]
        self._auth.add_auth(request)
        return {name: value for name, value in request.headers.items()}

    def presign(self, url: str, expires: int) -> str:
        """``url`` with a query-string signature valid for ``expires`` seconds (GET)."""
        from botocore.auth import S3SigV4QueryAuth

        if not 1 <= expires <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"a presigned URL lives 1 to {MAX_PRESIGN_SECONDS} seconds, not {expires}")
        request: Any = self._request_class(method="GET", url=url, headers={})
        S3SigV4QueryAuth(self._credentials, "s3", self._region, expires=expires).add_auth(request)
        return str(request.url)
