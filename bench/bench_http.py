"""B1, B2, B4: the gateway on the wire, beside direct access and nginx, measured in the same rounds.

HOP the forwarding hop alone with each candidate HTTP client (aiohttp, httpx, httpx2, the gateway's own).
B1  tools/call (small arguments) to the SDK's MCPServer (stateless, JSON answers), directly and through
    `mcp-gateway serve` with every feature on (gateway JWT, policy, SQLite audit, metrics); wrk at
    concurrency 32 (throughput) and 1 (latency).
B2  the same request to a trivial upstream (a bare ASGI app with a canned answer): directly, through nginx
    proxy_pass (Debian nginx, one worker, keepalive to the upstream), and through the gateway.
B3  the same tools/call through IBM ContextForge (PyPI mcp-contextforge-gateway 1.1.x, installed by this script
    into bench/.contextforge with Python 3.12 from pyenv), one worker, SQLite, auth on, its direct_proxy mode,
    in front of the same upstream: directly, through the gateway, through ContextForge.
B4  SSE: time to the first event and to the end of a tool that streams 1,000 progress notifications,
    directly and through the gateway; and the gateway's peak RSS while a 100 MB resource streams through.
B9  tracing: the B2 request through the gateway with `tracing` off, on (every request sampled, exported over
    OTLP/HTTP to a local receiver) and on with sample_ratio 0 (context propagated, nothing recorded); and what
    the off path's hooks cost, timed alone, as a share of the gateway's CPU per request.
B10 beyond one process, trivial upstream: a rate limit (never reached) counted in memory against in Redis, and
    `serve --workers 2` against one process, both with Redis-backed sessions and buckets.
B11 audit durability: `written` (an answer's end waits for its event's commit; the default) against `queued`.

Each round runs every case once, in the same order (A B A B ...); medians and spreads are over rounds,
ratios are taken within each round. Absolute figures are printed, never asserted.

    python bench/bench_http.py [--rounds 3] [--seconds 5] [--only B1,B2,B4,B9,B10,B11]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MODERN,
    Processes,
    cpu_seconds,
    free_port,
    gateway,
    median_spread,
    modern_request,
    save,
    tools_call,
    upstream,
    wrk,
    wrk_script,
)

_T = TypeVar("_T")
Case = tuple[str, Path, int | None]  # (url, wrk script, pid of the process whose CPU per request is reported)


Runs = dict[str, list[dict[str, float]]]  # case -> one wrk result per round


def rounds_of(cases: dict[str, Case], concurrency: int, rounds: int, seconds: float) -> Runs:
    for url, script, _ in cases.values():  # warm up connections, caches and lazily started work
        wrk(url, script, concurrency, 1)
    runs: Runs = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (url, script, pid) in cases.items():
            before = cpu_seconds(pid) if pid else 0.0
            result = wrk(url, script, concurrency, seconds)
            if pid and result["rps"]:
                result["cpu_us"] = (cpu_seconds(pid) - before) / (result["rps"] * seconds) * 1e6
            runs[name].append(result)
    return runs


def both(cases: dict[str, Case], title: str, rounds: int, seconds: float) -> tuple[Runs, Runs]:
    """Every case at concurrency 32 (throughput), then at 1 (latency), each table printed."""
    c32 = rounds_of(cases, 32, rounds, seconds)
    c1 = rounds_of(cases, 1, rounds, seconds)
    print_runs(title, 32, c32)
    print_runs(title, 1, c1)
    return c32, c1


def ratio(runs: Runs, top: str, bottom: str, key: str) -> tuple[float, float]:
    return median_spread([a[key] / b[key] for a, b in zip(runs[top], runs[bottom], strict=True)])


def summary(runs: Runs) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in runs.items():
        out[name] = {key: median_spread([v[key] for v in values])[0]
                     for key in ("rps", "p50_ms", "p99_ms", "errors", "cpu_us") if key in values[0]}
    return out


def print_runs(title: str, concurrency: int, runs: Runs) -> None:
    print(f"\n{title}, c={concurrency}")
    print(f"  {'case':<10} {'rps':>9} {'spread':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'CPU us/req':>11}")
    for name, values in runs.items():
        rps, spread = median_spread([v["rps"] for v in values])
        p50 = median_spread([v["p50_ms"] for v in values])[0]
        p99 = median_spread([v["p99_ms"] for v in values])[0]
        errors = sum(v["errors"] for v in values)
        cpu = f"{median_spread([v['cpu_us'] for v in values])[0]:>11.0f}" if "cpu_us" in values[0] else f"{'-':>11}"
        print(f"  {name:<10} {rps:>9,.0f} {spread:>6.0%} {p50:>8.3f} {p99:>8.3f} {errors:>7.0f} {cpu}")


def b1(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """Directly, through the gateway as configured by default (`audit.durability: written`), and through one whose
    answers wait only for their events to be queued."""
    direct = upstream(processes, "mcp")
    headers, body = tools_call("echo", {"text": "hello"})
    cases: dict[str, Case] = {"direct": (direct, wrk_script(tmp / "b1-direct.lua", headers, body), None)}
    for name, durability in (("gateway", "written"), ("queued", "queued")):
        audit = {"sinks": [{"type": "sqlite", "path": "audit.db"}], "durability": durability}
        via, token, pid = gateway(processes, tmp / f"b1-{name}", direct, audit=audit)
        cases[name] = (via, wrk_script(tmp / f"b1-{name}.lua", {**headers, "Authorization": f"Bearer {token}"},
                                       body), pid)
    c32, c1 = both(cases, "B1 tools/call, MCPServer (stateless JSON); gateway: durability written / queued",
                   rounds, seconds)
    targets = {}
    for name, suffix in (("gateway", ""), ("queued", "_queued")):
        throughput, throughput_spread = ratio(c32, name, "direct", "rps")
        latency, latency_spread = ratio(c1, name, "direct", "p50_ms")
        added = median_spread([g["p50_ms"] - d["p50_ms"] for g, d in zip(c1[name], c1["direct"], strict=True)])[0]
        print(f"  {name}/direct throughput at c=32: {throughput:.2f}x (spread {throughput_spread:.0%}); p50 at c=1: "
              f"{latency:.2f}x, +{added:.3f} ms (spread {latency_spread:.0%})")
        targets |= {f"sdk_rps_c32{suffix}": (throughput, throughput_spread),
                    f"sdk_p99_c1{suffix}": ratio(c1, name, "direct", "p99_ms"),
                    f"sdk_p99_c32{suffix}": ratio(c32, name, "direct", "p99_ms")}
    return {"c32": summary(c32), "c1": summary(c1), "throughput_ratio": targets["sdk_rps_c32"][0],
            "p50_ratio": ratio(c1, "gateway", "direct", "p50_ms")[0], "targets": targets}


NGINX_CONF = """worker_processes 1;
master_process off;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream trivial {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://trivial;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def b2(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        sys.exit("B2 needs nginx: apt-get install nginx")
    direct = upstream(processes, "trivial")
    via, token, pid = gateway(processes, tmp / "b2", direct)
    port = free_port()
    (tmp / "nginx").mkdir()
    conf = tmp / "nginx" / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp / "nginx", upstream=urlsplit(direct).port, port=port))
    nginx_process = processes.start([nginx, "-c", str(conf), "-p", str(tmp / "nginx")], port)
    headers, body = tools_call("echo", {"text": "hello"})
    plain = wrk_script(tmp / "b2-plain.lua", headers, body)
    cases = {"trivial": (direct, plain, None), "nginx": (f"http://127.0.0.1:{port}/mcp", plain, nginx_process.pid),
             "gateway": (via, wrk_script(tmp / "b2-gateway.lua", {**headers, "Authorization": f"Bearer {token}"},
                                         body), pid)}
    c32, c1 = both(cases, "B2 tools/call, trivial upstream", rounds, seconds)
    saturation, saturation_spread = ratio(c32, "gateway", "nginx", "rps")
    latency, latency_spread = ratio(c1, "gateway", "trivial", "p50_ms")
    p99 = ratio(c1, "gateway", "nginx", "p99_ms")
    print(f"  gateway/nginx throughput at c=32: {saturation:.2f}x (spread {saturation_spread:.0%})")
    print(f"  gateway p50 / trivial's own p50 at c=1: {latency:.2f}x (spread {latency_spread:.0%})")
    print(f"  gateway p99 / nginx's p99 at c=1: {p99[0]:.2f}x (spread {p99[1]:.0%})")
    return {"c32": summary(c32), "c1": summary(c1), "throughput_ratio_to_nginx": saturation,
            "p50_ratio_to_upstream": latency,
            "targets": {"trivial_p99_c1": p99, "trivial_rps_c32": (saturation, saturation_spread),
                        "trivial_p50_c1": (latency, latency_spread)}}


