"""What every HTTP benchmark shares: processes on loopback ports, wrk runs, medians, the results file.

Nothing here asserts a time. Figures are compared as ratios between cases run
side by side in the same rounds (A B A B ...), because this machine is shared.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RESULTS = ROOT / "bench" / "results"
MODERN = "2026-07-28"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[Any] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


class Processes:
    """Every process a benchmark starts, stopped together at the end."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[Any]] = []

    def start(self, command: Sequence[str], port: int, *, env: Mapping[str, str] | None = None,
              cwd: Path = ROOT, log: Path | None = None) -> subprocess.Popen[Any]:
        output: Any = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(list(command), cwd=cwd, env={**os.environ, **(env or {})}, stdout=output,
                                   stderr=subprocess.STDOUT)
        self._running.append(process)
        wait_for_port(port, process)
        return process

    def stop(self) -> None:
        for process in reversed(self._running):
            process.terminate()
        for process in self._running:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self._running.clear()


def upstream(processes: Processes, kind: str, *extra: str) -> str:
    """Start bench/servers.py KIND; its MCP URL."""
    port = free_port()
    processes.start([PYTHON, str(ROOT / "bench" / "servers.py"), kind, str(port), *extra], port)
    return f"http://127.0.0.1:{port}/mcp"


POLICY = {
    "roles": {"reader": {"permissions": {"can_execute_tools": ["echo", "progress"], "can_read_resources": ["bench://*"],
                                         "can_list_resources": True}}},
    "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["reader"]}],
}


def gateway(processes: Processes, directory: Path, upstream_url: str | None, *, command: Sequence[str] = (),
            serve: Sequence[str] = (), **overrides: Any) -> tuple[str, str, int]:
    """Start `mcp-gateway serve` with every security feature on (gateway JWTs, policy, SQLite audit, metrics)
    in front of `upstream_url` (or the stdio server `command`); (its MCP URL, a token for it, its pid)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (directory / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port}, "public_url": f"http://127.0.0.1:{port}",
        "upstreams": [{"name": "bench", "path": "/mcp",
                       **({"command": list(command)} if command else {"url": upstream_url})}],
        "policy": "policy.yaml", "auth": {"clients": {"signing_key_file": "key.pem"}},
        "audit": {"sinks": [{"type": "sqlite", "path": "audit.db"}]},
        "log_level": "WARNING", "policy_reload_interval_s": 0,
    }
    config.update(overrides)
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [PYTHON, "-m", "gateway.cli"]
    process = processes.start([*cli, "serve", "--config", str(path), *serve], port, log=directory / "gateway.log")
    token = subprocess.run([*cli, "issue-token", "--config", str(path), "--subject", "bench", "--scope", "mcp:tools",
                            "--ttl", "86400"], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    return f"http://127.0.0.1:{port}/mcp", token, process.pid


def tools_call(name: str, arguments: Mapping[str, Any], request_id: int = 1) -> tuple[dict[str, str], bytes]:
    """A 2026-07-28 tools/call: its routing headers and body."""
    return modern_request("tools/call", {"name": name, "arguments": dict(arguments)}, name, request_id)


def modern_request(method: str, params: Mapping[str, Any], name: str,
                   request_id: int = 1) -> tuple[dict[str, str], bytes]:
    """A 2026-07-28 request naming `name` (a tool, prompt or resource URI): its routing headers and body."""
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {
        **params, "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                            "io.modelcontextprotocol/clientCapabilities": {}}}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": method, "Mcp-Name": name}
    return headers, json.dumps(body, separators=(",", ":")).encode()


def wrk_script(path: Path, headers: Mapping[str, str], body: bytes) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    """One wrk run (one thread: the other core is for the servers); rps, p50 and p99 in ms, errors."""
    if shutil.which("wrk") is None:
        sys.exit("the HTTP benchmarks need wrk: apt-get install wrk")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def latency(percent: str) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if found is None:
            raise RuntimeError(f"wrk printed no {percent}% latency:\n{out}")
        return float(found.group(1)) * _UNITS[found.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": float(non_2xx.group(1) if non_2xx else 0) + (sum(map(float, errors.groups())) if errors else 0),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process and its running children (`serve --workers`'s worker
    processes) have used so far."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """The median and the spread (max - min) as a fraction of the median."""
    middle = statistics.median(values)
    return middle, (max(values) - min(values)) / middle if middle else 0.0


def save(section: str, data: dict[str, Any]) -> Path:
    """Merge `data` under `section` into bench/results/<today>.json (a partial run keeps the other keys)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.date.today().isoformat()}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(section, {}).update(data)
    results.setdefault("machine", {"cpus": os.cpu_count(), "python": sys.version.split()[0]})
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
