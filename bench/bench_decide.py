"""B5 (part): decide() cost with 10, 1,000 and 10,000 rules, as ratios to the 10-rule case.

A "rule" here is one entry of each kind the engine indexes: a tool pattern in a
role's permissions, a resource pattern, a per-tool requirement and a binding.
The operations are a fixed mix (exact hit, glob hit, miss, resource read,
denied-with-scope-hint), the same for every size. Sizes are measured
interleaved (A B C A B C ...) and the median of the rounds is reported, so
a noisy machine moves all of them alike.

    python bench/bench_decide.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from typing import Any

import yaml

from gateway.auth.principal import Principal
from gateway.mcp import Operation
from gateway.policy import decide
from gateway.policy.model import PolicySpec, compile_policy


def policy_with(rules: int) -> Any:
    tools = [f"tool_{i}" if i % 2 else f"family_{i}_*" for i in range(rules)]
    doc = {
        "roles": {
            "worker": {"security_level": "high", "capabilities": ["process:create"],
                       "permissions": {"can_execute_tools": tools,
                                       "can_read_resources": [f"file:///data/{i}/**" for i in range(rules)]}},
            "admin": {"security_level": "critical", "permissions": {"can_execute_tools": ["*"]}},
        },
        "bindings": [{"when": {"scope": f"scope:{i}"}, "roles": ["worker"]} for i in range(rules - 1)]
        + [{"when": {"scope": "mcp:admin"}, "roles": ["admin"]}],
        "tools": {f"family_{i}_*": {"security_level": "standard"} for i in range(0, rules, 2)},
    }
    data = yaml.safe_dump(doc).encode()
    return compile_policy(PolicySpec.model_validate(doc), version=hashlib.sha256(data).hexdigest()[:12], source="bench")


def workload(rules: int) -> list[Operation]:
    middle = rules // 2 | 1
    return [
        Operation("tool_call", "tools/call", 1, name=f"tool_{middle}"),          # exact hit
        Operation("tool_call", "tools/call", 1, name=f"family_{middle - 1}_x"),  # glob hit
        Operation("tool_call", "tools/call", 1, name="not_a_tool"),              # miss -> scope hint
        Operation("resource_read", "resources/read", 1, uri=f"file:///data/{middle}/a/b.txt"),
        Operation("resource_read", "resources/read", 1, uri="file:///elsewhere/x"),
        Operation("list", "tools/list", 1),
    ]


def measure(policy: Any, principal: Principal, operations: list[Operation], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        for operation in operations:
            decide(principal, operation, policy)
    return (time.perf_counter() - start) / (loops * len(operations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loops", type=int, default=100)
    args = parser.parse_args()
    sizes = (10, 1_000, 10_000)
    principal = Principal("bench", "bench", scopes=frozenset({"scope:3"}))
    cases = {n: (policy_with(n), workload(n)) for n in sizes}
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            policy, operations = cases[n]
            samples[n].append(measure(policy, principal, operations, args.loops))
    base = statistics.median(samples[10])
    print(f"{'rules':>8}  {'median µs/decide':>16}  {'ratio to 10':>11}  {'spread (min-max µs)':>20}")
    for n in sizes:
        median = statistics.median(samples[n])
        spread = f"{min(samples[n]) * 1e6:.2f}-{max(samples[n]) * 1e6:.2f}"
        print(f"{n:>8}  {median * 1e6:>16.2f}  {median / base:>11.2f}  {spread:>20}")


if __name__ == "__main__":
    main()