def hop(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """The forwarding hop alone, with each candidate client, in front of the trivial upstream."""
    direct = upstream(processes, "trivial")
    headers, body = tools_call("echo", {"text": "hello"})
    plain = wrk_script(tmp / "hop.lua", headers, body)
    cases: dict[str, Case] = {}
    for client in ("aiohttp", "httpx", "httpx2", "lean"):
        port = free_port()
        process = processes.start([sys.executable, str(Path(__file__).parent / "hops.py"), client, str(port)], port,
                                  env={"UPSTREAM": direct})
        cases[client] = (f"http://127.0.0.1:{port}/mcp", plain, process.pid)
    c32, c1 = both(cases, "HOP a bare pass-through per upstream client, trivial upstream", rounds, seconds)
    return {"c32": summary(c32), "c1": summary(c1)}


CONTEXTFORGE = Path(__file__).resolve().parent / ".contextforge"
CONTEXTFORGE_SECRET = "bench-jwt-secret-that-is-long-enough-0123456789"


def contextforge_python() -> Path:
    """ContextForge's own venv (Python 3.12, which it needs), created on first use."""
    venv = CONTEXTFORGE / "venv"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    candidates = sorted(Path.home().glob(".pyenv/versions/3.12.*/bin/python"))
    found = shutil.which("python3.12")
    interpreter = str(candidates[-1]) if candidates else found
    if interpreter is None:
        sys.exit("B3 needs Python 3.12 (pyenv install 3.12) for ContextForge")
    print(f"B3: installing mcp-contextforge-gateway 1.1.x into {venv} (once)", flush=True)
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, env={**os.environ, "PYENV_VERSION": "3.12"})
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "mcp-contextforge-gateway>=1.1,<1.2"], check=True)
    return python


