"""An https upstream (issue 17): its certificate checked against `upstreams[].tls.ca_file` (an internal CA), the
gateway's own certificate presented when the upstream asks for one (mutual TLS), `verify: false` only when
written. The upstream is the demo MCPServer behind uvicorn's TLS with a CA made here; the client is a plain
2026-07-28 tools/call through the gateway.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import ConfigError, load_config
from tests.harness import Deployment, Recorder, ServerThread, build_server, proxy_for, write_config
from tests.test_bad_input import BASE_HEADERS, modern


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue(directory: Path, name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
          usage: x509.ObjectIdentifier | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `name` (a CA when `ca` is None) written as NAME.pem and NAME.key in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca[0].subject if ca else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True))
    if ca is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(
            "127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage or ExtendedKeyUsageOID.SERVER_AUTH]),
                                        critical=False)
    certificate = builder.sign(ca[1] if ca else key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(_pem(key))
    return certificate, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    ca = issue(directory, "ca", None)
    issue(directory, "upstream", ca)
    issue(directory, "gateway", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    issue(directory, "other-ca", None)
    return directory


def tls_upstream(pki: Path, *, client_certificates: bool) -> tuple[ServerThread, Recorder]:
    recorder = Recorder(build_server().streamable_http_app(stateless_http=True, json_response=True))
    options: dict[str, Any] = {"ssl_certfile": str(pki / "upstream.pem"), "ssl_keyfile": str(pki / "upstream.key")}
    if client_certificates:
        options |= {"ssl_ca_certs": str(pki / "ca.pem"), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return ServerThread(recorder, **options).start(), recorder


@pytest.fixture
def gateway_for(tmp_path: Path, pki: Path) -> Iterator[Any]:
    running: list[tuple[Deployment, ServerThread]] = []

    def start(tls: dict[str, Any] | None, client_certificates: bool = False) -> Deployment:
        upstream, recorder = tls_upstream(pki, client_certificates=client_certificates)
        deployment = proxy_for(f"https://127.0.0.1:{upstream.port}/mcp", recorder, tmp_path,
                               **({"upstream_options": {"tls": tls}} if tls is not None else {}))
        running.append((deployment, upstream))
        return deployment

    try:
        yield start
    finally:
        for deployment, upstream in running:
            deployment.stop()
            upstream.stop()


def call(deployment: Deployment) -> httpx.Response:
    headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "over tls"}})
    return httpx.post(deployment.url, json=body, headers={**BASE_HEADERS, **headers,
                                                          "Authorization": f"Bearer {deployment.token()}"})


@pytest.mark.parametrize(("tls", "mutual", "reaches"), [
    (None, False, False),  # the system's CAs do not know the internal CA
    ({"ca_file": "{pki}/other-ca.pem"}, False, False),  # another CA
    ({"ca_file": "{pki}/ca.pem"}, False, True),
    ({"ca_file": "{pki}/ca.pem"}, True, False),  # the upstream asks for a certificate, none is presented
    ({"ca_file": "{pki}/ca.pem", "client_cert": "{pki}/gateway.pem", "client_key": "{pki}/gateway.key"}, True, True),
    ({"verify": False}, False, True),  # written out: any certificate
])
def test_an_https_upstream_is_reached_only_as_its_tls_settings_say(gateway_for: Any, pki: Path,
                                                                   tls: dict[str, Any] | None, mutual: bool,
                                                                   reaches: bool) -> None:
    settings = None if tls is None else {k: v.format(pki=pki) if isinstance(v, str) else v for k, v in tls.items()}
    deployment = gateway_for(settings, mutual)
    answer = call(deployment)
    if reaches:
        assert answer.status_code == 200 and answer.json()["result"]["content"][0]["text"] == "over tls"
        assert deployment.recorder.tool_calls("echo")
    else:
        assert answer.status_code == 502, answer.text
        assert not deployment.recorder.tool_calls("echo")


@pytest.mark.parametrize(("upstream", "problem"), [
    ({"url": "http://127.0.0.1:9/mcp", "tls": {"verify": False}}, "only for an https:// url"),
    ({"url": "https://127.0.0.1:9/mcp", "tls": {"client_cert": "c.pem"}}, "client_cert and client_key go together"),
    ({"url": "http://127.0.0.1:99999/mcp"}, "its port is not a number from 1 to 65535"),
])
def test_tls_settings_and_ports_are_checked_with_the_config(tmp_path: Path, upstream: dict[str, Any],
                                                            problem: str) -> None:
    config = write_config(tmp_path, None, upstream_options=upstream)
    with pytest.raises(ConfigError, match=problem):
        load_config(config)
