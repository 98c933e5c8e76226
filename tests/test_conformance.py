"""@modelcontextprotocol/conformance server scenarios: every scenario that passes against
server-everything directly also passes through the gateway.

The suite sends no Authorization header, so the gateway here admits anonymous callers
to a test-only role, which its config allows only when `auth.anonymous_role` says so.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from gateway import create_app
from tests.harness import NODE22, NODE_DIR, ServerThread, free_port, write_config
from tests.node_peers import node_env, server_everything
from tests.test_server_everything import EVERYTHING_POLICY

CONFORMANCE = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
_LINE = re.compile(r"^[✓✗] (?P<scenario>[\w-]+): (?P<passed>\d+) passed, (?P<failed>\d+) failed$")


def run_conformance(url: str, out: Path) -> dict[str, tuple[int, int]]:
    """Scenario -> (checks passed, checks failed), from the suite's summary lines."""
    done = subprocess.run([str(NODE22), str(CONFORMANCE), "server", "--url", url, "-o", str(out)],
                          env=node_env(), capture_output=True, text=True, timeout=300)
    results = {}
    for line in done.stdout.splitlines():
        match = _LINE.match(line.strip())
        if match:
            results[match["scenario"]] = (int(match["passed"]), int(match["failed"]))
    assert results, f"no scenario results in the suite's output:\n{done.stdout}\n{done.stderr}"
    return results


def test_every_scenario_passing_direct_passes_through_the_gateway(tmp_path: Path) -> None:
    with server_everything() as upstream_url:
        direct = run_conformance(upstream_url, tmp_path / "direct")
        port = free_port()
        config = write_config(tmp_path, upstream_url, policy=EVERYTHING_POLICY, public_url=f"http://127.0.0.1:{port}",
                              auth={"anonymous_role": "tester",
                                    "clients": {"signing_key_file": str(tmp_path / "key.pem")}})
        server = ServerThread(create_app(config), port).start()
        try:
            through = run_conformance(f"{server.url}/mcp", tmp_path / "through")
        finally:
            server.stop()

    passing_direct = {name for name, (_, failed) in direct.items() if failed == 0}
    passing_through = {name for name, (_, failed) in through.items() if failed == 0}
    print(f"conformance: {len(passing_direct)}/{len(direct)} scenarios pass direct, "
          f"{len(passing_through)}/{len(through)} through the gateway")
    assert passing_direct - passing_through == set()
    checks_direct = sum(p for p, _ in direct.values())
    checks_through = sum(p for p, _ in through.values())
    print(f"conformance checks passed: {checks_direct} direct, {checks_through} through the gateway")
    assert checks_through >= checks_direct
