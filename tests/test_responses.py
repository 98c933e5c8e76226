"""ResponseInspector rules on answers, message by message, in JSON and SSE: a table of what comes out."""

from __future__ import annotations

import json
from typing import Any

import orjson

from gateway import sse
from gateway.responses import ResponseInspector, Rules

SAMPLE = {"method": "sampling/createMessage", "params": {"messages": [], "maxTokens": 5}}
ELICIT = {"method": "elicitation/create", "params": {"message": "name?", "requestedSchema": {}}}


def rules(**overrides: Any) -> Rules:
    seen: list[Any] = []
    base: dict[str, Any] = {
        "lists": {},
        "may_need_input": set(),
        "police_server_requests": False,
        "item_visible": lambda method, item: item.get("name") != "secret",
        "server_request": lambda message: (seen.append(message), message["method"] != "sampling/createMessage")[1],
        "input_request": lambda request: request["method"] != "sampling/createMessage",
        "learn": lambda method, result: seen.append((method, result)),
        "request_ids": (1,),
    }
    base.update(overrides)
    return Rules(**base)


async def run(rules_: Rules, content_type: bytes, chunks: list[bytes], status: int = 200,
              max_bytes: int = 1 << 20) -> tuple[int, dict[bytes, bytes], bytes, list[int]]:
    sent: list[dict[str, Any]] = []
    completed: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    inspector = ResponseInspector(send, rules_, max_bytes=max_bytes, upstream_error=lambda: None,
                                  on_complete=completed.append)
    await inspector.send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", content_type)]})
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
    status, headers, body, completed = await run(rules(lists={1: "tools/list"}), b"application/json",
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
    _, _, body, _ = await run(rules(lists={1: "prompts/list"}), b"text/event-stream", [events[:17], events[17:]])
    decoded = sse.Decoder().feed(body)
    assert decoded[0].raw == b"id: 0\ndata:\n\n"
    assert decoded[1].id == "7"
    assert [p["name"] for p in json.loads(decoded[1].data or "")["result"]["prompts"]] == ["summarize"]


async def test_an_unfiltered_answer_passes_through_byte_for_byte() -> None:
    raw = b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}'
    _, headers, body, _ = await run(rules(), b"application/json", [raw])
    assert body == raw and b"content-length" not in headers  # nothing held, nothing rewritten


async def test_refused_server_requests_are_dropped_from_a_stream() -> None:
    stream = (sse.encode(json.dumps({"jsonrpc": "2.0", "id": 40, **SAMPLE}), event="message", id="1")
              + sse.encode(json.dumps({"jsonrpc": "2.0", "id": 41, **ELICIT}), event="message", id="2")
              + b": keep-alive\n\n")
    _, _, body, _ = await run(rules(police_server_requests=True, request_ids=()), b"text/event-stream", [stream])
    kept = [json.loads(e.data) for e in sse.Decoder().feed(body) if e.data]
    assert [m["id"] for m in kept] == [41]
    assert body.endswith(b": keep-alive\n\n")


async def test_input_required_keeps_only_what_the_client_may_answer() -> None:
    partial = answer({"resultType": "input_required", "inputRequests": {"a": SAMPLE, "b": ELICIT},
                      "requestState": "s1"})
    _, _, body, _ = await run(rules(may_need_input={1}), b"application/json", [partial])
    result = json.loads(body)["result"]
    assert list(result["inputRequests"]) == ["b"] and result["requestState"] == "s1"

    only_sampling = answer({"resultType": "input_required", "inputRequests": {"a": SAMPLE}})
    _, _, body, _ = await run(rules(may_need_input={1}), b"application/json", [only_sampling])
    assert json.loads(body)["error"] == {
        "code": -32011, "message": "Forbidden: the server asked for sampling/createMessage, which is not allowed"}


async def test_an_answer_too_large_to_filter_is_refused_not_passed() -> None:
    huge = answer({"tools": [{"name": "x" * 200}] * 100})
    status, _, body, completed = await run(rules(lists={1: "tools/list"}), b"application/json",
                                           [huge[:1000], huge[1000:]], max_bytes=2000)
    assert status == 502 and json.loads(body)["error"]["code"] == -32052
    assert completed == [502]


async def test_an_sse_event_too_large_to_inspect_ends_the_stream_with_an_error() -> None:
    stream = sse.encode('{"jsonrpc":"2.0","method":"notifications/progress"}') + b"data: " + b"x" * 5000
    _, _, body, _ = await run(rules(), b"text/event-stream", [stream], max_bytes=1000)
    events = sse.Decoder().feed(body)
    assert json.loads(events[0].data or "")["method"] == "notifications/progress"
    assert json.loads(events[-1].data or "")["error"]["code"] == -32052
