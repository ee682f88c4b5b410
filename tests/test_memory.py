"""Streaming uploads: a 2 GiB layer raises RSS by < 30 MiB and is written once."""
from __future__ import annotations

import hashlib
import http.client
import os

from conftest import start_twistd, stop_process
from syncclient import request

SIZE = 2 * 1024 ** 3
BLOCK = os.urandom(1024 * 1024)


def proc_value(pid: int, name: str, key: str) -> int:
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def body(digest: "hashlib._Hash"):
    for i in range(SIZE // len(BLOCK)):
        block = i.to_bytes(8, "big") + BLOCK[8:]
        digest.update(block)
        yield block


def test_two_gib_push_is_streamed_and_written_once(tmp_path) -> None:
    process, server = start_twistd(str(tmp_path / "data"))
    try:
        assert request(server.host, "GET", "/v2/").status == 200
        rss_before = proc_value(process.pid, "status", "VmRSS")  # KiB
        written_before = proc_value(process.pid, "io", "wchar")
        location = request(server.host, "POST", "/v2/big/layer/blobs/uploads/").header("Location")
        hasher = hashlib.sha256()
        host, port = server.host.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.request("PATCH", location, body=body(hasher), headers={"Content-Length": str(SIZE)})
        response = conn.getresponse()
        response.read()
        assert response.status == 202
        assert response.getheader("Range") == f"0-{SIZE - 1}"
        digest = "sha256:" + hasher.hexdigest()
        conn.request("PUT", f"{location}?digest={digest}")
        response = conn.getresponse()
        response.read()
        assert response.status == 201
        conn.close()
        peak = proc_value(process.pid, "status", "VmHWM")
        written = proc_value(process.pid, "io", "wchar") - written_before
        assert peak - rss_before < 30 * 1024, f"RSS rose by {(peak - rss_before) / 1024:.1f} MiB"
        assert SIZE <= written < SIZE + 16 * 1024 * 1024, f"{written} bytes written for a {SIZE} byte blob"

        # And it comes back intact.
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.request("GET", f"/v2/big/layer/blobs/{digest}")
        response = conn.getresponse()
        assert response.status == 200
        assert int(response.getheader("Content-Length")) == SIZE
        check = hashlib.sha256()
        while chunk := response.read(1024 * 1024):
            check.update(chunk)
        conn.close()
        assert "sha256:" + check.hexdigest() == digest
        assert proc_value(process.pid, "status", "VmHWM") - rss_before < 30 * 1024
    finally:
        stop_process(process)
