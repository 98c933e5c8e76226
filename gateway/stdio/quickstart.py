"""`mcp-gateway serve --stdio -- COMMAND...`: one stdio server behind the gateway, with no config to write.

Owns the files the quick start runs from, in a directory of their own: a config
with COMMAND as the one upstream (isolated per caller, with no environment but
the fixed minimum), a policy that lets one principal (`quickstart`) use
everything the server offers and nobody else anything, the signing key and the
SQLite audit trail; and the banner that prints the URL, a token for that
principal and where the files are. Every check of a full deployment still runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from gateway.yamlfile import ProblemsError

SUBJECT = "quickstart"
TOKEN_TTL_S = 8 * 3600
_POLICY = {
    "roles": {"owner": {"permissions": {
        "can_list_resources": True, "can_read_resources": ["**"], "can_execute_tools": ["*"],
        "can_access_prompts": ["*"], "can_request_sampling": True, "can_elicit": True, "can_list_roots": True}}},
    "bindings": [{"when": {"subject": SUBJECT}, "roles": ["owner"]}],
}


def prepare(command: list[str], config: str | None, host: str | None,
            port: int | None) -> tuple[Path, list[str], str]:
    """From `serve --stdio [--host H] [--port P] -- COMMAND...`: the quick start's directory, the command
    (without the `--`) and the config path, written. Raises ProblemsError for a missing command or a --config."""
    command = command[1:] if command[:1] == ["--"] else command
    if config is not None or not command:
        raise ProblemsError(["serve: give --config FILE, or --stdio -- COMMAND [ARGS...] (not both)"])
    directory = Path(tempfile.mkdtemp(prefix="mcp-gateway-stdio-"))
    return directory, command, str(write_quickstart(directory, command, host or "127.0.0.1", port or 8080))


def write_quickstart(directory: Path, command: list[str], host: str, port: int) -> Path:
    """Write the quick start's config and policy into `directory`; the config's path."""
    (directory / "policy.yaml").write_text(yaml.safe_dump(_POLICY))
    config = {
        "public_url": f"http://{host}:{port}",
        "listen": {"host": host, "port": port},
        "upstreams": [{"name": "stdio", "path": "/mcp", "command": command}],
        "policy": "policy.yaml",
        "auth": {"clients": {"token_ttl_s": TOKEN_TTL_S}},
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def banner(url: str, token: str, directory: Path, command: list[str]) -> str:
    """What the quick start prints once it serves: where, with which token, and where its files are."""
    return (f"mcp-gateway: {' '.join(command)} (stdio) is served at {url}\n"
            f"  a client connects with the header  Authorization: Bearer {token}\n"
            f"  (the token is valid for {TOKEN_TTL_S // 3600} h; `mcp-gateway issue-token --config "
            f"{directory / 'gateway.yaml'} --subject {SUBJECT}` makes another)\n"
            f"  config, policy, signing key and audit trail: {directory}\n")
