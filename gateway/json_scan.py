"""An incremental, strict RFC 8259 scanner for one JSON-RPC message: an upstream's answer, read as it streams.

Owns: reading the bytes of one answer chunk by chunk as they arrive, saying as early as possible that they
cannot be one strict JSON object, and keeping only what the gateway decides on (the skeleton). Every member
of the top-level object is kept and parsed (`jsonrpc`, `id`, `error`, a `result` that is not an object,
unknown members), except that an object `result` keeps only the members whose names the caller asks for.
Everything else is checked and dropped as it streams past, so memory stays bounded by a chunk plus what is
kept, however large the answer.

The gateway passes on the upstream's own bytes, not a re-encoding of what it read, so this scanner is as
strict as a validating parser: wherever the gateway's reading and a client's could differ, the answer is
refused with `InvalidJson`:

* RFC 8259 exactly: whitespace is space, tab, LF and CR; no byte order mark, comment, trailing comma, single
  quote, NaN or Infinity; numbers `-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?` (no `01`, `-`, `1.`,
  `.5`); the literals `true`, `false` and `null`; no raw control character in a string and only the escapes
  the RFC lists; nothing but whitespace after the object;
* valid UTF-8 throughout (no overlong form, no encoded surrogate, no character cut short at the end);
* no duplicate key in the top-level object or in an object `result`, names compared after their escapes
  are decoded (`"\\u0069d"` is `"id"`), nor anywhere in a kept value;
* a kept value is read by `json` and must be read alike by `orjson` (no lone surrogate, no number orjson
  refuses, no integer beyond 64 bits, which orjson would read as a float), and be at most
  `max_kept_bytes`; containers nest at most `max_depth` deep (the top-level object is 1).

What is dropped is held to the grammar but not remembered, so a duplicate key inside it goes unseen: the
gateway never reads it. What is kept is bounded per value (`max_kept_bytes`), not in number: every member
of the top-level object, and the name of every member of the result (to refuse a duplicate).

Speed: string bodies, whitespace and whole shallow values are jumped over by compiled patterns at C speed;
only structure they cannot cover is walked a byte at a time, on an explicit stack (no recursion). Pure: no
I/O; it imports the standard library, orjson, `json_grammar` (the patterns) and `gateway.exceptions`.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

import orjson

from gateway import json_grammar as grammar
from gateway.exceptions import GatewayError

__all__ = ["AnswerScanner", "InvalidJson"]


class InvalidJson(GatewayError, ValueError):
    """The answer is not one strict JSON object the gateway can read.

    The message says why, for an error answer and the audit log.
    """


# what the scanner expects next
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _COMMA_OR_CLOSE, _DONE, _IN_STRING, _IN_NUMBER = range(9)
_ARRAY, _OBJECT = 0, 1
_WHITESPACE = frozenset(b" \t\n\r")
_NUMBER_FIRST = frozenset(b"-0123456789")
_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
_CLOSE = {_ARRAY: ord("]"), _OBJECT: ord("}")}
_DECODE_SLICE = 1 << 20  # the UTF-8 check reads a large chunk in slices of this many bytes
_INTEGERS = range(-(1 << 63), 1 << 64)  # the integers orjson reads as integers (i64 and u64)
# Members of the top-level object or of the result whose names are remembered, to refuse a repeated one: beyond
# this many, the answer is refused rather than remembered without bound (a result has a handful).
MAX_MEMBERS = 10_000


class AnswerScanner:
    """One answer, fed as it streams: `feed` each chunk, then `end` for the skeleton.

    `keep` names the members of an object `result` the gateway reads; a kept value may be at most
    `max_kept_bytes`; containers may nest `max_depth` deep. Once it has raised, the scanner raises the same
    error again.
    """

    def __init__(self, *, keep: frozenset[str], max_kept_bytes: int, max_depth: int) -> None:
        self._keep = keep
        self._max_kept_bytes = max_kept_bytes
        self._max_depth = max_depth
        self._runs = [grammar.runs(levels) for levels in range(grammar.SHALLOW_LEVELS + 1)]
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._error: str | None = None
        self._stack: list[int] = []  # _ARRAY or _OBJECT per open container
        self._state = _VALUE
        self._tail = b""  # the start of a token the next chunk ends (an escape, a literal): a few bytes
        self._offset = 0  # where in the answer the next chunk's data begins (the tail, then the chunk)
        self._skeleton: dict[str, Any] = {}
        self._keys: set[str] = set()  # of the top-level object
        self._result: dict[str, Any] | None = None  # the skeleton's result, while the object result is open
        self._result_keys: set[str] = set()
        self._member = ""  # the key of the member being read, in the top-level object or the open result
        self._string_is_key = False
        self._number = b""  # the number begun, as the shortest text the grammar treats alike
        self._key: bytearray | None = None  # a key the gateway reads, as far as it has come
        self._key_from = 0
        self._kept: bytearray | None = None  # a value the gateway reads, as far as it has come
        self._kept_from = 0
        self._kept_depth = 0
        self._kept_into: dict[str, Any] = self._skeleton

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk; raises InvalidJson as soon as the bytes so far cannot be the start of a valid answer."""
        if self._error is not None:
            raise InvalidJson(self._error)
        try:
            self._check_utf8(chunk, final=False)
            self._scan(self._tail + chunk if self._tail else chunk)
        except InvalidJson as error:
            self._error = str(error)
            raise

    def end(self) -> dict[str, Any]:
        """The document is complete: its skeleton.

        Raises InvalidJson if incomplete or followed by anything but whitespace.
        """
        if self._error is not None:
            raise InvalidJson(self._error)
        try:
            self._check_utf8(b"", final=True)
            if self._state != _DONE:
                if not self._stack and self._state == _VALUE and not self._tail:
                    raise InvalidJson("an empty answer: an answer that is not one JSON object")
                raise InvalidJson("the answer ends before its JSON object does")
        except InvalidJson as error:
            self._error = str(error)
            raise
        return self._skeleton

    def _check_utf8(self, chunk: bytes, *, final: bool) -> None:
        if chunk.isascii() and not self._utf8.getstate()[0]:
            return  # nothing to decode: no character begun in an earlier chunk, and ASCII is UTF-8
        try:
            if len(chunk) <= _DECODE_SLICE:
                self._utf8.decode(chunk, final)
            else:  # in slices: the decoded text is thrown away, and need not be as large as the chunk
                view = memoryview(chunk)
                for start in range(0, len(view), _DECODE_SLICE):
                    self._utf8.decode(view[start:start + _DECODE_SLICE])
        except UnicodeDecodeError as error:
            raise InvalidJson(f"an answer that is not valid UTF-8 ({error.reason})") from None

    def _scan(self, data: bytes) -> None:
        """Read `data` (the tail, then the chunk) as far as it goes; keep the start of a token it cuts short."""
        stack = self._stack
        stops: bytes | None = None  # `data` translated by grammar.STOPS_AS_QUOTES, once a long string needs it
        state = self._state
        pos, n = 0, len(data)
        while pos < n:
            if state == _IN_STRING:
                if n - pos > grammar.LONG_STRING and data.find(b'"', pos, pos + grammar.LONG_STRING) == -1:
                    if stops is None:
                        stops = data.translate(grammar.STOPS_AS_QUOTES)
                    stop = stops.find(b'"', pos)
                    pos = n if stop == -1 else stop
                match = grammar.STRING_BODY.match(data, pos)
                if match:
                    pos = match.end()
                if pos == n:
                    break
                byte = data[pos]
                if byte == 0x22:  # "
                    pos += 1
                    state = self._string_read(data, pos)
                elif byte == 0x5C:  # \ not followed by a whole escape
                    if n - pos < 6 and grammar.ESCAPE_BEGUN.fullmatch(data, pos):
                        break  # the next chunk ends it
                    raise self._invalid("an invalid escape in a string", pos)
                else:
                    raise self._invalid("a raw control character in a string", pos)
                continue
            if state == _IN_NUMBER:
                match = grammar.NUMBER_RUN.match(data, pos)
                end = match.end() if match else pos
                text = self._number + data[pos:end]
                if end == n:  # the number may go on in the next chunk
                    if not grammar.NUMBER_BEGUN.fullmatch(text):
                        raise self._invalid("an invalid number", pos)
                    self._number = _stand_in(text)
                    pos = n
                    break
                if not grammar.NUMBER.fullmatch(text):
                    raise self._invalid("an invalid number", pos)
                pos = end
                state = self._value_read(data, pos)
                continue
            byte = data[pos]
            if byte in _WHITESPACE:
                match = grammar.WS_RUN.match(data, pos)
                pos = match.end() if match else pos + 1
                continue
            if state == _COMMA_OR_CLOSE:
                if byte == 0x2C:  # ,
                    state = _KEY if stack[-1] == _OBJECT else _VALUE
                    pos += 1
                elif byte == _CLOSE[stack[-1]]:
                    pos += 1
                    state = self._closed(data, pos)
                else:
                    raise self._unexpected(byte, pos, "after a value")
                continue
            if state == _COLON:
                if byte != 0x3A:  # :
                    raise self._unexpected(byte, pos, "after a key")
                state = _VALUE
                pos += 1
                continue
            if state in (_KEY, _KEY_OR_CLOSE):
                if byte == 0x7D and state == _KEY_OR_CLOSE:  # }
                    pos += 1
                    state = self._closed(data, pos)
                    continue
                depth = len(stack)
                if depth > 2 or (depth == 2 and self._result is None):  # no key here is read: jump members
                    match = self._whole_runs(depth)[1].match(data, pos)
                    if match:
                        pos = match.end()
                        state = _COMMA_OR_CLOSE
                        continue
                elif byte == 0x22:
                    self._key = bytearray()
                    self._key_from = pos + 1
                if byte != 0x22:
                    raise self._unexpected(byte, pos, "where a key must be")
                self._string_is_key = True
                state = _IN_STRING
                pos += 1
                continue
            if state == _DONE:
                raise self._invalid("data after the JSON object", pos)
            # a value, in an array, an object or at the top
            depth = len(stack)
            if depth and stack[-1] == _ARRAY:
                if byte == 0x5D and state == _VALUE_OR_CLOSE:  # ]
                    pos += 1
                    state = self._closed(data, pos)
                    continue
                match = self._whole_runs(depth)[0].match(data, pos)
                if match:
                    pos = match.end()
                    state = _COMMA_OR_CLOSE
                    continue
            elif depth == 0:
                if byte != 0x7B:  # {
                    raise InvalidJson(f"an answer that is not one JSON object: it begins with {_shown(byte)}")
            elif depth == 1:
                if self._member == "result" and byte == 0x7B:
                    self._result = self._skeleton["result"] = {}
                else:
                    self._keep_from(pos, self._skeleton)
            elif self._result is not None and depth == 2 and self._member in self._keep:
                self._keep_from(pos, self._result)
            if byte == 0x22:
                self._string_is_key = False
                state = _IN_STRING
                pos += 1
            elif byte == 0x7B or byte == 0x5B:  # { [
                if depth >= self._max_depth:
                    raise InvalidJson(f"nesting deeper than {self._max_depth}")
                stack.append(_OBJECT if byte == 0x7B else _ARRAY)
                state = _KEY_OR_CLOSE if byte == 0x7B else _VALUE_OR_CLOSE
                pos += 1
            elif byte in _NUMBER_FIRST:
                self._number = b""
                state = _IN_NUMBER
            else:
                literal = _LITERALS.get(byte)
                if literal is None:
                    raise self._unexpected(byte, pos, "where a value must be")
                if data.startswith(literal, pos):
                    pos += len(literal)
                    state = self._value_read(data, pos)
                elif n - pos < len(literal) and literal.startswith(data[pos:]):
                    break  # the next chunk ends it
                else:
                    raise self._invalid("an invalid literal", pos)
        self._state = state
        self._tail = data[pos:]
        self._offset += pos
        if self._kept is not None:
            self._grow(self._kept, data, self._kept_from, pos, "a member")
            self._kept_from = 0
        if self._key is not None:
            self._grow(self._key, data, self._key_from, pos, "a key")
            self._key_from = 0

    def _grow(self, buffer: bytearray, data: bytes, start: int, end: int, what: str) -> None:
        """Add `data[start:end]` to a key or value the gateway reads, refusing it past `max_kept_bytes`."""
        buffer += memoryview(data)[start:end]
        if len(buffer) > self._max_kept_bytes:
            raise InvalidJson(f"{what} the gateway must read is over {self._max_kept_bytes} bytes")

    def _whole_runs(self, depth: int) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
        """The patterns jumping whole array items and object members `depth` containers deep, nesting no deeper
        than `max_depth` allows."""
        return self._runs[min(grammar.SHALLOW_LEVELS, self._max_depth - depth)]

    def _keep_from(self, pos: int, into: dict[str, Any]) -> None:
        """The value beginning at `pos` is one the gateway reads: keep its bytes, to parse when it ends."""
        self._kept = bytearray()
        self._kept_from = pos
        self._kept_depth = len(self._stack)
        self._kept_into = into

    def _string_read(self, data: bytes, end: int) -> int:
        """A string ended just before `end`: read it if it is a key the gateway reads; what comes next."""
        if not self._string_is_key:
            return self._value_read(data, end)
        if self._key is not None:
            self._grow(self._key, data, self._key_from, end - 1, "a key")
            raw, self._key = bytes(self._key), None
            key = _decode_key(raw)
            seen, where = (self._keys, "answer") if len(self._stack) == 1 else (self._result_keys, "result")
            if key in seen:
                raise InvalidJson(f"a duplicate key {_shown_key(key)} in the {where}")
            if len(seen) >= MAX_MEMBERS:
                raise InvalidJson(f"more than {MAX_MEMBERS} members in the {where}")
            seen.add(key)
            self._member = key
        return _COLON

    def _closed(self, data: bytes, end: int) -> int:
        """A container closed just before `end`; what comes next."""
        self._stack.pop()
        if len(self._stack) == 1:
            self._result = None  # if it was the result, it is whole
        return self._value_read(data, end)

    def _value_read(self, data: bytes, end: int) -> int:
        """A value ended just before `end`: parse it if it is one the gateway reads; what comes next."""
        if self._kept is not None and len(self._stack) == self._kept_depth:
            self._grow(self._kept, data, self._kept_from, end, "a member")
            raw, self._kept = bytes(self._kept), None
            self._kept_into[self._member] = _parse_kept(raw)
        return _COMMA_OR_CLOSE if self._stack else _DONE

    def _invalid(self, why: str, pos: int) -> InvalidJson:
        return InvalidJson(f"{why} at byte {self._offset + pos}")

    def _unexpected(self, byte: int, pos: int, where: str) -> InvalidJson:
        return self._invalid(f"an unexpected {_shown(byte)} {where}", pos)