def contextforge(processes: Processes, tmp: Path, upstream_url: str) -> tuple[str, dict[str, str], int]:
    """Start ContextForge with the upstream registered in direct_proxy mode; (MCP URL, headers to send, pid)."""
    python = contextforge_python()
    port = free_port()
    (tmp / "contextforge").mkdir()
    env = {
        "DATABASE_URL": f"sqlite:///{tmp}/contextforge/cf.db", "JWT_SECRET_KEY": CONTEXTFORGE_SECRET,
        "AUTH_ENCRYPTION_SECRET": "bench-encryption-secret-0123456789abcdef",
        "PLATFORM_ADMIN_EMAIL": "admin@example.com", "PLATFORM_ADMIN_PASSWORD": "Bench@Admin2026!",
        "BASIC_AUTH_PASSWORD": "Bench@Basic2026!", "DEFAULT_USER_PASSWORD": "Bench@Default2026!",
        "SSRF_ALLOW_LOCALHOST": "true", "RATE_LIMITING_ENABLED": "false", "MCPGATEWAY_DIRECT_PROXY_ENABLED": "true",
        "MCPGATEWAY_UI_ENABLED": "false", "MCPGATEWAY_ADMIN_API_ENABLED": "true", "LOG_LEVEL": "ERROR",
        "CACHE_TYPE": "memory", "REDIS_URL": "",
    }
    process = processes.start([str(python.parent / "mcpgateway"), "--host", "127.0.0.1", "--port", str(port)], port,
                              env=env, cwd=tmp / "contextforge", log=tmp / "contextforge" / "log")
    token = subprocess.run([str(python), "-m", "mcpgateway.utils.create_jwt_token", "--username", "admin@example.com",
                            "--exp", "600", "--secret", CONTEXTFORGE_SECRET], capture_output=True, text=True,
                           check=True, env={**os.environ, **env}, cwd=tmp / "contextforge").stdout.strip().split()[-1]
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(100):  # the port opens before the app has finished starting
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    registered = httpx.post(f"{base}/gateways", headers=auth, timeout=60, json={
        "name": "bench", "url": upstream_url, "transport": "STREAMABLEHTTP", "gateway_mode": "direct_proxy"})
    registered.raise_for_status()
    return f"{base}/mcp", {**auth, "X-Context-Forge-Gateway-Id": registered.json()["id"]}, process.pid


