"""Sampling governance: how much of a caller's model a server may use (`roles.NAME.sampling`).

A role that grants `can_request_sampling` may cap each request's `maxTokens` (`max_tokens`) and the number of
sampling requests passed on per principal in an hour (`per_hour`, counted in the session store). A request over
either limit never reaches the client: legacy era, it is dropped from the stream and the upstream is answered
with an error; 2026-07-28 era, it is taken out of `inputRequests` (none left: the result becomes an error).
Every decision is audited.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx2
import mcp_types as types
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer, Resolve, Sample
from mcp.shared.exceptions import MCPError

from gateway import create_app
from gateway.config import Sessions, Upstream
from gateway.errors import StateUnavailable
from gateway.exchange import Exchange
from gateway.handles import Handles
from gateway.jsonrpc import Message
from gateway.mcp import Era, Operation, classify, classify_server_request
from gateway.metrics import Metrics
from gateway.policy import Decision, Policy, PolicyError, decide, load_policy
from gateway.policy.explain import explain, operation_for, principal_from, run_cases
from gateway.response_rules import ResponseRules
from gateway.sessions import MemorySessions
from tests.harness import Deployment, ServerThread, audit_events, deploy, free_port, write_config
from tests.node_peers import server_everything

ERAS = ["auto", "legacy"]
REDIS = {"backend": "redis", "url": "redis://127.0.0.1:6379/0"}

# ---- the decision -------------------------------------------------------------------------------------------

TABLE_POLICY: dict[str, Any] = {
    "roles": {
        "capped": {"permissions": {"can_request_sampling": True}, "sampling": {"max_tokens": 100, "per_hour": 5}},
        "unlimited": {"permissions": {"can_request_sampling": True}},
        "large": {"permissions": {"can_request_sampling": True}, "sampling": {"max_tokens": 1000, "per_hour": 2}},
        "heir": {"inherits": ["capped"]},
        "own_limits": {"inherits": ["capped"], "sampling": {"max_tokens": 10}},
        "unmetered": {"inherits": ["capped"], "sampling": {"per_hour": None}},
        "no_grant": {"permissions": {"can_execute_tools": ["*"]}, "sampling": {"max_tokens": 100}},
        "large_then_capped": {"inherits": ["large", "capped"]},
        "capped_then_large": {"inherits": ["capped", "large"]},
        "capped_and_unlimited": {"inherits": ["capped", "unlimited"]},
    },
    "bindings": [
        {"when": {"subject": "carol"}, "roles": ["capped"]},
        {"when": {"subject": "uma"}, "roles": ["unlimited"]},
        {"when": {"subject": "mixed"}, "roles": ["capped", "unlimited"]},
        {"when": {"subject": "duo"}, "roles": ["capped", "large"]},
        {"when": {"subject": "hank"}, "roles": ["heir"]},
        {"when": {"subject": "olive"}, "roles": ["own_limits"]},
        {"when": {"subject": "ursula"}, "roles": ["unmetered"]},
        {"when": {"subject": "nora"}, "roles": ["no_grant"]},
        {"when": {"subject": "lc"}, "roles": ["large_then_capped"]},
        {"when": {"subject": "cl"}, "roles": ["capped_then_large"]},
        {"when": {"subject": "cu"}, "roles": ["capped_and_unlimited"]},
    ],
}

MISSING = object()

# (subject, maxTokens the server asks for, allowed, reason, per_hour)
DECISIONS = [
    ("carol", 50, True, "role:capped:sampling", 5),
    ("carol", 100, True, "role:capped:sampling", 5),  # the cap itself is allowed
    ("carol", 101, False, "sampling:max_tokens>100", None),
    ("carol", MISSING, False, "sampling:max_tokens>100", None),
    ("carol", "50", False, "sampling:max_tokens>100", None),
    ("carol", True, False, "sampling:max_tokens>100", None),
    ("carol", 50.0, False, "sampling:max_tokens>100", None),
    ("uma", 10_000, True, "role:unlimited:sampling", None),
    ("uma", MISSING, True, "role:unlimited:sampling", None),
    ("uma", "50", True, "role:unlimited:sampling", None),
    ("uma", True, True, "role:unlimited:sampling", None),
    ("mixed", 500, True, "role:unlimited:sampling", None),  # one role without a cap is enough
    ("mixed", MISSING, True, "role:unlimited:sampling", None),
    ("duo", 500, True, "role:large:sampling", 2),  # only the larger cap fits
    ("duo", 50, True, "role:capped:sampling", 5),  # both fit: the most generous per_hour decides
    ("duo", 5000, False, "sampling:max_tokens>1000", None),  # the refusal names the largest cap
    ("hank", 50, True, "role:heir:sampling", 5),  # the grant and the limits are inherited
    ("hank", 500, False, "sampling:max_tokens>100", None),
    # inherited from several parents: the most generous of each limit, whatever the order of `inherits`
    ("lc", 500, True, "role:large_then_capped:sampling", 5),
    ("cl", 500, True, "role:capped_then_large:sampling", 5),
    ("cl", 1001, False, "sampling:max_tokens>1000", None),
    ("cu", 5000, True, "role:capped_and_unlimited:sampling", None),  # a parent without limits leaves none
    ("olive", 10, True, "role:own_limits:sampling", 5),  # its own max_tokens; per_hour inherited
    ("ursula", 100, True, "role:unmetered:sampling", None),  # per_hour: null clears the inherited count
    ("ursula", 101, False, "sampling:max_tokens>100", None),  # ... and the inherited cap stays
    ("olive", 50, False, "sampling:max_tokens>10", None),
    ("nora", 50, False, "no-grant:sampling", None),  # limits without the grant grant nothing
    ("nobody", 50, False, "no-role", None),
]


@pytest.fixture(scope="module")
def table_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("sampling") / "policy.yaml"
    path.write_text(yaml.safe_dump(TABLE_POLICY))
    return load_policy(path)


def sampling_request(max_tokens: object) -> Message:
    params: dict[str, Any] = {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}
    if max_tokens is not MISSING:
        params["maxTokens"] = max_tokens
    raw = {"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": params}
    return Message("request", 1, "sampling/createMessage", params, raw)


@pytest.mark.parametrize(("subject", "max_tokens", "allowed", "reason", "per_hour"), DECISIONS,
                         ids=[f"{s}-{'missing' if m is MISSING else repr(m)}" for s, m, *_ in DECISIONS])
def test_sampling_decision(table_policy: Policy, subject: str, max_tokens: object, allowed: bool, reason: str,
                           per_hour: int | None) -> None:
    operation = classify_server_request(sampling_request(max_tokens))
    decision = decide(principal_from({"sub": subject}), operation, table_policy)
    assert (decision.allowed, decision.reason, decision.per_hour) == (allowed, reason, per_hour)


BAD_LIMITS = {
    "zero max_tokens": ({"max_tokens": 0}, "roles.a.sampling.max_tokens: Input should be greater than 0"),
    "negative per_hour": ({"per_hour": -1}, "roles.a.sampling.per_hour: Input should be greater than 0"),
    "fractional max_tokens": ({"max_tokens": 1.5}, "roles.a.sampling.max_tokens: Input should be a valid integer"),
    "unknown key": ({"burst": 3}, "roles.a.sampling.burst: unknown key"),
    "a boolean": ({"max_tokens": True}, "roles.a.sampling.max_tokens: Input should be a valid integer"),
    "a string": ({"per_hour": "5"}, "roles.a.sampling.per_hour: Input should be a valid integer"),
}


@pytest.mark.parametrize(("limits", "problem"), BAD_LIMITS.values(), ids=BAD_LIMITS.keys())
def test_an_invalid_sampling_limit_is_refused_naming_the_key(tmp_path: Path, limits: dict[str, Any],
                                                              problem: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"roles": {"a": {"permissions": {"can_request_sampling": True},
                                                    "sampling": limits}}}))
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert any(line.startswith(f"{path}: {problem}") for line in raised.value.problems), raised.value.problems


def test_policy_test_cases_and_explain_say_how_many_tokens_the_server_asks_for(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(yaml.safe_dump(TABLE_POLICY))
    (tmp_path / "p.tests.yaml").write_text(yaml.safe_dump({"cases": [
        {"name": "within the cap", "claims": {"sub": "carol"}, "method": "sampling/createMessage",
         "max_tokens": 100, "expect": "allowed"},
        {"name": "over the cap", "claims": {"sub": "carol"}, "method": "sampling/createMessage",
         "max_tokens": 101, "expect": "denied", "reason": "sampling:max_tokens>100"},
    ]}))
    _, results = run_cases(policy_file)
    assert [(r.name, r.passed) for r in results] == [("within the cap", True), ("over the cap", True)]
    decision = explain(load_policy(policy_file), principal_from({"sub": "carol"}),
                       operation_for("sampling/createMessage", max_tokens=101)).decision
    assert (decision.allowed, decision.reason) == (False, "sampling:max_tokens>100")


# ---- end to end: an upstream that asks for as many tokens as it is told to ------------------------------------


def _sample(max_tokens: int) -> Sample:
    return Sample([types.SamplingMessage(role="user", content=types.TextContent(type="text", text="hi"))],
                  max_tokens=max_tokens)


def sampling_upstream() -> Any:
    """An MCPServer whose `ask` tool makes one sampling request for `max_tokens` tokens."""
    server = MCPServer("sampler")

    @server.tool()
    def ask(max_tokens: int, reply: Annotated[types.CreateMessageResult, Resolve(_sample)]) -> str:
        """Ask the client's model, for up to `max_tokens` tokens."""
        content = reply.content
        return f"model said: {content.text if isinstance(content, types.TextContent) else content}"

    return server.streamable_http_app()


