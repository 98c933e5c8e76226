"""Fuzzing: hypothesis strategies for what reaches the gateway, and the property each of its parsers must keep.

Shared by `tests/test_fuzz.py` (bounded examples, in `make test`) and `tests/fuzz_main.py` (`make fuzz`: long
runs with counts and rates). Each property takes one generated input and raises AssertionError on a violation;
any exception other than the parser's own defined ones is a failure too.

    parse_body        bytes -> Body, or NotJson / NotJsonRpc
    classify          every parsed message -> Operation, or MalformedParams; routing-header checks never raise
    normalize_uri     -> a canonical URI with no dot segment however it is decoded, or InvalidUri; idempotent
    sse               any chunking gives the events of the whole; only EventTooLarge
    inspector         any upstream answer (label, status, chunking) -> one start, one end, one audit call,
                      nothing hidden shown, nothing unreadable passed
    upstream client   never accepts an answer h11 refuses, and reads what it accepts as h11 does
"""

from __future__ import annotations

import asyncio
import random
import unicodedata
from typing import Any
from urllib.parse import unquote

import h11
import orjson
from hypothesis import strategies as st

from gateway import jsonrpc, mcp, mcp_headers, sse
from gateway.inspect import ResponseInspector
from gateway.policy.uri import InvalidUri, normalize_uri
from gateway.upstream_http import _Connection
from tests.answer_rules import completions, fixed_rules

# ---- JSON and JSON-RPC -------------------------------------------------------------------------

METHODS = [*mcp.CLIENT_NOTIFICATIONS, "initialize", "server/discover", "ping", "tools/list", "tools/call",
           "resources/list", "resources/read", "resources/subscribe", "prompts/get", "completion/complete",
           "subscriptions/listen", "tasks/get", "tasks/list", "tasks/update", "sampling/createMessage",
           "admin/shutdown", "", "Tools/Call"]
KEYS = ["jsonrpc", "id", "method", "params", "result", "error", "name", "uri", "arguments", "_meta", "ref", "type",
        "taskId", "task", "inputResponses", "notifications", "taskIds", "code", "message", "tools", "action",
        "model", "role", "content", "roots", mcp_headers.PROTOCOL_VERSION_META_KEY]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.sampled_from(METHODS), st.sampled_from(["2.0", "2026-07-28", "2025-11-25", "file:///a/../b"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5)), max_leaves=25)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """JSON-RPC-ish objects: mostly well formed, with a member missing, retyped or added now and then."""
    message: dict[str, Any] = {"jsonrpc": "2.0"}
    kind = draw(st.sampled_from(["request", "notification", "response", "error"]))
    if kind in ("request", "response", "error"):
        message["id"] = draw(st.one_of(st.integers(-5, 5), st.text(max_size=4), st.none()))
    if kind in ("request", "notification"):
        message["method"] = draw(st.sampled_from(METHODS))
        message["params"] = draw(st.one_of(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5),
                                           json_values))
    elif kind == "response":
        message["result"] = draw(json_values)
    else:
        error = st.fixed_dictionaries({"code": st.integers(-(2**63), 2**63 - 1), "message": st.text()})
        message["error"] = draw(st.one_of(error, json_values))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()):
            message.pop(key, None)
        else:
            message[key] = draw(json_values)
    return message


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """POST bodies: messages, batches, bare JSON, byte soup, repeated keys, escapes, deep nesting, truncation."""
    choice = draw(st.integers(0, 7))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return orjson.dumps(draw(json_values))
    if choice == 2:
        return orjson.dumps(draw(st.lists(messages(), min_size=0, max_size=4)))
    raw = orjson.dumps(draw(messages()))
    if choice == 3:
        return raw[: draw(st.integers(0, len(raw)))]
    if choice == 4:  # a member written twice, at the top or one level down
        key = draw(st.sampled_from([b"name", b"method", b"id", b"uri", b"arguments", b"params"]))
        at = draw(st.sampled_from([0, raw.find(b"{", 1)]))
        if at < 0:
            return raw
        return raw[:at + 1] + b'"' + key + b'":' + orjson.dumps(draw(json_values)) + b"," + raw[at + 1:]
    if choice == 5:
        return b"[" * draw(st.integers(0, 80)) + raw + b"]" * draw(st.integers(0, 80))
    if choice == 6:
        return raw.replace(b'"method"', b'"\\u006dethod"').replace(b"tools", b"\\u0074ools")
    return raw


