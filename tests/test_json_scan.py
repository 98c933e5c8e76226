"""The streaming answer scanner: the skeleton it keeps, what it refuses, and that chunking changes neither."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections.abc import Iterable
from typing import Any

import pytest

from gateway.json_scan import MAX_MEMBERS, AnswerScanner, InvalidJson

KEEP = frozenset({"content", "isError"})
Outcome = dict[str, Any] | type[InvalidJson]


def scan(chunks: Iterable[bytes], *, max_kept_bytes: int = 1000, max_depth: int = 8) -> dict[str, Any]:
    scanner = AnswerScanner(keep=KEEP, max_kept_bytes=max_kept_bytes, max_depth=max_depth)
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner.end()


def outcome(chunks: Iterable[bytes]) -> Outcome:
    try:
        return scan(chunks)
    except InvalidJson:
        return InvalidJson


# what the gateway does not read is held to the grammar only: no duplicate key or 65-bit integer is looked for
UNREAD = b'{"result":{"structuredContent":{"a":1,"a":2},"big":18446744073709551616}}'
SKELETONS = [
    (b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}],"isError":false,'
     b'"structuredContent":{"rows":[[1,2],{"a":null}]}}}',
     {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "hi"}], "isError": False}}),
    (b'{"jsonrpc":"2.0","id":"x","error":{"code":-32000,"message":"no","data":{"a":[1.5,true]}}}',
     {"jsonrpc": "2.0", "id": "x", "error": {"code": -32000, "message": "no", "data": {"a": [1.5, True]}}}),
    (b'{"id":1,"result":[{"content":1},{"a":2}]}', {"id": 1, "result": [{"content": 1}, {"a": 2}]}),
    (b'{"id":1,"result":null}', {"id": 1, "result": None}),
    (b'{"\\u0072esult":{"\\u0063ontent":"x","is\\u0045rror":true,"other":1},"\\u0069d":1}',
     {"result": {"content": "x", "isError": True}, "id": 1}),
    (b' \t\r\n{ "id" : -0.5e-3 , "result" : { "isError" : true , "x" : [ ] } , "extra" : { } } \n',
     {"id": -0.0005, "result": {"isError": True}, "extra": {}}),
    ('{"result":{"content":"é€😀\\u00e9\\ud83d\\ude00\\"\\\\\\/\\b\\f\\n\\r\\t"}}'.encode(),
     {"result": {"content": 'é€😀é😀"\\/\b\f\n\r\t'}}),
    (b'{"id":[0,-0,1E+2,18446744073709551615,-9223372036854775808]}',
     {"id": [0, 0, 100.0, 18446744073709551615, -9223372036854775808]}),
    (b"{}", {}),
    (b'{"result":{"x":1},"extra":{"x":2,"content":[3]}}', {"result": {}, "extra": {"x": 2, "content": [3]}}),
    (UNREAD, {"result": {}}),
]

DEEP = b'{"result":{"x":' + b"[" * 6 + b"]" * 6 + b"}}"  # 8 levels: the answer, the result and 6 arrays
REJECTED = [
    pytest.param(b'{"id":1,"id":2}', "duplicate key 'id' in the answer", id="duplicate-top-level-key"),
    pytest.param(b'{"id":1,"\\u0069d":2}', "duplicate key 'id'", id="escaped-duplicate-id"),
    pytest.param(b'{"result":{"x":1,"x":2}}', "duplicate key 'x' in the result", id="duplicate-result-key"),
    pytest.param(b'{"result":{"content":1,"content":2}}', "duplicate key 'content'", id="duplicate-kept-key"),
    pytest.param(b'{"result":{"content":[{"a":1,"a":2}]}}', "duplicate key 'a'", id="duplicate-in-kept-value"),
    pytest.param(b'{"error":{"code":1,"code":2}}', "duplicate key 'code'", id="duplicate-in-error"),
    pytest.param(b'{"id":"\xff"}', "UTF-8", id="invalid-utf8"),
    pytest.param(b'{"id":"\xc0\xaf"}', "UTF-8", id="overlong-utf8"),
    pytest.param(b'{"id":"\xed\xa0\x80"}', "UTF-8", id="encoded-surrogate"),
    pytest.param(b'{"result":{"x":"\xe2\x82"}}', "UTF-8", id="cut-utf8-in-skipped-string"),
    pytest.param(b'\xef\xbb\xbf{"id":1}', "not one JSON object", id="bom"),
    pytest.param(b'{"id":NaN}', "unexpected 'N'", id="nan"),
    pytest.param(b'{"id":-Infinity}', "invalid number", id="infinity"),
    pytest.param(b'{"id":01}', "invalid number", id="leading-zero"),
    pytest.param(b'{"id":-}', "invalid number", id="minus-alone"),
    pytest.param(b'{"id":1.}', "invalid number", id="no-fraction-digit"),
    pytest.param(b'{"id":.5}', "unexpected '.'", id="no-integer-digit"),
    pytest.param(b'{"id":1e}', "invalid number", id="no-exponent-digit"),
    pytest.param(b'{"id":+1}', "unexpected '+'", id="plus-sign"),
    pytest.param(b'{"result":{"x":[1,01]}}', "invalid number", id="leading-zero-skipped"),
    pytest.param(b'{"id":"a\tb"}', "control character", id="raw-tab"),
    pytest.param(b'{"result":{"x":["a\x01"]}}', "control character", id="raw-control-skipped"),
    pytest.param(b'{"id":"\\x41"}', "invalid escape", id="x-escape"),
    pytest.param(b'{"id":"\\u12"}', "invalid escape", id="short-u-escape"),
    pytest.param(b'{"result":{"x":[["\\U0041"]]}}', "invalid escape", id="bad-escape-skipped"),
    pytest.param(b"{'id':1}", "unexpected", id="single-quotes"),
    pytest.param(b'{"id":1/*c*/}', "unexpected '/'", id="comment"),
    pytest.param(b'{"id":tru}', "invalid literal", id="bad-literal"),
    pytest.param(b'{"id":True}', "unexpected 'T'", id="capital-literal"),
    pytest.param(b'{"id":1}x', "data after the JSON object", id="trailing-garbage"),
    pytest.param(b"{}{}", "data after the JSON object", id="two-objects"),
    pytest.param(b'{"id":1,}', "unexpected '}'", id="trailing-comma"),
    pytest.param(b'{"result":{"x":[1,]}}', "unexpected ']'", id="trailing-comma-skipped"),
    pytest.param(b'{"id" 1}', "unexpected '1' after a key", id="missing-colon"),
    pytest.param(b'{"result":{"x":[1 2]}}', "unexpected '2'", id="missing-comma"),
    pytest.param(b'{"result":{"x":[1}}}', "unexpected '}'", id="mismatched-close"),
    pytest.param(b'[{"id":1}]', "not one JSON object", id="top-level-array"),
    pytest.param(b'"x"', "not one JSON object", id="top-level-string"),
    pytest.param(b" \n", "not one JSON object", id="empty"),
    pytest.param(b'{"id":1', "ends before", id="incomplete"),
    pytest.param(b'{"id":"\\', "ends before", id="incomplete-escape"),
    pytest.param(DEEP.replace(b"[]", b"[[]]"), "nesting deeper than 8", id="too-deep-skipped"),
    pytest.param(DEEP.replace(b'"x"', b'"content"').replace(b"[]", b"[{}]"), "deeper", id="too-deep-kept"),
    pytest.param(b'{"result":{"content":"' + b"x" * 999 + b'"}}', "over 1000 bytes", id="kept-value-too-large"),
    pytest.param(b'{"result":{"' + b"k" * 1001 + b'":1}}', "over 1000 bytes", id="read-key-too-large"),
    pytest.param(b'{"id":18446744073709551616}', "64 bits", id="integer-over-64-bits"),
    pytest.param(b'{"result":{"content":[-9223372036854775809]}}', "64 bits", id="negative-over-64-bits"),
    pytest.param(b'{"id":"\\ud800"}', "not strict JSON", id="lone-surrogate-kept"),
    pytest.param(b'{"\\udc00":1}', "not strict JSON", id="lone-surrogate-key"),
    pytest.param(b'{"id":1e400}', "not strict JSON", id="float-overflow-kept"),
    pytest.param(b'{"result":{' + b",".join(b'"k%d":0' % i for i in range(MAX_MEMBERS + 1)) + b"}}",
                 f"more than {MAX_MEMBERS} members in the result", id="result-members-beyond-the-bound"),
]


@pytest.mark.parametrize(("doc", "skeleton"), SKELETONS)
def test_a_valid_answer_gives_its_skeleton(doc: bytes, skeleton: dict[str, Any]) -> None:
    assert scan([doc]) == skeleton


@pytest.mark.parametrize(("doc", "why"), REJECTED)
def test_an_answer_a_client_might_read_otherwise_is_refused_saying_why(doc: bytes, why: str) -> None:
    with pytest.raises(InvalidJson, match=re.escape(why)):
        scan([doc])


@pytest.mark.parametrize("doc", [DEEP, DEEP.replace(b'"x"', b'"content"')], ids=["skipped", "kept"])
def test_the_depth_limit_is_exact(doc: bytes) -> None:
    scan([doc], max_depth=8)
    with pytest.raises(InvalidJson, match="nesting deeper than 7"):
        scan([doc], max_depth=7)


# json with hooks that refuse what RFC 8259 leaves open (a duplicate key, NaN): the validating parser a
# client might use. The scanner must agree with it wherever the gateway reads (no skipped duplicate here).
LONG = b"y" * 5000  # past the length at which a string is skipped by a translated copy
TRICKY = [
    b'{"result":{"x":"' + LONG + b'\\n' + LONG + b'"}}', b'{"result":{"x":"' + LONG + b'\n' + LONG + b'"}}',
    b'{"result":{"x":"' + LONG + b'\t"}}', b'{"result":{"x":"' + LONG + b'\\u00e9' + LONG + b'","y":"' + LONG + b'"}}',
    b'{"a":"\\"}"}', b'{"a":"\\\\"}', b'{"a":"]}\\"[{"}', b'{"":0}', b'{"result":{"":{"":[]}}}',
    b'{"result":{"content":{"x":[{"y":"}"}]}}}', b'{"id":[1e-7,1E7,-1.0e+0]}', b'{"id":1}\r\n\t ',
    b'{"result":"{\\"content\\":1}"}', b'{"result":{"content":[],"isError":null}}', b'{"id":"\\u00"}',
    b'{"id":"\\u00G0"}', b'{"id":1,}', b'{,}', b'{"id"}', b'{"id":}', b'{"id"::1}', b'{"id":1 "x":2}',
    b'{"id":[1,,2]}', b'{"id":[,]}', b'{"id":["a",]}', b'{"id":{"a":1,}}', b'{"id":[}', b'{"id":{]}',
    b'{"id":00}', b'{"id":-01}', b'{"id":1.2.3}', b'{"id":1e+}', b'{"id":1e5.5}', b'{"id":0x10}',
    b'{"id":nul}', b'{"id":nulll}', b'{"id":truefalse}', b'{"id":"a"\x0b}', b'{"id":"\x7f"}',
    b'{"id":\xc2\xa01}', b'{"id":"\x00"}', b'{"id":"\\u0000"}', b'{"result":{"x":[[[[[["deep"]]]]]]}}',
    b'{"result":{"x":[{"a":[{"b":[1]}]}],"content":[{"c":[true]}]},"id":0}', b'{"id"\n:\n1\n}',
    b'{"result":{"x":{"y":{"z":{"w":1}}},"content":2}}', b"{\"id\":'1'}", b'{"id":1}}', b"{",
]


def reference(doc: bytes) -> Outcome:
    """The validating parser's reading of `doc`, cut down to the skeleton."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        value = json.loads(doc.decode("utf-8"), object_pairs_hook=unique, parse_constant=refuse)
    except ValueError:
        return InvalidJson
    if not isinstance(value, dict):
        return InvalidJson
    if isinstance(value.get("result"), dict):
        value["result"] = {key: member for key, member in value["result"].items() if key in KEEP}
    return value


