"""A stdio upstream as the gateway's forwarding hop: Streamable HTTP on the gateway's side, stdio on the child's.

`StdioUpstream` is an ASGI app like `UpstreamProxy`: the middleware guards,
decides, forwards to it and inspects what it answers exactly as for an HTTP
upstream, so there is no second request path. It owns what an HTTP MCP server
would do with what it is forwarded, over the processes of `stdio.pool`:

- the isolation key of a request: the caller (`per_principal`), the legacy
  session (`per_session`; a 2026-07-28 request, which has no session, is keyed
  by its caller), or one for everyone (`shared`). The caller comes from the
  gateway (`RequestState.caller`), never from the request;
- the legacy handshake: a caller's `initialize` starts (or finds) its process,
  is answered from the process's own handshake, and opens a session whose id
  this hop issues; `notifications/initialized` is not passed again; DELETE ends
  the session (and, `per_session`, its process);
- 2026-07-28 requests (no session, no handshake) are bridged to the same
  process by `stdio.modern`: `server/discover` answered from the handshake, a
  request of the child's turned into an `input_required` result and the
  caller's retry into answers to the child;
- a POST's requests are answered as JSON when nothing else comes first, or as
  an SSE stream that carries what the child sends the caller meanwhile (its
  requests for sampling, elicitation or roots; notifications; progress) and
  then the answers; a GET opens the stream of what the child sends outside any
  call. A child that breaks or is silent past `upstream_timeout_s` answers
  each call in progress with the gateway's upstream errors (502/504 classes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import TYPE_CHECKING, Any

import orjson
from cachetools import TTLCache

from gateway import errors, mcp, sse
from gateway.exchange import read_body
from gateway.mcp_headers import PROTOCOL_VERSION_HEADER
from gateway.stdio import modern
from gateway.stdio.channel import HANDSHAKE_VERSION, Broken, Channel, Outlet
from gateway.stdio.pool import Pool, PoolFull, Running
from gateway.types import RequestState, first_value, header_values, send_json

if TYPE_CHECKING:
    from gateway.config import Limits, Sessions, Upstream
    from gateway.metrics import Metrics
    from gateway.types import ASGIReceive, ASGIScope, ASGISend

_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]
# The handshake-era versions a caller may open a session with: the child is spoken to in HANDSHAKE_VERSION,
# whose messages are a superset of the earlier ones'.
_LEGACY_VERSIONS = sorted(mcp.LEGACY_VERSIONS)


class StdioUpstream:
    """Serves one stdio upstream's path from its processes."""

    def __init__(self, upstream: Upstream, limits: Limits, sessions: Sessions, metrics: Metrics) -> None:
        self.upstream = upstream
        self._pool = Pool(upstream, limits, metrics)
        self._timeout_s = limits.upstream_timeout_s
        # legacy session id issued here -> the caller it was issued to; kept as long as the gateway's binding
        self._sessions: TTLCache[str, str] = TTLCache(maxsize=sessions.max_sessions, ttl=sessions.ttl_s)
        self._parking = modern.Parking(limits.upstream_timeout_s)

    @property
    def crash_looping(self) -> bool:
        return self._pool.crash_looping

    def processes(self) -> list[Running]:
        """Its running processes, each saying whose it is: a caller's subject (and client), a legacy session's,
        or everyone's."""
        return [dataclasses.replace(r, whose=_whose(r.whose)) for r in self._pool.running()]

    async def close(self) -> None:
        self._parking.close()
        await self._pool.close()

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        state: RequestState = scope.get("mcp_gateway") or RequestState()
        caller = state.caller or "anonymous"
        headers = header_values(scope)
        session = first_value(headers, mcp.SESSION_HEADER)
        new_era = (first_value(headers, PROTOCOL_VERSION_HEADER) or "") in mcp.MODERN_VERSIONS
        body = await read_body(receive)  # replayed whole by the middleware, within its limits
        if session is not None and not new_era:
            if self._sessions.get(session) != caller:
                await send_json(send, 404, errors.error_body(errors.UNKNOWN_SESSION))
                return
            self._sessions[session] = caller  # used: kept for another ttl
        try:
            if scope["method"] == "DELETE":
                await self._end(session, send)
            elif scope["method"] == "GET":
                await self._stream(self._key(caller, session), caller, state, receive, send)
            else:
                await self._post(orjson.loads(body), caller, session, new_era, state, receive, send)
        except PoolFull as exc:
            state.upstream_error = "busy"
            await send_json(send, 503, errors.error_body(errors.UPSTREAM_BUSY, _only_id(body), str(exc)))
        except Broken as broken:
            state.upstream_error = broken.kind
            refusal = errors.UPSTREAM_TIMEOUT if broken.kind == "timeout" else errors.UPSTREAM_UNAVAILABLE
            await send_json(send, refusal.http_status, errors.error_body(refusal, _only_id(body), str(broken)))

    def _key(self, caller: str, session: str | None) -> str:
        isolation = self.upstream.isolation
        if isolation == "shared":
            return "shared"
        if isolation == "per_session" and session is not None:
            return f"session:{session}"
        return f"caller:{caller}"

    async def _post(self, value: Any, caller: str, session: str | None, new_era: bool, state: RequestState,
                    receive: ASGIReceive, send: ASGISend) -> None:
        messages: list[dict[str, Any]] = value if isinstance(value, list) else [value]
        first = messages[0]
        if first.get("method") == "initialize" and not new_era:
            await self._initialize(first, caller, state, send)
            return
        if new_era:
            await self._modern(first, caller, state, receive, send)
            return
        channel = await self._pool.channel(self._key(caller, session))
        state.upstream_process = channel.child.pid
        requests = [m for m in messages if "method" in m and "id" in m]
        for message in messages:
            if "method" not in message:
                await channel.answer(caller, message)
            elif "id" not in message:
                await channel.notify(caller, message)
        if not requests:
            await _accepted(send)
            return
        outlet: Outlet = asyncio.Queue()
        loop = asyncio.get_running_loop()
        calls = [(m.get("id"), loop.create_task(channel.call(caller, m, outlet, self._timeout_s))) for m in requests]
        watcher = loop.create_task(_until_disconnect(receive))
        try:
            await self._answer(calls, outlet, isinstance(value, list), state, _Reply(send), watcher)
        finally:
            watcher.cancel()
            for _, call in calls:
                call.cancel()

    async def _modern(self, message: dict[str, Any], caller: str, state: RequestState, receive: ASGIReceive,
                      send: ASGISend) -> None:
        """One 2026-07-28 message (no sessions, no batches), bridged to the caller's process (`stdio.modern`)."""
        method, request_id = message.get("method"), message.get("id")
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        assert isinstance(params, dict)
        if method == "subscriptions/listen":  # no stream of change notifications is bridged from stdio yet
            error = errors.error_object(errors.METHOD_NOT_FOUND, "subscriptions/listen (stdio upstream)")
            await send_json(send, 404, orjson.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}))
            return
        if "requestState" in params:
            parked = await self._parking.resume(caller, params["requestState"], params.get("inputResponses"))
            if parked is None:
                await send_json(send, 400, errors.error_body(errors.INVALID_PARAMS, request_id,
                                                             "requestState is unknown, expired or another's"))
                return
            channel, call, outlet = parked.channel, parked.call, parked.outlet
        else:
            channel = await self._pool.channel(self._key(caller, None))
            if method == "server/discover":
                state.upstream_process = channel.child.pid
                result = modern.discover(_server_description(channel), _LEGACY_VERSIONS)
                await send_json(send, 200, orjson.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}))
                return
            if method is None or request_id is None:  # a notification or a client's answer: passed on
                await (channel.notify if request_id is None else channel.answer)(
                    caller, modern.as_handshake_era(message))
                await _accepted(send)
                return
            outlet = asyncio.Queue()
            call = asyncio.get_running_loop().create_task(
                channel.call(caller, modern.as_handshake_era(message), outlet, self._timeout_s))
        state.upstream_process = channel.child.pid
        watcher = asyncio.get_running_loop().create_task(_until_disconnect(receive))
        waiting = False  # parked again, for the caller's next answers
        try:
            waiting = await self._answer([(request_id, call)], outlet, False, state, _Reply(send), watcher,
                                         park=modern.Parked(caller, method, channel, call, outlet, []))
        finally:
            watcher.cancel()
            if not waiting:
                call.cancel()

    async def _initialize(self, message: dict[str, Any], caller: str, state: RequestState, send: ASGISend) -> None:
        session = secrets.token_urlsafe(24)
        channel = await self._pool.channel(self._key(caller, session))
        state.upstream_process = channel.child.pid
        self._sessions[session] = caller
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        version = asked if asked in mcp.LEGACY_VERSIONS else channel.initialize_result.get(
            "protocolVersion", HANDSHAKE_VERSION)
        result = {**_server_description(channel), "protocolVersion": version}
        await send_json(send, 200, orjson.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": result}),
                        [(b"mcp-session-id", session.encode())])

    async def _answer(self, calls: list[tuple[Any, asyncio.Task[dict[str, Any]]]], outlet: Outlet, batch: bool,
                      state: RequestState, reply: _Reply, watcher: asyncio.Task[None], *,
                      park: modern.Parked | None = None) -> bool:
        """JSON when every answer comes before anything else; else an SSE stream of both, answers last. With
        `park` (a 2026-07-28 call), a request of the child's parks the call and answers `input_required`
        instead; True then."""
        pending: set[asyncio.Future[Any]] = {call for _, call in calls}
        while pending:
            getter = asyncio.ensure_future(outlet.get())
            done, _ = await asyncio.wait({*pending, getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                getter.cancel()
                return False  # the client went away: the calls are cancelled, and the child told
            if getter not in done:
                getter.cancel()
            elif park is not None and _is_request(getter.result()):
                asked = [getter.result()]
                while not outlet.empty():
                    message = outlet.get_nowait()
                    await (reply.event(message) if not _is_request(message) else _append(asked, message))
                result = self._parking.park(park, asked)
                await reply.finish([{"jsonrpc": "2.0", "id": calls[0][0], "result": result}], 200, batch=False)
                return True
            else:
                await reply.event(getter.result())
            pending -= done
        answers = [_answer_or_error(request_id, call, state) for request_id, call in calls]
        while not outlet.empty():
            await reply.event(outlet.get_nowait())
        if park is not None:
            answers = [(modern.complete(answer, park.method), status) for answer, status in answers]
        await reply.finish([a for a, _ in answers], answers[0][1], batch)
        return False

    async def _stream(self, key: str, caller: str, state: RequestState, receive: ASGIReceive,
                      send: ASGISend) -> None:
        """A legacy GET: what the child sends this caller outside any call, until either side ends it."""
        channel = await self._pool.channel(key)
        state.upstream_process = channel.child.pid
        outlet: Outlet = asyncio.Queue()
        watcher = asyncio.get_running_loop().create_task(_until_disconnect(receive))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        try:
            with channel.listening(caller, outlet):
                while channel.broken is None:  # looked at each second: a process that broke ends the stream
                    getter = asyncio.ensure_future(outlet.get())
                    done, _ = await asyncio.wait({getter, watcher}, timeout=1.0,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if watcher in done:
                        getter.cancel()
                        return
                    if getter in done:
                        await _event(send, getter.result())
                    else:
                        getter.cancel()
        finally:
            watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _end(self, session: str | None, send: ASGISend) -> None:
        if session is None:
            await send_json(send, 400, errors.error_body(errors.INVALID_REQUEST, None, "no session to end"))
            return
        self._sessions.pop(session, None)
        if self.upstream.isolation == "per_session":
            await self._pool.end(f"session:{session}", "session_end")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Reply:
    """One POST's answer: held until it is known whether anything comes before the answers (then SSE)."""

    def __init__(self, send: ASGISend) -> None:
        self._send = send
        self._streaming = False

    async def event(self, message: dict[str, Any]) -> None:
        if not self._streaming:
            self._streaming = True
            await self._send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await _event(self._send, message)

    async def finish(self, answers: list[dict[str, Any]], status: int, batch: bool) -> None:
        """The answers: as the stream's last events, or as the JSON body (`status` when it is one answer)."""
        if self._streaming:
            for answer in answers:
                await self.event(answer)
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send_json(self._send, 200 if batch else status, orjson.dumps(answers if batch else answers[0]))


def _whose(key: str) -> str:
    """An isolation key (`_key`) in words."""
    kind, _, rest = key.partition(":")
    if kind == "caller":
        _issuer, _, subject_client = rest.partition("\0")
        subject, _, client = subject_client.partition("\0")
        return subject + (f" (client {client})" if client else "")
    return f"session {rest[:8]}…" if kind == "session" else "everyone (shared)"


def _is_request(message: dict[str, Any]) -> bool:
    return "method" in message and "id" in message


async def _append(asked: list[dict[str, Any]], message: dict[str, Any]) -> None:
    asked.append(message)


async def _accepted(send: ASGISend) -> None:
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _server_description(channel: Channel) -> dict[str, Any]:
    """What the child said of itself in its handshake: capabilities, serverInfo, instructions."""
    result = channel.initialize_result
    return {k: result[k] for k in ("capabilities", "serverInfo", "instructions") if k in result}


def _answer_or_error(request_id: Any, call: asyncio.Task[dict[str, Any]],
                     state: RequestState) -> tuple[dict[str, Any], int]:
    """A call's answer, or the gateway's upstream error for it, with the status it would have alone."""
    exc = call.exception()
    if exc is None:
        return {**call.result(), "id": request_id}, 200
    if not isinstance(exc, Broken):
        raise exc
    state.upstream_error = exc.kind
    refusal = errors.UPSTREAM_TIMEOUT if exc.kind == "timeout" else errors.UPSTREAM_UNAVAILABLE
    return orjson.loads(errors.error_body(refusal, request_id, str(exc))), refusal.http_status


async def _event(send: ASGISend, message: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": sse.encode(orjson.dumps(message).decode(), event="message"),
                "more_body": True})


async def _until_disconnect(receive: ASGIReceive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _only_id(body: bytes) -> Any:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value.get("id") if isinstance(value, dict) else None