def check_parse_body(body: bytes) -> None:
    """Only the defined refusals come out, and what is accepted is JSON-RPC as the gateway reads it."""
    try:
        parsed = jsonrpc.parse_body(body, max_depth=64)
    except (jsonrpc.NotJson, jsonrpc.NotJsonRpc):
        return
    assert parsed.messages
    for message in parsed.messages:
        assert message.kind in ("request", "notification", "response", "error")
        assert message.kind not in ("request", "notification") or isinstance(message.method, str)
        check_classify(message)


_TOKENS = [b'"name":"x",', b"{", b"[", b"}", b"]", b'"\\u0000"', b'"\\ud800"', b"1e400", b"-0", b'"id":1,', b",",
           b'"method":"tools/call",', b"\xff", b"\\", b'"', b"null", b"18446744073709551616"]


def mutants(body: bytes, seed: int, count: int) -> list[bytes]:
    """`count` cheap variations of `body` (a byte flipped, a span cut or doubled, a JSON token put in): many
    bodies per generated one, so long runs reach millions of inputs at a speed hypothesis alone does not."""
    chance = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(body)
        for _ in range(chance.randint(1, 3)):
            at = chance.randint(0, len(data))
            how = chance.randint(0, 3)
            if how == 0 and data:
                data[min(at, len(data) - 1)] = chance.randint(0, 255)
            elif how == 1:
                del data[at:at + chance.randint(1, 8)]
            elif how == 2:
                data[at:at] = data[at:at + chance.randint(1, 16)]
            else:
                data[at:at] = chance.choice(_TOKENS)
        out.append(bytes(data))
    return out


def check_parse_body_and_mutants(body: bytes, seed: int, count: int = 49) -> int:
    """`check_parse_body` on `body` and `count` mutants of it; the number of bodies checked."""
    for each in [body, *mutants(body, seed, count)]:
        check_parse_body(each)
    return count + 1


def check_classify(message: jsonrpc.Message) -> None:
    try:
        op = mcp.classify(message)
    except mcp.MalformedParams:
        return
    assert op.kind in mcp.OperationKind.__args__  # type: ignore[attr-defined]
    if message.kind == "notification" and message.method not in mcp.CLIENT_NOTIFICATIONS:
        assert op.kind == "unknown", "a message without an id passed as a harmless notification"
    for value in (op.name, op.uri):
        assert value is None or not any(ord(c) < 0x20 for c in value)
    mcp.classify_server_request(message)
    mcp.detect_era((message,), None)
    mcp.result_kind(message.raw.get("result"))
    mcp.created_task(message.raw.get("result"))


@st.composite
def routing_headers(draw: st.DrawFn) -> dict[str, list[str]]:
    names = st.sampled_from(["mcp-protocol-version", "mcp-method", "mcp-name", "mcp-param-region", "mcp-param-x"])
    values = st.one_of(st.text(max_size=12), st.sampled_from(["2026-07-28", "tools/call", "=?base64?ZWNobw==?=",
                                                              "=?base64?!!?=", "echo"]))
    return draw(st.dictionaries(names, st.lists(values, min_size=1, max_size=2), max_size=5))


def check_routing(message: dict[str, Any], headers: dict[str, list[str]], schema: Any) -> None:
    try:
        parsed = jsonrpc.parse_body(orjson.dumps(message), max_depth=64)
    except (jsonrpc.NotJson, jsonrpc.NotJsonRpc):
        return
    first = parsed.messages[0]
    verdict = mcp_headers.routing_header_mismatch(first, headers, name_param=mcp.mirrored_param(first.method),
                                                  tool_schema=schema if isinstance(schema, dict) else None)
    assert verdict is None or isinstance(verdict, str)


