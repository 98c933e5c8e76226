"""B5: decide() cost with 10, 1,000 and 10,000 rules, as ratios to the 10-rule case; and token verification
cold (a token seen for the first time: ES256 signature, claims) against cached (seen before: one hash and one
lookup, plus the revocation check), as the request path pays them.

The cedar variant is a Cedar policy (`policy: {engine: cedar}`) of as many policies as the others have rules,
a third of each shape: a tool named by the policy's scope (`resource == Gateway::Tool::"tool_7"`, which the
engine sets apart), a tool name pattern (`resource.name like "family_6_*"`) and a resource pattern, each granted
to one scope. Cedar evaluates every policy it is given; the engine gives it only those whose scope and literal
prefix fit (`gateway.policy.cedar_index`), so these shapes cost the same at every size (a condition with no
literal prefix, `like "*_admin"`, is evaluated on every decision of its action). Its operations are the same mix,
on names that exist at every size.

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
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import save
from gateway.auth.authenticator import Authenticator
from gateway.auth.keys import load_or_create_signing_key
from gateway.config import Config
from gateway.mcp import Operation
from gateway.policy import decide
from gateway.policy.model import PolicySpec, compile_policy
from gateway.principal import Principal
from gateway.sessions import MemorySessions

CONSTRAINED = {"path": {"kind": "path", "within": ["/data/**"]}, "limit": {"range": [1, 100], "optional": True},
               "mode": {"in": ["fast", "safe"], "optional": True}}
ARGUMENTS = {"path": "/data/7/a/b.txt", "limit": 5, "mode": "safe"}


def policy_with(rules: int, constrained: bool = False) -> Any:
    """`rules` rules of each kind; with `constrained`, every tool grant also constrains three arguments."""
    tools: list[Any] = [f"tool_{i}" if i % 2 else f"family_{i}_*" for i in range(rules)]
    if constrained:
        tools = [{"name": tool, "arguments": CONSTRAINED} for tool in tools]
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
    arguments = ARGUMENTS  # read only where the policy constrains arguments
    return [
        Operation("tool_call", "tools/call", 1, name=f"tool_{middle}", arguments=arguments),          # exact hit
        Operation("tool_call", "tools/call", 1, name=f"family_{middle - 1}_x", arguments=arguments),  # glob hit
        Operation("tool_call", "tools/call", 1, name="not_a_tool"),              # miss -> scope hint
        Operation("resource_read", "resources/read", 1, uri=f"file:///data/{middle}/a/b.txt"),
        Operation("resource_read", "resources/read", 1, uri="file:///elsewhere/x"),
        Operation("list", "tools/list", 1),
    ]


def cedar_policy_with(policies: int, directory: Path) -> Any:
    """`policies` Cedar policies: a tools/list grant, and the rest in three shapes by index (see above)."""
    lines = ['@id("lists") permit (principal, action == Gateway::Action::"tools/list", resource);']
    call = 'action == Gateway::Action::"tools/call"'
    for i in range(policies - 1):
        scope = 'principal.scopes.contains("scope:3")'
        lines.append([
            f'@id("family_{i}") permit (principal, {call}, resource is Gateway::Tool) '
            f'when {{ {scope} && resource.name like "family_{i}_*" }};',
            f'@id("tool_{i}") permit (principal, {call}, resource == Gateway::Tool::"tool_{i}") when {{ {scope} }};',
            f'@id("data_{i}") permit (principal, action == Gateway::Action::"resources/read", resource is '
            f'Gateway::Resource) when {{ {scope} && resource.uri like "file:///data/{i}/*" }};',
        ][i % 3])
    path = directory / f"bench-{policies}.cedar"
    path.write_text("\n".join(lines) + "\n")
    from gateway.policy.cedar import load_cedar_policy

    return load_cedar_policy(path)


def cedar_workload(policies: int) -> list[Operation]:
    """The same mix as `workload`, on the policy of each shape nearest the middle."""
    middle = policies // 2
    family, tool, data = (next(i for i in range(middle, policies) if i % 3 == shape) for shape in range(3))
    return [
        Operation("tool_call", "tools/call", 1, name=f"tool_{tool}", arguments=ARGUMENTS),
        Operation("tool_call", "tools/call", 1, name=f"family_{family}_x", arguments=ARGUMENTS),
        Operation("tool_call", "tools/call", 1, name="not_a_tool"),
        Operation("resource_read", "resources/read", 1, uri=f"file:///data/{data}/a/b.txt"),
        Operation("resource_read", "resources/read", 1, uri="file:///elsewhere/x"),
        Operation("list", "tools/list", 1),
    ]


def measure(policy: Any, principal: Principal, operations: list[Operation], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        for operation in operations:
            decide(principal, operation, policy)
    return (time.perf_counter() - start) / (loops * len(operations))


async def token_costs(rounds: int, per_round: int = 300) -> tuple[list[float], list[float]]:
    """Seconds per authenticate() for tokens never seen (cold) and for one token seen before (cached)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.model_validate({
            "upstreams": [{"name": "bench", "path": "/mcp", "url": "http://127.0.0.1:9/mcp"}],
            "policy": policy_with(10), "auth": {"clients": {"signing_key_file": f"{tmp}/key.pem"}}})
        authenticator = Authenticator(config, load_or_create_signing_key(config.auth.clients.signing_key_file),
                                      sessions=MemorySessions(config.sessions))
        resource = config.resource_url(config.upstreams[0])

        def header(token: str) -> dict[str, list[str]]:
            return {"authorization": [f"Bearer {token}"]}

        cached = header(authenticator.issue_token(subject="bench", audience=resource, scopes=["mcp:tools"]))
        await authenticator.authenticate(cached, b"", resource, "/mcp")
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(rounds):
            fresh = [header(authenticator.issue_token(subject=f"u{i}", audience=resource, scopes=["mcp:tools"]))
                     for i in range(per_round)]
            start = time.perf_counter()
            for headers in fresh:
                await authenticator.authenticate(headers, b"", resource, "/mcp")
            cold.append((time.perf_counter() - start) / per_round)
            start = time.perf_counter()
            for _ in range(per_round):
                await authenticator.authenticate(cached, b"", resource, "/mcp")
            warm.append((time.perf_counter() - start) / per_round)
        return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loops", type=int, default=100)
    args = parser.parse_args()
    sizes = (10, 1_000, 10_000)
    principal = Principal("bench", "bench", scopes=frozenset({"scope:3"}))
    variants = ("plain", "constrained", "cedar")
    with tempfile.TemporaryDirectory() as tmp:
        cases = {(v, n): (cedar_policy_with(n, Path(tmp)), cedar_workload(n)) if v == "cedar" else
                 (policy_with(n, v == "constrained"), workload(n)) for v in variants for n in sizes}
    samples: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case, (policy, operations) in cases.items():
            samples[case].append(measure(policy, principal, operations, args.loops))
    results: dict[str, Any] = {}
    for variant in variants:
        base = statistics.median(samples[(variant, 10)])
        plain = "" if variant == "plain" else f"  {'to plain':>8}"
        print(f"B5 decide() against policy size: {variant} rules"
              + {"plain": "", "constrained": " (three argument constraints on every tool grant)",
                 "cedar": " (a Cedar policy of as many policies, cedarpy)"}[variant])
        print(f"{'rules':>8}  {'median µs/decide':>16}  {'ratio to 10':>11}  {'spread (min-max µs)':>20}{plain}")
        results[f"decide_us_{variant}"], results[f"decide_ratio_{variant}"] = {}, {}
        for n in sizes:
            median = statistics.median(samples[(variant, n)])
            spread = f"{min(samples[(variant, n)]) * 1e6:.2f}-{max(samples[(variant, n)]) * 1e6:.2f}"
            versus = "" if variant == "plain" else f"  {median / statistics.median(samples[('plain', n)]):>7.2f}x"
            print(f"{n:>8}  {median * 1e6:>16.2f}  {median / base:>11.2f}  {spread:>20}{versus}")
            results[f"decide_us_{variant}"][n], results[f"decide_ratio_{variant}"][n] = median * 1e6, median / base
    cold, warm = asyncio.run(token_costs(max(3, args.rounds // 3)))
    ratios = [c / w for c, w in zip(cold, warm, strict=True)]
    print("\nB5 token verification (gateway ES256 token, revocation checked every time)")
    print(f"  cold {statistics.median(cold) * 1e6:.1f} µs, cached {statistics.median(warm) * 1e6:.2f} µs: "
          f"cached is {statistics.median(ratios):.0f}x faster (target >= 20x; spread {min(ratios):.0f}-"
          f"{max(ratios):.0f}x)")
    results.update(jwt_cold_us=statistics.median(cold) * 1e6, jwt_cached_us=statistics.median(warm) * 1e6,
                   jwt_ratio=statistics.median(ratios))
    print(f"\nresults: {save('decide_and_tokens', results)}")


if __name__ == "__main__":
    main()
