"""What the upstream receives is what the gateway decided, and every message it receives was decided as what it is.

- a body with a repeated key (`name`, `method`, `id`, `arguments`, `uri`, at any depth) is decided on the value
  the gateway reads, and forwarded as exactly that structure: a first-key reader and a last-key reader upstream
  read the same message;
- a client's JSON-RPC response reaches the upstream only when it answers a server request the gateway passed to
  that same principal, once, with a result of that request's kind.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import sse
from tests.harness import Deployment, deploy
from tests.test_bad_input import BASE_HEADERS, modern

LEGACY = {**BASE_HEADERS, "MCP-Protocol-Version": "2025-11-25"}


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"the upstream received a repeated key: {keys}"
    return dict(pairs)


REPEATED = [
    # (body, whether a reader may do it as the gateway reads it: echo yes, delete_file no)
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_file","name":"echo",'
     b'"arguments":{"text":"hi"}}}', True),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_file",'
     b'"arguments":{"path":"/etc/passwd"}}}', False),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"path":"/etc/passwd"},'
     b'"arguments":{"text":"hi"}}}', True),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list","params":{"name":"delete_file"}}', True),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"delete_file"}}', False),
    (b'{"jsonrpc":"2.0","id":"other","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}',
     True),
    (b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///srv/docs/secret/x",'
     b'"uri":"file:///srv/docs/a.txt"}}', True),
    (b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///srv/docs/a.txt",'
     b'"uri":"file:///srv/docs/secret/x"}}', False),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"a","text":"b"},'
     b'"\\u006eame":"delete_file"}}', False),  # an escaped key is the same key
]


@pytest.mark.parametrize(("body", "allowed"), REPEATED, ids=[str(i) for i in range(len(REPEATED))])
def test_a_repeated_key_is_decided_and_forwarded_as_one_reading(gateway: Deployment, body: bytes,
                                                                allowed: bool) -> None:
    decided = json.loads(body)  # Python keeps the last of repeated keys, as the gateway's parser does
    response = httpx.post(gateway.url, content=body,
                          headers={**LEGACY, "Authorization": f"Bearer {gateway.token()}"})
    if not allowed:
        assert response.status_code in (200, 403) and "error" in response.text
        assert gateway.recorder.requests == []
        assert [e["result"] for e in gateway.audit_events()] == ["denied"]
        return
    [received] = [r for r in gateway.recorder.requests if r.method == "POST"]
    assert json.loads(received.body, object_pairs_hook=_no_repeats) == decided
    assert json.loads(received.body, object_pairs_hook=_first_wins) == decided


def _session(gateway: Deployment, token: str) -> dict[str, str]:
    headers = {**LEGACY, "Authorization": f"Bearer {token}"}
    init = httpx.post(gateway.url, headers=headers, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "clientInfo": {"name": "t", "version": "1"},
                   "capabilities": {"sampling": {}}}})
    headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
    httpx.post(gateway.url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


SAMPLED = {"role": "assistant", "model": "m", "content": {"type": "text", "text": "42"}}


@pytest.fixture
def legacy_gateway(tmp_path: Path) -> Any:
    deployment = deploy("proxy", tmp_path)
    yield deployment
    deployment.stop()


def test_an_answer_to_a_server_request_must_be_the_principals_once_and_of_its_kind(
        legacy_gateway: Deployment) -> None:
    gateway = legacy_gateway
    olga = _session(gateway, gateway.token("olga", (), groups=["ops"]))  # may sample
    mallory = _session(gateway, gateway.token("mallory", (), groups=["ops"]))
    events: list[Any] = []
    asked = threading.Event()

    def call() -> None:
        with httpx.stream("POST", gateway.url, headers=olga, timeout=30, json={
                "jsonrpc": "2.0", "id": 5, "method": "tools/call",
                "params": {"name": "ask_llm", "arguments": {"topic": "cats"}}}) as stream:
            decoder = sse.Decoder()
            for chunk in stream.iter_bytes():
                for event in decoder.feed(chunk):
                    if event.data:
                        events.append(json.loads(event.data))
                        asked.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert asked.wait(15)
    request = events[0]
    assert request["method"] == "sampling/createMessage"

    def answer(headers: dict[str, str], result: dict[str, Any]) -> httpx.Response:
        return httpx.post(gateway.url, headers=headers, json={"jsonrpc": "2.0", "id": request["id"], "result": result})

    elicited = answer(olga, {"action": "accept", "content": {"model": "m"}})  # an elicitation result
    disguised = answer(olga, {"action": "accept", **SAMPLED})  # shaped as two kinds at once
    foreign = answer(mallory, SAMPLED)  # the right shape, from another principal's session
    assert [r.status_code for r in (elicited, disguised, foreign)] == [400, 400, 400]
    assert all(r.json()["error"]["code"] == -32600 for r in (elicited, disguised, foreign))
    assert answer(olga, SAMPLED).status_code == 202  # the principal it was passed to, with a sampling result
    assert answer(olga, SAMPLED).status_code == 400  # once only
    caller.join(15)
    assert any(m.get("id") == 5 and "model said: 42" in json.dumps(m) for m in events)

    responses = [json.loads(r.body) for r in gateway.recorder.requests if b'"result"' in r.body
                 and b'"method"' not in r.body]
    assert responses == [{"jsonrpc": "2.0", "id": request["id"], "result": SAMPLED}]
    refused = [(e["result"], e["reason"]) for e in gateway.audit_events() if e["operation"] == "response"]
    assert refused == [("denied", "response:not_a_sampling_result"), ("denied", "response:not_a_sampling_result"),
                       ("denied", "response:unsolicited"), ("allowed", "protocol:client_response"),
                       ("denied", "response:unsolicited")]


def test_input_responses_shaped_as_two_kinds_are_refused(gateway: Deployment) -> None:
    headers, body = modern("tools/call", {"name": "ask_llm", "arguments": {"topic": "cats"},
                                          "inputResponses": {"a": {"action": "accept", **SAMPLED}}})
    response = httpx.post(gateway.url, json=body, headers={
        **BASE_HEADERS, **headers, "Authorization": f"Bearer {gateway.token('olga', (), groups=['ops'])}"})
    assert response.status_code == 403
    assert gateway.recorder.requests == []
    assert [(e["result"], e["reason"]) for e in gateway.audit_events()] == [("denied", "input_response:unknown")]
