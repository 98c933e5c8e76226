"""The npm peers the suite runs (installed by `make` into tests/node): server-everything, and Node 22."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from tests.harness import NODE22, NODE_DIR, free_port, wait_for_port

EVERYTHING = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def node_env() -> dict[str, str]:
    """Environment for a third-party Node server: every socket it listens on is bound to 127.0.0.1."""
    env = dict(os.environ)
    env["NODE_OPTIONS"] = f"--require {NODE_DIR / 'loopback.cjs'}"
    return env


class NodeAuthServer:
    """An npm authorization server started from `tests/node/<script>` on a free loopback port. The script prints
    `ready <issuer>` once it serves (the issuer URL set, not just the port open). `env` adds to its environment."""

    script = ""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([str(NODE22), str(NODE_DIR / self.script), str(self.port)],
                                        env={**node_env(), **(env or {})},
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        assert ready.startswith("ready "), f"{self.script} did not start: {ready!r}"
        self.url = ready.split()[1]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextmanager
def server_everything() -> Iterator[str]:
    """Run @modelcontextprotocol/server-everything (streamable HTTP) on a free loopback port; yield its MCP URL."""
    port = free_port()
    env = node_env()
    env["PORT"] = str(port)
    process = subprocess.Popen([str(NODE22), str(EVERYTHING), "streamableHttp"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)
