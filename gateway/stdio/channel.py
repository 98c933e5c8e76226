"""One stdio child's JSON-RPC conversation: ids of the gateway's own, and whom each message belongs to.

Owns, for one child process:

- the handshake: the gateway initializes the child once, when it starts, in
  the newest handshake-era version, and offers every client capability a
  caller may have (each server->client request is still decided per caller);
  callers' own `initialize` is answered from that result by `stdio.upstream`;
- callers' requests, written under ids of the gateway's own (so two callers'
  ids never collide) and answered under the caller's id, to the call that
  asked and to no other; progress tokens and cancellations mapped the same way;
- the child's own requests and notifications, given to the caller they belong
  to: the progress of a call to that call; anything else to the caller whose
  call is in progress (or who listens on a stream) when it is the only caller
  that can be meant. A request that belongs to no caller is refused to the
  child; the caller's answer reaches the child under the child's own id, and
  only from that caller;
- breaking: a child that exits, writes what is not JSON or writes a line over
  the bound fails every call in progress, and is not used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.exceptions import GatewayError
from gateway.jsonrpc import JsonRpcId
from gateway.stdio.process import ChildGone, ChildProcess, LineTooLong, ProcessSpec

log = logging.getLogger("gateway.stdio")

HANDSHAKE_VERSION = "2025-11-25"
_CLIENT_CAPABILITIES = {"sampling": {}, "elicitation": {}, "roots": {"listChanged": True}}
Outlet = asyncio.Queue[dict[str, Any]]  # a caller's stream: what the child sends that caller


class Broken(GatewayError):
    """The child cannot serve (any more): `kind` is exited, protocol, timeout or spawn."""

    def __init__(self, kind: Literal["exited", "protocol", "timeout", "spawn"], why: str) -> None:
        super().__init__(why)
        self.kind = kind


@dataclass(slots=True)
class _Call:
    owner: str
    client_id: JsonRpcId
    outlet: Outlet
    progress_token: Any = None
    answer: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Channel:
    """A child and the calls in progress on it."""

    def __init__(self, child: ChildProcess) -> None:
        self.child = child
        self.initialize_result: dict[str, Any] = {}
        self.broken: Broken | None = None
        self.started_at = time.time()  # wall clock, for people
        self.last_used = time.monotonic()
        self._ids = itertools.count(1)
        self._tag = secrets.token_hex(4)  # makes the ids of the child's requests unique across channels
        self._calls: dict[int, _Call] = {}
        self._asked: dict[str, tuple[str, JsonRpcId]] = {}  # our id of a child's request -> (owner, its id)
        self._listeners: dict[str, list[Outlet]] = {}  # owner -> its open streams (legacy GET)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, spec: ProcessSpec, *, max_line_bytes: int, timeout_s: float) -> Channel:
        """Start the child and shake hands with it; raises Broken when it cannot be started or does not answer."""
        try:
            child = await ChildProcess.start(spec, max_line_bytes=max_line_bytes)
        except OSError as exc:
            raise Broken("spawn", f"cannot start {spec.command[0]}: {exc.strerror or exc}") from None
        channel = cls(child)
        try:
            result = await channel.call("", {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": HANDSHAKE_VERSION, "capabilities": _CLIENT_CAPABILITIES,
                "clientInfo": {"name": "mcp-security-gateway", "version": "1"}}}, asyncio.Queue(), timeout_s)
            if not isinstance(result.get("result"), dict):
                raise Broken("protocol", f"initialize failed: {result.get('error')}")
            channel.initialize_result = result["result"]
            await channel.child.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        except (Broken, ChildGone) as exc:
            await channel.close()
            raise exc if isinstance(exc, Broken) else Broken("exited", str(exc)) from None
        return channel

    @property
    def idle(self) -> bool:
        return not self._calls and not any(self._listeners.values())

    # ---- what callers send ------------------------------------------------------------------------

    async def call(self, owner: str, message: dict[str, Any], outlet: Outlet, timeout_s: float) -> dict[str, Any]:
        """Send a caller's request; the child's answer to it, under the caller's id. Raises Broken."""
        self._check()
        ours = next(self._ids)
        call = _Call(owner, message.get("id"), outlet)
        sent = {**message, "id": ours}
        params = _params(message)
        meta = params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            call.progress_token = meta["progressToken"]
            sent["params"] = {**params, "_meta": {**meta, "progressToken": f"{self._tag}-p{ours}"}}
        self._calls[ours] = call
        self.last_used = time.monotonic()
        try:
            await self._write(sent)
            async with asyncio.timeout(timeout_s):
                answer = await asyncio.shield(call.answer)
        except TimeoutError:
            await self._cancel(ours, "the gateway's upstream timeout passed")
            raise Broken("timeout", f"no answer within {timeout_s} s") from None
        except asyncio.CancelledError:  # the caller went away: the child need not finish
            await self._cancel(ours, "the client went away")
            raise
        finally:
            self._calls.pop(ours, None)
            self.last_used = time.monotonic()
        return {**answer, "id": call.client_id}

    async def notify(self, owner: str, message: dict[str, Any]) -> None:
        """Pass a caller's notification on; a cancellation names the caller's own call in the gateway's ids."""
        self._check()
        method = message.get("method")
        if method == "notifications/initialized":
            return  # the gateway shook hands with the child itself
        if method == "notifications/cancelled":
            params = _params(message)
            ours = next((i for i, c in self._calls.items()
                         if c.owner == owner and c.client_id == params.get("requestId")), None)
            if ours is None:
                return  # not a call of this caller's in progress: nothing to cancel
            message = {**message, "params": {**params, "requestId": ours}}
        await self._write(message)

    async def answer(self, owner: str, message: dict[str, Any]) -> bool:
        """Pass a caller's answer to a request of the child's; False when it answers none asked of this caller."""
        self._check()
        ours = message.get("id")
        if not isinstance(ours, str) or ours not in self._asked or self._asked[ours][0] != owner:
            return False
        await self._write({**message, "id": self._asked.pop(ours)[1]})
        return True

    @contextlib.contextmanager
    def listening(self, owner: str, outlet: Outlet) -> Any:
        """While inside, what the child sends this caller outside any call goes to `outlet` (a GET stream)."""
        self._listeners.setdefault(owner, []).append(outlet)
        try:
            yield
        finally:
            self._listeners[owner].remove(outlet)
            self.last_used = time.monotonic()

    async def close(self, grace_s: float = 5.0) -> None:
        self._fail(Broken("exited", "the process was stopped"), quiet=True)
        self._reader.cancel()
        await self.child.stop(grace_s)

    # ---- what the child sends ---------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                line = await self.child.receive()
                if line is None:
                    self._fail(Broken("exited", f"the process exited ({await self.child.wait()})"))
                    return
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self._fail(Broken("protocol", "the process wrote a line that is not JSON"))
                    return
                if isinstance(message, dict):
                    await self._dispatch(message)
        except LineTooLong as exc:
            self._fail(Broken("protocol", str(exc)))
        except Exception:  # whatever it was, this child's answers can no longer be read
            log.exception("%s[%d]: reading its output failed", self.child.spec.upstream, self.child.pid)
            self._fail(Broken("protocol", "the gateway could not read the process's output"))

    async def _dispatch(self, message: dict[str, Any]) -> None:
        method, child_id = message.get("method"), message.get("id")
        if method is None:  # an answer to a call
            call = self._calls.get(child_id) if isinstance(child_id, int) else None
            if call is not None and not call.answer.done():
                call.answer.set_result(message)
            return
        if method == "notifications/progress":
            params = _params(message)
            token = params.get("progressToken")
            call = next((c for i, c in self._calls.items() if token == f"{self._tag}-p{i}"), None)
            if call is not None:
                call.outlet.put_nowait({**message, "params": {**params, "progressToken": call.progress_token}})
            return
        found = self._owner_outlet()
        if child_id is None:
            if found is not None:
                found[1].put_nowait(message)
            return
        if found is None:  # a request no caller can be meant by: the child gets an answer, not a wait
            log.info("%s[%d]: %s asked of no caller in particular: refused", self.child.spec.upstream,
                     self.child.pid, method, extra={"upstream": self.child.spec.upstream, "pid": self.child.pid})
            error = {"code": -32603, "message": "No client of the gateway can answer this request"}
            await self._write({"jsonrpc": "2.0", "id": child_id, "error": error})
            return
        ours = f"{self._tag}-{next(self._ids)}"
        self._asked[ours] = (found[0], child_id)
        found[1].put_nowait({**message, "id": ours})

    def _owner_outlet(self) -> tuple[str, Outlet] | None:
        """The one caller the child's message can be meant for, with the stream it goes to."""
        owners = {c.owner for c in self._calls.values() if c.owner}
        if len(owners) == 1:
            latest = max(i for i, c in self._calls.items() if c.owner)
            return self._calls[latest].owner, self._calls[latest].outlet
        if owners:
            return None  # several callers share this process: which one is meant cannot be told
        listening = [(owner, outlets[-1]) for owner, outlets in self._listeners.items() if outlets]
        return listening[0] if len(listening) == 1 else None

    # ---- both ways ----------------------------------------------------------------------------------

    async def _write(self, message: dict[str, Any]) -> None:
        try:
            await self.child.send(orjson.dumps(message))
        except ChildGone as exc:
            self._fail(Broken("exited", str(exc)))
            raise self.broken from None  # type: ignore[misc]

    async def _cancel(self, ours: int, reason: str) -> None:
        with contextlib.suppress(Broken):
            await self._write({"jsonrpc": "2.0", "method": "notifications/cancelled",
                               "params": {"requestId": ours, "reason": reason}})

    def _check(self) -> None:
        if self.broken is not None:
            raise self.broken

    def _fail(self, broken: Broken, *, quiet: bool = False) -> None:
        if self.broken is None:
            self.broken = broken
            if not quiet:
                log.warning("%s[%d]: %s", self.child.spec.upstream, self.child.pid, broken)
        for call in self._calls.values():
            if not call.answer.done():
                call.answer.set_exception(broken)


def _params(message: dict[str, Any]) -> dict[str, Any]:
    params = message.get("params")
    return params if isinstance(params, dict) else {}
