"""Rate limits (`rate_limits:` in the gateway config): token buckets per principal, client, role or upstream.

Counted: tools/call, resources/read, prompts/get and the server's sampling requests; never lists, ping,
initialize, discover or completion. A request takes one token from every rule that applies, all or none; over a
limit it is refused (HTTP 429, `Retry-After`, JSON-RPC -32018), audited `rate_limited` and never forwarded.
Buckets live in memory, or in the sessions' Redis where replicas share them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import redis.asyncio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from prometheus_client import generate_latest

from gateway import create_app
from gateway.cli import main
from gateway.config import ConfigError, load_config
from gateway.errors import StateUnavailable
from gateway.policy.explain import operation_for
from gateway.principal import Principal
from gateway.ratelimit.buckets import MemoryBuckets, RedisBuckets, Taken, retry_after
from gateway.ratelimit.rules import Bucket, Limits, RateLimit
from tests.harness import (
    DEFAULT_POLICY,
    Deployment,
    Recorder,
    ServerThread,
    audit_events,
    deploy,
    free_port,
    proxy_for,
    write_config,
)
from tests.node_peers import server_everything
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_sampling_limits import Model, sampling_upstream

REDIS_URL = "redis://127.0.0.1:6379/0"
ISSUER = "https://issuer.example"


def principal(subject: str = "alice", client_id: str | None = None, issuer: str = ISSUER) -> Principal:
    return Principal(subject=subject, issuer=issuer, client_id=client_id)


def rule(**fields: Any) -> RateLimit:
    return RateLimit.model_validate(fields)


# ---- which rules count an operation -----------------------------------------------------------------------

TABLE_RULES = [
    rule(id="readers", match={"role": "reader"}, tool="*", limit="60/minute", burst=10),
    rule(id="bot-deploy", match={"client_id": "ci-bot"}, tool="deploy", limit="5/hour"),
    rule(id="everyone", match={"any": True}, limit="600/minute"),
    rule(id="carol-getters", match={"subject": "carol"}, tool="get_*", limit="1/second"),
    rule(match={"role": "ops", "client_id": "ci-bot"}, limit="10/day"),  # every key must hold; id rate_limits[4]
]

# (subject, client, roles, method, name or uri, the rules that count it)
APPLIES = [
    ("alice", None, ["reader"], "tools/call", "echo", ["readers", "everyone"]),
    ("alice", None, ["reader"], "resources/read", "file:///srv/docs/a", ["everyone"]),  # tool: counts calls only
    ("alice", None, ["reader"], "prompts/get", "summarize", ["everyone"]),
    ("alice", None, ["reader"], "sampling/createMessage", None, ["everyone"]),
    ("alice", None, [], "tools/call", "echo", ["everyone"]),
    ("alice", None, ["writer"], "tools/call", "echo", ["everyone"]),
    ("bot", "ci-bot", [], "tools/call", "deploy", ["bot-deploy", "everyone"]),
    ("bot", "ci-bot", [], "tools/call", "deployer", ["everyone"]),  # a glob without * is the name exactly
    ("bot", "ci-bot", [], "resources/read", "file:///deploy", ["everyone"]),
    ("bot", "ci-bot-2", [], "tools/call", "deploy", ["everyone"]),
    ("carol", None, [], "tools/call", "get_weather", ["everyone", "carol-getters"]),
    ("carol", None, [], "tools/call", "search", ["everyone"]),
    ("carol", None, [], "prompts/get", "get_weather", ["everyone"]),  # a tool glob never counts a prompt
    ("caroline", None, [], "tools/call", "get_weather", ["everyone"]),
    ("bot", "ci-bot", ["ops"], "tools/call", "search", ["everyone", "rate_limits[4]"]),
    ("olga", None, ["ops"], "tools/call", "search", ["everyone"]),  # role without the client: not that rule
    # never counted, whoever asks
    ("bot", "ci-bot", ["reader", "ops"], "tools/list", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "resources/list", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "resources/templates/list", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "prompts/list", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "ping", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "initialize", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "server/discover", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "completion/complete", "deploy", []),
    ("bot", "ci-bot", ["reader", "ops"], "logging/setLevel", None, []),
    ("bot", "ci-bot", ["reader", "ops"], "resources/subscribe", "file:///deploy", []),
    ("bot", "ci-bot", ["reader", "ops"], "elicitation/create", None, []),
]


def _operation(method: str, target: str | None) -> Any:
    if target is not None and ":" in target:
        return operation_for(method, uri=target)
    return operation_for(method, target)


@pytest.mark.parametrize(("subject", "client", "roles", "method", "target", "expected"), APPLIES,
                         ids=[f"{s}-{c}-{'+'.join(r) or 'noroles'}-{m}-{t}" for s, c, r, m, t, _ in APPLIES])
def test_the_rules_that_count_an_operation(subject: str, client: str | None, roles: list[str], method: str,
                                           target: str | None, expected: list[str]) -> None:
    buckets = Limits(TABLE_RULES).buckets(principal(subject, client), roles, _operation(method, target), "demo")
    assert [b.rule for b in buckets] == expected


def test_a_bucket_carries_its_rules_size_and_refill_rate() -> None:
    limits = Limits([*TABLE_RULES, rule(match={"any": True}, limit="3/second", burst=7)])
    op = operation_for("tools/call", "deploy")
    sizes = {b.rule: (b.capacity, b.rate) for b in limits.buckets(principal("bot", "ci-bot"), ["reader"], op, "d")}
    assert sizes == {"readers": (10, 1.0), "bot-deploy": (5, 5 / 3600), "everyone": (600, 10.0),
                     "rate_limits[5]": (7, 3.0)}


def _key(limits: Limits, rule_id: str, who: Principal, roles: Sequence[str], method: str, target: str | None,
         upstream: str = "demo") -> str:
    [bucket] = [b for b in limits.buckets(who, roles, _operation(method, target), upstream) if b.rule == rule_id]
    return bucket.key


def test_a_rule_with_tool_keeps_a_bucket_per_tool_and_one_without_keeps_one_for_everything() -> None:
    limits = Limits(TABLE_RULES)
    alice = principal("alice")
    per_tool = {_key(limits, "readers", alice, ["reader"], "tools/call", tool) for tool in ("echo", "search", "x")}
    assert len(per_tool) == 3
    one = {_key(limits, "everyone", alice, ["reader"], method, target) for method, target in [
        ("tools/call", "echo"), ("tools/call", "search"), ("resources/read", "file:///srv/docs/a"),
        ("prompts/get", "summarize"), ("sampling/createMessage", None)]}
    assert len(one) == 1


# (per, first caller, second caller, whether they share a bucket); a caller is (subject, issuer, client, roles,
# upstream)
PER = [
    ("principal", ("alice", ISSUER, "web", ["reader"], "demo"), ("alice", ISSUER, "cli", ["ops"], "other"), True),
    ("principal", ("alice", ISSUER, None, [], "demo"), ("bob", ISSUER, None, [], "demo"), False),
    ("principal", ("alice", ISSUER, None, [], "demo"), ("alice", "https://elsewhere", None, [], "demo"), False),
    ("client", ("alice", ISSUER, "web", ["reader"], "demo"), ("bob", "https://x", "web", [], "other"), True),
    ("client", ("alice", ISSUER, "web", [], "demo"), ("alice", ISSUER, "cli", [], "demo"), False),
    ("role", ("alice", ISSUER, "web", ["reader"], "demo"), ("bob", "https://x", "cli", ["reader"], "other"), True),
    ("role", ("alice", ISSUER, None, ["reader"], "demo"), ("alice", ISSUER, None, ["ops"], "demo"), False),
    ("role", ("alice", ISSUER, None, ["ops", "reader"], "demo"), ("bob", ISSUER, None, ["reader", "ops"], "demo"),
     True),  # with any: the roles held, in any order
    ("role", ("alice", ISSUER, None, ["reader"], "demo"), ("alice", ISSUER, None, ["reader", "ops"], "demo"), False),
    ("upstream", ("alice", ISSUER, "web", ["reader"], "demo"), ("bob", "https://x", "cli", ["ops"], "demo"), True),
    ("upstream", ("alice", ISSUER, None, [], "demo"), ("alice", ISSUER, None, [], "other"), False),
]


@pytest.mark.parametrize(("per", "first", "second", "shared"), PER,
                         ids=[f"{p}-{'shared' if s else 'apart'}-{i}" for i, (p, _, _, s) in enumerate(PER)])
def test_whose_bucket_per_says(per: str, first: tuple[Any, ...], second: tuple[Any, ...], shared: bool) -> None:
    limits = Limits([rule(id="r", match={"any": True}, limit="5/minute", per=per)])

    def key(caller: tuple[Any, ...]) -> str:
        subject, issuer, client, roles, upstream = caller
        return _key(limits, "r", principal(subject, client, issuer), roles, "tools/call", "echo", upstream)

    assert (key(first) == key(second)) is shared


def test_per_role_with_a_role_match_is_the_matched_role_alone() -> None:
    limits = Limits([rule(id="r", match={"role": "reader"}, limit="5/minute", per="role")])
    alone = _key(limits, "r", principal("alice"), ["reader"], "tools/call", "echo")
    with_more = _key(limits, "r", principal("bob"), ["ops", "reader"], "tools/call", "echo")
    assert alone == with_more


ODD = ['a"b', 'a\\"b', "a\x1fb", "a,b", "a", "b", "", '"', ",", "\x1f", "a\x00b", "[\"a\",\"b\"]", "a\nb"]


def test_two_principals_never_share_a_key_whatever_their_issuer_and_subject_hold() -> None:
    limits = Limits([rule(id="r", match={"any": True}, tool="*", limit="5/minute")])
    callers = [(issuer, subject) for issuer in ODD for subject in ODD]
    keys = {_key(limits, "r", principal(subject, issuer=issuer), [], "tools/call", "echo")
            for issuer, subject in callers}
    assert len(keys) == len(callers)
    names = [name for name in ODD if name and name.isprintable()]  # a tool name holds no control character
    tools = {_key(limits, "r", principal("alice"), [], "tools/call", name) for name in names}
    assert len(tools) == len(names)


def test_no_rule_id_can_make_two_rules_one_key() -> None:
    # rules whose id ends where another's whose text begins would meet in a naively joined key
    limits = Limits([rule(id="a", match={"any": True}, limit="5/minute", per="client"),
                     rule(id='a","client', match={"any": True}, limit="5/minute", per="upstream")])
    keys = [b.key for b in limits.buckets(principal("x", client_id="demo"), [], operation_for("tools/call", "t"),
                                          "demo")]
    assert len(set(keys)) == 2


# ---- the buckets in memory, on a clock the test turns ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bucket(key: str, capacity: int, per_second: float, rule_id: str | None = None) -> Bucket:
    return Bucket(key, capacity, per_second, rule_id or key)


async def takes(buckets: MemoryBuckets | RedisBuckets, wanted: Sequence[Bucket], times: int) -> list[str | None]:
    """The refusing rule (None: taken) of each of `times` takes, one after the other."""
    return [(await buckets.take(wanted)).rule for _ in range(times)]


async def test_a_full_bucket_gives_its_burst_then_refuses_until_it_refills() -> None:
    clock = Clock()
    memory = MemoryBuckets(clock=clock)
    five_a_minute = bucket("k", 5, 5 / 60)
    assert await takes(memory, [five_a_minute], 6) == [None] * 5 + ["k"]
    assert (await memory.take([five_a_minute])).wait_s == pytest.approx(12.0)
    clock.now += 11.9
    assert (await memory.take([five_a_minute])).wait_s == pytest.approx(0.1)
    clock.now += 0.1
    assert await takes(memory, [five_a_minute], 2) == [None, "k"]  # one token, one call
    clock.now += 60
    assert await takes(memory, [five_a_minute], 6) == [None] * 5 + ["k"]  # full again, never more than full


async def test_a_burst_larger_than_the_rate_refills_at_the_rate() -> None:
    clock = Clock()
    memory = MemoryBuckets(clock=clock)
    ten_burst_one_a_second = bucket("k", 10, 1.0)
    assert await takes(memory, [ten_burst_one_a_second], 11) == [None] * 10 + ["k"]
    clock.now += 2.5
    assert await takes(memory, [ten_burst_one_a_second], 3) == [None, None, "k"]
    assert (await memory.take([ten_burst_one_a_second])).wait_s == pytest.approx(0.5)


async def test_a_bucket_never_seen_is_full_and_buckets_are_kept_apart() -> None:
    memory = MemoryBuckets(clock=Clock())
    assert await takes(memory, [bucket("a", 2, 1 / 60)], 3) == [None, None, "a"]
    assert await takes(memory, [bucket("b", 2, 1 / 60)], 3) == [None, None, "b"]


async def test_a_bucket_is_never_forgotten_before_it_is_full_again() -> None:
    clock = Clock()
    memory = MemoryBuckets(clock=clock)
    burst_ten_five_a_day = bucket("k", 10, 5 / 86400)
    assert await takes(memory, [burst_ten_five_a_day], 11) == [None] * 10 + ["k"]
    clock.now += 86400  # a day refills five
    assert await takes(memory, [burst_ten_five_a_day], 6) == [None] * 5 + ["k"]


@pytest.mark.parametrize(("wait_s", "header"), [
    (0.0, 1), (1e-3, 1), (0.5, 1), (1.0, 1), (1.01, 2), (12.0, 12), (59.2, 60), (3599.9, 3600),
])
def test_retry_after_is_whole_seconds_rounded_up_and_never_zero(wait_s: float, header: int) -> None:
    assert retry_after(wait_s) == header


async def test_a_request_takes_a_token_from_every_bucket_or_from_none() -> None:
    clock = Clock()
    memory = MemoryBuckets(clock=clock)
    wide, narrow = bucket("wide", 2, 1 / 60), bucket("narrow", 1, 1 / 60)
    assert await memory.take([wide, narrow]) == Taken()
    assert (await memory.take([wide, narrow])).rule == "narrow"
    assert (await memory.take([narrow, wide])).rule == "narrow"
    # the refusals took nothing from wide: its second token is still there
    assert await takes(memory, [wide], 2) == [None, "wide"]


async def test_a_refusal_names_the_bucket_that_stays_empty_longest_and_its_wait() -> None:
    clock = Clock()
    memory = MemoryBuckets(clock=clock)
    hourly, secondly = bucket("hourly", 1, 1 / 3600), bucket("secondly", 1, 1.0)
    assert await memory.take([secondly, hourly]) == Taken()
    refused = await memory.take([secondly, hourly])
    assert (refused.rule, retry_after(refused.wait_s)) == ("hourly", 3600)
    clock.now += 10
    refused = await memory.take([secondly, hourly])
    assert (refused.rule, retry_after(refused.wait_s)) == ("hourly", 3590)


# ---- the buckets in Redis, shared by replicas ----------------------------------------------------------------


def unique(name: str) -> str:
    """A name no earlier run used: buckets in Redis outlive a run."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def replicas() -> AsyncIterator[list[RedisBuckets]]:
    """Two RedisBuckets on clients of their own, as two gateway replicas sharing one Redis have."""
    clients = [redis.asyncio.from_url(REDIS_URL), redis.asyncio.from_url(REDIS_URL)]
    yield [RedisBuckets(client) for client in clients]
    for client in clients:
        await client.aclose()


