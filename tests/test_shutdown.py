"""SIGTERM: stop accepting, let running transfers finish, then exit; nothing committed is lost."""
from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import time

from conftest import start_twistd, stop_process
from syncclient import push_blob, request


def test_sigterm_lets_a_running_download_finish(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    process, server = start_twistd(data_dir)
    data = os.urandom(24 * 1024 * 1024)
    try:
        digest = push_blob(server.host, "shut/down", data)
        host, port = server.host.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", f"/v2/shut/down/blobs/{digest}")
        response = conn.getresponse()
        hasher = hashlib.sha256(response.read(1024 * 1024))
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # No new connections are taken while the transfer finishes.
        with socket.socket() as probe:
            assert probe.connect_ex((host, int(port))) != 0
        while chunk := response.read(1024 * 1024):
            hasher.update(chunk)
            time.sleep(0.01)
        conn.close()
        assert "sha256:" + hasher.hexdigest() == digest
        # twistd ends by re-raising the signal that stopped it (systemd counts that as a clean stop).
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        stop_process(process)
    # Everything committed is still there after a restart.
    process, server = start_twistd(data_dir)
    try:
        assert request(server.host, "GET", f"/v2/shut/down/blobs/{digest}").body == data
    finally:
        stop_process(process)


def test_sigterm_gives_up_on_a_stalled_client_after_the_timeout(tmp_path) -> None:
    config = tmp_path / "registryd.toml"
    config.write_text("[server]\nshutdown_timeout = 1\n")
    process, server = start_twistd(str(tmp_path / "data"), "--config", str(config))
    try:
        digest = push_blob(server.host, "stall/ed", os.urandom(32 * 1024 * 1024))
        host, port = server.host.split(":")
        stalled = socket.create_connection((host, int(port)))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(f"GET /v2/stall/ed/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10
        stalled.close()
    finally:
        stop_process(process)