def limited_policy(**sampling: int) -> dict[str, Any]:
    return {
        "roles": {"sampler": {"permissions": {"can_execute_tools": ["ask"], "can_request_sampling": True},
                              "sampling": sampling}},
        "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["sampler"]}],
    }


class Model:
    """The client's model: answers every sampling request, remembering the maxTokens each asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def __call__(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.asked.append(params.max_tokens)
        return types.CreateMessageResult(role="assistant", model="test",
                                         content=types.TextContent(type="text", text="42"))


def client(url: str, token: str, era: str, model: Model) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http), mode=era, sampling_callback=model)


async def ask(session: Client, max_tokens: int) -> str:
    result = await session.call_tool("ask", {"max_tokens": max_tokens})
    return str(result.content)


async def assert_refused(session: Client, era: str, max_tokens: int) -> None:
    """The call whose sampling request the gateway refused fails, as the era lets the refusal show."""
    with pytest.raises(MCPError) as refused:
        await session.call_tool("ask", {"max_tokens": max_tokens})
    if era == "legacy":
        # dropped from the stream; the upstream got the gateway's error in its place and failed the call with it
        assert "sampling/createMessage is not allowed by the gateway's policy" in refused.value.error.message
    else:
        # inputRequests held only the refused request: the result became the gateway's error
        assert refused.value.error.code == -32011


def sampling_events(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(e["user_id"], e["result"], e["reason"], e["rule"]) for e in events
            if e["operation"] == "sampling/createMessage"]


def unique(name: str) -> str:
    """A subject no earlier run used: the hourly count is kept per principal, in Redis across runs."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("era", ERAS)