async def test_replicas_sharing_redis_draw_from_one_bucket(replicas: list[RedisBuckets]) -> None:
    first, second = replicas
    five_an_hour = bucket(unique("shared"), 5, 5 / 3600)  # a token back only after 12 minutes
    taken = [await (first if n % 2 else second).take([five_an_hour]) for n in range(5)]
    assert taken == [Taken()] * 5
    for replica in (first, second):
        refused = await replica.take([five_an_hour])
        assert refused.rule == five_an_hour.rule
        assert 700 <= retry_after(refused.wait_s) <= 720


async def test_replicas_taking_at_once_never_both_take_the_last_token(replicas: list[RedisBuckets]) -> None:
    five_an_hour = bucket(unique("race"), 5, 5 / 3600)
    taken = await asyncio.gather(*(replicas[n % 2].take([five_an_hour]) for n in range(40)))
    assert sum(t.rule is None for t in taken) == 5


async def test_redis_takes_from_every_bucket_or_from_none(replicas: list[RedisBuckets]) -> None:
    first, second = replicas
    wide, narrow = bucket(unique("wide"), 2, 2 / 3600), bucket(unique("narrow"), 1, 1 / 3600)
    assert await first.take([wide, narrow]) == Taken()
    assert (await second.take([wide, narrow])).rule == narrow.rule
    assert (await first.take([narrow, wide])).rule == narrow.rule
    assert await takes(second, [wide], 2) == [None, wide.rule]  # the refusals took nothing from wide