def b3(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    direct = upstream(processes, "mcp")
    via, token, pid = gateway(processes, tmp / "b3", direct)
    forge, forge_headers, forge_pid = contextforge(processes, tmp, direct)
    headers, body = tools_call("echo", {"text": "hello"})
    # ContextForge speaks the 2025 protocol to its clients: the same call without the 2026-07-28 envelope.
    legacy_body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                              "params": {"name": "echo", "arguments": {"text": "hello"}}}).encode()
    legacy = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    check = httpx.post(forge, headers={**legacy, **forge_headers}, content=legacy_body, timeout=60)
    if check.status_code != 200 or b'"hello"' not in check.content:
        sys.exit(f"B3: ContextForge did not forward the call: {check.status_code} {check.text[:300]}")
    cases = {"direct": (direct, wrk_script(tmp / "b3-direct.lua", headers, body), None),
             "gateway": (via, wrk_script(tmp / "b3-gateway.lua", {**headers, "Authorization": f"Bearer {token}"},
                                         body), pid),
             "forge": (forge, wrk_script(tmp / "b3-forge.lua", {**legacy, **forge_headers}, legacy_body), forge_pid)}
    c32, c1 = both(cases, "B3 tools/call: direct, gateway, ContextForge 1.1 (direct_proxy, SQLite, one worker)",
                   rounds, seconds)
    over, spread = ratio(c32, "gateway", "forge", "rps")
    print(f"  gateway/ContextForge throughput at c=32: {over:,.0f}x (spread {spread:.0%}; target >= 100)")
    return {"c32": summary(c32), "c1": summary(c1), "gateway_over_contextforge": over}


def _post(url: str, headers: dict[str, str], body: bytes) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    connection.request("POST", parts.path, body=body, headers=headers)
    return connection.getresponse()


def stream_times(url: str, headers: dict[str, str], body: bytes) -> tuple[float, float, int]:
    """(ms to the first SSE event, ms to the end, events) for one streamed tools/call."""
    started = time.perf_counter()
    response = _post(url, headers, body)
    first, events = 0.0, 0
    while line := response.readline():
        if line.startswith(b"data:"):
            events += 1
            if events == 1:
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    response.close()
    return first * 1000, total * 1000, events


def peak_rss(pid: int, work: Callable[[], _T]) -> tuple[float, float, _T]:
    """(RSS before in MB, peak RSS during `work` in MB, what `work` returned), sampling every 5 ms."""

    def rss() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    before, peak, done = rss(), 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return before, max(peak, rss()), result