async def test_a_request_over_max_tokens_never_reaches_the_client_and_is_audited(tmp_path: Path, era: str) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=sampling_upstream(), policy=limited_policy(max_tokens=100))
    model = Model()
    try:
        async with client(deployment.url, deployment.token("alice"), era, model) as session:
            assert "model said: 42" in await ask(session, 50)
            await assert_refused(session, era, 500)
            assert "model said: 42" in await ask(session, 100)  # the refusal ended nothing
        assert model.asked == [50, 100]
        told = [r.body for r in deployment.recorder.requests if b'"error"' in r.body]
        assert len(told) == (1 if era == "legacy" else 0)  # legacy: the gateway answered for the client
        events = deployment.audit_events()
        assert sampling_events(events) == [
            ("alice", "allowed", "role:sampler:sampling", "role:sampler:sampling"),
            ("alice", "denied", "sampling:max_tokens>100", "sampling:max_tokens>100"),
            ("alice", "allowed", "role:sampler:sampling", "role:sampler:sampling"),
        ]
        versions = {e["policy_version"] for e in events if e["operation"] == "sampling/createMessage"}
        assert versions == {deployment.runtime.policy.version}
    finally:
        deployment.stop()


async def _per_hour_is_counted_per_principal(deployment: Deployment, era: str) -> None:
    first, second = unique("alice"), unique("bob")
    model = Model()
    async with client(deployment.url, deployment.token(first), era, model) as session:
        assert "model said: 42" in await ask(session, 10)
        assert "model said: 42" in await ask(session, 20)
        await assert_refused(session, era, 30)
    async with client(deployment.url, deployment.token(second), era, model) as session:
        assert "model said: 42" in await ask(session, 40)
    assert model.asked == [10, 20, 40]
    assert sampling_events(deployment.audit_events()) == [
        (first, "allowed", "role:sampler:sampling", "role:sampler:sampling"),
        (first, "allowed", "role:sampler:sampling", "role:sampler:sampling"),
        (first, "denied", "sampling:per_hour>2", "sampling:per_hour>2"),
        (second, "allowed", "role:sampler:sampling", "role:sampler:sampling"),
    ]