async def test_redis_names_the_bucket_that_stays_empty_longest() -> None:
    client = redis.asyncio.from_url(REDIS_URL)
    try:
        buckets = RedisBuckets(client)
        hourly, daily = bucket(unique("hourly"), 1, 1 / 3600), bucket(unique("daily"), 1, 1 / 86400)
        assert await buckets.take([hourly, daily]) == Taken()
        refused = await buckets.take([hourly, daily])
        assert refused.rule == daily.rule and 86000 < retry_after(refused.wait_s) <= 86400
    finally:
        await client.aclose()


async def test_redis_that_cannot_be_reached_is_state_unavailable() -> None:
    # a Redis that is down: nothing listens on its port
    client = redis.asyncio.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    try:
        with pytest.raises(StateUnavailable):
            await RedisBuckets(client).take([bucket("k", 1, 1.0)])
    finally:
        await client.aclose()


# ---- the config ----------------------------------------------------------------------------------------------

ANY = {"any": True}
BAD_RULES = {
    "a limit without a period": ([{"match": ANY, "limit": "60"}], "rate_limits.0.limit: a limit is N/second"),
    "an unknown period": ([{"match": ANY, "limit": "5/fortnight"}], "rate_limits.0.limit: a limit is N/second"),
    "a zero limit": ([{"match": ANY, "limit": "0/minute"}], "rate_limits.0.limit: a limit is N/second"),
    "a negative limit": ([{"match": ANY, "limit": "-1/minute"}], "rate_limits.0.limit: a limit is N/second"),
    "a zero burst": ([{"match": ANY, "limit": "5/minute", "burst": 0}],
                     "rate_limits.0.burst: Input should be greater than 0"),
    "a negative burst": ([{"match": ANY, "limit": "5/minute", "burst": -3}],
                         "rate_limits.0.burst: Input should be greater than 0"),
    "a burst as text": ([{"match": ANY, "limit": "5/minute", "burst": "3"}],
                        "rate_limits.0.burst: Input should be a valid integer"),
    "a match with nothing": ([{"match": {}, "limit": "5/minute"}], "rate_limits.0.match: say whom the rule counts"),
    "any: false alone": ([{"match": {"any": False}, "limit": "5/minute"}],
                         "rate_limits.0.match: say whom the rule counts"),
    "an unknown match key": ([{"match": {"group": "ops"}, "limit": "5/minute"}],
                             "rate_limits.0.match.group: unknown key"),
    "an unknown per": ([{"match": ANY, "limit": "5/minute", "per": "ip"}], "rate_limits.0.per: Input should be"),
    "no limit": ([{"match": ANY}], "rate_limits.0.limit: Field required"),
    "a role the policy lacks": ([{"match": ANY, "limit": "1/second"}, {"match": {"role": "admin"}, "limit": "5/hour"}],
                                "rate_limits[1].match.role: 'admin' is not a role in the policy"),
    "two rules with one id": ([{"id": "x", "match": ANY, "limit": "5/minute"},
                               {"id": "x", "match": {"role": "reader"}, "limit": "6/minute"}],
                              "rate_limits: rate_limits[0], rate_limits[1] have one id, 'x'"),
}