def b4(processes: Processes, tmp: Path, rounds: int, _seconds: float) -> dict[str, Any]:
    direct = upstream(processes, "mcp", "--sse")
    via, token, pid = gateway(processes, tmp / "b4", direct)
    headers, body = tools_call("progress", {"count": 1000})
    message = json.loads(body)
    message["params"]["_meta"]["progressToken"] = "bench"
    body = json.dumps(message).encode()
    cases = {"direct": headers, "gateway": {**headers, "Authorization": f"Bearer {token}"}}
    urls = {"direct": direct, "gateway": via}
    for name in cases:
        stream_times(urls[name], cases[name], body)  # warm up
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in cases}
    for _ in range(max(rounds, 5) * 2):
        for name in cases:
            runs[name].append(stream_times(urls[name], cases[name], body))
    print("\nB4 SSE: a tool streaming 1,000 progress notifications")
    print(f"  {'case':<10} {'first event ms':>15} {'total ms':>10} {'events':>7}")
    for name, values in runs.items():
        print(f"  {name:<10} {median_spread([v[0] for v in values])[0]:>15.2f} "
              f"{median_spread([v[1] for v in values])[0]:>10.1f} {values[0][2]:>7}")
    first, first_spread = median_spread([g[0] / d[0] for g, d in zip(runs["gateway"], runs["direct"], strict=True)])
    total, total_spread = median_spread([g[1] / d[1] for g, d in zip(runs["gateway"], runs["direct"], strict=True)])
    print(f"  gateway/direct first event: {first:.2f}x (spread {first_spread:.0%}); "
          f"total: {total:.2f}x (spread {total_spread:.0%})")

    # 100 MB through: a 2026-07-28 resources/read answered as one JSON body by a JSON-mode upstream, read by the
    # client as fast as it comes, directly and through the gateway, timed side by side; the gateway's RSS sampled
    # meanwhile. (An SSE event is inspected whole, so a 100 MB event would be refused by
    # limits.max_inspected_bytes rather than streamed.)
    json_upstream = upstream(processes, "mcp")
    via, token, pid = gateway(processes, tmp / "b4-json", json_upstream)
    read_headers, read_body = modern_request("resources/read", {"uri": "bench://big"}, "bench://big")
    read_cases = {"direct": (json_upstream, read_headers), "gateway": (via, {**read_headers,
                                                                            "Authorization": f"Bearer {token}"})}

    def download(url: str, headers: dict[str, str]) -> tuple[float, int]:
        started = time.perf_counter()
        response = _post(url, headers, read_body)
        received, last = 0, b""
        while chunk := response.read(65536):
            received += len(chunk)
            last = chunk
        response.close()
        if response.status != 200 or not last.rstrip().endswith(b"}"):
            sys.exit(f"B4: the 100 MB read failed through {url}: {response.status} ...{last[-200:]!r}")
        return (time.perf_counter() - started) * 1000, received

    reads: dict[str, list[float]] = {name: [] for name in read_cases}
    growth: list[float] = []
    for _ in range(rounds):
        for name, (url, headers) in read_cases.items():
            if name == "gateway":
                before, peak, (ms, received) = peak_rss(pid, lambda u=url, h=headers: download(u, h))
                growth.append(peak - before)
            else:
                ms, received = download(url, headers)
            reads[name].append(ms)
    read_ratio = median_spread([g / d for g, d in zip(reads["gateway"], reads["direct"], strict=True)])
    print(f"  100 MB 2026-07-28 resources/read ({received / 2**20:.1f} MB): direct "
          f"{median_spread(reads['direct'])[0]:.0f} ms, gateway {median_spread(reads['gateway'])[0]:.0f} ms, "
          f"{read_ratio[0]:.2f}x (spread {read_ratio[1]:.0%}); gateway RSS growth {max(growth):.1f} MB at most")
    return {"first_event_ratio": first, "total_ratio": total,
            "first_event_ms": {n: median_spread([v[0] for v in r])[0] for n, r in runs.items()},
            "total_ms": {n: median_spread([v[1] for v in r])[0] for n, r in runs.items()},
            "big_read": {"received_mb": received / 2**20, "ms": {n: median_spread(v)[0] for n, v in reads.items()},
                         "rss_growth_mb": growth},
            "targets": {"sse_first_event": (first, first_spread), "read_100mb_time": read_ratio,
                        "read_100mb_rss_growth_mb": (max(growth), median_spread(growth)[1])}}


