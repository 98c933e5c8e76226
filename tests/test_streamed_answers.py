"""2026-07-28 JSON answers too large to hold: streamed on as they come, judged whole before their end goes out.

A JSON answer the rules must read (a tools/call, prompts/get or resources/read that may ask for input or
create a task) is held whole up to `HOLD_BYTES` (here: `max_bytes`, the smaller). Past it, it streams on while
`json_scan` reads it; its last significant byte waits until the whole answer is judged on its top-level members
and its result's `RESULT_MEMBERS_READ`. Judged unchanged, it went out as the upstream wrote it. Anything else
(a change the rules would make, an answer that is not one strict JSON object, an answer cut short) is refused
with its error if nothing went out yet, else withheld: never ended, on record as refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from mcp.server.mcpserver import MCPServer

from gateway.inspect import AnswerWithheld, ResponseInspector
from tests.answer_rules import CALLER, FixedGateway, completions, fixed_rules
from tests.harness import deploy
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_responses import ELICIT, SAMPLE

MAX = 400  # max_bytes in the table: answers over it stream
TEXT = "a line of text\n" * 200  # 3 KB: the content that makes each answer too large to hold


def big(result: dict[str, Any], id: Any = 1) -> bytes:
    """An answer whose (large) contents come before the members the rules read."""
    return orjson.dumps({"jsonrpc": "2.0", "id": id, "result": {"contents": [{"uri": "x", "text": TEXT}],
                                                                **result}})


async def stream(raw: bytes, *, parts: int = 7, upstream_error: str | None = None,
                 gateway: list[FixedGateway] | None = None) -> tuple[int, bytes, list[int], bool, bool]:
    """`raw` through an inspector in `parts` chunks, answering a 2026-07-28 tools/call: (status sent, body sent,
    statuses put on record, whether the answer was withheld, whether anything went out before the last chunk
    arrived). The rules' gateway is appended to `gateway`."""
    rules, fixed = await fixed_rules(may_need_input={1}, may_create_task={1})
    (gateway if gateway is not None else []).append(fixed)
    sent: list[dict[str, Any]] = []
    completed: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    inspector = ResponseInspector(send, rules, max_bytes=MAX, on_complete=completions(completed),
                                  upstream_error=lambda: upstream_error if len(sent) > 1 else None)
    await inspector.send({"type": "http.response.start", "status": 200,
                          "headers": [(b"content-type", b"application/json")]})
    size = -(-len(raw) // parts)
    chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
    early, withheld = False, False
    try:
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            early = early or (last and bool(sent))
            await inspector.send({"type": "http.response.body", "body": chunk, "more_body": not last})
        await inspector.close()
    except AnswerWithheld:
        withheld = True
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), completed, withheld, early


@pytest.mark.parametrize(("case", "raw"), [
    ("complete", big({"resultType": "complete"})),
    ("no resultType", big({})),
    ("input asked, every request allowed", big({"resultType": "input_required", "inputRequests": {"b": ELICIT}})),
    ("escaped key", big({}).replace(b'"result"', b'"\\u0072esult"')),
    ("trailing whitespace", big({}) + b" \n" * 300),
])
async def test_an_answer_judged_unchanged_streams_through_as_the_upstream_wrote_it(case: str, raw: bytes) -> None:
    status, body, completed, withheld, early = await stream(raw)
    assert (status, body, completed, withheld) == (200, raw, [200], False)
    assert early  # it went out as it came: the head and most of it before the upstream had finished


@pytest.mark.parametrize(("case", "raw", "why"), [
    ("a request the caller may not answer",
     big({"resultType": "input_required", "inputRequests": {"a": SAMPLE, "b": ELICIT}}), "changed"),
    ("a task waiting for input with one", big({"status": "input_required", "inputRequests": {"a": SAMPLE}}),
     "changed"),
    ("a result to a request nobody here made", big({}, id=2), "changed"),
    ("a repeated top-level key after the content", big({})[:-1] + b',"result":{"resultType":"input_required"}}',
     "duplicate"),
    ("a repeated result member", big({"resultType": "complete"})[:-2] + b',"resultType":"input_required"}}',
     "duplicate"),
    ("not JSON at the end", big({})[:-1] + b"]", "json"),
    ("something after the answer", big({}) + b'{"jsonrpc":"2.0"}', "json"),
    ("cut short", big({})[:-20], "json"),
])
async def test_an_answer_that_cannot_pass_unchanged_is_withheld_and_never_complete(case: str, raw: bytes,
                                                                                  why: str) -> None:
    _, body, completed, withheld, _ = await stream(raw)
    assert withheld and completed == [502]  # on record as refused
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)  # the client never holds a whole answer: its last significant byte never went out
    assert body == raw[:len(body)]