@pytest.mark.parametrize("doc", TRICKY + [doc for doc, _ in SKELETONS if doc != UNREAD] + [DEEP])
def test_the_scanner_reads_as_a_validating_parser_does(doc: bytes) -> None:
    assert outcome([doc]) == reference(doc)


CHUNKED = [doc for doc, _ in SKELETONS] + [doc for param in REJECTED if len(doc := param.values[0]) < 10_000] + TRICKY


@pytest.mark.parametrize("doc", CHUNKED, ids=[repr(doc[:40])[2:-1] for doc in CHUNKED])
def test_every_chunking_gives_what_the_whole_answer_gives(doc: bytes) -> None:
    whole = outcome([doc])
    for cut in range(len(doc) + 1):
        assert outcome([doc[:cut], doc[cut:]]) == whole, cut
    assert outcome([doc[i:i + 1] for i in range(len(doc))]) == whole


@pytest.mark.parametrize(("chunks", "read"), [
    ([b'{"id":12', b'34}'], 1234),
    ([b'{"id":-', b"0.", b"5e", b"-", b"1}"], -0.05),
    ([b'{"id":t', b"ru", b"e}"], True),
    ([b'{"id":"\\u', b"00", b'e9\\', b'n"}'], "é\n"),
    ([b'{"id":"\xe2', b"\x82", b'\xac"}'], "€"),
])
def test_a_token_cut_by_the_chunks_is_read_whole(chunks: list[bytes], read: Any) -> None:
    assert scan(chunks) == {"id": read}


