"""`mcp-gateway connect URL`: a local stdio MCP server that is a Streamable HTTP client of a remote one.

Owns carrying messages between an MCP host that speaks only stdio (newline-
delimited JSON-RPC on stdin/stdout) and an MCP endpoint over HTTP, in the era
the host speaks:

- handshake era (2025-xx): the session id and negotiated version from the
  `initialize` answer go on every later request; once the host is initialized,
  a GET stream carries the server's own requests and notifications; the
  session is ended with DELETE when the host goes;
- 2026-07-28: each request is sent alone with `MCP-Protocol-Version`,
  `Mcp-Method` and `Mcp-Name` taken from its body; a `notifications/cancelled`
  closes the named request's stream instead of being sent (that era's signal).

Each host message is its own HTTP request, so a long call never holds up the
answer the host gives to a server request made during it. JSON and SSE answers
are written to the host one message per line. A 401 or a 403
`insufficient_scope` goes to `oauth.login.Authorization` (refresh, login,
step-up) and the request is sent once more; what still fails reaches the host
as a JSON-RPC error that says why. stdin and stdout are the protocol channel
and nothing else: fd 0 becomes /dev/null and fd 1 stderr, so a browser command
cannot read the host's messages and a stray print cannot corrupt them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

import httpx
import orjson

from gateway import errors, mcp
from gateway.exceptions import GatewayError
from gateway.mcp_headers import encode_header_value, params_protocol_version
from gateway.oauth.login import Authorization
from gateway.oauth.metadata import OAuthClientError, bearer_challenge
from gateway.sse import Decoder

log = logging.getLogger("gateway.connect")

_MAX_LINE = 16 * 1024 * 1024
_SHUTDOWN_GRACE_S = 5.0


class Host:
    """The stdio side: lines from the host's stdin; whole lines to its stdout, written by one task in order (a
    cancelled sender never leaves half a line for the next one to interleave with)."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self._stdin = stdin
        self._stdout = stdout
        self._lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    def take_stdio(cls) -> Host:
        """Keep the real stdin and stdout for the protocol; fd 0 becomes /dev/null and fd 1 stderr, so that no
        child (a console browser) reads the host's messages and nothing stray is written among them."""
        sys.stdout.flush()
        protocol_in = os.fdopen(os.dup(0), "rb")
        protocol_out = os.fdopen(os.dup(1), "wb")
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(sys.stderr.fileno(), 1)
        return cls(protocol_in, protocol_out)

    async def read(self) -> bytes | None:
        """The next line; None at the end. A line over 16 MiB is a ValueError (the host is not speaking MCP)."""
        line = await asyncio.to_thread(self._stdin.readline, _MAX_LINE + 1)
        if not line:
            return None
        if len(line) > _MAX_LINE:
            raise ValueError(f"a line over {_MAX_LINE} bytes from the host")
        return line

    async def write(self, message: Any) -> None:
        self._lines.put_nowait(orjson.dumps(message) + b"\n")
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_lines())

    async def flush(self) -> None:
        """Until every line given to `write` is written."""
        await self._lines.join()

    async def _write_lines(self) -> None:
        while True:
            line = await self._lines.get()
            try:
                await asyncio.to_thread(self._write_all, line)
            finally:
                self._lines.task_done()

    def _write_all(self, line: bytes) -> None:
        self._stdout.write(line)
        self._stdout.flush()