def off_path_us() -> float:
    """What a request pays for tracing while it is off: the calls the request path makes on the no-op trace,
    in the order it makes them, timed alone (µs per request, best of 5)."""
    from gateway.tracing import NO_TRACE

    class Runtime:
        tracing = None

    runtime, trace = Runtime(), NO_TRACE

    def one_request() -> None:
        if runtime.tracing is not None:  # middleware: a trace only when tracing is on
            raise AssertionError
        with trace.span("authenticate"):
            pass
        with trace.span("decide"):
            pass
        if trace.upstream(None):  # type: ignore[arg-type]  # forwarding: the context to send, none
            raise AssertionError
        trace.upstream_done(200, None)
        with trace.span("audit"):
            pass
        trace.answered(None, 200)  # type: ignore[arg-type]

    count = 200_000
    return min(timeit.repeat(one_request, number=count, repeat=5)) / count * 1e6


def b9(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    direct = upstream(processes, "trivial")
    receiver_port = free_port()
    processes.start([sys.executable, str(Path(__file__).parent / "servers.py"), "otlp", str(receiver_port)],
                    receiver_port)
    endpoint = f"http://127.0.0.1:{receiver_port}/v1/traces"
    headers, body = tools_call("echo", {"text": "hello"})
    cases: dict[str, Case] = {}
    for name, tracing in (("off", {}), ("on", {"enabled": True, "endpoint": endpoint}),
                          ("on-0%", {"enabled": True, "endpoint": endpoint, "sample_ratio": 0.0})):
        via, token, pid = gateway(processes, tmp / f"b9-{name}", direct, **({"tracing": tracing} if tracing else {}))
        cases[name] = (via, wrk_script(tmp / f"b9-{name}.lua", {**headers, "Authorization": f"Bearer {token}"},
                                       body), pid)
    c32, c1 = both(cases, "B9 tracing off / on / on sampling nothing, trivial upstream", rounds, seconds)
    out: dict[str, Any] = {"c32": summary(c32), "c1": summary(c1)}
    for case in ("on", "on-0%"):
        cpu, cpu_spread = ratio(c32, case, "off", "cpu_us")
        rps, rps_spread = ratio(c32, case, "off", "rps")
        p50 = ratio(c1, case, "off", "p50_ms")[0]
        print(f"  {case}/off at c=32: CPU per request {cpu:.2f}x (spread {cpu_spread:.0%}), throughput {rps:.2f}x "
              f"(spread {rps_spread:.0%}); p50 at c=1 {p50:.2f}x")
        out[case] = {"cpu_ratio": cpu, "rps_ratio": rps, "p50_ratio": p50}
    hooks = off_path_us()
    off_cpu = median_spread([v["cpu_us"] for v in c32["off"]])[0]
    print(f"  off path: {hooks * 1000:.0f} ns of hooks per request, {hooks / off_cpu:.2%} of the gateway's "
          f"{off_cpu:.0f} µs CPU per request")
    out["off_path_us"], out["off_path_share"] = hooks, hooks / off_cpu
    return out


QUOTA = [{"id": "bench", "match": {"any": True}, "per": "principal", "limit": "1000000/second"}]  # never reached


def b10(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """Beyond one process, on the wire: a rate limit's buckets in memory against in Redis (one process each), and
    `serve --workers 2` against 1 with the same Redis-backed configuration."""
    direct = upstream(processes, "trivial")
    headers, body = tools_call("echo", {"text": "hello"})
    redis = {"sessions": {"backend": "redis", "url": "redis://127.0.0.1:6379/0"}}
    cases: dict[str, Case] = {}
    for name, serve, overrides in (("quota-mem", (), {}), ("quota-redis", (), redis),
                                   ("workers-2", ("--workers", "2"), redis)):
        via, token, pid = gateway(processes, tmp / f"b10-{name}", direct, serve=serve, rate_limits=QUOTA, **overrides)
        cases[name] = (via, wrk_script(tmp / f"b10-{name}.lua", {**headers, "Authorization": f"Bearer {token}"},
                                       body), pid)
    c32, c1 = both(cases, "B10 rate limit in memory / in Redis, serve --workers 2 (Redis), trivial upstream",
                   rounds, seconds)
    redis_rps, redis_spread = ratio(c32, "quota-redis", "quota-mem", "rps")
    workers_rps, workers_spread = ratio(c32, "workers-2", "quota-redis", "rps")
    print(f"  Redis/memory buckets at c=32: throughput {redis_rps:.2f}x (spread {redis_spread:.0%}), "
          f"p50 at c=1 {ratio(c1, 'quota-redis', 'quota-mem', 'p50_ms')[0]:.2f}x")
    print(f"  --workers 2 / 1 at c=32: throughput {workers_rps:.2f}x (spread {workers_spread:.0%}; 2 cores, shared "
          f"with wrk and the upstream)")
    return {"c32": summary(c32), "c1": summary(c1), "redis_to_memory_rps": redis_rps, "workers2_to_1_rps": workers_rps}


def b11(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """`audit.durability`: an answer's end waiting for its event's commit (written, the default) against waiting
    only for it to be queued, SQLite sink, trivial upstream."""
    direct = upstream(processes, "trivial")
    headers, body = tools_call("echo", {"text": "hello"})
    cases: dict[str, Case] = {}
    for name in ("queued", "written"):
        audit = {"sinks": [{"type": "sqlite", "path": "audit.db"}], "durability": name}
        via, token, pid = gateway(processes, tmp / f"b11-{name}", direct, audit=audit)
        cases[name] = (via, wrk_script(tmp / f"b11-{name}.lua", {**headers, "Authorization": f"Bearer {token}"},
                                       body), pid)
    c32, c1 = both(cases, "B11 audit durability queued / written (SQLite), trivial upstream", rounds, seconds)
    rps, rps_spread = ratio(c32, "written", "queued", "rps")
    p50, p50_spread = ratio(c1, "written", "queued", "p50_ms")
    p99 = ratio(c1, "written", "queued", "p99_ms")[0]
    print(f"  written/queued at c=32: throughput {rps:.2f}x (spread {rps_spread:.0%}); at c=1: p50 {p50:.2f}x "
          f"(spread {p50_spread:.0%}), p99 {p99:.2f}x")
    return {"c32": summary(c32), "c1": summary(c1), "rps_ratio": rps, "p50_ratio": p50, "p99_ratio": p99}


BENCHES = {"HOP": hop, "B1": b1, "B2": b2, "B3": b3, "B4": b4, "B9": b9, "B10": b10,
           "B11": b11}  # in the order they run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--only", default="HOP,B1,B2,B3,B4,B9,B10,B11")
    args = parser.parse_args()
    wanted = set(args.only.upper().split(","))
    results: dict[str, Any] = {"rounds": args.rounds, "seconds": args.seconds, "protocol": MODERN}
    processes = Processes()
    try:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            for name, bench in BENCHES.items():
                if name in wanted:
                    results[name] = bench(processes, tmp, args.rounds, args.seconds)
                    processes.stop()
    finally:
        processes.stop()
    print(f"\nresults: {save('http', results)}")


if __name__ == "__main__":
    main()