async def test_an_answer_the_upstream_cut_short_is_withheld_as_an_upstream_failure() -> None:
    _, body, completed, withheld, _ = await stream(big({}), upstream_error="reset")
    assert withheld and completed == [502]
    assert len(body) < len(big({})) and not body.endswith(b"}")  # its end never went out


async def test_an_answer_unreadable_before_anything_went_out_is_refused_with_its_error() -> None:
    raw = b'{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"result":{"contents":"' + b"x" * 1000 + b'"}}'
    status, body, completed, withheld, _ = await stream(raw, parts=2)
    assert (status, withheld, completed) == (502, False, [502])
    assert json.loads(body)["error"]["code"] == -32052


async def test_a_large_answer_that_created_a_task_makes_it_the_callers() -> None:
    raw = big({"resultType": "task", "taskId": "t-big", "ttlMs": 60000})
    gateway: list[FixedGateway] = []
    status, body, _, withheld, _ = await stream(raw, gateway=gateway)
    assert (status, body, withheld) == (200, raw, False)
    assert await gateway[0].handles.sessions.owned_tasks("up", CALLER.identity, ["t-big"]) == {"t-big"}


# ---- end to end: the real SDK server, the gateway as reverse proxy ---------------------------------------------

BIG_TEXT = "0123456789abcdef" * (3 * 1024 * 1024 // 16)  # 3 MB: three times what the gateway holds whole


def big_resource_server() -> Any:
    server = MCPServer("big")

    @server.resource("file:///srv/docs/big")
    def big_file() -> str:
        """3 MB of text."""
        return BIG_TEXT

    return server.streamable_http_app(stateless_http=True, json_response=True)


def test_a_large_2026_read_streams_through_whole_and_is_on_record(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=big_resource_server())
    try:
        headers, body = modern("resources/read", {"uri": "file:///srv/docs/big"})
        answer = httpx.post(deployment.url, json=body, timeout=60, headers={
            **BASE_HEADERS, **headers, "Authorization": f"Bearer {deployment.token()}"})
        assert answer.status_code == 200
        assert answer.json()["result"]["contents"][0]["text"] == BIG_TEXT
        event = next(e for e in deployment.audit_events() if e["operation"] == "resources/read")
        assert (event["result"], event["status"]) == ("allowed", 200)
    finally:
        deployment.stop()


def asking_for_sampling(text: str) -> Any:
    """An upstream answering every call `input_required` with a sampling request after `text`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = json.loads((await receive())["body"])
        answer = orjson.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {
            "content": [{"type": "text", "text": text}], "resultType": "input_required",
            "inputRequests": {"a": SAMPLE}}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        for start in range(0, len(answer), 65536):
            await send({"type": "http.response.body", "body": answer[start:start + 65536], "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def test_a_large_2026_answer_asking_what_the_caller_may_not_answer_never_reaches_it_whole(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, upstream_app=asking_for_sampling(BIG_TEXT))
    try:
        headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
        auth = {**BASE_HEADERS, **headers, "Authorization": f"Bearer {deployment.token()}"}
        with pytest.raises(httpx.RemoteProtocolError):  # cut off: the client never holds the whole answer
            httpx.post(deployment.url, json=body, timeout=60, headers=auth)
        events = deployment.audit_events()
        assert any(e["operation"] == "sampling/createMessage" and e["result"] == "denied" for e in events)
        call = next(e for e in events if e["operation"] == "tools/call")
        assert (call["result"], call["status"]) == ("upstream_error", 502)
    finally:
        deployment.stop()
