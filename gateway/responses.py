"""Response inspection: what the upstream sends back, as it streams to the client.

Owns the rules applied to answers, message by message, in JSON bodies and
SSE streams alike:

- list results (`tools/list`, `prompts/list`, `resources/list`,
  `resources/templates/list`, every page) keep only the items the principal
  may see, and a `cacheScope: "public"` on them becomes `"private"`;
- server-to-client requests on a legacy SSE stream (sampling, elicitation,
  roots) the principal may not answer are dropped; the `Rules` callback is
  told, so the upstream gets an error response instead of waiting forever;
- 2026-07-28 `input_required` results lose the `inputRequests` the principal
  may not answer; with none left the result becomes an error;
- a stream the upstream cut short ends with an error for every call it left
  unanswered; a 2025-03-26 batch's refused members are merged in.

Memory is bounded: a JSON body is held only when it must be rewritten, and
then only up to `max_bytes`; SSE is handled one event at a time. What is too
large to inspect is refused, never passed on unfiltered.

The decisions themselves come from the `Rules` the middleware supplies.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import errors, sse
from gateway.jsonrpc import JsonRpcId
from gateway.types import ASGIMessage, ASGISend

_JSON = (b"content-type", b"application/json")
_LIST_ITEMS = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
}


@dataclass
class Rules:
    """What to do with answers to one request; every callable is a policy decision made elsewhere."""

    lists: dict[JsonRpcId, str]  # request id -> list method, for answers to filter
    may_need_input: set[JsonRpcId]  # request ids whose 2026-07-28 result may be input_required
    police_server_requests: bool  # legacy era: requests from the server on the stream are checked
    item_visible: Callable[[str, dict[str, Any]], bool]  # (list method, item) -> keep it?
    server_request: Callable[[dict[str, Any]], bool]  # a server->client request on the stream: pass it on?
    input_request: Callable[[dict[str, Any]], bool]  # one entry of inputRequests: keep it?
    learn: Callable[[str, dict[str, Any]], None]  # (list method, result) seen, before filtering
    request_ids: tuple[JsonRpcId, ...] = ()
    extra: list[bytes] = field(default_factory=list)  # refused members of a batch, already answered

    @property
    def rewrites_json(self) -> bool:
        return bool(self.lists or self.may_need_input or self.extra)


class ResponseInspector:
    """An ASGI `send` wrapper applying `Rules` to one response."""

    def __init__(self, send: ASGISend, rules: Rules, *, max_bytes: int, upstream_error: Callable[[], str | None],
                 on_complete: Callable[[int], None], complete_on_start: bool = False,
                 before_start: Callable[[int, list[tuple[bytes, bytes]]], Awaitable[None]] | None = None) -> None:
        self._send = send
        self._on_complete = on_complete  # called just before the last byte goes out (or at the start: streams)
        self._complete_on_start = complete_on_start
        self._before_start = before_start  # runs before the client sees the status line (session binding)
        self._rules = rules
        self._max = max_bytes
        self._upstream_error = upstream_error
        self.status = 0
        self.response_started = False
        self.started_at: float | None = None  # perf_counter when the upstream began to answer
        self.finished = False
        self._decoder: sse.Decoder | None = None
        self._held: ASGIMessage | None = None  # a JSON response start, held while its body is collected
        self._body: list[bytes] = []
        self._size = 0
        self._answered: set[str | None] = set()
        self._refused = False

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
        self.response_started = True
        self.started_at = time.perf_counter()
        self.status = message["status"]
        if self._before_start is not None:
            await self._before_start(self.status, list(message.get("headers", [])))
        if self._complete_on_start:
            self._on_complete(self.status)
        headers = [(n.lower(), v) for n, v in message.get("headers", [])]
        content_type = next((v for n, v in headers if n == b"content-type"), b"").lower()
        if content_type.startswith(b"text/event-stream"):
            self._decoder = sse.Decoder(self._max)
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            await self._send({**message, "headers": headers})
        elif self._rules.extra and self.status == 202:
            # Every forwarded member was a notification; the refused requests still need their answers.
            self._held = {**message, "status": 200, "headers": [_JSON]}
            self.status = 200
        elif content_type.startswith(b"application/json") and self._rules.rewrites_json:
            self._held = {**message, "headers": [(n, v) for n, v in headers if n != b"content-length"]}
        else:
            await self._send(message)

    async def _chunk(self, chunk: bytes, more: bool) -> None:
        if self._refused:
            return
        if self._decoder is not None:
            await self._sse_chunk(chunk, more)
        elif self._held is not None:
            self._body.append(chunk)
            self._size += len(chunk)
            if self._size > self._max:
                await self._refuse_json()
            elif not more:
                await self._finish_json()
        else:
            await self._body_out(chunk, more)

    # ---- SSE --------------------------------------------------------------------------------

    async def _sse_chunk(self, chunk: bytes, more: bool) -> None:
        assert self._decoder is not None
        try:
            events = self._decoder.feed(chunk)
        except sse.EventTooLarge as too_large:
            events = too_large.events
            self._refused = True
        out = b"".join(self._event(event) for event in events)
        if self._refused:
            out += self._tail(errors.UNINSPECTABLE, f"an event over {self._max} bytes")
            more = False
        if not more and not self._refused:
            out += self._decoder.pending() + self._tail(errors.UPSTREAM_UNAVAILABLE, self._upstream_error())
        if out or not more:
            await self._body_out(out, more)

    def _event(self, event: sse.Event) -> bytes:
        if not event.is_message or event.data is None:
            return event.raw
        try:
            value = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return event.raw
        kept = self._message(value)
        if kept is None:
            return b""
        if kept is value:
            return event.raw
        return sse.encode(orjson.dumps(kept).decode(), event=event.event, id=event.id)

    def _tail(self, refusal: errors.Refusal, why: str | None) -> bytes:
        """Errors for calls left unanswered when the stream stopped abnormally; refused batch members."""
        out = b""
        if why is not None:
            for request_id in self._rules.request_ids:
                if _text(request_id) not in self._answered:
                    out += sse.encode(errors.error_body(refusal, request_id, why).decode(), event="message")
        for body in self._rules.extra:
            out += sse.encode(body.decode(), event="message")
        return out

    # ---- JSON -------------------------------------------------------------------------------

    async def _finish_json(self) -> None:
        raw = b"".join(self._body)
        payload = raw
        if raw:
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                value = None
            if value is not None:
                kept = self._message(value)
                items = kept if isinstance(kept, list) else ([] if kept is None else [kept])
                if self._rules.extra:
                    items = [*items, *(orjson.loads(b) for b in self._rules.extra)]
                    payload = orjson.dumps(items)
                elif kept is not value:
                    payload = orjson.dumps(kept)
        elif self._rules.extra:
            payload = b"[" + b",".join(self._rules.extra) + b"]"
        await self._release(payload)

    async def _refuse_json(self) -> None:
        self._refused = True
        ids = self._rules.request_ids
        payload = errors.error_body(errors.UNINSPECTABLE, ids[0] if len(ids) == 1 else None, f"over {self._max} bytes")
        self.status = errors.UNINSPECTABLE.http_status
        assert self._held is not None
        self._held = {**self._held, "status": self.status, "headers": [_JSON]}
        self._body.clear()
        await self._release(payload)

    async def _release(self, payload: bytes) -> None:
        assert self._held is not None
        headers = [*self._held["headers"], (b"content-length", str(len(payload)).encode())]
        await self._send({**self._held, "headers": headers})
        self._held = None
        await self._body_out(payload, False)

    async def _body_out(self, body: bytes, more: bool) -> None:
        if not more:
            # The decision is on record before the client can see the answer end.
            self._on_complete(self.status)
        await self._send({"type": "http.response.body", "body": body, "more_body": more})
        self.finished = not more

    # ---- one message ------------------------------------------------------------------------

    def _message(self, value: Any) -> Any:
        """The message (or batch) to pass on: itself, a filtered copy, or None to drop it."""
        if isinstance(value, list):
            kept = [k for k in (self._message(v) for v in value) if k is not None]
            return kept if kept != value else value
        if not isinstance(value, dict):
            return value
        if "method" in value:
            if "id" in value and self._rules.police_server_requests and not self._rules.server_request(value):
                return None
            return value
        request_id = value.get("id")
        self._answered.add(_text(request_id))
        result = value.get("result")
        if not isinstance(result, dict):
            return value
        list_method = self._rules.lists.get(request_id)
        if list_method is not None:
            self._rules.learn(list_method, result)
            return _filtered_list(value, result, list_method, self._rules.item_visible)
        if request_id in self._rules.may_need_input and result.get("resultType") == "input_required":
            return _filtered_input(value, result, self._rules.input_request)
        return value


def _filtered_list(message: dict[str, Any], result: dict[str, Any], method: str,
                   visible: Callable[[str, dict[str, Any]], bool]) -> dict[str, Any]:
    key = _LIST_ITEMS[method]
    items = result.get(key)
    if not isinstance(items, list):
        return message
    kept = [item for item in items if isinstance(item, dict) and visible(method, item)]
    if len(kept) == len(items) and result.get("cacheScope") != "public":
        return message
    new_result = {**result, key: kept}
    if new_result.get("cacheScope") == "public":
        new_result["cacheScope"] = "private"  # filtered per principal: no shared cache may keep it
    return {**message, "result": new_result}


def _filtered_input(message: dict[str, Any], result: dict[str, Any],
                    allowed: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    requests = result.get("inputRequests")
    if not isinstance(requests, dict) or not requests:
        return message
    kept = {key: request for key, request in requests.items() if isinstance(request, dict) and allowed(request)}
    if len(kept) == len(requests):
        return message
    if not kept:
        methods = sorted({str(r.get("method")) for r in requests.values() if isinstance(r, dict)})
        asked = ", ".join(methods)
        error = errors.error_object(errors.FORBIDDEN, f"the server asked for {asked}, which is not allowed")
        return {"jsonrpc": "2.0", "id": message.get("id"), "error": error}
    return {**message, "result": {**result, "inputRequests": kept}}


def _text(value: JsonRpcId) -> str | None:
    return None if value is None else str(value)
