"""``probes:`` listeners: health checks without the client certificate an mTLS listener demands."""
from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
from typing import Any

import pytest

from conftest import ROOT, VENV_BIN, free_port, stop_process, wait_for_port
from syncclient import request
from upstreams import upstream_pki  # noqa: F401


def get(port: int, path: str) -> tuple[int, bytes]:
    reply = request(f"127.0.0.1:{port}", "GET", path, timeout=10)
    return reply.status, reply.body


def test_probes_listener_beside_an_mtls_listener(tmp_path: Any, upstream_pki: Any) -> None:
    mtls, probes = free_port(), free_port()
    config = tmp_path / "registryd.toml"
    config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[[listen]]
endpoint = "probes:tcp:{probes}:interface=127.0.0.1"
[[listen]]
endpoint = "tcp:{mtls}:interface=127.0.0.1"
tls_cert = "{upstream_pki.server_cert_file}"
tls_key = "{upstream_pki.server_key_file}"
tls_client_ca = "{upstream_pki.ca_file}"
""")
    log = open(tmp_path / "twistd.log", "ab")
    process = subprocess.Popen([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd",
                                "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for_port("127.0.0.1", mtls, process)
        wait_for_port("127.0.0.1", probes, process)
        # The mTLS listener wants a certificate, for the probes too.
        context = ssl.create_default_context(cafile=upstream_pki.ca_file)
        conn = http.client.HTTPSConnection("127.0.0.1", mtls, context=context, timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
        conn.close()
        # The probes listener answers them in plain HTTP...
        status, body = get(probes, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body = get(probes, "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        # ...and nothing else: no way around the certificates.
        for path in ("/v2/", "/v2/_catalog", "/metrics", "/", "/healthz/x"):
            status, body = get(probes, path)
            assert status == 404, path
            assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    finally:
        stop_process(process)
    with open(tmp_path / "twistd.log", encoding="utf-8") as f:
        assert "(health checks only)" in f.read()
