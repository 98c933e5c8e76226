"""JSON-RPC framing limits and the incremental SSE decoder."""

from __future__ import annotations

import pytest

from gateway import jsonrpc, sse

INVALID = [
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', '"jsonrpc" must be "2.0"'),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', '"id"'),
    (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', "must not be null"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":3}', '"params"'),
    (b'{"jsonrpc":"2.0","id":1}', "exactly one of"),
    (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1}}', "exactly one of"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"message":"x"}}', "integer"),
    (b"[1]", "JSON object"),
    (b"[]", "empty batch"),
    (b"[" * 70 + b"]" * 70, "nesting deeper"),
    (b"[" * 2000 + b"]" * 2000, "nesting deeper"),  # past the JSON parser's own recursion limit
]


@pytest.mark.parametrize(("data", "why"), INVALID)
def test_json_that_is_not_json_rpc_says_why(data: bytes, why: str) -> None:
    with pytest.raises(jsonrpc.NotJsonRpc, match=why):
        jsonrpc.parse_body(data, max_depth=64)


def test_invalid_json_is_a_parse_error() -> None:
    with pytest.raises(jsonrpc.NotJson):
        jsonrpc.parse_body(b'{"jsonrpc": ', max_depth=64)


def test_depth_limit_is_exact() -> None:
    # the message (1), params (2) and 62 arrays: 64 levels
    ok = b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":' + b"[" * 62 + b"]" * 62 + b"}}"
    jsonrpc.parse_body(ok, max_depth=64)
    with pytest.raises(jsonrpc.NotJsonRpc):
        jsonrpc.parse_body(ok, max_depth=63)


def test_batch_keeps_every_message_kind() -> None:
    body = jsonrpc.parse_body(
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/x"},'
        b'{"jsonrpc":"2.0","id":"a","result":{}}]', max_depth=64)
    assert body.is_batch and [m.kind for m in body.messages] == ["request", "notification", "response"]
    assert body.request_ids == (1,)


STREAM = (b": comment\r\nretry: 10\r\nid: 1\r\ndata:\r\n\r\n"
          b"event: message\ndata: {\"a\":\ndata: 1}\n\n"
          b"id: 2\rdata: x\r\r\n")


def test_sse_decoder_gives_the_same_events_however_the_stream_is_cut() -> None:
    for cut in range(1, len(STREAM)):
        decoder = sse.Decoder()
        events = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
        assert [(e.id, e.event, e.data) for e in events] == [("1", None, ""), (None, "message", '{"a":\n1}'),
                                                             ("2", None, "x")]
        assert events[0].retry == 10 and events[0].comments == [" comment"]
        assert b"".join(e.raw for e in events) == STREAM
        assert decoder.pending() == b""


def test_sse_priming_event_is_not_a_message() -> None:
    events = sse.Decoder().feed(b"id: 1\ndata:\n\n")
    assert events[0].data == "" and not events[0].is_message


def test_sse_event_larger_than_the_bound_is_refused() -> None:
    decoder = sse.Decoder(max_event_bytes=100)
    with pytest.raises(sse.EventTooLarge):
        decoder.feed(b"data: " + b"x" * 200)


def test_sse_encode_round_trips_multiline_data() -> None:
    encoded = sse.encode('{"a":\n1}', event="message", id="7")
    [event] = sse.Decoder().feed(encoded)
    assert (event.data, event.event, event.id) == ('{"a":\n1}', "message", "7")