@pytest.mark.parametrize(("rules", "problem"), BAD_RULES.values(), ids=BAD_RULES.keys())
def test_a_bad_rate_limit_is_refused_naming_its_key(tmp_path: Path, rules: list[dict[str, Any]], problem: str) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/mcp", rate_limits=rules)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any(line.startswith(f"{path}: ") and problem in line for line in raised.value.problems), raised.value


def test_an_unknown_store_failure_policy_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/mcp", rate_limits_on_store_failure="sometimes")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems == [f"{path}: rate_limits_on_store_failure: Input should be 'closed' or 'open'"]


def test_an_id_that_is_another_rules_default_id_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/mcp", rate_limits=[
        {"id": "rate_limits[1]", "match": ANY, "limit": "100/minute"}, {"match": ANY, "limit": "1/minute"}])
    with pytest.raises(ConfigError):
        load_config(path)


def test_a_good_config_loads_its_rules_and_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/mcp", rate_limits=[
        {"id": "readers", "match": {"role": "reader"}, "tool": "*", "limit": "60/minute", "burst": 10},
        {"match": {"client_id": "ci-bot"}, "tool": "deploy", "limit": " 5 / hour "},
        {"match": ANY, "per": "upstream", "limit": "600/day"},
    ])
    config = load_config(path)
    assert config.rate_limits_on_store_failure == "closed"
    assert [(r.capacity, r.rate, r.per) for r in config.rate_limits] == [
        (10, 1.0, "principal"), (5, 5 / 3600, "principal"), (600, 600 / 86400, "upstream")]
    assert Limits(config.rate_limits).ids == ("readers", "rate_limits[1]", "rate_limits[2]")


