"""Policy hot reload: a changed file is swapped in whole; an invalid one is reported and the old policy stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness import DEFAULT_POLICY, ROOT, Deployment, deploy, free_port, wait_for_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern


def call(url: str, token: str, tool: str) -> httpx.Response:
    headers, body = modern("tools/call", {"name": tool, "arguments": {"path": "/tmp/x"}})
    return httpx.post(url, headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"}, json=body)


def granting_delete() -> dict[str, Any]:
    reader = DEFAULT_POLICY["roles"]["reader"]
    perms = {**reader["permissions"], "can_execute_tools": ["delete_file"]}
    return {**DEFAULT_POLICY, "roles": {**DEFAULT_POLICY["roles"], "reader": {"permissions": perms}}}


def eventually(check: Any, seconds: float = 10) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_changed_policy_file_takes_effect_and_an_invalid_one_is_refused(tmp_path: Path) -> None:
    deployment: Deployment = deploy("proxy", tmp_path, policy_reload_interval_s=0.1)
    policy_file = tmp_path / "policy.yaml"
    try:
        token = deployment.token()
        assert call(deployment.url, token, "delete_file").status_code == 400  # hidden: "Unknown tool"
        old_version = deployment.runtime.policy.version

        policy_file.write_text(yaml.safe_dump(granting_delete()))
        assert eventually(lambda: call(deployment.url, token, "delete_file").status_code == 200)
        new_version = deployment.runtime.policy.version
        assert new_version != old_version

        policy_file.write_text("roles: {reader: {inherits: [ghost]}}\n")
        time.sleep(0.5)
        assert deployment.runtime.policy.version == new_version, "an invalid file replaced the policy"
        assert call(deployment.url, token, "delete_file").status_code == 200
        metrics = httpx.get(f"{deployment.gateway.url}/metrics").text
        assert 'mcp_gateway_policy_reloads_total{outcome="invalid"} 1.0' in metrics
        versions = {e["policy_version"] for e in deployment.audit_events()
                    if e["tool_executed"] == "delete_file" and e["operation"] == "tools/call"}
        assert versions == {old_version, new_version}
    finally:
        deployment.stop()


def test_sighup_reloads_the_policy_of_a_running_server(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, "http://127.0.0.1:9/mcp", public_url=f"http://127.0.0.1:{port}",
                          policy_reload_interval_s=0, listen={"host": "127.0.0.1", "port": port})
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        token = subprocess.run([sys.executable, "-m", "gateway.cli", "issue-token", "--config", str(config),
                                "--subject", "alice", "--scope", "mcp:tools"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout.strip()
        url = f"http://127.0.0.1:{port}/mcp"
        assert call(url, token, "delete_file").status_code == 400
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump(granting_delete()))
        time.sleep(0.3)
        assert call(url, token, "delete_file").status_code == 400, "reloaded without being asked"
        os.kill(process.pid, signal.SIGHUP)
        # Allowed now: the upstream (port 9, nothing there) is what fails, with a 502.
        assert eventually(lambda: call(url, token, "delete_file").status_code == 502)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    assert "policy" in stderr and "reloaded" in stderr