class Bridge:
    """Carries one host's messages to `url` and the answers back.

    Args:
        url: the remote MCP endpoint.
        http: the HTTP client (timeouts set by the caller); the bridge closes nothing it did not open.
        host: the stdio side.
        auth: the user's authorization for `url`; None sends no token (a server without auth).
    """

    def __init__(self, url: str, http: httpx.AsyncClient, host: Host, auth: Authorization | None) -> None:
        self._url = url
        self._http = http
        self._host = host
        self._auth = auth
        self._session: str | None = None
        self._version: str | None = None  # negotiated in the handshake era
        self._listening: asyncio.Task[None] | None = None
        self._in_flight: dict[Any, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Until the host closes stdin; then the session (if any) is ended."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await self._host.read()
            except ValueError as exc:
                log.error("%s: stopping", exc)
                break
            if line is None:
                break
            if not line.strip():
                continue
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                await self._host.write(_error(None, errors.PARSE_ERROR.code, "Parse error: the line is not JSON"))
                continue
            if self._cancels_in_flight(message):
                continue
            task = loop.create_task(self._carry(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if isinstance(message, dict) and "method" in message and "id" in message:
                self._track(message["id"], task)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_SHUTDOWN_GRACE_S)
        for task in [*self._tasks, *([self._listening] if self._listening else [])]:
            task.cancel()
        if self._session is not None:
            with contextlib.suppress(httpx.HTTPError, GatewayError):
                await self._http.delete(self._url, headers=self._headers(None, await self._token()))
        await self._host.flush()

    def _track(self, request_id: Any, task: asyncio.Task[None]) -> None:
        self._in_flight[request_id] = task
        task.add_done_callback(lambda _: self._in_flight.pop(request_id, None))

    def _cancels_in_flight(self, message: Any) -> bool:
        """2026-07-28: a cancellation closes the request's stream; nothing is sent for it."""
        if not (isinstance(message, dict) and message.get("method") == "notifications/cancelled"
                and self._version is None and self._session is None):
            return False
        params = message.get("params")
        task = self._in_flight.get(params.get("requestId")) if isinstance(params, dict) else None
        if task is not None:
            task.cancel()
        return True

    async def _carry(self, message: Any) -> None:
        first = message[0] if isinstance(message, list) and message else message
        ids = [m["id"] for m in (message if isinstance(message, list) else [message])
               if isinstance(m, dict) and "method" in m and "id" in m]
        try:
            await self._post(message, first if isinstance(first, dict) else {}, ids)
        except OAuthClientError as exc:
            log.error("authorization failed: %s", exc)
            await self._fail(ids, errors.UNAUTHORIZED.code, f"Authorization failed: {exc}")
        except GatewayError as exc:  # the token store
            log.error("%s", exc)
            await self._fail(ids, errors.INTERNAL.code, str(exc))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log.error("%s: %s", self._url, type(exc).__name__)
            await self._fail(ids, errors.UPSTREAM_UNAVAILABLE.code, f"cannot reach {self._url}: {type(exc).__name__}")
        except Exception:
            log.exception("a bug in mcp-gateway connect")
            await self._fail(ids, errors.INTERNAL.code, "Internal error in mcp-gateway connect (see its log)")

    async def _fail(self, ids: list[Any], code: int, message: str) -> None:
        """Every request of a message gets an answer, so the host never waits for one that cannot come."""
        for request_id in ids:
            await self._host.write(_error(request_id, code, message))

    async def _post(self, message: Any, first: Mapping[str, Any], ids: list[Any]) -> None:
        body = orjson.dumps(message)
        refreshed = stepped_up = False  # each at most once per message
        while True:
            token = await self._token()
            headers = self._headers(first, token)
            async with self._http.stream("POST", self._url, content=body, headers=headers) as response:
                challenge = bearer_challenge(response.headers.get("www-authenticate"))
                if self._auth is not None and not refreshed and response.status_code == 401:
                    await response.aread()
                    await self._auth.unauthorized(challenge, token)
                    refreshed = True
                    continue
                if self._auth is not None and not stepped_up and response.status_code == 403 \
                        and challenge.get("error") == "insufficient_scope":
                    await response.aread()
                    await self._auth.insufficient_scope(challenge, token)
                    stepped_up = True
                    continue
                await self._answer(response, first, ids)
                return

    async def _answer(self, response: httpx.Response, first: Mapping[str, Any], ids: list[Any]) -> None:
        if first.get("method") == "initialize" and response.status_code == 200:
            self._session = response.headers.get("mcp-session-id")
        if response.status_code == 404 and self._session is not None and "mcp-session-id" in response.request.headers:
            self._session = None
            self._version = None
            log.warning("the server ended the session; the host must initialize again")
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            await self._relay_events(response)
            return
        body = await response.aread()
        if not body and 200 <= response.status_code < 300:
            return
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if isinstance(answer, dict | list) and answer:
            self._note_handshake(answer)
            await self._host.write(answer)
            return
        await self._fail(ids, errors.UPSTREAM_UNAVAILABLE.code,
                         f"{self._url} answered HTTP {response.status_code} without a JSON-RPC message")

    async def _relay_events(self, response: httpx.Response) -> None:
        decoder = Decoder()
        async for chunk in response.aiter_bytes():
            for event in decoder.feed(chunk):
                if not event.is_message or not event.data:
                    continue
                try:
                    message = orjson.loads(event.data)
                except orjson.JSONDecodeError:
                    log.warning("an SSE event from %s is not JSON; dropped", self._url)
                    continue
                self._note_handshake(message)
                await self._host.write(message)

    def _note_handshake(self, answer: Any) -> None:
        """The version the handshake settled on; and, once it has, the stream of the server's own messages."""
        result = answer.get("result") if isinstance(answer, dict) else None
        if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str) \
                and isinstance(result.get("capabilities"), dict) and self._session is not None:
            self._version = result["protocolVersion"]
            if self._listening is None:
                self._listening = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """The handshake era's GET stream, reopened while the session lasts; none if the server offers none."""
        refused = False
        while self._session is not None:
            token = await self._token()
            try:
                async with self._http.stream("GET", self._url, headers={
                        **self._headers(None, token), "accept": "text/event-stream"},
                        timeout=httpx.Timeout(30, read=None)) as response:
                    if response.status_code == 401 and self._auth is not None and not refused:
                        refused = True  # once: a stream the server keeps refusing is given up, not retried
                        await self._auth.unauthorized(bearer_challenge(response.headers.get("www-authenticate")),
                                                      token)
                        continue
                    if response.status_code != 200:
                        return  # 405: the server sends its own messages only on POST streams
                    refused = False
                    await self._relay_events(response)
            except GatewayError as exc:
                log.error("the server's message stream cannot be authorized: %s", exc)
                return
            except httpx.HTTPError as exc:
                log.warning("the server's message stream closed: %s", type(exc).__name__)
            await asyncio.sleep(1)

    async def _token(self) -> str | None:
        return await self._auth.token() if self._auth is not None else None

    def _headers(self, first: Mapping[str, Any] | None, token: str | None) -> dict[str, str]:
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        if self._session is not None:
            headers["mcp-session-id"] = self._session
        version = params_protocol_version(first.get("params")) if first is not None else None
        if version is not None:
            headers["mcp-protocol-version"] = version
            method = first.get("method") if first is not None else None
            if isinstance(method, str):
                headers["mcp-method"] = method
                name = _mirrored_name(method, first)
                if name is not None:
                    headers["mcp-name"] = name
        elif self._version is not None:
            headers["mcp-protocol-version"] = self._version
        return headers


def _mirrored_name(method: str, message: Mapping[str, Any] | None) -> str | None:
    """The `Mcp-Name` value for a 2026-07-28 request (base64-wrapped when it is not plain ASCII)."""
    member = mcp.mirrored_param(method)
    params = message.get("params") if message is not None else None
    value = params.get(member) if member is not None and isinstance(params, dict) else None
    return encode_header_value(value) if isinstance(value, str) else None


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