@pytest.mark.parametrize(("first", "why"), [
    (b'{"id":1} x', "data after"),
    (b'{"id":01', "invalid number"),
    (b'{"result":{"content":"' + b"x" * 1001, "over 1000 bytes"),
    (b'[', "not one JSON object"),
])
def test_feed_refuses_as_soon_as_the_bytes_cannot_begin_an_answer(first: bytes, why: str) -> None:
    scanner = AnswerScanner(keep=KEEP, max_kept_bytes=1000, max_depth=8)
    with pytest.raises(InvalidJson, match=why):
        scanner.feed(first)
    with pytest.raises(InvalidJson, match=why):  # and goes on refusing
        scanner.end()


@pytest.mark.parametrize(("head", "unit", "size", "tail"), [
    (b'{"id":1,"result":{"contents":[{"uri":"x","text":"', b"x" * 78 + b"\\n", 20_000_000, b'"}]}}'),
    (b'{"id":1,"result":{"items":[', b'{"a":1,"b":"xy"},', 4_000_000, b"0]}}"),
], ids=["20-MB-string", "4-MB-array"])
def test_what_is_not_kept_is_not_held_however_large(head: bytes, unit: bytes, size: int, tail: bytes) -> None:
    doc = head + unit * (size // len(unit)) + tail
    scanner = AnswerScanner(keep=KEEP, max_kept_bytes=1000, max_depth=8)
    tracemalloc.start()
    try:
        for start in range(0, len(doc), 65521):  # a prime: tokens are cut everywhere
            scanner.feed(doc[start:start + 65521])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scanner.end() == {"id": 1, "result": {}}
    assert peak < 1_000_000  # a few chunks' worth, not the answer
