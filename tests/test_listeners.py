"""What `mcp-gateway serve` listens on and whom it believes (issue 17): `admin_listen`, `metrics_token_file`,
`trusted_proxies`.

- With `admin_listen`, the operators' routes (/metrics, /admin, the console) are on that listener only, and the
  MCP endpoints, OAuth and metadata on the public one only; /healthz and /readyz on both.
- With `metrics_token_file`, /metrics answers only `Authorization: Bearer <the file's token>`.
- `X-Forwarded-For` names the caller (in the audit trail's `source_ip`, and so in every per-source limit) only
  when the connection comes from one of `trusted_proxies`; by default from nobody.

Each runs the real `serve` in front of the demo MCPServer.
"""

from __future__ import annotations

import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from tests.harness import ROOT, free_port, wait_for_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_upstream_tls import issue

METRICS_TOKEN = "a-metrics-scraper-token-0123456789"


class Served:
    def __init__(self, directory: Path, upstream: str, **overrides: Any) -> None:
        self.port = free_port()
        self.config = write_config(directory, upstream, public_url=f"http://127.0.0.1:{self.port}",
                                   listen={"host": "127.0.0.1", "port": self.port}, **overrides)
        self.directory = directory
        self.log = (directory / "serve.log").open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
                                        cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "issue-token", "--config", str(self.config),
                               "--subject", "alice", "--scope", "mcp:tools"], capture_output=True, text=True,
                              check=True, cwd=ROOT)
        return done.stdout.strip()

    def call(self, base: str, **headers: str) -> httpx.Response:
        h, body = modern("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        return httpx.post(f"{base}/mcp", json=body, headers={**BASE_HEADERS, **h, **headers,
                                                             "Authorization": f"Bearer {self.token()}"})

    def source_ips(self) -> list[str]:
        deadline = time.monotonic() + 10
        while True:
            try:
                db = sqlite3.connect(self.directory / "audit.db")
                try:
                    return [r[0] for r in db.execute("SELECT source_ip FROM audit_events WHERE operation = "
                                                      "'tools/call' ORDER BY seq")]
                finally:
                    db.close()
            except sqlite3.OperationalError:
                assert time.monotonic() < deadline
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


@pytest.fixture
def served(tmp_path: Path, demo_upstream: str) -> Iterator[Any]:
    running: list[Served] = []

    def start(**overrides: Any) -> Served:
        running.append(Served(tmp_path, demo_upstream, **overrides))
        return running[-1]

    try:
        yield start
    finally:
        for gateway in running:
            gateway.stop()


OPERATORS = ["/metrics", "/admin/audit", "/admin/"]  # the console is /admin/
EVERYONE = ["/healthz", "/readyz"]


def test_with_admin_listen_the_operators_routes_are_on_their_own_listener_only(served: Any) -> None:
    admin_port = free_port()
    gateway = served(admin_listen={"host": "127.0.0.1", "port": admin_port})
    wait_for_port(admin_port)
    admin = f"http://127.0.0.1:{admin_port}"
    for path in OPERATORS:
        assert httpx.get(f"{gateway.url}{path}").status_code == 404, f"{path} on the public listener"
        assert httpx.get(f"{admin}{path}").status_code != 404, f"{path} not on the admin listener"
    for path in EVERYONE:
        assert httpx.get(f"{gateway.url}{path}").status_code == 200
        assert httpx.get(f"{admin}{path}").status_code == 200
    assert gateway.call(gateway.url).status_code == 200
    assert gateway.call(admin).status_code == 404, "an MCP endpoint on the admin listener"
    assert httpx.get(f"{admin}/.well-known/oauth-protected-resource/mcp").status_code == 404
    assert "mcp_gateway_requests_total" in httpx.get(f"{admin}/metrics").text


def test_without_admin_listen_everything_is_on_the_one_listener(served: Any) -> None:
    gateway = served()
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200
    assert gateway.call(gateway.url).status_code == 200


