"""The response side: what the upstream sends back, inspected as it streams to the client.

Owns how an answer is read, in JSON bodies and SSE streams alike, and what
happens when it cannot be: `ResponseInspector` wraps the ASGI `send` of one
forwarded request. It finds each JSON-RPC message in the answer and hands it to
the exchange's `ResponseRules` (`response_rules`), which decide what the
principal may see: list results filtered, server->client requests policed,
`inputRequests` trimmed, tasks kept to their owner. The inspector itself:

- drops a result whose id answers no request of this exchange;
- ends a stream the upstream cut short with an error for every call it left
  unanswered, and merges in a 2025-03-26 batch's refused members;
- fails closed: how an answer is read is decided by what was asked, not by the
  label on it. A stream labelled `text/event-stream` is read event by event;
  an answer the rules must rewrite, or one labelled anything but JSON, is held
  and read as JSON whatever its label; what cannot be read (not JSON, an event
  that is not JSON, larger than `max_bytes`) is refused with the
  uninspectable-answer error, never passed on. What is passed on is what was
  read: every inspected message is serialised again from the decoded value, so
  a client's parser cannot read duplicate keys or odd escapes another way.

Memory is bounded: SSE is handled one event at a time, and an answer labelled
JSON that needs no rewriting streams through as it comes. A JSON answer the
rules must read is held whole up to `HOLD_BYTES`; past that, if the rules can
judge it on its top-level members and its result's `RESULT_MEMBERS_READ`
alone (an input-required result, a created task: not a list to filter), it
streams on while `json_scan` reads it strictly, and its last significant byte
is held back until the whole answer has been read and judged. An answer so
judged goes out as the upstream wrote it; one the rules would change (input
requests to remove, a result nobody here asked for), or that turns out not to
be one strict JSON object, or that the upstream cuts short, is withheld: its
end never goes out and the connection closes (`AnswerWithheld`), on record.
A larger answer the rules cannot judge that way (a list) is refused past
`max_bytes`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway import errors, sse
from gateway.audit.writer import AuditUnavailable
from gateway.exceptions import GatewayError
from gateway.json_scan import AnswerScanner, InvalidJson
from gateway.jsonrpc import id_key, valid_id
from gateway.response_rules import RESULT_MEMBERS_READ
from gateway.types import send_json

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from gateway.response_rules import ResponseRules
    from gateway.types import ASGIMessage, ASGISend

log = logging.getLogger("gateway")

_JSON_TYPE = b"application/json"
HOLD_BYTES = 1024 * 1024  # a JSON answer the rules read is held whole up to this, streamed and scanned past it
_MAX_DEPTH = 1024  # nesting a streamed answer may have: orjson's own limit for an answer held whole
_WHITESPACE = b" \t\r\n"


class _Unreadable(GatewayError):
    """An answer (or an event of one) that cannot be inspected."""


class AnswerWithheld(GatewayError):
    """An answer whose head went out but whose events could not be written: the connection is to close without
    its end, so that the client never holds a whole answer the audit trail does not."""


class ResponseInspector:
    """An ASGI `send` wrapper applying one exchange's `ResponseRules` to its answer."""

    def __init__(self, send: ASGISend, rules: ResponseRules, *, max_bytes: int,
                 upstream_error: Callable[[], str | None], on_complete: Callable[[int], Awaitable[None]],
                 complete_on_start: bool = False,
                 before_start: Callable[[int, list[tuple[bytes, bytes]]], Awaitable[None]] | None = None) -> None:
        self._send = send
        # awaited before the client can see the answer end: its last byte, the first event answering one of its
        # requests in a stream, or the start of a stream the client opened (GET); if it raises, nothing more goes
        # out and the exception propagates (the connection closes with the answer cut off)
        self._on_complete = on_complete
        self._complete_on_start = complete_on_start
        self._before_start = before_start  # runs before the client sees the status line (session binding)
        self._rules = rules
        self._ids = {id_key(i) for i in rules.request_ids}
        self._max = max_bytes
        self._upstream_error = upstream_error
        self.status = 0
        self.started_at: float | None = None  # perf_counter when the upstream began to answer
        self.finished = False
        self.completed = False
        self.withheld = False  # completing failed: the answer's end was never sent
        self.head_sent = False  # the client has the status line
        self._head: ASGIMessage | None = None  # a response start to send with the body's first chunk
        self._decoder: sse.Decoder | None = None
        self._held: ASGIMessage | None = None  # a response start, held while its body is collected
        self._as_sent: ASGIMessage | None = None  # that start as the upstream sent it, if it may stream on
        self._scanner: AnswerScanner | None = None  # reading a JSON answer that streams on
        self._last = b""  # its last significant byte (and any whitespace after it), not sent before it is judged
        self._body: list[bytes] = []
        self._size = 0
        self._answered: set[tuple[str, Any]] = set()
        self._refused = False
        self._failed_before = False

    # ---- ASGI -------------------------------------------------------------------------------

    async def send(self, message: ASGIMessage) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            await self._start(message)
        elif kind == "http.response.body":
            await self._chunk(message.get("body", b""), message.get("more_body", False))
        else:
            await self._send(message)

    async def _start(self, message: ASGIMessage) -> None:
        self.started_at = time.perf_counter()
        self.status = message["status"]
        # Already failed as the answer starts: this is the forwarding hop's own error answer, whole as it is.
        self._failed_before = self._upstream_error() is not None
        if self._before_start is not None:
            await self._before_start(self.status, list(message.get("headers", [])))
        if self._complete_on_start:
            await self.complete()
        headers = [(n.lower(), v) for n, v in message.get("headers", [])]
        content_type = next((v for n, v in headers if n == b"content-type"), b"").lower()
        if content_type.startswith(b"text/event-stream"):
            self._decoder = sse.Decoder(self._max)
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            await self._send_head({**message, "headers": headers})
        elif self._rules.extra and self.status == 202:
            # Every forwarded member was a notification; the refused requests still need their answers.
            self._held = {**message, "status": 200, "headers": []}  # _release labels what it sends
            self.status = 200
        elif content_type.startswith(_JSON_TYPE) and not self._rules.holds_json:
            self._head = message  # goes out with the first chunk of the body (after completing, if that is the last)
        else:  # read whole as JSON, whatever the label: a list labelled text/plain is still a list
            self._held = {**message, "headers": [(n, v) for n, v in headers
                                                 if n not in (b"content-length", b"content-type")]}
            if content_type.startswith(_JSON_TYPE) and self._rules.judged_on_members and not self._failed_before:
                self._as_sent = message

    async def _chunk(self, chunk: bytes, more: bool) -> None:
        if self._refused:
            return
        if self._decoder is not None:
            await self._sse_chunk(chunk, more)
        elif self._scanner is not None:
            await self._scan(chunk, more)
        elif self._held is not None:
            self._body.append(chunk)
            self._size += len(chunk)
            if self._as_sent is not None and self._size > min(HOLD_BYTES, self._max):
                await self._stream_on(more)
            elif self._size > self._max:
                await self._refuse_json(f"over {self._max} bytes")
            elif not more:
                await self._finish_json()
        else:
            await self._body_out(chunk, more)

    # ---- SSE --------------------------------------------------------------------------------

    async def _sse_chunk(self, chunk: bytes, more: bool) -> None:
        assert self._decoder is not None
        why = ""
        try:
            events = self._decoder.feed(chunk)
        except sse.EventTooLarge as too_large:
            events = too_large.events
            self._refused = True
            why = f"an event over {self._max} bytes"
        out = b""
        for event in events:
            try:
                out += await self._event(event)
            except _Unreadable as unreadable:
                self._refused = True
                why = str(unreadable)
                break
        if self._refused:
            out += self._tail(errors.UNINSPECTABLE, why)
            more = False
        if not more and not self._refused:
            out += self._tail(errors.UPSTREAM_UNAVAILABLE, self._upstream_error())
        if more and self._ids & self._answered:
            await self.complete()  # before the first answer goes out: the stream may stay open a while
        if out or not more:
            await self._body_out(out, more)

    async def _event(self, event: sse.Event) -> bytes:
        """The event as it goes out: re-encoded from what was read, or dropped (b"")."""
        if not event.data:  # comments, a retry, an id (priming events): no message in it
            return sse.encode_event(event)
        if event.event not in (None, "message"):
            return b""  # not a JSON-RPC message: nothing a client should act on, so nothing passes
        try:
            value = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            raise _Unreadable("an event that is not JSON") from None
        kept = await self._message(value)
        if kept is None:
            return b""
        return sse.encode_event(event, orjson.dumps(kept).decode())

    def _tail(self, refusal: errors.Refusal, why: str | None) -> bytes:
        """Errors for calls left unanswered when the stream stopped abnormally; refused batch members."""
        out = b""
        if why is not None:
            for request_id in self._rules.request_ids:
                if id_key(request_id) not in self._answered:
                    out += sse.encode(errors.error_body(refusal, request_id, why).decode(), event="message")
        for body in self._rules.extra:
            out += sse.encode(body.decode(), event="message")
        return out

    # ---- JSON -------------------------------------------------------------------------------

    async def _finish_json(self) -> None:
        raw = b"".join(self._body)
        failure = None if self._failed_before else self._upstream_error()
        if failure is not None:  # cut short or broken: what arrived is not the upstream's whole answer
            await self._replace(errors.UPSTREAM_UNAVAILABLE, failure)
            return
        if not raw:
            await self._release(b"[" + b",".join(self._rules.extra) + b"]" if self._rules.extra else b"")
            return
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self._refuse_json("an answer that is not JSON")
            return
        kept = await self._message(value)
        items = kept if isinstance(kept, list) else ([] if kept is None else [kept])
        if self._rules.extra:
            items = [*items, *(orjson.loads(b) for b in self._rules.extra)]
        if not items:
            await self._replace(errors.UPSTREAM_UNAVAILABLE, "the upstream's answer answers no request")
            return
        await self._release(orjson.dumps(items if isinstance(value, list) or self._rules.extra else items[0]))

    async def _stream_on(self, more: bool) -> None:
        """The held answer is too large to hold: what arrived goes out as it came, and the rest streams on."""
        assert self._as_sent is not None
        self._head, self._held = self._as_sent, None
        self._scanner = AnswerScanner(keep=RESULT_MEMBERS_READ, max_kept_bytes=self._max, max_depth=_MAX_DEPTH)
        held = b"".join(self._body)
        self._body.clear()
        await self._scan(held, more)

    async def _scan(self, chunk: bytes, more: bool) -> None:
        """Read the next part of a streaming JSON answer and pass it on, all but its last significant byte until
        the whole answer is read and judged."""
        assert self._scanner is not None
        try:
            self._scanner.feed(chunk)
            if more:
                significant = len(chunk if chunk[-1:].strip(_WHITESPACE) else chunk.rstrip(_WHITESPACE))
                if significant:
                    out = b"".join((self._last, memoryview(chunk)[:significant - 1]))
                    self._last = chunk[significant - 1:]
                else:
                    out, self._last = b"", self._last + chunk
                if len(self._last) > self._max:
                    raise InvalidJson(f"over {self._max} bytes of whitespace")
            else:
                failure = self._upstream_error()
                if failure is not None:  # cut short: what arrived is not the upstream's whole answer
                    await self._withhold(errors.UPSTREAM_UNAVAILABLE, failure)
                    return
                skeleton = self._scanner.end()
                if await self._message(skeleton) is not skeleton:
                    await self._withhold(errors.UNINSPECTABLE, f"an answer over {min(HOLD_BYTES, self._max)} "
                                                               "bytes that would have to be changed for this caller")
                    return
                out, self._last = self._last + chunk, b""
        except InvalidJson as invalid:
            await self._withhold(errors.UNINSPECTABLE, str(invalid))
            return
        if out or not more:
            await self._body_out(out, more)

    async def _withhold(self, refusal: errors.Refusal, why: str) -> None:
        """A streaming answer that cannot be passed on: answered with `refusal` if nothing of it went out yet;
        else on record as refused and never ended (`AnswerWithheld`: the connection closes)."""
        self._refused, self._scanner = True, None
        if not self.head_sent:
            assert self._as_sent is not None
            self._head, self._held = None, {**self._as_sent, "headers": []}
            await self._replace(refusal, why)
            return
        self.status = refusal.http_status
        with contextlib.suppress(AuditUnavailable):
            await self.complete()
        self.withheld = True
        log.warning("answer cut off before its end: %s", why, extra={"status": self.status})
        raise AnswerWithheld(f"the answer was cut off: {why}")

    async def _refuse_json(self, why: str) -> None:
        """The held answer cannot be read: its body never goes out. A 4xx status (a 405 for a GET stream the
        upstream does not offer, a 404 for an ended session) is kept, since clients act on it; anything else
        becomes the uninspectable-answer error (502)."""
        self._refused = True
        self._body.clear()
        await self._replace(errors.UNINSPECTABLE, why, keep_status=400 <= self.status < 500)

    async def _replace(self, refusal: errors.Refusal, why: str, *, keep_status: bool = False) -> None:
        """Answer with `refusal` instead of the held answer (for the one request, or null for several)."""
        if not keep_status:
            self.status = refusal.http_status
        assert self._held is not None
        self._held = {**self._held, "status": self.status, "headers": []}
        await self._release(errors.error_body(refusal, self._only_id, why))

    async def _release(self, payload: bytes) -> None:
        assert self._held is not None
        framing = [(b"content-type", _JSON_TYPE)] if payload else []
        headers = [*self._held["headers"], *framing, (b"content-length", str(len(payload)).encode())]
        self._head, self._held = {**self._held, "headers": headers}, None
        await self._body_out(payload, False)

    async def complete(self) -> None:
        """Put the exchange on record (once) before the client can see its answer end."""
        if self.completed:
            return
        self.completed = True
        try:
            await self._on_complete(self.status)
        except Exception:
            self.withheld = self._refused = True  # nothing more of this answer goes out
            raise

    async def close(self) -> None:
        """After the wrapped app is done, having raised or not: an answer it left unfinished is finished here,
        on record first. One that could not be put on record is withheld: answered with the audit-unavailable
        error if nothing of it went out, else never ended (`AnswerWithheld`: the connection closes)."""
        if self.finished:
            return
        if not self.head_sent and not self.withheld:
            self.status = 500  # the app failed before an answer could go out
        with contextlib.suppress(AuditUnavailable):
            await self.complete()
        only_id = self._only_id
        if self.withheld and self.head_sent:
            raise AnswerWithheld("the answer's events could not be written: its end is not sent")
        if self.withheld:
            self.status = errors.AUDIT_UNAVAILABLE.http_status
            await send_json(self._send, self.status, errors.error_body(
                errors.AUDIT_UNAVAILABLE, only_id, "the answer's audit events could not be written"))
        elif not self.head_sent:
            await send_json(self._send, 500, errors.error_body(errors.INTERNAL, only_id))
        else:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished = True

    @property
    def _only_id(self) -> Any:
        """The id an error answer names: the one request's, or null for several."""
        ids = self._rules.request_ids
        return ids[0] if len(ids) == 1 else None

    async def _send_head(self, message: ASGIMessage) -> None:
        await self._send(message)
        self.head_sent = True

    async def _body_out(self, body: bytes, more: bool) -> None:
        if not more:
            await self.complete()  # before the head too, if it is still here: then it can be answered otherwise
        if self._head is not None:
            head, self._head = self._head, None
            await self._send_head(head)
        await self._send({"type": "http.response.body", "body": body, "more_body": more})
        self.finished = not more

    # ---- one message ------------------------------------------------------------------------

    async def _message(self, value: Any) -> Any:
        """The message (or batch) to pass on: itself, a filtered copy, or None to drop it."""
        if isinstance(value, list):
            kept = [k for k in [await self._message(v) for v in value] if k is not None]
            return kept or None
        if not isinstance(value, dict) or not valid_id(value.get("id")):
            return None  # not a JSON-RPC message
        if "method" in value:
            if not isinstance(value["method"], str):
                return None
            if "id" in value:
                return value if await self._rules.server_request(value) else None
            return await self._rules.notification(value)
        request_id = value.get("id")
        result = value.get("result")
        if not isinstance(result, dict):
            self._answered.add(id_key(request_id))
            return value  # an error, for this exchange or for none: nothing in it to keep from the client
        if id_key(request_id) not in self._ids:
            return None  # a result to a request nobody here made
        self._answered.add(id_key(request_id))
        return await self._rules.result(value, result)
