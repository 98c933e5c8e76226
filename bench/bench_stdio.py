"""B7: tools/call to a stdio MCP server, directly and through the gateway, measured in the same rounds.

direct   the SDK client talking to the SDK's MCPServer (examples/demo_server.py --stdio) over stdio, the way a
         desktop client runs a local server: one process, calls one after another (c=1) and K at once (c=8)
gateway  the same server as a stdio upstream of `mcp-gateway serve` (every feature on: gateway JWT, policy,
         SQLite audit, metrics, per-principal process, 2026-07-28 bridge), driven by wrk over HTTP at c=1 and
         c=8 with one token (so one process serves every call, as directly)

The two sides use different load generators (the SDK client cannot be pointed at wrk's side, nor wrk at
stdio): the direct side's figures include the Python client's own cost, the gateway side's do not include
any client cost worth mentioning (wrk is C). Ratios are taken within each round.

    python bench/bench_stdio.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcp import Client
from mcp.client.stdio import StdioServerParameters

from bench.common import (
    MODERN,
    PYTHON,
    ROOT,
    Processes,
    gateway,
    median_spread,
    save,
    tools_call,
    wrk,
    wrk_script,
)

SERVER = [str(ROOT / "examples" / "demo_server.py"), "--stdio"]


async def direct(concurrency: int, seconds: float) -> dict[str, float]:
    """Calls over stdio with the SDK client for `seconds`, `concurrency` at a time: rps and p50 (ms)."""
    latencies: list[float] = []
    async with Client(StdioServerParameters(command=PYTHON, args=SERVER)) as session:
        await session.call_tool("echo", {"text": "warm"})
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await session.call_tool("echo", {"text": "hello"})
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"rps": len(latencies) / elapsed, "p50_ms": statistics.median(latencies)}


def b7(processes: Processes, tmp: Path, rounds: int, seconds: float) -> dict[str, Any]:
    via, token, _ = gateway(processes, tmp / "b7", None, command=[PYTHON, *SERVER])
    headers, body = tools_call("echo", {"text": "hello"})
    script = wrk_script(tmp / "b7.lua", {**headers, "Authorization": f"Bearer {token}"}, body)
    results: dict[str, Any] = {}
    for concurrency in (1, 8):
        wrk(via, script, concurrency, 1)  # the process is started and warm
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for _ in range(rounds):
            runs["direct"].append(asyncio.run(direct(concurrency, seconds)))
            runs["gateway"].append(wrk(via, script, concurrency, seconds))
        throughput = median_spread([g["rps"] / d["rps"] for g, d in zip(runs["gateway"], runs["direct"],
                                                                        strict=True)])
        added = median_spread([g["p50_ms"] - d["p50_ms"] for g, d in zip(runs["gateway"], runs["direct"],
                                                                          strict=True)])[0]
        print(f"\nB7 tools/call to a stdio server, c={concurrency}")
        for name, values in runs.items():
            rps = median_spread([v["rps"] for v in values])[0]
            p50 = median_spread([v["p50_ms"] for v in values])[0]
            print(f"  {name:<8} {rps:>8,.0f} rps  p50 {p50:.3f} ms")
        print(f"  gateway/direct throughput: {throughput[0]:.2f}x (spread {throughput[1]:.0%}); p50 added "
              f"{added:+.3f} ms")
        results[f"c{concurrency}"] = {"runs": runs, "throughput_ratio": throughput[0], "added_p50_ms": added}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    processes = Processes()
    try:
        with tempfile.TemporaryDirectory() as name:
            results = {"rounds": args.rounds, "seconds": args.seconds, "protocol": MODERN,
                       "B7": b7(processes, Path(name), args.rounds, args.seconds)}
    finally:
        processes.stop()
    print(f"\nresults: {save('stdio', results)}")


if __name__ == "__main__":
    main()