# ---- policy explain ------------------------------------------------------------------------------------------

EXPLAIN_RULES = [
    {"id": "readers", "match": {"role": "reader"}, "tool": "*", "limit": "60/minute", "burst": 10},
    {"id": "deploys", "match": ANY, "tool": "deploy", "limit": "5/hour"},
    {"match": ANY, "per": "client", "limit": "600/minute"},
]


@pytest.mark.parametrize(("method", "name", "expected"), [
    ("tools/call", "echo", ["rate limits:", "  readers: 60/minute, burst 10, per principal and tool (*)",
                            "  rate_limits[2]: 600/minute, burst 600, per client"]),
    ("prompts/get", "summarize", ["rate limits:", "  rate_limits[2]: 600/minute, burst 600, per client"]),
    ("tools/list", None, ["rate limits: none counts it"]),
])
def test_policy_explain_names_the_rules_that_count_the_operation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, name: str | None,
        expected: list[str]) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/mcp", rate_limits=EXPLAIN_RULES)
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"sub": "alice", "scope": "mcp:tools"}))
    asked = ["policy", "explain", "--config", str(config), "--method", method, "--claims", str(claims)]
    assert main([*asked, *(["--name", name] if name else [])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index(expected[0]):] == expected


def test_policy_explain_without_rate_limits_says_nothing_of_them(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/mcp")
    assert main(["policy", "explain", "--config", str(config), "--method", "tools/call", "--name", "echo"]) == 0
    assert "rate limits" not in capsys.readouterr().out


# ---- end to end: the SDK client through the gateway to a real upstream ---------------------------------------

ERAS = ["auto", "legacy"]
MODES = ["proxy", "middleware"]
ECHO_POLICY = {"roles": {"echoer": {"permissions": {"can_execute_tools": ["echo"]}}},
               "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["echoer"]}]}


def sdk_client(url: str, token: str, era: str, **callbacks: Any) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http), mode=era, **callbacks)


def metrics_text(deployment: Deployment) -> str:
    """The gateway's metrics as Prometheus serves them: the reverse proxy's /metrics, or the middleware's registry
    (the middleware serves no route of its own)."""
    if deployment.mode == "proxy":
        return httpx.get(f"{deployment.gateway.url}/metrics").text
    return generate_latest(deployment.runtime.metrics.registry).decode()


def call_events(deployment: Deployment, operation: str = "tools/call") -> list[tuple[str, str, str]]:
    return [(e["result"], e["reason"], e["rule"]) for e in deployment.audit_events() if e["operation"] == operation]


def post_modern(deployment: Deployment, token: str, method: str, params: dict[str, Any],
                id: int = 7, url: str | None = None) -> httpx.Response:
    headers, body = modern(method, params, id=id)
    return httpx.post(url or deployment.url, headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"},
                      json=body)


def call_echo(id: int, text: str, argument: str = "text") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "echo", "arguments": {argument: text}}}


