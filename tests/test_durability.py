"""Nothing acknowledged is lost, nothing half-written is served.

These run registryd as its own process so that a restart or a crash
(SIGKILL) is real.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

from conftest import start_twistd, stop_process
from syncclient import push_blob, request, sha256, start_upload


def test_chunked_upload_survives_a_crash_between_chunks(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    process, server = start_twistd(data_dir)
    first, second = os.urandom(300_000), os.urandom(200_000)
    try:
        location = start_upload(server.host, "crash/test")
        response = request(server.host, "PATCH", location, first,
                           {"Content-Range": f"0-{len(first) - 1}", "Content-Type": "application/octet-stream"})
        assert response.status == 202
        assert response.header("Range") == f"0-{len(first) - 1}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    process, server = start_twistd(data_dir)
    try:
        status = request(server.host, "GET", location)
        assert status.status == 204
        assert status.header("Range") == f"0-{len(first) - 1}"
        end = len(first) + len(second) - 1
        response = request(server.host, "PATCH", location, second,
                           {"Content-Range": f"{len(first)}-{end}"})
        assert response.status == 202, response.body
        digest = sha256(first + second)
        done = request(server.host, "PUT", f"{location}?digest={digest}")
        assert done.status == 201, done.body
        blob = request(server.host, "GET", f"/v2/crash/test/blobs/{digest}")
        assert blob.status == 200
        assert blob.body == first + second
    finally:
        stop_process(process)


def test_a_chunk_cut_off_mid_body_is_not_counted(tmp_path) -> None:
    process, server = start_twistd(str(tmp_path / "data"))
    try:
        location = start_upload(server.host, "cut/off")
        first = os.urandom(1000)
        assert request(server.host, "PATCH", location, first).status == 202
        # Announce 100000 bytes, send 5000, hang up.
        host, port = server.host.split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                      f"Content-Range: 1000-100999\r\n\r\n".encode() + os.urandom(5000))
        status = request(server.host, "GET", location)
        assert status.header("Range") == "0-999"
        second = os.urandom(500)
        response = request(server.host, "PATCH", location, second, {"Content-Range": "1000-1499"})
        assert response.status == 202, response.body
        digest = sha256(first + second)
        assert request(server.host, "PUT", f"{location}?digest={digest}").status == 201
        assert request(server.host, "GET", f"/v2/cut/off/blobs/{digest}").body == first + second
    finally:
        stop_process(process)


def test_same_blob_pushed_twice_at_once_is_stored_once(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    process, server = start_twistd(data_dir)
    data = os.urandom(8 * 1024 * 1024)
    results: list[str] = []
    try:
        threads = [threading.Thread(target=lambda r=repo: results.append(push_blob(server.host, r, data)))
                   for repo in ("twice/a", "twice/b", "twice/a")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [sha256(data)] * 3
        stored = [name for _, _, files in os.walk(os.path.join(data_dir, "blobs")) for name in files]
        assert stored == [sha256(data).split(":")[1]]
        assert os.listdir(os.path.join(data_dir, "uploads")) == []
        for repo in ("twice/a", "twice/b"):
            assert request(server.host, "GET", f"/v2/{repo}/blobs/{sha256(data)}").body == data
    finally:
        stop_process(process)


def test_leftovers_of_a_crash_are_cleaned_at_start(tmp_path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "tmp").mkdir(parents=True)
    (data_dir / "tmp" / "half-written").write_bytes(b"partial")
    process, server = start_twistd(str(data_dir))
    try:
        assert request(server.host, "GET", "/v2/").status == 200
        assert os.listdir(data_dir / "tmp") == []
    finally:
        stop_process(process)


def test_abandoned_uploads_are_reaped(tmp_path) -> None:
    config = tmp_path / "registryd.toml"
    config.write_text("[uploads]\nexpiry = 1\nreap_interval = 1\n")
    process, server = start_twistd(str(tmp_path / "data"), "--config", str(config))
    try:
        location = start_upload(server.host, "reap/me")
        assert request(server.host, "GET", location).status == 204

        deadline = time.monotonic() + 10
        while request(server.host, "GET", location).status == 204 and time.monotonic() < deadline:
            time.sleep(0.3)
        response = request(server.host, "GET", location)
        assert response.status == 404
        assert response.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        # The session's state goes first, its emptied folder at the end of the same reaping pass.
        while os.listdir(tmp_path / "data" / "uploads") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.listdir(tmp_path / "data" / "uploads") == []
    finally:
        stop_process(process)


def test_cut_off_monolithic_upload_leaves_nothing(tmp_path) -> None:
    data_dir = tmp_path / "data"
    process, server = start_twistd(str(data_dir))
    try:
        digest = sha256(b"x" * 100000)
        host, port = server.host.split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST /v2/mono/lith/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Length: 100000\r\n\r\n".encode() + b"x" * 5000)

        deadline = time.monotonic() + 5
        while os.listdir(data_dir / "uploads") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(data_dir / "uploads") == []
        assert request(server.host, "HEAD", f"/v2/mono/lith/blobs/{digest}").status == 404
    finally:
        stop_process(process)
