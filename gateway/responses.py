"""Response inspection: what the upstream sends back, as it streams to the client.

Owns the rules applied to answers, message by message, in JSON bodies and
SSE streams alike:

- list results (`tools/list`, `prompts/list`, `resources/list`,
  `resources/templates/list`, every page) keep only the items the principal
  may see, and a `cacheScope: "public"` on them becomes `"private"`; a
  `tasks/list` result keeps only the principal's own tasks;
- server-to-client requests on a stream (sampling, elicitation, roots, ping)
  the principal may not answer are dropped, in either era; the `Rules`
  callback is told, so the upstream gets an error response instead of waiting;
- `input_required` results (and a 2026-07-28 task waiting for input) lose the
  `inputRequests` the principal may not answer; with none left the result
  becomes an error;
- a result that created a task is reported (the task then belongs to the
  principal); task status notifications about other principals' tasks are dropped;
- a result whose id answers no request of this exchange is dropped;
- a stream the upstream cut short ends with an error for every call it left
  unanswered; a 2025-03-26 batch's refused members are merged in.

It fails closed: how an answer is read is decided by what was asked, not by
the label on it. A stream labelled `text/event-stream` is read event by event;
an answer the rules must rewrite, or one labelled anything but JSON, is held
and read as JSON whatever its label; what cannot be read (not JSON, an event
that is not JSON, larger than `max_bytes`) is refused with the
uninspectable-answer error, never passed on. What is passed on is what was
read: every inspected message is serialised again from the decoded value, so a
client's parser cannot read duplicate keys or odd escapes another way.

Memory is bounded: a JSON body is held only up to `max_bytes`, SSE is handled
one event at a time. An answer labelled JSON that needs no rewriting streams
through as it comes.

The decisions themselves come from the `Rules` the middleware supplies.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import errors, sse
from gateway.jsonrpc import JsonRpcId, valid_id
from gateway.types import ASGIMessage, ASGISend

_JSON_TYPE = b"application/json"
_LIST_ITEMS = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
    "tasks/list": "tasks",
}
_TASK_NOTIFICATIONS = frozenset({"notifications/tasks/status", "notifications/tasks"})


class _Unreadable(Exception):
    """An answer (or an event of one) that cannot be inspected."""


@dataclass
class Rules:
    """What to do with answers to one request; every callable is a policy decision made elsewhere."""

    lists: dict[JsonRpcId, str]  # request id -> list method, for answers to filter
    may_need_input: set[JsonRpcId]  # request ids whose result may ask for input (input_required)
    item_visible: Callable[[str, dict[str, Any]], bool]  # (list method, item) -> keep it?
    server_request: Callable[[dict[str, Any]], Awaitable[bool]]  # a server->client request on a stream: pass it?
    input_request: Callable[[dict[str, Any]], bool]  # one entry of inputRequests: keep it?
    learn: Callable[[str, dict[str, Any]], None]  # (list method, result) seen, before filtering
    answered: Callable[[dict[str, Any]], Awaitable[None]]  # a result to one of the requests (tasks it created)
    own_tasks: Callable[[list[str]], Awaitable[set[str]]]  # which of these task ids the principal owns
    request_ids: tuple[JsonRpcId, ...] = ()
    may_create_task: set[JsonRpcId] = field(default_factory=set)  # request ids whose result may be a new task
    extra: list[bytes] = field(default_factory=list)  # refused members of a batch, already answered

    @property
    def holds_json(self) -> bool:
        """Whether a JSON answer must be read whole: something in it may be rewritten or recorded."""
        return bool(self.lists or self.may_need_input or self.may_create_task or self.extra)


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
        self._ids = {_key(i) for i in rules.request_ids}
        self._max = max_bytes
        self._upstream_error = upstream_error
        self.status = 0
        self.response_started = False
        self.started_at: float | None = None  # perf_counter when the upstream began to answer
        self.finished = False
        self._decoder: sse.Decoder | None = None
        self._held: ASGIMessage | None = None  # a response start, held while its body is collected
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
        self.response_started = True
        self.started_at = time.perf_counter()
        self.status = message["status"]
        # Already failed as the answer starts: this is the forwarding hop's own error answer, whole as it is.
        self._failed_before = self._upstream_error() is not None
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
            self._held = {**message, "status": 200, "headers": []}  # _release labels what it sends
            self.status = 200
        elif content_type.startswith(_JSON_TYPE) and not self._rules.holds_json:
            await self._send(message)
        else:  # read whole as JSON, whatever the label: a list labelled text/plain is still a list
            self._held = {**message, "headers": [(n, v) for n, v in headers
                                                 if n not in (b"content-length", b"content-type")]}

    async def _chunk(self, chunk: bytes, more: bool) -> None:
        if self._refused:
            return
        if self._decoder is not None:
            await self._sse_chunk(chunk, more)
        elif self._held is not None:
            self._body.append(chunk)
            self._size += len(chunk)
            if self._size > self._max:
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
                if _key(request_id) not in self._answered:
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

    async def _refuse_json(self, why: str) -> None:
        """The held answer cannot be read: its body never goes out. A 4xx status (a 405 for a GET stream the
        upstream does not offer, a 404 for an ended session) is kept, since clients act on it; anything else
        becomes the uninspectable-answer error (502)."""
        self._refused = True
        self._body.clear()
        await self._replace(errors.UNINSPECTABLE, why, keep_status=400 <= self.status < 500)

    async def _replace(self, refusal: errors.Refusal, why: str, *, keep_status: bool = False) -> None:
        """Answer with `refusal` instead of the held answer (for the one request, or null for several)."""
        ids = self._rules.request_ids
        if not keep_status:
            self.status = refusal.http_status
        assert self._held is not None
        self._held = {**self._held, "status": self.status, "headers": []}
        await self._release(errors.error_body(refusal, ids[0] if len(ids) == 1 else None, why))

    async def _release(self, payload: bytes) -> None:
        assert self._held is not None
        framing = [(b"content-type", _JSON_TYPE)] if payload else []
        headers = [*self._held["headers"], *framing, (b"content-length", str(len(payload)).encode())]
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
            return await self._notification(value)
        request_id = value.get("id")
        result = value.get("result")
        if not isinstance(result, dict):
            self._answered.add(_key(request_id))
            return value  # an error, for this exchange or for none: nothing in it to keep from the client
        if _key(request_id) not in self._ids:
            return None  # a result to a request nobody here made
        self._answered.add(_key(request_id))
        if request_id in self._rules.may_create_task:
            await self._rules.answered(result)
        list_method = self._rules.lists.get(request_id)
        if list_method == "tasks/list":
            return await self._own_tasks_only(value, result)
        if list_method is not None:
            self._rules.learn(list_method, result)
            return _filtered_list(value, result, list_method, self._rules.item_visible)
        if request_id in self._rules.may_need_input and "input_required" in (result.get("resultType"),
                                                                             result.get("status")):
            return _filtered_input(value, result, self._rules.input_request)
        return value

    async def _notification(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Task status notifications reach only the task's owner; other notifications pass."""
        if message.get("method") not in _TASK_NOTIFICATIONS:
            return message
        params = message.get("params")
        task_id = params.get("taskId") if isinstance(params, dict) else None
        if not isinstance(task_id, str) or task_id not in await self._rules.own_tasks([task_id]):
            return None
        return message

    async def _own_tasks_only(self, message: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        tasks = result.get("tasks")
        if not isinstance(tasks, list):
            return message
        ids: list[str] = [t["taskId"] for t in tasks if isinstance(t, dict) and isinstance(t.get("taskId"), str)]
        owned = await self._rules.own_tasks(ids) if ids else set()
        kept = [t for t in tasks if isinstance(t, dict) and t.get("taskId") in owned]
        return message if len(kept) == len(tasks) else {**message, "result": {**result, "tasks": kept}}


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


def _key(value: JsonRpcId) -> tuple[str, Any]:
    """A request id as a set member: 1, "1" and true are three different ids."""
    return (type(value).__name__, value)

