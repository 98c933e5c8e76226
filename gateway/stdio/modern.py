"""2026-07-28 callers in front of a handshake-era process: per-request metadata, `resultType`, input requests.

A stdio server that speaks only the handshake era (2025-11-25 and before)
still serves 2026-07-28 clients, translated here:

- a request's `_meta` protocol keys (version, client capabilities and info)
  and its `inputResponses`/`requestState` are the gateway's business, not the
  child's: they are taken off before it is written;
- `server/discover` is answered from the child's handshake, naming 2026-07-28
  and the handshake-era versions; each result gets `resultType: "complete"`;
- a request the child sends during a call (sampling, elicitation, roots) is not
  a stream message in this era: the call is parked and the caller gets an
  `input_required` result whose `inputRequests` hold those requests and whose
  `requestState` names the parked call. The caller's retry, carrying the same
  `requestState` (bound to that caller: anyone else's is unknown) and the
  `inputResponses`, answers the child and picks the call up again; a request
  the retry does not answer (the gateway's policy took it out, or the client
  left it) is answered to the child with an error. A parked call nobody picks
  up within `upstream_timeout_s` is cancelled.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import errors, mcp
from gateway.mcp_headers import PROTOCOL_VERSION_META_KEY

if TYPE_CHECKING:
    from gateway.stdio.channel import Channel, Outlet

VERSION = "2026-07-28"
_META_KEYS = frozenset({PROTOCOL_VERSION_META_KEY, "io.modelcontextprotocol/clientCapabilities",
                        "io.modelcontextprotocol/clientInfo"})
_RETRY_KEYS = ("inputResponses", "requestState")
_NOT_CACHED = {"ttlMs": 0, "cacheScope": "private"}


def as_handshake_era(message: dict[str, Any]) -> dict[str, Any]:
    """A 2026-07-28 request as a handshake-era server reads it."""
    params = message.get("params")
    if not isinstance(params, dict):
        return message
    kept = {k: v for k, v in params.items() if k not in _RETRY_KEYS}
    meta = kept.get("_meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in _META_KEYS}
        if meta:
            kept["_meta"] = meta
        else:
            del kept["_meta"]
    return {**message, "params": kept}


def complete(answer: dict[str, Any], method: Any) -> dict[str, Any]:
    """An answer to `method` as 2026-07-28 has it: every result says what kind it is, and a cacheable one how
    long and for whom it may be cached (not at all: the child names no lifetime; per caller, as the gateway
    filters it per caller)."""
    result = answer.get("result")
    if not isinstance(result, dict):
        return answer
    spec = mcp.METHODS.get(method) if isinstance(method, str) else None
    added = {**_NOT_CACHED} if spec is not None and spec.cacheable else {}
    return {**answer, "result": {"resultType": "complete", **added, **result}}


def discover(description: dict[str, Any], legacy_versions: list[str]) -> dict[str, Any]:
    return {**description, "resultType": "complete", **_NOT_CACHED, "supportedVersions": [VERSION, *legacy_versions]}


@dataclass(slots=True)
class Parked:
    """A call waiting for its caller to answer the child's requests."""

    caller: str
    method: Any  # the request's, for the shape of its result
    channel: Channel
    call: asyncio.Task[dict[str, Any]]
    outlet: Outlet
    asked: list[str]  # the ids (of the gateway's own) of the child's requests put to the caller
    expiry: asyncio.TimerHandle | None = field(default=None)


class Parking:
    """Calls parked on an `input_required` result, by `requestState`."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._parked: dict[str, Parked] = {}

    def park(self, parked: Parked, requests: list[dict[str, Any]]) -> dict[str, Any]:
        """Park a call on the child's `requests`; the `input_required` result that asks the caller for them."""
        state = secrets.token_urlsafe(24)
        parked.asked = [str(r["id"]) for r in requests]
        parked.expiry = asyncio.get_running_loop().call_later(self._timeout_s, self._expire, state)
        self._parked[state] = parked
        return {"resultType": "input_required", "requestState": state, "inputRequests": {
            str(r["id"]): {k: v for k, v in r.items() if k in ("method", "params")} for r in requests}}

    async def resume(self, caller: str, state: Any, responses: Any) -> Parked | None:
        """The call `state` names, its child's requests answered from `responses`; None when `state` names no
        call parked for this caller (unknown, expired, taken, or another caller's)."""
        parked = self._parked.get(state) if isinstance(state, str) else None
        if parked is None or parked.caller != caller:
            return None
        del self._parked[state]
        if parked.expiry is not None:
            parked.expiry.cancel()
        answers = responses if isinstance(responses, dict) else {}
        for asked in parked.asked:
            if isinstance(answers.get(asked), dict):
                answer: dict[str, Any] = {"jsonrpc": "2.0", "id": asked, "result": answers[asked]}
            else:
                answer = {"jsonrpc": "2.0", "id": asked, "error": errors.error_object(
                    errors.FORBIDDEN, "the client did not answer this request")}
            await parked.channel.answer(caller, answer)
        return parked

    def close(self) -> None:
        for state in list(self._parked):
            self._expire(state)

    def _expire(self, state: str) -> None:
        parked = self._parked.pop(state, None)
        if parked is not None:
            parked.call.cancel()  # the child is told to cancel it