@pytest.mark.parametrize(("authorization", "status"), [
    (None, 401), ("Bearer wrong-token", 401), (f"Basic {METRICS_TOKEN}", 401), (f"Bearer {METRICS_TOKEN}x", 401),
    (f"Bearer {METRICS_TOKEN}", 200),
])
def test_metrics_behind_a_bearer_token_answer_only_that_token(served: Any, tmp_path: Path,
                                                              authorization: str | None, status: int) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text(METRICS_TOKEN + "\n")
    gateway = served(metrics_token_file=str(token_file))
    headers = {"Authorization": authorization} if authorization else {}
    answer = httpx.get(f"{gateway.url}/metrics", headers=headers)
    assert answer.status_code == status
    if status == 401:
        assert "mcp_gateway_" not in answer.text and answer.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("trusted", "expected"), [
    ([], "127.0.0.1"),  # nobody's X-Forwarded-For is believed by default
    (["10.0.0.0/8"], "127.0.0.1"),  # a proxy elsewhere: this connection's is not
    (["127.0.0.1"], "203.0.113.9"),
    (["127.0.0.0/8", "::1"], "203.0.113.9"),
])
def test_x_forwarded_for_names_the_caller_only_from_a_trusted_proxy(served: Any, trusted: list[str],
                                                                   expected: str) -> None:
    gateway = served(trusted_proxies=trusted)
    assert gateway.call(gateway.url, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    assert gateway.source_ips() == [expected]


@pytest.mark.parametrize(("overrides", "problem"), [
    ({"trusted_proxies": ["not-an-address"]}, "trusted_proxies: 'not-an-address'"),
    ({"admin_listen": {"host": "127.0.0.1", "port": 99999}}, "admin_listen.port"),
])
def test_listener_settings_are_checked_with_the_config(tmp_path: Path, overrides: dict[str, Any],
                                                       problem: str) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/mcp", **overrides)
    checked = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--config", str(config)],
                             capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode == 2 and problem in checked.stderr, checked.stderr


def test_an_admin_listener_on_the_public_port_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/mcp", listen={"host": "127.0.0.1", "port": 8123},
                          admin_listen={"host": "127.0.0.1", "port": 8123})
    checked = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--config", str(config)],
                             capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode == 2 and "admin_listen" in checked.stderr


def served_serial(port: int, ca: Path) -> int:
    """The serial number of the certificate a new TLS connection to 127.0.0.1:port is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_tls_on_the_listener_serves_mcp_and_a_renewed_certificate_without_a_restart(tmp_path: Path,
                                                                                  demo_upstream: str) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = issue(pki, "ca", None)
    first, _ = issue(pki, "upstream", ca)  # a server certificate for 127.0.0.1
    port = free_port()
    config = write_config(tmp_path, demo_upstream, public_url=f"https://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port},
                          tls={"cert_file": str(pki / "upstream.pem"), "key_file": str(pki / "upstream.key"),
                               "reload_interval_s": 0.2})
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        assert served_serial(port, pki / "ca.pem") == first.serial_number
        token = subprocess.run([sys.executable, "-m", "gateway.cli", "issue-token", "--config", str(config),
                                "--subject", "alice", "--scope", "mcp:tools"], capture_output=True, text=True,
                               check=True, cwd=ROOT).stdout.strip()
        h, body = modern("tools/call", {"name": "echo", "arguments": {"text": "over tls"}})
        called = httpx.post(f"https://127.0.0.1:{port}/mcp", json=body, verify=str(pki / "ca.pem"),
                            headers={**BASE_HEADERS, **h, "Authorization": f"Bearer {token}"})
        assert called.status_code == 200 and called.json()["result"]["content"][0]["text"] == "over tls"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz")  # plain HTTP on a TLS listener gets nowhere

        renewed = pki / "renewed"
        renewed.mkdir()
        second, _ = issue(renewed, "upstream", ca)
        for name in ("upstream.key", "upstream.pem"):  # as a certificate manager renews: each file replaced whole
            (renewed / name).replace(pki / name)
        deadline = time.monotonic() + 10
        while served_serial(port, pki / "ca.pem") != second.serial_number:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.1)
        assert httpx.get(f"https://127.0.0.1:{port}/healthz", verify=str(pki / "ca.pem")).status_code == 200
    finally:
        process.terminate()
        process.wait(30)
        log.close()