@pytest.mark.parametrize("era", ERAS)
async def test_per_hour_is_counted_per_principal_in_memory(tmp_path: Path, era: str) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=sampling_upstream(), policy=limited_policy(per_hour=2))
    try:
        await _per_hour_is_counted_per_principal(deployment, era)
    finally:
        deployment.stop()


@pytest.mark.parametrize("era", ERAS)
async def test_per_hour_is_counted_per_principal_in_redis(tmp_path: Path, era: str) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=sampling_upstream(), policy=limited_policy(per_hour=2),
                        sessions=REDIS)
    try:
        await _per_hour_is_counted_per_principal(deployment, era)
    finally:
        deployment.stop()


@pytest.mark.parametrize("era", ERAS)
async def test_replicas_share_the_hourly_count_through_redis(tmp_path: Path, era: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    policy = limited_policy(per_hour=2)
    deployment = deploy("proxy", tmp_path / "a", upstream_app=sampling_upstream(), policy=policy, sessions=REDIS)
    assert deployment.upstream is not None
    # Replica B: the same public URL and signing key, so a token for one is good at both.
    (tmp_path / "b" / "key.pem").write_bytes((tmp_path / "a" / "key.pem").read_bytes())
    config = write_config(tmp_path / "b", f"{deployment.upstream.url}/mcp", policy=policy,
                          public_url=deployment.runtime.config.public_url, sessions=REDIS)
    replica_app = create_app(config)
    replica = ServerThread(replica_app, free_port()).start()
    subject, model = unique("alice"), Model()
    token = deployment.token(subject)
    try:
        async with client(deployment.url, token, era, model) as session:
            assert "model said: 42" in await ask(session, 10)
            assert "model said: 42" in await ask(session, 20)
        async with client(f"{replica.url}/mcp", token, era, model) as session:
            await assert_refused(session, era, 30)
        assert model.asked == [10, 20]
        assert sampling_events(audit_events(replica, replica_app.runtime)) == [
            (subject, "denied", "sampling:per_hour>2", "sampling:per_hour>2")]
    finally:
        replica.stop()
        deployment.stop()


@pytest.mark.parametrize("era", ERAS)
async def test_under_audit_only_the_hourly_count_is_recorded_not_enforced(tmp_path: Path, era: str) -> None:
    policy = {**limited_policy(per_hour=1), "mode": "audit_only"}
    deployment = deploy("proxy", tmp_path, upstream_app=sampling_upstream(), policy=policy)
    model = Model()
    try:
        async with client(deployment.url, deployment.token("alice"), era, model) as session:
            assert "model said: 42" in await ask(session, 10)
            assert "model said: 42" in await ask(session, 20)
        assert model.asked == [10, 20]
        recorded = [(e["result"], e["would_deny"]) for e in deployment.audit_events()
                    if e["operation"] == "sampling/createMessage"]
        assert recorded == [("allowed", None), ("allowed", "sampling:per_hour>1")]
    finally:
        deployment.stop()


@pytest.mark.parametrize("era", ERAS)
async def test_a_count_that_cannot_be_kept_refuses_the_request(tmp_path: Path, era: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=sampling_upstream(), policy=limited_policy(per_hour=50))

    async def unreachable(key: str, window_s: float, add: int = 1) -> int:
        raise StateUnavailable("ConnectionError")

    monkeypatch.setattr(deployment.runtime.sessions, "tally", unreachable)
    model = Model()
    try:
        async with client(deployment.url, deployment.token("alice"), era, model) as session:
            await assert_refused(session, era, 10)
        assert model.asked == []
        assert sampling_events(deployment.audit_events()) == [
            ("alice", "denied", "sampling:count_unavailable", "sampling:count_unavailable")]
    finally:
        deployment.stop()


# ---- the reference server: server-everything's trigger-sampling-request -------------------------------------


async def test_server_everything_asking_over_the_cap_is_refused(tmp_path: Path) -> None:
    policy = {
        "roles": {"tester": {"permissions": {"can_execute_tools": ["*"], "can_request_sampling": True},
                             "sampling": {"max_tokens": 100}}},
        "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["tester"]}],
    }
    model = Model()
    with server_everything() as upstream_url:
        port = free_port()
        app = create_app(write_config(tmp_path, upstream_url, policy=policy, public_url=f"http://127.0.0.1:{port}"))
        server = ServerThread(app, port).start()
        try:
            config = app.runtime.config
            token = app.runtime.authenticator.issue_token(
                subject="bob", audience=config.resource_url(config.upstreams[0]), scopes=["mcp:tools"])
            async with client(f"{server.url}/mcp", token, "auto", model) as session:
                fits = await session.call_tool("trigger-sampling-request", {"prompt": "hi", "maxTokens": 100})
                over = await session.call_tool("trigger-sampling-request", {"prompt": "hi", "maxTokens": 101})
            assert model.asked == [100]
            assert not fits.is_error and "42" in str(fits.content)
            assert over.is_error and "not allowed by the gateway" in str(over.content)
            assert sampling_events(audit_events(server, app.runtime)) == [
                ("bob", "allowed", "role:tester:sampling", "role:tester:sampling"),
                ("bob", "denied", "sampling:max_tokens>100", "sampling:max_tokens>100"),
            ]
        finally:
            server.stop()


def test_a_roles_own_sampling_limits_merge_field_by_field_with_the_inherited_ones(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "roles": {"agent": {"permissions": {"can_request_sampling": True}, "sampling": {"max_tokens": 100}},
                  "metered": {"inherits": ["agent"], "sampling": {"per_hour": 5}}},
        "bindings": [{"when": {"subject": "mo"}, "roles": ["metered"]}],
    }))
    policy, metered = load_policy(path), principal_from({"sub": "mo"})
    over = decide(metered, classify_server_request(sampling_request(100_000)), policy)
    assert (over.allowed, over.reason) == (False, "sampling:max_tokens>100")  # the inherited cap holds
    within = decide(metered, classify_server_request(sampling_request(100)), policy)
    assert (within.allowed, within.reason, within.per_hour) == (True, "role:metered:sampling", 5)  # and its own count


