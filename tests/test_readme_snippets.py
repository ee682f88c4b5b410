"""What README.md tells an operator to write, run verbatim (issue 21).

Snippets are found by their section heading and fence language
(tests/readme_snippets.py), so sections others add change nothing here.
Every TOML block is valid TOML; every one that configures registryd loads
with its config parser; the listener snippet serves. Client configurations
(containerd hosts.toml, containers registries.conf) are checked by the
end-to-end tests that use them; here they must at least parse.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import socket
import subprocess
import tomllib
from typing import Any

import pytest

from conftest import ROOT, VENV_BIN, stop_process, wait_for_port
from support.ports import free_port_on_both_loopbacks
from readme_snippets import Snippet, containing, in_section, snippets
from registryd.config import load_config
from syncclient import request

CLIENT_CONFIG = re.compile(r"^\s*(\[\[registry\]\]|\[host\.|server\s*=)", re.M)


def registryd_configs() -> list[Snippet]:
    return [s for s in snippets() if s.language == "toml" and not CLIENT_CONFIG.search(s.text)]


def load_snippet(snippet: Snippet, tmp_path: Any, monkeypatch: Any) -> Any:
    """The snippet as a config file, with the variables its *_env keys name set."""
    for variable in re.findall(r'_env\s*=\s*"([A-Z0-9_]+)"', snippet.text):
        monkeypatch.setenv(variable, "s3cret")
    path = tmp_path / f"readme-{snippet.line}.toml"
    path.write_text(snippet.text)
    return load_config(str(path))


def test_every_toml_block_is_toml() -> None:
    for snippet in snippets():
        if snippet.language == "toml":
            try:
                tomllib.loads(snippet.text)
            except tomllib.TOMLDecodeError as e:
                pytest.fail(f"README.md:{snippet.line} ({snippet.section}) is not TOML: {e}")
        elif snippet.language == "json":
            json.loads(snippet.text)


def test_every_registryd_toml_block_loads(tmp_path: Any, monkeypatch: Any) -> None:
    found = registryd_configs()
    assert len(found) >= 5
    for snippet in found:
        load_snippet(snippet, tmp_path, monkeypatch)


def test_upstream_snippet_names_where_the_upstream_is(tmp_path: Any, monkeypatch: Any) -> None:
    snippet = containing("Pull-through cache", "toml", "[[upstream]]")
    config = load_snippet(snippet, tmp_path, monkeypatch)
    hub = config.upstreams[0]
    assert (hub.namespace, hub.url, hub.default, hub.password) == (
        "docker.io", "https://registry-1.docker.io", True, "s3cret")
    assert re.search(r'^url = "https://registry-1\.docker\.io"', snippet.text, re.M)


def test_a_snippet_for_another_upstream_per_client() -> None:
    hosts = tomllib.loads(containing("Pull-through cache", "toml", 'server = "https://ghcr.io"').text)
    assert hosts["host"]["http://registry.example:5000"]["capabilities"] == ["pull", "resolve"]
    conf = tomllib.loads(containing("Pull-through cache", "toml", 'prefix = "ghcr.io"').text)
    assert conf["registry"][0]["mirror"][0]["location"] == "registry.example:5000/ghcr.io"


def test_listener_snippet_serves_on_both_loopbacks(tmp_path: Any, monkeypatch: Any) -> None:
    """The IPv6 listener needs a literal string; the snippet's listeners replace tcp:5000."""
    snippet = in_section("Listeners", "toml")[0]
    config = load_snippet(snippet, tmp_path, monkeypatch)
    assert config.listen == ("tcp:5000:interface=127.0.0.1", "tcp6:5000:interface=\\:\\:1")
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(snippet.text.replace("'tcp6:5000:interface=\\:\\:1'", '"tcp6:5000:interface=\\:\\:1"'))
    # Served on a free port instead of 5000 (the tests must not need it).
    port = free_port_on_both_loopbacks()
    path = tmp_path / "listen.toml"
    path.write_text(snippet.text.replace(":5000:", f":{port}:") + f'data_dir = "{tmp_path / "data"}"\n')
    process = subprocess.Popen([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd",
                                "--config", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               cwd=ROOT)
    try:
        # Both listeners up before the first request (a failure to bind either stops twistd).
        wait_for_port("127.0.0.1", port, process)
        wait_for_port("::1", port, process)
        assert request(f"127.0.0.1:{port}", "GET", "/healthz").status == 200
        with socket.create_connection(("::1", port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200 ") or reply.startswith(b"HTTP/1.1 200 "), reply
        with socket.socket() as other:          # not every interface: tcp:5000 is gone
            assert other.connect_ex(("127.0.0.2", port)) != 0
    finally:
        stop_process(process)


def test_probes_snippet(tmp_path: Any, monkeypatch: Any) -> None:
    config = load_snippet(containing("Listeners", "toml", "probes:"), tmp_path, monkeypatch)
    assert config.listen[0].startswith("tls:5443:") and ":client_ca=" in config.listen[0]
    assert config.listen[1] == "probes:tcp:8081"      # tests/test_probes.py runs such a listener


def test_password_env_drop_in_is_a_systemd_drop_in() -> None:
    drop_in = containing("Pull-through cache", "ini", "EnvironmentFile=")
    parser = configparser.ConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(drop_in.text)
    assert parser["Service"]["EnvironmentFile"] == "/etc/registryd/secrets.env"


def test_containerd_tls_hosts_toml() -> None:
    hosts = tomllib.loads(containing("Clients of a TLS listener", "toml", "client = ").text)
    host = hosts["host"]["https://registry.example:5443"]
    assert host["ca"].endswith("/ca.crt") and len(host["client"][0]) == 2


def test_readme_says_how_to_run_every_tier() -> None:
    """The tiers README.md lists are the ones tests/conftest.py assigns and pyproject.toml registers."""
    from conftest import TIER_ORDER

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    listed = re.findall(r"^\| (\w+) \|.*\| `\./run-tests\.sh -m (\w+)` \|$", readme, re.M)
    assert [tier for tier, _ in listed] == list(TIER_ORDER)
    assert all(tier == run for tier, run in listed)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        markers = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
    assert set(TIER_ORDER) <= {m.split(":")[0] for m in markers}