# ---- URIs -----------------------------------------------------------------------------------------

URI_PARTS = ["/", "..", ".", "%2e", "%2E%2e", "%2F", "%5c", "\\", "\uff0e", "\uff0f", "\u2024", "%EF%BC%8E",
             "%C0%AE", "%00", "a", "srv", "docs", "%41", "~", "?", "#", "@", ":", "%", "%zz", "\u00e9", "\x01"]
uris = st.builds(lambda scheme, parts: scheme + "".join(parts),
                 st.sampled_from(["file://", "file:///", "https://Example.COM/", "mem://", "", "x:"]),
                 st.lists(st.sampled_from(URI_PARTS), max_size=12))


def check_uri(uri: str) -> None:
    try:
        canonical = normalize_uri(uri)
    except InvalidUri:
        return
    assert normalize_uri(canonical) == canonical, "normalisation is not idempotent"
    path = canonical.split("?", 1)[0].split("#", 1)[0]
    for reading in (path, unquote(path), unicodedata.normalize("NFKC", unquote(path))):
        segments = reading.split("/")
        assert ".." not in segments, f"{uri!r} accepted as {canonical!r}, which another reader sees as {reading!r}"


# ---- SSE ------------------------------------------------------------------------------------------

sse_streams = st.lists(st.one_of(
    st.sampled_from([b"data: x\n\n", b"data: {}\r\n\r\n", b": c\n\n", b"id: 1\rdata: a\r\r", b"event: e\ndata:\n\n",
                     b"retry: 5\n", b"data", b"\n", b"\r\n", b"\r", b"id: \x00\n"]),
    st.binary(max_size=20)), max_size=12).map(b"".join)


def check_sse(stream: bytes, cuts: list[int]) -> None:
    def decode(chunks: list[bytes]) -> list[tuple[Any, ...]]:
        decoder = sse.Decoder(1 << 16)
        out = []
        for chunk in chunks:
            out += [(e.data, e.event, e.id, e.retry, e.comments) for e in decoder.feed(chunk)]
        return out

    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert decode(pieces) == decode([stream]), "the events depend on how the stream was cut"


# ---- the response inspector ------------------------------------------------------------------------

