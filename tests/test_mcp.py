"""mcp.classify, era detection and the 2026-07-28 routing-header rules, as tables."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gateway import jsonrpc, mcp, mcp_headers

META = {"_meta": {mcp_headers.PROTOCOL_VERSION_META_KEY: "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}


def message(value: dict[str, Any]) -> jsonrpc.Message:
    return jsonrpc.parse_body(jsonrpc.dumps(value), max_depth=64).messages[0]


def request(method: str, **params: Any) -> jsonrpc.Message:
    return message({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})


CLASSIFY = [
    # (method, params, kind, name, uri)
    ("initialize", {"protocolVersion": "2025-11-25"}, "initialize", None, None),
    ("server/discover", {}, "discover", None, None),
    ("ping", {}, "ping", None, None),
    ("tools/list", {}, "list", None, None),
    ("tools/call", {"name": "echo", "arguments": {"a": 1}}, "tool_call", "echo", None),
    ("resources/list", {}, "list", None, None),
    ("resources/templates/list", {}, "list", None, None),
    ("resources/read", {"uri": "file:///srv/docs/a"}, "resource_read", None, "file:///srv/docs/a"),
    ("resources/subscribe", {"uri": "file:///a"}, "resource_subscribe", None, "file:///a"),
    ("resources/unsubscribe", {"uri": "file:///a"}, "resource_unsubscribe", None, "file:///a"),
    ("subscriptions/listen", {}, "subscriptions_listen", None, None),
    ("prompts/list", {}, "list", None, None),
    ("prompts/get", {"name": "summarize"}, "prompt_get", "summarize", None),
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "summarize"}}, "completion", "summarize", None),
    ("completion/complete", {"ref": {"type": "ref/resource", "uri": "file:///srv/docs/{name}"}}, "completion", None,
     "file:///srv/docs/{name}"),
    ("logging/setLevel", {"level": "info"}, "logging_set_level", None, None),
    ("tasks/get", {"taskId": "t"}, "task", None, None),
    ("tasks/result", {"taskId": "t"}, "task", None, None),
    ("tasks/list", {}, "task", None, None),
    ("tasks/cancel", {"taskId": "t"}, "task", None, None),
    ("admin/shutdown", {}, "unknown", None, None),
    ("Tools/Call", {"name": "echo"}, "unknown", None, None),  # methods are case-sensitive
]


@pytest.mark.parametrize(("method", "params", "kind", "name", "uri"), CLASSIFY,
                         ids=[f"{r[0]}-{r[3] or r[4] or ''}" for r in CLASSIFY])
def test_every_method_of_every_revision_is_classified(method: str, params: dict[str, Any], kind: str,
                                                      name: str | None, uri: str | None) -> None:
    op = mcp.classify(request(method, **params))
    assert (op.kind, op.method, op.name, op.uri, op.request_id) == (kind, method, name, uri, 1)


def test_notifications_and_client_responses_are_classified() -> None:
    note = message({"jsonrpc": "2.0", "method": "notifications/initialized"})
    reply = message({"jsonrpc": "2.0", "id": 9, "result": {"content": []}})
    error = message({"jsonrpc": "2.0", "id": 9, "error": {"code": -1, "message": "no"}})
    assert mcp.classify(note).kind == "notification"
    assert [mcp.classify(m).kind for m in (reply, error)] == ["client_response", "client_response"]


@pytest.mark.parametrize(("method", "params"), [
    ("tools/call", {"name": 5}), ("tools/call", {}), ("tools/call", {"name": "x", "arguments": [1]}),
    ("resources/read", {"uri": None}), ("completion/complete", {}),
    ("completion/complete", {"ref": {"type": "ref/prompt"}}),
])
def test_a_known_method_without_a_readable_target_is_malformed(method: str, params: dict[str, Any]) -> None:
    with pytest.raises(mcp.MalformedParams):
        mcp.classify(request(method, **params))


def test_input_responses_are_classified_by_shape() -> None:
    retry = request("tools/call", name="ask_llm", inputResponses={
        "a": {"role": "assistant", "model": "m", "content": {"type": "text", "text": "x"}},
        "b": {"action": "accept", "content": {}},
        "c": {"roots": []},
        "d": {"surprise": True},
    })
    assert mcp.classify(retry).input_responses == ("sampling", "elicitation", "roots_list", "unknown")


def test_server_requests_are_classified() -> None:
    kinds = [mcp.classify_server_request(request(m)).kind
             for m in ("sampling/createMessage", "elicitation/create", "roots/list", "ping", "x/y")]
    assert kinds == ["sampling", "elicitation", "roots_list", "ping", "unknown"]


ERAS = [
    (None, {}, "legacy"),
    ("2025-06-18", {}, "legacy"),
    ("2025-11-25", {}, "legacy"),
    ("2026-07-28", {}, "modern"),
    (None, META, "modern"),
    ("2099-01-01", {}, "modern"),  # an unknown version is not a handshake one: the upstream answers -32022
]


@pytest.mark.parametrize(("header", "params", "era"), ERAS)
def test_era_comes_from_header_or_body(header: str | None, params: dict[str, Any], era: str) -> None:
    assert mcp.detect_era((request("tools/list", **params),), header) == era


def headers(**values: str | list[str]) -> dict[str, list[str]]:
    return {k.replace("_", "-").lower(): v if isinstance(v, list) else [v] for k, v in values.items()}


GOOD = dict(mcp_protocol_version="2026-07-28", mcp_method="tools/call", mcp_name="echo")
CALL = request("tools/call", name="echo", arguments={"region": "eu", "days": 2, "flag": True}, **META)
SCHEMA = {"type": "object", "properties": {
    "region": {"type": "string", "x-mcp-header": "Region"},
    "days": {"type": "integer", "x-mcp-header": "Days"},
    "flag": {"type": "boolean", "x-mcp-header": "Flag"},
}}
B64 = "=?base64?" + base64.b64encode("ünï".encode()).decode() + "?="

HEADER_RULES: list[tuple[str, dict[str, list[str]], dict[str, Any] | None, str | None]] = [
    ("all agree, no schema known", headers(**GOOD), None, None),
    ("version missing", headers(mcp_method="tools/call", mcp_name="echo"), None,
     "MCP-Protocol-Version header is missing"),
    ("version repeated", headers(**{**GOOD, "mcp_protocol_version": ["2026-07-28", "2026-07-28"]}), None,
     "mcp-protocol-version header appears more than once"),
    ("method differs", headers(**{**GOOD, "mcp_method": "tools/list"}), None, "Mcp-Method header does not match"),
    ("name differs", headers(**{**GOOD, "mcp_name": "ECHO"}), None, "Mcp-Name header does not match the body"),
    ("params all match", headers(**GOOD, mcp_param_region="eu", mcp_param_days="2", mcp_param_flag="true"),
     SCHEMA, None),
    ("integer compares by value", headers(**GOOD, mcp_param_region="eu", mcp_param_days="2.0", mcp_param_flag="true"),
     SCHEMA, None),
    ("param differs", headers(**GOOD, mcp_param_region="us", mcp_param_days="2", mcp_param_flag="true"), SCHEMA,
     "Mcp-Param-Region header does not match"),
    ("param missing", headers(**GOOD, mcp_param_days="2", mcp_param_flag="true"), SCHEMA,
     "Mcp-Param-Region header is missing"),
    ("param undeclared", headers(**GOOD, mcp_param_region="eu", mcp_param_days="2", mcp_param_flag="true",
                                 mcp_param_other="x"), SCHEMA, "not declared"),
    ("param repeated", headers(**GOOD, mcp_param_region=["eu", "eu"]), SCHEMA, "appears more than once"),
    ("param with bad sentinel, schema unknown", headers(**GOOD, mcp_param_region="=?base64?***?="), None,
     "malformed base64 sentinel"),
]


@pytest.mark.parametrize(("case", "sent", "schema", "problem"), HEADER_RULES, ids=[r[0] for r in HEADER_RULES])
def test_routing_headers_must_match_the_body(case: str, sent: dict[str, list[str]], schema: dict[str, Any] | None,
                                             problem: str | None) -> None:
    found = mcp_headers.routing_header_mismatch(CALL, sent, name_param="name", tool_schema=schema)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_base64_sentinel_carries_non_ascii_names() -> None:
    call = request("prompts/get", name="ünï", **META)
    sent = headers(mcp_protocol_version="2026-07-28", mcp_method="prompts/get", mcp_name=B64)
    assert mcp_headers.routing_header_mismatch(call, sent, name_param="name", tool_schema=None) is None
    assert mcp_headers.decode_header_value(B64) == "ünï"
    assert mcp_headers.decode_header_value("=?base64?ZWNobw?=") is None  # non-canonical padding
    assert mcp_headers.decode_header_value("plain") == "plain"


@pytest.mark.parametrize(("value", "sent"), [
    ("echo", "echo"), ("", ""), ("ünï", B64), (" x", "=?base64?IHg=?="),
    ("=?base64?ZWNobw==?=", "=?base64?PT9iYXNlNjQ/WldOb2J3PT0/PQ==?="),  # a plain value that looks encoded
])
def test_a_routing_header_value_is_encoded_so_it_decodes_to_itself(value: str, sent: str) -> None:
    assert mcp_headers.encode_header_value(value) == sent
    assert mcp_headers.decode_header_value(sent) == value
