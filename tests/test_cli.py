"""The `mcp-gateway` command: what it refuses to do, and that it says so in one line with exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import load_config
from gateway.app import CONFIG_ENV
from gateway.auth.keys import load_or_create_signing_key
from gateway.cli import main
from tests.harness import free_port, write_config

UPSTREAM_URL = "http://127.0.0.1:9/mcp"

SIGNING_COMMANDS = [
    ["issue-token", "--subject", "alice", "--scope", "mcp:tools"],
    ["sessions", "list"],
    ["sessions", "revoke", "some-token-id"],
]


@pytest.mark.parametrize("command", SIGNING_COMMANDS, ids=[" ".join(c[:2]) for c in SIGNING_COMMANDS])
def test_commands_that_sign_for_the_gateway_never_create_a_key_of_their_own(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    path = write_config(tmp_path, UPSTREAM_URL)
    key_file = tmp_path / "key.pem"
    assert main([*command, "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"no signing key at {key_file}: start the gateway once (mcp-gateway serve) "
                   "or point auth.clients.signing_key_file at its key\n")
    assert not key_file.exists()


def test_issue_token_signs_with_the_gateways_existing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, UPSTREAM_URL)
    key = load_or_create_signing_key(tmp_path / "key.pem")  # as `serve` left it
    assert main(["issue-token", "--config", str(path), "--subject", "alice", "--scope", "mcp:tools"]) == 0
    token = capsys.readouterr().out.strip()
    config = load_config(path)
    claims = jwt.decode(token, key.public, algorithms=["ES256"], audience=config.resource_url(config.upstreams[0]))
    assert claims["sub"] == "alice"
    assert jwt.get_unverified_header(token)["kid"] == key.kid


def _pem(private: Any) -> bytes:
    return bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


UNUSABLE_KEYS = [
    (b"not a key\n", "not a usable signing key"),
    (_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "not an EC P-256 private key"),
    (_pem(ec.generate_private_key(ec.SECP384R1())), "not an EC P-256 private key"),
]


@pytest.mark.parametrize(("content", "why"), UNUSABLE_KEYS, ids=["garbage", "rsa", "p-384"])
def test_issue_token_names_a_key_file_it_cannot_sign_with(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, why: str) -> None:
    path = write_config(tmp_path, UPSTREAM_URL)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(content)
    assert main(["issue-token", "--config", str(path), "--subject", "alice"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{key_file}: {why}") and err.count("\n") == 1, err
    assert key_file.read_bytes() == content


def test_serve_with_several_workers_refuses_the_in_memory_session_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, UPSTREAM_URL, listen={"host": "127.0.0.1", "port": free_port()})

    def no_server(*args: object, **kwargs: object) -> None:
        pytest.fail("serve started a server")

    monkeypatch.setattr(uvicorn, "run", no_server)
    for name in (CONFIG_ENV, "PROMETHEUS_MULTIPROC_DIR"):  # whatever serve sets for workers is undone afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert main(["serve", "--config", str(path), "--workers", "2"]) == 2
    assert capsys.readouterr().err == (
        f"{path}: sessions.backend: memory keeps session bindings, task owners and token revocations in one process; "
        "serve --workers 2 needs sessions.backend: redis\n")
