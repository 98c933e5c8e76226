"""ResponseInspector rules on answers, message by message, in JSON and SSE: a table of what comes out."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway import sse
from gateway.inspect import ResponseInspector
from gateway.response_rules import ResponseRules
from tests.answer_rules import CALLER, completions, fixed_rules

SAMPLE = {"method": "sampling/createMessage", "params": {"messages": [], "maxTokens": 5}}
ELICIT = {"method": "elicitation/create", "params": {"message": "name?", "requestedSchema": {}}}


async def rules(seen: list[Any] | None = None, **overrides: Any) -> ResponseRules:
    """Rules for request id 1 whose decisions are fixed: "secret" items hidden, sampling refused, task "mine"
    owned (`tests.answer_rules`); what the gateway was told is appended to `seen`."""
    return (await fixed_rules(seen, **overrides))[0]


async def run(rules_: ResponseRules, content_type: bytes | None, chunks: list[bytes], status: int = 200,
              max_bytes: int = 1 << 20, upstream_error: str | None = None
              ) -> tuple[int, dict[bytes, bytes], bytes, list[int]]:
    sent: list[dict[str, Any]] = []
    completed: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    failure: list[str] = []  # `upstream_error` is reported once the answer has started, as the hop reports a break
    inspector = ResponseInspector(send, rules_, max_bytes=max_bytes, upstream_error=lambda: (failure or [None])[0],
                                  on_complete=completions(completed))
    labels = [(b"content-type", content_type)] if content_type is not None else []
    await inspector.send({"type": "http.response.start", "status": status, "headers": labels})
    if upstream_error is not None:
        failure.append(upstream_error)
    for index, chunk in enumerate(chunks):
        await inspector.send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, completed


def answer(result: dict[str, Any], id: int = 1) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id, "result": result})


async def test_a_list_in_json_is_filtered_and_made_private() -> None:
    listed = answer({"tools": [{"name": "echo"}, {"name": "secret"}], "nextCursor": "p2", "cacheScope": "public",
                     "ttlMs": 1000})
    status, headers, body, completed = await run(await rules(lists={1: "tools/list"}), b"application/json",
                                                 [listed[:10], listed[10:]])
    result = json.loads(body)["result"]
    assert [t["name"] for t in result["tools"]] == ["echo"]
    assert (result["cacheScope"], result["nextCursor"], result["ttlMs"]) == ("private", "p2", 1000)
    assert headers[b"content-length"] == str(len(body)).encode()
    assert (status, completed) == (200, [200])


async def test_a_list_in_sse_is_filtered_event_by_event_with_its_id_kept() -> None:
    events = (b"id: 0\ndata:\n\n"
              + sse.encode(answer({"prompts": [{"name": "secret"}, {"name": "summarize"}]}).decode(), event="message",
                           id="7"))
    _, _, body, _ = await run(await rules(lists={1: "prompts/list"}), b"text/event-stream",
                              [events[:17], events[17:]])
    decoded = sse.Decoder().feed(body)
    assert (decoded[0].id, decoded[0].data) == ("0", "")
    assert decoded[1].id == "7"
    assert [p["name"] for p in json.loads(decoded[1].data or "")["result"]["prompts"]] == ["summarize"]


async def test_an_unfiltered_answer_passes_through_byte_for_byte() -> None:
    raw = b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}'
    _, headers, body, _ = await run(await rules(), b"application/json", [raw])
    assert body == raw and b"content-length" not in headers  # nothing held, nothing rewritten


async def test_refused_server_requests_are_dropped_from_a_stream() -> None:
    stream = (sse.encode(json.dumps({"jsonrpc": "2.0", "id": 40, **SAMPLE}), event="message", id="1")
              + sse.encode(json.dumps({"jsonrpc": "2.0", "id": 41, **ELICIT}), event="message", id="2")
              + b": keep-alive\n\n")
    _, _, body, _ = await run(await rules(request_ids=()), b"text/event-stream", [stream])
    kept = [json.loads(e.data) for e in sse.Decoder().feed(body) if e.data]
    assert [m["id"] for m in kept] == [41]
    assert body.endswith(b": keep-alive\n\n")


async def test_input_required_keeps_only_what_the_client_may_answer() -> None:
    partial = answer({"resultType": "input_required", "inputRequests": {"a": SAMPLE, "b": ELICIT},
                      "requestState": "s1"})
    _, _, body, _ = await run(await rules(may_need_input={1}), b"application/json", [partial])
    result = json.loads(body)["result"]
    assert list(result["inputRequests"]) == ["b"] and result["requestState"] == "s1"

    only_sampling = answer({"resultType": "input_required", "inputRequests": {"a": SAMPLE}})
    _, _, body, _ = await run(await rules(may_need_input={1}), b"application/json", [only_sampling])
    assert json.loads(body)["error"] == {
        "code": -32011, "message": "Forbidden: the server asked for sampling/createMessage, which is not allowed"}


async def test_an_answer_too_large_to_filter_is_refused_not_passed() -> None:
    huge = answer({"tools": [{"name": "x" * 200}] * 100})
    status, _, body, completed = await run(await rules(lists={1: "tools/list"}), b"application/json",
                                           [huge[:1000], huge[1000:]], max_bytes=2000)
    assert status == 502 and json.loads(body)["error"]["code"] == -32052
    assert completed == [502]


async def test_an_sse_event_too_large_to_inspect_ends_the_stream_with_an_error() -> None:
    stream = sse.encode('{"jsonrpc":"2.0","method":"notifications/progress"}') + b"data: " + b"x" * 5000
    _, _, body, _ = await run(await rules(), b"text/event-stream", [stream], max_bytes=1000)
    events = sse.Decoder().feed(body)
    assert json.loads(events[0].data or "")["method"] == "notifications/progress"
    assert json.loads(events[-1].data or "")["error"]["code"] == -32052


LISTED = answer({"tools": [{"name": "echo"}, {"name": "secret"}]})


@pytest.mark.parametrize("label", [b"text/plain", None, b"application/octet-stream", b"application/json"])
async def test_a_list_is_filtered_whatever_its_label(label: bytes | None) -> None:
    status, headers, body, _ = await run(await rules(lists={1: "tools/list"}), label, [LISTED])
    assert status == 200 and headers[b"content-type"] == b"application/json"
    assert [t["name"] for t in json.loads(body)["result"]["tools"]] == ["echo"]


@pytest.mark.parametrize(("held", "label"), [
    ({"lists": {1: "tools/list"}}, b"application/json"),  # an answer that must be filtered
    ({}, b"text/plain"),  # an answer labelled as something the gateway cannot read
    ({}, None),
])
async def test_a_held_answer_that_is_not_json_is_refused_not_released(held: dict[str, Any],
                                                                      label: bytes | None) -> None:
    status, _, body, completed = await run(await rules(**held), label, [b'{"tools": [{"name": "secret"}'])
    assert status == 502 and json.loads(body)["error"]["code"] == -32052 and b"secret" not in body
    assert completed == [502]


async def test_an_upstream_error_status_with_a_body_that_is_not_json_keeps_its_status_not_its_body() -> None:
    # A 405 for a GET stream the upstream does not offer: the client acts on the status; the body never passes.
    status, headers, body, _ = await run(await rules(request_ids=()), b"text/plain", [b"Method Not Allowed"],
                                         status=405)
    assert status == 405 and headers[b"content-type"] == b"application/json"
    assert json.loads(body)["error"]["code"] == -32052 and b"Method Not Allowed" not in body


async def test_a_repeated_key_reaches_the_client_only_as_the_gateway_read_it() -> None:
    # A first-key-wins client would read the unfiltered list if these bytes passed as they came.
    tricky = (b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"secret"}]},'
              b'"result":{"tools":[{"name":"echo"},{"name":"secret"}]}}')
    _, _, body, _ = await run(await rules(lists={1: "tools/list"}), b"application/json", [tricky])
    assert body.count(b'"result"') == 1 and b"secret" not in body


async def test_an_sse_event_that_is_not_json_ends_the_stream_with_an_error() -> None:
    stream = sse.encode('{"jsonrpc":"2.0","method":"notifications/progress"}') + b"data: {not json\n\n" \
        + sse.encode(answer({"content": []}).decode())
    _, _, body, _ = await run(await rules(), b"text/event-stream", [stream])
    events = sse.Decoder().feed(body)
    assert json.loads(events[0].data or "")["method"] == "notifications/progress"
    assert json.loads(events[-1].data or "") == {"jsonrpc": "2.0", "id": 1, "error": {
        "code": -32052, "message": "Upstream answer cannot be inspected: an event that is not JSON"}}
    assert len(events) == 2  # nothing after the unreadable event passes


async def test_events_that_are_not_messages_are_dropped_and_comments_kept() -> None:
    stream = (b"event: sampling\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 9, **SAMPLE}).encode() + b"\n\n"
              + b": keep-alive\n\n" + sse.encode(answer({"content": []}).decode(), id="3"))
    _, _, body, _ = await run(await rules(), b"text/event-stream", [stream])
    events = sse.Decoder().feed(body)
    assert [(e.event, e.comments, e.id) for e in events] == [(None, [" keep-alive"], None), (None, [], "3")]


async def test_a_result_that_answers_no_request_of_this_exchange_is_dropped() -> None:
    stream = sse.encode(answer({"content": ["not yours"]}, id=2).decode()) \
        + sse.encode(answer({"content": []}).decode())
    _, _, body, _ = await run(await rules(), b"text/event-stream", [stream])
    assert [json.loads(e.data or "")["id"] for e in sse.Decoder().feed(body)] == [1]
    status, _, body, _ = await run(await rules(lists={1: "tools/list"}), b"application/json",
                                   [answer({"tools": []}, id="1")])
    assert status == 502 and json.loads(body)["error"]["code"] == -32050  # "1" is not 1


async def test_server_requests_are_policed_in_every_era() -> None:
    stream = sse.encode(json.dumps({"jsonrpc": "2.0", "id": 40, **SAMPLE}))
    seen: list[Any] = []
    _, _, body, _ = await run(await rules(seen), b"text/event-stream", [stream])
    assert seen and seen[0].request_id == 40 and b"sampling" not in body
    assert ("withheld", 40) in seen  # the upstream is answered on the client's behalf


async def test_tasks_list_and_task_notifications_show_only_the_principals_own_tasks() -> None:
    listed = answer({"tasks": [{"taskId": "mine", "status": "working"}, {"taskId": "theirs", "status": "working"}]})
    _, _, body, _ = await run(await rules(lists={1: "tasks/list"}), b"application/json", [listed])
    assert [t["taskId"] for t in json.loads(body)["result"]["tasks"]] == ["mine"]
    notes = b"".join(sse.encode(json.dumps({"jsonrpc": "2.0", "method": method, "params": {"taskId": task}}))
                     for method in ("notifications/tasks/status", "notifications/tasks") for task in ("mine", "x"))
    _, _, body, _ = await run(await rules(request_ids=()), b"text/event-stream", [notes])
    assert [json.loads(e.data or "")["params"]["taskId"] for e in sse.Decoder().feed(body)] == ["mine", "mine"]


async def test_a_result_that_may_create_a_task_makes_it_the_callers() -> None:
    created = answer({"task": {"taskId": "t1", "status": "working", "ttl": 60000}})
    rules_, gateway = await fixed_rules(may_create_task={1})
    await run(rules_, b"application/json", [created])
    sessions = gateway.handles.sessions
    assert await sessions.owned_tasks("up", CALLER.identity, ["t1"]) == {"t1"}


async def test_a_held_answer_cut_short_by_the_upstream_is_an_error_not_half_an_answer() -> None:
    status, _, body, completed = await run(await rules(lists={1: "tools/list"}), b"application/json", [LISTED],
                                           upstream_error="protocol")
    assert status == 502 and json.loads(body)["error"] == {"code": -32050, "message": "Upstream unavailable: protocol"}
    assert completed == [502]


async def test_a_task_waiting_for_input_loses_the_requests_the_principal_may_not_answer() -> None:
    waiting = answer({"resultType": "complete", "taskId": "mine", "status": "input_required",
                      "inputRequests": {"a": SAMPLE, "b": ELICIT}})
    _, _, body, _ = await run(await rules(may_need_input={1}), b"application/json", [waiting])
    assert list(json.loads(body)["result"]["inputRequests"]) == ["b"]


async def test_refused_batch_members_answered_after_a_202_carry_one_content_type() -> None:
    refused = orjson.dumps({"jsonrpc": "2.0", "id": 2, "error": {"code": -32011, "message": "Forbidden"}})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    inspector = ResponseInspector(send, await rules(request_ids=(), extra=[refused]), max_bytes=1 << 20,
                                  upstream_error=lambda: None, on_complete=completions([]))
    await inspector.send({"type": "http.response.start", "status": 202, "headers": []})
    await inspector.send({"type": "http.response.body", "body": b"", "more_body": False})
    names = [name for name, _ in sent[0]["headers"]]
    assert sent[0]["status"] == 200 and names.count(b"content-type") == 1
    assert json.loads(sent[1]["body"]) == [json.loads(refused)]


@pytest.mark.parametrize("request_ids", [(1,), (1, 2)])  # one call; a 2025-03-26 batch answered event by event
async def test_a_stream_is_on_record_before_the_first_answer_to_one_of_its_requests_goes_out(
        request_ids: tuple[int, ...]) -> None:
    """Completion (the exchange's events recorded and, under audit.durability: written, on every sink) comes
    before the first event that answers a request, not at the end of the stream: a client holds no answer the
    audit trail does not."""
    sent: list[dict[str, Any]] = []
    out_at_completion: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def complete(_status: int) -> None:
        out_at_completion.append(b"".join(m.get("body", b"") for m in sent))

    inspector = ResponseInspector(send, await rules(request_ids=request_ids), max_bytes=1 << 20,
                                  upstream_error=lambda: None, on_complete=complete)
    await inspector.send({"type": "http.response.start", "status": 200,
                          "headers": [(b"content-type", b"text/event-stream")]})
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}
    chunks = [sse.encode(json.dumps(progress), event="message")]
    chunks += [sse.encode(answer({"content": []}, id=i).decode(), event="message") for i in request_ids]
    for index, chunk in enumerate(chunks):
        await inspector.send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})
    assert len(out_at_completion) == 1, "not completed exactly once"
    assert b"notifications/progress" in out_at_completion[0] and b'"id":1' not in out_at_completion[0]
    assert b'"id":1' in b"".join(m.get("body", b"") for m in sent)