# ---- one request, one count: the hourly count of requests shown again ------------------------------------------

SAMPLE = {"method": "sampling/createMessage",
          "params": {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}], "maxTokens": 10}}
UPSTREAM = Upstream(name="up", path="/mcp")


class PolicyGateway:
    """What `ResponseRules` ask of the gateway, deciding with the exchange's policy; the in-memory session store
    keeps the count. Each decision on a server request is appended to `decided` as (allowed, reason)."""

    def __init__(self) -> None:
        self.handles = Handles(MemorySessions(Sessions()), Metrics(), answer_timeout_s=60)
        self.decided: list[tuple[bool, str]] = []

    def decide(self, ex: Exchange, op: Operation) -> Decision:
        assert ex.principal is not None and ex.policy is not None
        return decide(ex.principal, op, ex.policy)

    async def rate_limited(self, ex: Exchange, op: Operation, decision: Decision) -> Decision:
        return decision  # no rate limit: the hourly count alone is under test

    async def input_asked(self, ex: Exchange, op: Operation) -> None:
        return None

    def server_request_decided(self, ex: Exchange, op: Operation, decision: Decision) -> None:
        self.decided.append((decision.allowed, decision.reason))

    def server_request_withheld(self, ex: Exchange, op: Operation) -> None:
        pass

    async def tools_listed(self, ex: Exchange, result: dict[str, Any]) -> frozenset[str]:
        return frozenset()