def legacy_session(deployment: Deployment, token: str, version: str = "2025-06-18") -> dict[str, str]:
    """The headers of a legacy session opened (initialize, initialized) at `version`."""
    headers = {**BASE_HEADERS, "Authorization": f"Bearer {token}"}
    init = httpx.post(deployment.url, headers=headers, json={
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert init.status_code == 200, init.text
    headers = {**headers, "Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": version}
    httpx.post(deployment.url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


def sse_messages(response: httpx.Response) -> dict[Any, dict[str, Any]]:
    """The JSON-RPC messages of a response (SSE events or JSON), by id."""
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        return {m["id"]: m for m in (body if isinstance(body, list) else [body])}
    return {m["id"]: m for m in (json.loads(line[6:]) for line in response.text.splitlines()
                                 if line.startswith("data: "))}


@pytest.fixture(params=MODES)
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The demo server behind the gateway, as reverse proxy and as middleware: echo limited to 3 an hour."""
    deployment = deploy(request.param, tmp_path, rate_limits=[
        {"id": "echoes", "match": {"role": "reader"}, "tool": "echo", "limit": "3/hour"}])
    yield deployment
    deployment.stop()


@pytest.mark.parametrize("era", ERAS)
async def test_calls_over_the_limit_are_refused_audited_counted_and_never_forwarded(limited: Deployment,
                                                                                    era: str) -> None:
    async with sdk_client(limited.url, limited.token("alice"), era) as session:
        for n in range(3):
            called = await session.call_tool("echo", {"text": f"call {n}"})
            assert called.content[0].text == f"call {n}"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await session.call_tool("echo", {"text": "one too many"})
        assert refused.value.error.code == -32018
        assert 1100 <= refused.value.error.data["retry_after_s"] <= 1200  # a token back every 20 minutes
        assert "rule" not in refused.value.error.data  # deny_detail minimal: the rule is for the audit log
        searched = await session.call_tool("search", {"query": "x"})  # another tool: no rule counts it
        assert not searched.is_error
    assert [m["params"]["arguments"]["text"] for m in limited.recorder.tool_calls("echo")] == [
        "call 0", "call 1", "call 2"]
    assert call_events(limited) == [("allowed", "role:reader:tool", "role:reader:tool")] * 3 + [
        ("rate_limited", "rate_limit:echoes", "rate_limit:echoes"),
        ("allowed", "role:reader:tool", "role:reader:tool")]
    assert 'mcp_gateway_rate_limited_total{rule="echoes"} 1.0' in metrics_text(limited)


def test_a_refusal_is_http_429_with_retry_after(limited: Deployment) -> None:
    token = limited.token("alice")
    answers = [post_modern(limited, token, "tools/call", {"name": "echo", "arguments": {"text": "x"}}, id=n)
               for n in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[3]
    body = refused.json()
    assert body["id"] == 3 and body["error"]["code"] == -32018
    assert int(refused.headers["retry-after"]) == body["error"]["data"]["retry_after_s"]
    assert 1100 <= int(refused.headers["retry-after"]) <= 1200
    assert len(limited.recorder.tool_calls("echo")) == 3


def test_a_refusal_in_a_legacy_session_is_http_429_with_retry_after(limited: Deployment) -> None:
    headers = legacy_session(limited, limited.token("alice"))
    answers = [httpx.post(limited.url, headers=headers, json=call_echo(n, "x")) for n in range(2, 6)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[3]
    assert refused.json()["error"]["code"] == -32018 and refused.json()["id"] == 5
    assert int(refused.headers["retry-after"]) == refused.json()["error"]["data"]["retry_after_s"]
    assert len(limited.recorder.tool_calls("echo")) == 3


def test_under_deny_detail_explain_the_refusal_names_the_rule(tmp_path: Path) -> None:
    policy = {**DEFAULT_POLICY, "deny_detail": "explain"}
    deployment = deploy("proxy", tmp_path, policy=policy, rate_limits=[
        {"id": "echoes", "match": {"any": True}, "limit": "1/hour"}])
    try:
        token = deployment.token("alice")
        answers = [post_modern(deployment, token, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
                   for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 429]
        assert answers[1].json()["error"]["data"]["rule"] == "rate_limit:echoes"
    finally:
        deployment.stop()


@pytest.mark.filterwarnings("ignore:ping is removed")
@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("mode", MODES)
async def test_lists_and_ping_are_never_counted(tmp_path: Path, mode: str, era: str) -> None:
    deployment = deploy(mode, tmp_path, rate_limits=[{"id": "all", "match": {"any": True}, "limit": "3/hour"}])
    try:
        async with sdk_client(deployment.url, deployment.token("alice"), era) as session:
            for _ in range(10):
                await session.list_tools()
                await session.list_resources()
                await session.list_prompts()
                if era == "legacy":  # ping is gone from 2026-07-28
                    await session.send_ping()
            read = await session.read_resource("file:///srv/docs/readme")  # read, get and call: each counted
            assert read.contents[0].text == "The demo docs."  # type: ignore[union-attr]
            await session.get_prompt("summarize", {"text": "abc"})
            called = await session.call_tool("echo", {"text": "still within"})
            assert called.content[0].text == "still within"  # type: ignore[union-attr]
            with pytest.raises(MCPError) as refused:
                await session.call_tool("echo", {"text": "the fourth"})
            assert refused.value.error.code == -32018
            await session.list_tools()  # refused calls do not stop what is not counted
        assert len(deployment.recorder.tool_calls("echo")) == 1
        limited = [(e["operation"], e["result"]) for e in deployment.audit_events() if e["result"] != "allowed"]
        assert limited == [("tools/call", "rate_limited")]
    finally:
        deployment.stop()


async def test_each_principal_has_its_own_bucket(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, rate_limits=[{"match": {"any": True}, "limit": "1/hour"}])
    try:
        for subject in ("alice", "bob"):
            token = deployment.token(subject)
            answers = [post_modern(deployment, token, "tools/call", {"name": "echo", "arguments": {"text": subject}})
                       for _ in range(2)]
            assert [a.status_code for a in answers] == [200, 429]
        assert [(e["user_id"], e["result"], e["rule"]) for e in deployment.audit_events()
                if e["operation"] == "tools/call"] == [
            ("alice", "allowed", "role:reader:tool"), ("alice", "rate_limited", "rate_limit:rate_limits[0]"),
            ("bob", "allowed", "role:reader:tool"), ("bob", "rate_limited", "rate_limit:rate_limits[0]")]
    finally:
        deployment.stop()


def test_a_call_the_policy_denies_takes_no_token(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, rate_limits=[{"match": {"any": True}, "limit": "1/hour"}])
    try:
        token = deployment.token("alice")
        denied = post_modern(deployment, token, "tools/call", {"name": "delete_file", "arguments": {"path": "/"}})
        assert denied.json()["error"]["code"] != -32018
        allowed = post_modern(deployment, token, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
        assert allowed.status_code == 200 and "result" in allowed.json()
    finally:
        deployment.stop()


# ---- replicas sharing the sessions' Redis, and a Redis that is down --------------------------------------------

REDIS_SESSIONS = {"backend": "redis", "url": REDIS_URL}


@pytest.mark.parametrize("era", ERAS)
async def test_two_gateways_sharing_redis_share_one_bucket(tmp_path: Path, era: str) -> None:
    rules = [{"id": unique("shared"), "match": {"any": True}, "per": "principal", "limit": "4/hour"}]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = deploy("proxy", tmp_path / "a", sessions=REDIS_SESSIONS, rate_limits=rules)
    assert first.upstream is not None
    # the second replica: the same public URL and signing key, so one token (one principal) is good at both
    (tmp_path / "b" / "key.pem").write_bytes((tmp_path / "a" / "key.pem").read_bytes())
    config = write_config(tmp_path / "b", f"{first.upstream.url}/mcp", public_url=first.runtime.config.public_url,
                          sessions=REDIS_SESSIONS, rate_limits=rules)
    second_app = create_app(config)
    second = ServerThread(second_app, free_port()).start()
    token = first.token(unique("alice"))
    try:
        async with sdk_client(first.url, token, era) as on_first, \
                sdk_client(f"{second.url}/mcp", token, era) as on_second:
            for n, session in enumerate([on_first, on_second, on_second, on_first]):
                called = await session.call_tool("echo", {"text": f"call {n}"})
                assert called.content[0].text == f"call {n}"  # type: ignore[union-attr]
            for session in (on_first, on_second):
                with pytest.raises(MCPError) as refused:
                    await session.call_tool("echo", {"text": "over"})
                assert refused.value.error.code == -32018
        assert len(first.recorder.tool_calls("echo")) == 4
        assert [e["result"] for e in audit_events(second, second_app.runtime) if e["operation"] == "tools/call"] \
            == ["allowed", "allowed", "rate_limited"]
    finally:
        second.stop()
        first.stop()


def store_down(mode: str, tmp_path: Path, on_failure: str, limit: str) -> Deployment:
    """A gateway whose sessions (and so its buckets) live in a Redis that is down: nothing listens on its port.
    Its callers are anonymous and its role assignments in SQLite, since a gateway token's revocation check and
    the assignments would otherwise need that Redis first (and refuse the request before any rate limit)."""
    return deploy(mode, tmp_path, sessions={"backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0"},
                  auth={"anonymous_role": "reader", "clients": {"signing_key_file": str(tmp_path / "key.pem")}},
                  role_assignments={"backend": "sqlite", "path": str(tmp_path / "roles.db")},
                  rate_limits_on_store_failure=on_failure, rate_limits=[{"match": {"any": True}, "limit": limit}])


def post_anonymous(deployment: Deployment, method: str, params: dict[str, Any]) -> httpx.Response:
    headers, body = modern(method, params)
    return httpx.post(deployment.url, headers={**BASE_HEADERS, **headers}, json=body)


@pytest.mark.parametrize("mode", MODES)
def test_with_the_store_down_closed_refuses_the_counted_call_and_audits_it(tmp_path: Path, mode: str) -> None:
    deployment = store_down(mode, tmp_path, "closed", "100/second")
    try:
        listed = post_anonymous(deployment, "tools/list", {})  # nothing to count: no store needed
        assert listed.status_code == 200, listed.text
        refused = post_anonymous(deployment, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
        assert refused.status_code == 503, refused.text
        assert refused.json()["id"] == 7 and refused.json()["error"]["code"] == -32054
        assert "retry-after" not in refused.headers
        assert deployment.recorder.tool_calls("echo") == []
        assert call_events(deployment) == [
            ("error", "rate_limit:store_unavailable", "rate_limit:store_unavailable")]  # as other -32054s
        assert 'mcp_gateway_rate_limit_store_failures_total{policy="closed"} 1.0' in metrics_text(deployment)
    finally:
        deployment.stop()


@pytest.mark.parametrize("mode", MODES)
def test_with_the_store_down_open_lets_the_call_through_and_counts_the_failure(tmp_path: Path, mode: str) -> None:
    deployment = store_down(mode, tmp_path, "open", "1/hour")
    try:
        answers = [post_anonymous(deployment, "tools/call", {"name": "echo", "arguments": {"text": f"{n}"}})
                   for n in range(2)]  # the second is over the limit too: nothing can count it
        assert [a.status_code for a in answers] == [200, 200], answers[0].text
        assert [a.json()["result"]["content"][0]["text"] for a in answers] == ["0", "1"]
        assert len(deployment.recorder.tool_calls("echo")) == 2
        assert call_events(deployment) == [("allowed", "role:reader:tool", "role:reader:tool")] * 2
        metrics = metrics_text(deployment)
        assert 'mcp_gateway_rate_limit_store_failures_total{policy="open"} 2.0' in metrics
        assert "mcp_gateway_rate_limited_total{" not in metrics
    finally:
        deployment.stop()


# ---- the server's sampling requests ---------------------------------------------------------------------------


SAMPLER_POLICY = {
    "roles": {"sampler": {"permissions": {"can_execute_tools": ["ask"], "can_request_sampling": True}}},
    "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["sampler"]}],
}


@pytest.mark.parametrize("era", ERAS)
async def test_a_rule_without_tool_counts_the_servers_sampling_requests(tmp_path: Path, era: str) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=sampling_upstream(), policy=SAMPLER_POLICY,
                        rate_limits=[{"id": "all", "match": {"any": True}, "limit": "1/hour"}])
    model = Model()
    try:
        async with sdk_client(deployment.url, deployment.token("alice"), era, sampling_callback=model) as session:
            with pytest.raises(MCPError):  # the call took the token; its sampling request found none
                await session.call_tool("ask", {"max_tokens": 10})
        assert model.asked == []
        assert len(deployment.recorder.tool_calls("ask")) >= 1
        # the sampling request is recorded when decided, the call once it is answered
        assert sorted((e["operation"], e["result"], e["rule"]) for e in deployment.audit_events()
                      if e["operation"] in ("tools/call", "sampling/createMessage")) == [
            ("sampling/createMessage", "rate_limited", "rate_limit:all"),
            ("tools/call", "allowed", "role:sampler:tool")]
        assert 'mcp_gateway_rate_limited_total{rule="all"} 1.0' in metrics_text(deployment)
    finally:
        deployment.stop()


@pytest.mark.parametrize("era", [
    "auto",  # 2026-07-28: the client's retry with the model's answer is the same call, not a second one
    "legacy",
])
async def test_a_rule_with_tool_leaves_sampling_requests_alone(tmp_path: Path, era: str) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=sampling_upstream(), policy=SAMPLER_POLICY,
                        rate_limits=[{"id": "asks", "match": {"any": True}, "tool": "ask", "limit": "1/hour"}])
    model = Model()
    try:
        async with sdk_client(deployment.url, deployment.token("alice"), era, sampling_callback=model) as session:
            assert "model said: 42" in str((await session.call_tool("ask", {"max_tokens": 10})).content)
            with pytest.raises(MCPError) as refused:
                await session.call_tool("ask", {"max_tokens": 20})
            assert refused.value.error.code == -32018
        assert model.asked == [10]
    finally:
        deployment.stop()


# ---- a 2025-03-26 batch: only the members over the limit are refused -----------------------------------------


class Forwarder:
    """An ASGI app passing each request on to `url` and answering with the whole of its answer: an upstream in
    another process (server-everything, which takes 2025-03-26 batches) made recordable by `Recorder`."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.request(scope["method"], self.url, headers=headers, content=body)
        kept = [(k.encode(), v.encode()) for k, v in answer.headers.items()
                if k not in ("content-length", "transfer-encoding", "content-encoding", "connection")]
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": [*kept, (b"content-length", str(len(answer.content)).encode())]})
        await send({"type": "http.response.body", "body": answer.content})


def test_in_a_2025_03_26_batch_only_the_calls_over_the_limit_are_refused(tmp_path: Path) -> None:
    with server_everything() as everything_url:
        recorder = Recorder(Forwarder(everything_url))
        upstream = ServerThread(recorder).start()
        deployment = proxy_for(f"{upstream.url}/mcp", recorder, tmp_path, policy=ECHO_POLICY, rate_limits=[
            {"id": "two", "match": {"any": True}, "limit": "2/hour"}])
        deployment.upstream = upstream
        try:
            headers = legacy_session(deployment, deployment.token("alice"), "2025-03-26")
            batch = [call_echo(2, "a", "message"), call_echo(3, "b", "message"),
                     {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, call_echo(5, "c", "message")]
            answered = httpx.post(deployment.url, headers=headers, json=batch)
            assert answered.status_code == 200, answered.text
            messages = sse_messages(answered)
            assert sorted(messages) == [2, 3, 4, 5]
            assert [messages[i]["result"]["content"][0]["text"] for i in (2, 3)] == ["Echo: a", "Echo: b"]
            assert "tools" in messages[4]["result"]
            assert messages[5]["error"]["code"] == -32018 and messages[5]["error"]["data"]["retry_after_s"] >= 1
            assert [m["id"] for m in recorder.tool_calls("echo")] == [2, 3]
            assert sorted((e["request_id"], e["result"]) for e in deployment.audit_events()
                          if e["operation"] == "tools/call") == [
                ("2", "allowed"), ("3", "allowed"), ("5", "rate_limited")]
        finally:
            deployment.stop()


def test_answers_the_gateway_never_asked_for_do_not_make_a_call_free(tmp_path: Path) -> None:
    # A retry is free only when this caller's same call was answered input_required through the gateway: a client
    # attaching made-up inputResponses to skip the count is counted like any call.
    deployment = deploy("proxy", tmp_path, stateless=True, json_response=True,
                        rate_limits=[{"id": "echo-1", "match": ANY, "tool": "echo", "limit": "1/hour"}])
    try:
        token = deployment.token(f"forger-{uuid.uuid4().hex[:8]}", groups=["ops"])  # operator: may answer sampling
        answer = {"role": "assistant", "content": {"type": "text", "text": "x"}, "model": "m"}
        statuses = []
        for text in ("one", "two"):
            headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": text},
                                                  "inputResponses": {"made-up": answer}})
            response = httpx.post(deployment.url, headers={**BASE_HEADERS, **headers,
                                                           "Authorization": f"Bearer {token}"}, json=body)
            statuses.append(response.status_code)
        assert statuses == [200, 429]
        assert len(deployment.recorder.tool_calls("echo")) == 1
    finally:
        deployment.stop()


def test_a_caller_without_a_client_id_has_a_client_bucket_of_its_own() -> None:
    limits = Limits([RateLimit.model_validate({"match": {"any": True}, "per": "client", "limit": "5/minute"})])
    op = operation_for("tools/call", "echo")
    first, second = (limits.buckets(Principal(subject, "issuer"), (), op, "up") for subject in ("ann", "bob"))
    with_client = [limits.buckets(Principal(s, "issuer", client_id="app"), (), op, "up") for s in ("ann", "bob")]
    assert first[0].key != second[0].key
    assert with_client[0][0].key == with_client[1][0].key  # one client's callers share its bucket
