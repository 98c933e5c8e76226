"""B12: how late the gateway's event loop wakes under load, with the audit sink writing and without.

The tail latency issue 18 targets (p99 many times p50 at one connection) means something holds the event loop
now and then. This bench measures the stall itself: the gateway (`create_app`, every feature on, the SQLite
audit sink) serves in this process on uvloop with httptools as `serve` does, with a ticker task in its loop
asking to wake every 1 ms and recording how late it wakes; wrk drives tools/call to a trivial upstream (another
process) at c=1 and c=32. Three cases, side by side in rounds:

  sink        the SQLite sink writing each batch (from a thread, as in production), durability written
  queued      the same sink, durability queued (answers do not wait for the commit)
  no-sink     the writer takes each batch off the queue without writing it (the sink's cost removed)

Printed per case: the ticker's lateness p50 / p99 / p99.9 / max in ms and how many wakes were over 1 / 5 ms,
beside wrk's requests/s and p50 / p99. Nothing is asserted.

    python bench/bench_lag.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import POLICY, Processes, free_port, median_spread, save, tools_call, upstream, wrk, wrk_script
from gateway.app import create_app, settle_garbage_collector
from gateway.audit.writer import AuditLog
from gateway.http_server import HeadDeadlineProtocol

TICK_S = 0.001


class Gateway:
    """The gateway app on uvicorn in a thread of this process, with a lateness ticker in its event loop."""

    def __init__(self, directory: Path, upstream_url: str, durability: str) -> None:
        directory.mkdir(parents=True)
        self.port = free_port()
        (directory / "policy.yaml").write_text(yaml.safe_dump(POLICY))
        config = {"listen": {"host": "127.0.0.1", "port": self.port}, "public_url": f"http://127.0.0.1:{self.port}",
                  "upstreams": [{"name": "bench", "path": "/mcp", "url": upstream_url}], "policy": "policy.yaml",
                  "auth": {"clients": {"signing_key_file": "key.pem"}},
                  "audit": {"sinks": [{"type": "sqlite", "path": "audit.db"}], "durability": durability},
                  "log_level": "WARNING", "policy_reload_interval_s": 0}
        (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
        self.app = create_app(directory / "gateway.yaml")
        settle_garbage_collector()  # as serve does
        config_ = self.app.runtime.config
        self.token = self.app.runtime.authenticator.issue_token(
            subject="bench", scopes=["mcp:tools"], audience=config_.resource_url(config_.upstreams[0]), ttl_s=86400)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", http=HeadDeadlineProtocol, access_log=False))
        self.lateness: list[float] = []
        self.recording = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def _run(self) -> None:
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        ticker = self.loop.create_task(self._tick())
        self.loop.run_until_complete(self.server.serve())
        ticker.cancel()
        self.loop.run_until_complete(asyncio.gather(ticker, return_exceptions=True))

    async def _tick(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(TICK_S)
            if self.recording:
                self.lateness.append((time.perf_counter() - asked - TICK_S) * 1000)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)


async def _drop_batches(self: AuditLog) -> None:
    """The writer with its sink's cost removed: each batch leaves the queue unwritten."""
    while self._queue:
        self._queue.popleft()
        self._written += 1
    self._offsets = [0] * len(self._offsets)
    self._release_waiters()


def lateness_summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p99": at(0.99), "p999": at(0.999), "max": ordered[-1],
            "over_1ms": sum(v > 1 for v in ordered) / len(ordered), "over_5ms": sum(v > 5 for v in ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    processes = Processes()
    results: dict[str, Any] = {"rounds": args.rounds, "seconds": args.seconds}
    original_drain = AuditLog._drain
    try:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            trivial = upstream(processes, "trivial")
            headers, body = tools_call("echo", {"text": "hello"})
            cases = {"sink": "written", "queued": "queued", "no-sink": "written"}
            for concurrency in (1, 32):
                runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
                for round_ in range(args.rounds):
                    for case, durability in cases.items():
                        AuditLog._drain = _drop_batches if case == "no-sink" else original_drain  # type: ignore[method-assign]
                        gateway = Gateway(tmp / f"{case}-{concurrency}-{round_}", trivial, durability)
                        signed = {**headers, "Authorization": f"Bearer {gateway.token}"}
                        script = wrk_script(tmp / f"{case}.lua", signed, body)
                        url = f"http://127.0.0.1:{gateway.port}/mcp"
                        wrk(url, script, concurrency, 1)  # warm up
                        gateway.lateness.clear()
                        gateway.recording = True
                        load = wrk(url, script, concurrency, args.seconds)
                        gateway.recording = False
                        runs[case].append({"wrk": load, "lag": lateness_summary(gateway.lateness)})
                        gateway.stop()
                print(f"\nB12 event-loop lateness under load, c={concurrency} (ms late for a 1 ms sleep; medians of "
                      f"{args.rounds} rounds)")
                print(f"  {'case':<8} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} | {'lag p50':>7} {'p99':>6} {'p99.9':>6} "
                      f"{'max':>6} {'>1ms':>6} {'>5ms':>5}")
                summary = {}
                for case, values in runs.items():
                    def med(key: str, part: str, values: list[dict[str, Any]] = values) -> float:
                        return median_spread([v[part][key] for v in values])[0]
                    summary[case] = {k: med(k, "lag") for k in ("p50", "p99", "p999", "max", "over_1ms", "over_5ms")}
                    summary[case] |= {f"wrk_{k}": med(k, "wrk") for k in ("rps", "p50_ms", "p99_ms")}
                    s = summary[case]
                    print(f"  {case:<8} {s['wrk_rps']:>8,.0f} {s['wrk_p50_ms']:>7.3f} {s['wrk_p99_ms']:>7.3f} | "
                          f"{s['p50']:>7.3f} {s['p99']:>6.2f} {s['p999']:>6.2f} {s['max']:>6.1f} "
                          f"{s['over_1ms']:>6.1%} {statistics.median(v['lag']['over_5ms'] for v in values):>5.0f}")
                results[f"c{concurrency}"] = summary
    finally:
        AuditLog._drain = original_drain  # type: ignore[method-assign]
        processes.stop()
    print(f"\nresults: {save('lag', results)}")


if __name__ == "__main__":
    main()