@pytest.fixture
def per_hour_2(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(limited_policy(per_hour=2)))
    return load_policy(path)


def _rules(gateway: PolicyGateway, policy: Policy, era: Era, method: str, params: dict[str, Any],
           session_id: str | None = None) -> ResponseRules:
    """The rules for one forwarded request (id 1) of alice's."""
    ex = Exchange(UPSTREAM, {"method": "POST", "headers": [], "client": ("127.0.0.1", 1)})
    ex.principal, ex.policy, ex.era, ex.session_id = principal_from({"sub": "alice", "scope": "mcp:tools"}), \
        policy, era, session_id
    message = Message("request", 1, method, params, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    ex.messages, ex.operations = (message,), (classify(message),)
    return ResponseRules(ex, [0], gateway)


async def _kept(rules: ResponseRules, requests: dict[str, Any]) -> list[str]:
    """The keys of `requests` an input_required answer to request 1 keeps."""
    result = {"resultType": "input_required", "status": "input_required", "inputRequests": requests}
    answered = await rules.result({"jsonrpc": "2.0", "id": 1, "result": result}, result)
    return list(answered["result"]["inputRequests"]) if "result" in answered else []


async def test_a_task_polled_while_it_waits_for_input_is_counted_once_per_input_request(per_hour_2: Policy) -> None:
    gateway = PolicyGateway()

    def poll(task: str) -> ResponseRules:
        return _rules(gateway, per_hour_2, "modern", "tasks/get", {"taskId": task})

    for _ in range(3):  # the same request shown on every poll: one count
        assert await _kept(poll("t1"), {"s1": SAMPLE}) == ["s1"]
    assert await _kept(poll("t1"), {"s2": SAMPLE}) == ["s2"]  # the task's next request: counted
    assert await _kept(poll("t2"), {"s1": SAMPLE}) == []  # another task's: the third of the hour, refused
    assert await _kept(poll("t1"), {"s1": SAMPLE}) == ["s1"]  # passed on before: still not counted again
    assert gateway.decided == [(True, "role:sampler:sampling")] * 4 + [(False, "sampling:per_hour>2"),
                                                                       (True, "role:sampler:sampling")]


async def test_each_round_of_a_call_asking_the_same_sampling_request_is_counted(per_hour_2: Policy) -> None:
    gateway = PolicyGateway()
    calls = [_rules(gateway, per_hour_2, "modern", "tools/call", {"name": "ask", "arguments": {}}) for _ in range(3)]
    assert [await _kept(rules, {"s1": SAMPLE}) for rules in calls] == [["s1"], ["s1"], []]
    assert [reason for _, reason in gateway.decided] == ["role:sampler:sampling"] * 2 + ["sampling:per_hour>2"]


@pytest.mark.parametrize(("session_id", "passed"), [
    # request 40 replayed on the session: counted once; 41 and 42 are requests of their own, the second and third
    ("session-1", [True, True, True, True, False]),
    (None, [True, True, False, False, False]),  # no session to tell a replay by: every showing is counted
])
async def test_a_request_replayed_on_a_legacy_sse_stream_is_counted_once_per_session(
        per_hour_2: Policy, session_id: str | None, passed: list[bool]) -> None:
    gateway = PolicyGateway()
    shown = []
    for request_id in (40, 40, 40, 41, 42):
        rules = _rules(gateway, per_hour_2, "legacy", "tools/call", {"name": "ask", "arguments": {}}, session_id)
        shown.append(await rules.server_request({"jsonrpc": "2.0", "id": request_id, **SAMPLE}))
    assert shown == passed
    assert [allowed for allowed, _ in gateway.decided] == passed
