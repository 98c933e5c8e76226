"""JSON-RPC 2.0 framing: parse a request body into messages, within limits.

Owns: turning bytes into `Message` values (request, notification, response,
error) and saying precisely why bytes are not JSON-RPC. It knows nothing of
MCP, HTTP or the gateway's error catalogue; it imports nothing from the rest
of the package but the root of its exceptions (`gateway.exceptions`, which
imports nothing). Size limits are enforced before parsing (by whoever reads the
body); depth is enforced here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.exceptions import GatewayError

JsonRpcId = str | int | None
MessageKind = Literal["request", "notification", "response", "error"]


class NotJson(GatewayError, ValueError):
    """The body is not JSON at all (JSON-RPC -32700)."""


class NotJsonRpc(GatewayError, ValueError):
    """The body is JSON but not a valid JSON-RPC 2.0 message or batch (JSON-RPC -32600)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message as received. `raw` is the decoded object, kept to re-serialise or inspect."""

    kind: MessageKind
    id: JsonRpcId
    method: str | None
    params: dict[str, Any] | list[Any] | None
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Body:
    """A parsed POST body: one message, or a batch (a JSON array) of them."""

    messages: tuple[Message, ...]
    is_batch: bool

    @property
    def request_ids(self) -> tuple[JsonRpcId, ...]:
        return tuple(m.id for m in self.messages if m.kind == "request")


def parse_body(data: bytes, *, max_depth: int) -> Body:
    """Parse `data` as a JSON-RPC message or batch; raise `NotJson` or `NotJsonRpc` with the reason."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise NotJsonRpc(f"nesting deeper than {max_depth}") from None
        raise NotJson(str(exc)) from None
    # Containers cannot nest deeper than there are brackets: most bodies skip the walk (counted in C).
    if data.count(b"{") + data.count(b"[") > max_depth and _depth_exceeds(value, max_depth):
        raise NotJsonRpc(f"nesting deeper than {max_depth}")
    if isinstance(value, list):
        if not value:
            raise NotJsonRpc("empty batch")
        return Body(tuple(_message(item) for item in value), is_batch=True)
    return Body((_message(value),), is_batch=False)


def _message(value: Any) -> Message:
    if not isinstance(value, dict):
        raise NotJsonRpc("a message must be a JSON object")
    if value.get("jsonrpc") != "2.0":
        raise NotJsonRpc('"jsonrpc" must be "2.0"')
    has_id = "id" in value
    msg_id = value.get("id")
    if has_id and not valid_id(msg_id):
        raise NotJsonRpc('"id" must be a string, an integer or null')
    if "method" in value:
        method = value["method"]
        if not isinstance(method, str) or not method:
            raise NotJsonRpc('"method" must be a non-empty string')
        params = value.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise NotJsonRpc('"params" must be an object or an array')
        if has_id and msg_id is None:
            raise NotJsonRpc('a request "id" must not be null')
        return Message("request" if has_id else "notification", msg_id, method, params, value)
    if not has_id:
        raise NotJsonRpc('a message needs "method" or "id"')
    if "result" in value and "error" not in value:
        return Message("response", msg_id, None, None, value)
    if "error" in value and "result" not in value:
        error = value["error"]
        if not isinstance(error, dict) or not isinstance(error.get("code"), int):
            raise NotJsonRpc('"error" must be an object with an integer "code"')
        return Message("error", msg_id, None, None, value)
    raise NotJsonRpc('a response needs exactly one of "result" and "error"')


def valid_id(value: Any) -> bool:
    """A JSON-RPC id as the gateway accepts one: a string, an integer (not a boolean), or null."""
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """True when containers nest more than `max_depth` levels (iterative: no recursion limit to hit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def dumps(value: Any) -> bytes:
    """Serialise a JSON value the way the gateway writes every body."""
    return orjson.dumps(value)


def id_key(value: JsonRpcId) -> tuple[str, Any]:
    """A request id as a set member or dict key: 1, "1" and true are three different ids."""
    return (type(value).__name__, value)