def _stand_in(begun: bytes) -> bytes:
    """The shortest number text that may go on exactly as `begun` (a valid beginning of a number) may."""
    low = begun.lower()
    if b"e" in low:
        exponent = low.partition(b"e")[2]
        return b"1e" if not exponent else b"1e+" if exponent in (b"+", b"-") else b"1e0"
    if b"." in low:
        return b"1." if low.endswith(b".") else b"1.0"
    if low in (b"-", b"0", b"-0"):
        return low[-1:]
    return b"1"


def _decode_key(raw: bytes) -> str:
    """A key's text from the bytes between its quotes (already held to the grammar and to UTF-8)."""
    try:
        if b"\\" not in raw:
            return raw.decode("utf-8")
        key: str = orjson.loads(b'"' + raw + b'"')  # refuses a lone surrogate, as for a kept value
    except ValueError as error:
        raise InvalidJson(f"a key the gateway must read is not strict JSON ({error})") from None
    return key


def _parse_kept(raw: bytes) -> Any:
    """A kept value, read as `json` reads it, once `orjson` has shown it reads it too."""
    try:
        orjson.loads(raw)
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_object, parse_constant=_constant,
                          parse_int=_integer)
    except InvalidJson:
        raise
    except (ValueError, RecursionError) as error:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidJson(f"a member the gateway must read is not strict JSON ({error})") from None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise InvalidJson(f"a duplicate key {_shown_key(key)} in a member the gateway must read")
        value[key] = item
    return value


def _constant(name: str) -> Any:
    raise InvalidJson(f"{name} is not JSON")


def _integer(text: str) -> int:
    value = int(text)
    if value not in _INTEGERS:
        raise InvalidJson("an integer beyond 64 bits in a member the gateway must read")
    return value


def _shown(byte: int) -> str:
    return repr(chr(byte)) if 0x20 <= byte < 0x7F else f"byte 0x{byte:02X}"


def _shown_key(key: str) -> str:
    return repr(key if len(key) <= 64 else key[:64] + "...")
