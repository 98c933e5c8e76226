"""B8: what a rate limit costs a decision: taking tokens from buckets in memory against in Redis.

The request path asks the rate limiter once per counted message (`RateLimiter.decided`): rules matched, bucket
keys built, and one token taken from each bucket, in process memory (one gateway process) or by one Lua script
in the sessions' Redis (every replica shares the buckets). Measured side by side in rounds (memory, Redis,
memory, Redis, ...) with one rule and with three rules counting the same call, the limits set so high that
every call is allowed (the cost of counting, not of refusing). Redis is the local one at 127.0.0.1:6379: the
figure is the round trip a replica next to its Redis pays.

    python bench/bench_quota.py [--rounds 9] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import save
from gateway.config import Sessions
from gateway.mcp import Operation
from gateway.metrics import Metrics
from gateway.policy.engine import Decision
from gateway.principal import Principal
from gateway.ratelimit.gate import RateLimiter
from gateway.ratelimit.rules import RateLimit
from gateway.sessions import MemorySessions, RedisSessions


class _Exchange:
    """What `RateLimiter.decided` reads of an exchange."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.upstream = type("Upstream", (), {"name": "bench"})()


def _rules(count: int, run: str) -> list[RateLimit]:
    shapes = [{"match": {"any": True}, "limit": "1000000/second"},
              {"match": {"role": "reader"}, "tool": "*", "limit": "1000000/second"},
              {"match": {"any": True}, "per": "upstream", "limit": "1000000/second"}]
    return [RateLimit.model_validate({"id": f"{run}-{i}", **shapes[i]}) for i in range(count)]


async def _per_call(limiter: RateLimiter, calls: int) -> float:
    ex: Any = _Exchange(Principal("bench", "bench"))
    op = Operation("tool_call", "tools/call", 1, "echo", None, {})
    decision = Decision(True, "role:reader:tool", ("reader",), "v")
    start = time.perf_counter()
    for _ in range(calls):
        if not (await limiter.decided(ex, op, decision)).allowed:
            raise SystemExit("a bench call was refused: the limits are meant to allow every call")
    return (time.perf_counter() - start) / calls


async def main_async(rounds: int, calls: int) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    memory = MemorySessions(Sessions())
    redis = RedisSessions(Sessions(backend="redis", url="redis://127.0.0.1:6379/0"))
    cases = {(store, n): RateLimiter(_rules(n, f"{run}-{store}"), sessions, "closed", Metrics())
             for store, sessions in (("memory", memory), ("redis", redis)) for n in (1, 3)}
    samples: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    try:
        for _ in range(rounds):
            for case, limiter in cases.items():
                samples[case].append(await _per_call(limiter, calls))
    finally:
        await redis.close()
    print("B8 rate limit cost per counted call (RateLimiter.decided): buckets in memory vs in Redis")
    print(f"{'rules':>6}  {'memory µs':>10}  {'redis µs':>10}  {'redis / memory':>14}  {'spread redis':>14}")
    results: dict[str, Any] = {}
    for n in (1, 3):
        mem, red = statistics.median(samples[("memory", n)]), statistics.median(samples[("redis", n)])
        spread = (max(samples[("redis", n)]) - min(samples[("redis", n)])) / red
        print(f"{n:>6}  {mem * 1e6:>10.1f}  {red * 1e6:>10.1f}  {red / mem:>13.1f}x  {spread:>13.0%}")
        results[f"rules_{n}"] = {"memory_us": mem * 1e6, "redis_us": red * 1e6, "ratio": red / mem}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    results = asyncio.run(main_async(args.rounds, args.calls))
    print(f"\nresults: {save('rate_limits', results)}")


if __name__ == "__main__":
    main()