VISIBLE, HIDDEN = "echo", "secret"


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes | None, int, list[bytes]]:
    """An upstream answer as the inspector meets it: a label, a status, and the body in chunks."""
    label = draw(st.sampled_from([b"application/json", b"text/event-stream", b"text/plain", None,
                                  b"application/json; charset=utf-8", b"TEXT/EVENT-STREAM"]))
    tools = draw(st.lists(st.sampled_from([VISIBLE, HIDDEN]), max_size=4))
    message = {"jsonrpc": "2.0", "id": draw(st.sampled_from([1, "1", 2, None])),
               "result": {"tools": [{"name": t} for t in tools]}}
    body = orjson.dumps(draw(st.one_of(st.just(message), messages(), st.lists(messages(), max_size=3))))
    if draw(st.booleans()):
        body = orjson.dumps(message)
    if label is not None and b"event-stream" in label.lower():
        body = b"".join(sse.encode(part) for part in [body.decode(), *draw(st.lists(st.just("{bad"), max_size=1))])
    body = draw(st.one_of(st.just(body), st.binary(max_size=60), st.just(body[: len(body) // 2])))
    status = draw(st.sampled_from([200, 202, 400, 404, 500]))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return label, status, chunks


def check_inspector(answer: tuple[bytes | None, int, list[bytes]], listing: bool) -> None:
    label, status, chunks = answer
    sent: list[dict[str, Any]] = []
    completed: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        rules, _ = await fixed_rules(lists={1: "tools/list"} if listing else {})
        inspector = ResponseInspector(send, rules, max_bytes=4096, upstream_error=lambda: None,
                                      on_complete=completions(completed))
        await inspector.send({"type": "http.response.start", "status": status,
                              "headers": [(b"content-type", label)] if label is not None else []})
        for index, chunk in enumerate(chunks):
            await inspector.send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})

    asyncio.run(run())
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1 and len(completed) == 1, "not exactly one answer, recorded once"
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    body = b"".join(m.get("body", b"") for m in sent[1:])
    headers = dict(starts[0]["headers"])
    is_sse = label is not None and label.lower().startswith(b"text/event-stream")
    if is_sse:
        payloads = [e.data for e in sse.Decoder().feed(body) if e.data]
        for data in payloads:
            orjson.loads(data)  # every event that went out is JSON
    elif listing or (label is not None and not label.startswith(b"application/json")):
        payloads = [body.decode()] if body else []
        for data in payloads:
            orjson.loads(data)  # a held answer goes out as JSON or not at all
        assert not body or headers.get(b"content-type") == b"application/json"
    else:
        return  # an answer labelled JSON that nothing rewrites streams through as it came
    if listing:
        assert all(f'"name":"{HIDDEN}"' not in data for data in payloads), "a hidden tool was shown"


# ---- the upstream client, held to h11 ------------------------------------------------------------------

HEADER_NAMES = [b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A", b"Content-Type", b"X A", b"X:A",
                b"", b"\xff", b"Keep-Alive", b"Trailer"]
HEADER_VALUES = [b"0", b"5", b"3", b"-1", b"+5", b"5, 5", b"chunked", b"gzip, chunked", b"close", b"keep-alive",
                 b"", b" a ", b"a\x00b", b"a\tb", b"\x80", b"a\r b"]


@st.composite
def raw_answers(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 ", b"http/1.1", b"ICY"]))
    status = draw(st.sampled_from([b"200", b"204", b"304", b"100", b"101", b"103", b"404", b"999", b"20", b"2000"]))
    reason = draw(st.sampled_from([b" OK", b"", b" ", b" Continue", b" a\x01b"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    head = version + b" " + status + reason + eol
    for _ in range(draw(st.integers(0, 4))):
        head += draw(st.sampled_from(HEADER_NAMES)) + b":" + draw(st.sampled_from([b" ", b"", b"  "])) \
            + draw(st.sampled_from(HEADER_VALUES)) + eol
        if draw(st.integers(0, 9)) == 0:
            head += b" folded" + eol
    body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhel", b"0\r\n\r\n",
                                 b"5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n"]))
    extra = draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n\r\n", b"junk"]))
    return head + eol + body + extra


def _ours(data: bytes, cuts: list[int]) -> tuple[str, Any]:
    """What the upstream client makes of `data` arriving in pieces, then the connection closing."""

    class Transport:
        def write(self, _: bytes) -> None: ...
        def close(self) -> None: ...
        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...

    connection = _Connection()
    connection.transport = Transport()  # type: ignore[assignment]
    connection.start(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    points = sorted({min(c, len(data)) for c in cuts})
    body = b""
    for piece in [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]:
        connection.data_received(piece)
        body += connection.take()
    connection.connection_lost(None)
    body += connection.take()
    if connection.error is not None or not connection.complete:
        return "refused", None
    headers = [(n.lower(), v.strip(b" \t")) for n, v in connection.headers]
    return "read", (connection.status, headers, body)


def _h11s(data: bytes) -> tuple[str, Any]:
    peer = h11.Connection(h11.CLIENT)
    peer.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    peer.send(h11.EndOfMessage())
    peer.receive_data(data)
    peer.receive_data(b"")
    status, headers, body = None, None, b""
    try:
        while True:
            event = peer.next_event()
            if isinstance(event, h11.Response):
                status, headers = event.status_code, [(n, v) for n, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return "read", (status, headers, body)
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed) or (
                    isinstance(event, h11.InformationalResponse) and event.status_code == 101):
                return "refused", None
    except h11.RemoteProtocolError:
        return "refused", None


def check_upstream_client(data: bytes, cuts: list[int]) -> None:
    ours, h11s = _ours(data, cuts), _h11s(data)
    if ours[0] == "read":
        assert h11s[0] == "read", f"the client accepted an answer h11 refuses: {data!r}"
        assert ours[1] == h11s[1], f"the client read {ours[1]!r}, h11 {h11s[1]!r}"

