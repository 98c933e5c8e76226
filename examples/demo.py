"""`make demo`: the demo MCP server on 127.0.0.1:9000, the gateway in front of it on 127.0.0.1:8080.

Uses config.example.yaml as it is, prints a reader token and an operator
token and how to call the gateway with them, then serves until Ctrl-C.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.example.yaml"


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the process for port {port} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    sys.exit(f"nothing listened on 127.0.0.1:{port} within {seconds}s")


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def token(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "issue-token", "--config", str(CONFIG), "--ttl", "86400", *args],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def main() -> None:
    for port in (8080, 9000):
        if not port_free(port):
            sys.exit(f"127.0.0.1:{port} is in use; stop what runs there and try again")
    upstream = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo_server.py"), "--port", "9000"])
    gateway: subprocess.Popen[bytes] | None = None
    try:
        wait_for_port(9000, upstream)
        # The gateway first: it creates its signing key on its first start, and issue-token signs with that key.
        gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(CONFIG)])
        wait_for_port(8080, gateway)
        reader = token("--subject", "alice", "--scope", "mcp:tools")
        operator = token("--subject", "olga", "--claim", 'groups=["ops"]', "--claim", 'amr=["hwk"]')
        print(f"""
Demo MCP server: http://127.0.0.1:9000/mcp (tools: search, get_weather, echo, delete_file, ask_llm)
Gateway:         http://127.0.0.1:8080/mcp (config: {CONFIG.name}, policy: policies/default.yaml)

A reader token (role reader: search, get_*, echo; delete_file is refused):
  export TOKEN={reader}

An operator token (role operator: every tool; signed in with a hardware key, so delete_file is allowed):
  export OPS_TOKEN={operator}

Call a tool through the gateway (2026-07-28, stateless):
  curl -s http://127.0.0.1:8080/mcp -H "Authorization: Bearer $TOKEN" \\
    -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\
    -H 'MCP-Protocol-Version: 2026-07-28' -H 'Mcp-Method: tools/call' -H 'Mcp-Name: echo' \\
    -d '{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hi"}},
        "_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}'

Or with the SDK client: see README.md. Audit events go to ./audit.db. Ctrl-C stops both.
""", flush=True)
        gateway.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in (gateway, upstream):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
