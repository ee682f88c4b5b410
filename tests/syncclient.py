"""A blocking HTTP client for tests against a registryd in its own process.

Only for servers started with ``start_twistd``: a blocking call against the
in-process fixture would stall the reactor that serves it.
"""
from __future__ import annotations

import hashlib
import http.client
import json
from typing import Any, Iterable


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def request(host: str, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
            headers: dict[str, str] | None = None, timeout: float = 120) -> Response:
    hostname, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(hostname, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def start_upload(host: str, repo: str) -> str:
    response = request(host, "POST", f"/v2/{repo}/blobs/uploads/")
    assert response.status == 202, response.body
    return response.header("Location") or ""


def push_blob(host: str, repo: str, data: bytes) -> str:
    digest = sha256(data)
    response = request(host, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", data,
                       {"Content-Type": "application/octet-stream"})
    assert response.status == 201, response.body
    return digest
