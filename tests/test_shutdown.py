"""SIGTERM: stop accepting, let running transfers finish, then exit; nothing committed is lost."""
from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import subprocess
import time
from typing import Any

from conftest import ROOT, VENV_BIN, free_port, start_twistd, stop_process, wait_for_port
from syncclient import push_blob, request
from upstreams import push_blob as push_upstream_blob, reference_upstream, upstream_pki  # noqa: F401


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


# -- bytes that left the request but not yet the process -------------------------
#
# A finished request may still have bytes in the transport's buffer or in the
# TLS layer; a stop must wait until they are sent (or shutdown_timeout passes).

CURL = "/usr/bin/curl"


def start_with_config(tmp_path: Any, config_text: str, port: int) -> subprocess.Popen[Any]:
    """``twistd -n registryd --config FILE`` (listeners from the file), once ``port`` accepts."""
    config = tmp_path / "registryd.toml"
    config.write_text(config_text)
    log = open(tmp_path / "twistd.log", "ab")
    process = subprocess.Popen([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd",
                                "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for_port("127.0.0.1", port, process)
    return process


def slow_download_across_sigterm(process: subprocess.Popen[Any], url: str, output: str, *curl_args: str,
                                 rate: str = "6M", after: float = 0.6) -> subprocess.CompletedProcess[bytes]:
    """curl ``url`` at ``rate`` bytes/s into ``output``; SIGTERM the server ``after`` seconds in."""
    assert os.path.exists(CURL), "curl is not installed"
    client = subprocess.Popen([CURL, "-sS", "--fail", "--limit-rate", rate, "-o", output, *curl_args, url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(after)
    assert client.poll() is None, "the download ended before the stop: nothing was tested"
    process.send_signal(signal.SIGTERM)
    out, err = client.communicate(timeout=60)
    assert process.wait(30) in (0, -signal.SIGTERM)
    return subprocess.CompletedProcess(client.args, client.returncode, out, err)


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def test_sigterm_lets_a_tls_download_finish_to_the_last_byte(tmp_path, upstream_pki) -> None:
    plain, tls = free_port(), free_port()
    process = start_with_config(tmp_path, f"""
data_dir = "{tmp_path / 'data'}"
[[listen]]
endpoint = "tcp:{plain}:interface=127.0.0.1"
[[listen]]
endpoint = "tcp:{tls}:interface=127.0.0.1"
tls_cert = "{upstream_pki.server_cert_file}"
tls_key = "{upstream_pki.server_key_file}"
""", tls)
    try:
        data = os.urandom(12 * 1024 * 1024)
        digest = push_blob(f"127.0.0.1:{plain}", "shut/tls", data)
        output = str(tmp_path / "blob")
        done = slow_download_across_sigterm(process, f"https://127.0.0.1:{tls}/v2/shut/tls/blobs/{digest}",
                                            output, "--cacert", upstream_pki.ca_file)
        assert done.returncode == 0, done.stderr
        assert os.path.getsize(output) == len(data)
        assert file_digest(output) == digest
    finally:
        stop_process(process)


def test_sigterm_lets_a_download_streamed_from_a_fill_finish(tmp_path, reference_upstream) -> None:
    up = reference_upstream("open")
    blob = push_upstream_blob(up, "lib/app", (12 * 1024 * 1024, "sigterm-fill"))
    port = free_port()
    process = start_with_config(tmp_path, f"""
data_dir = "{tmp_path / 'data'}"
listen = ["tcp:{port}:interface=127.0.0.1"]
[[upstream]]
namespace = "upstream.test"
url = "{up.url}"
""", port)
    try:
        output = str(tmp_path / "blob")
        # curl may take a burst above its rate at first: slower, and a stop sooner, than for TLS.
        done = slow_download_across_sigterm(
            process, f"http://127.0.0.1:{port}/v2/upstream.test/lib/app/blobs/{blob['digest']}", output,
            rate="4M", after=0.3)
        assert done.returncode == 0, done.stderr
        assert os.path.getsize(output) == blob["size"]
        assert file_digest(output) == blob["digest"]
    finally:
        stop_process(process)
