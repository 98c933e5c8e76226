"""MCP semantics: which era a request belongs to, what it asks for, and whether its headers agree.

Owns: the method catalogue of every protocol revision (2024-11-05 … 2026-07-28),
`classify(message) -> Operation`, era detection, and the 2026-07-28 routing
header rules (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`
with the `=?base64?…?=` sentinel). Pure: values in, values out; it imports
nothing from the rest of the package but `jsonrpc`.

Decisions are taken from the parsed body. Headers are only ever compared with
the body; a header that disagrees is a reason to refuse, never a source of truth.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from gateway.jsonrpc import JsonRpcId, Message

Era = Literal["legacy", "modern"]
OperationKind = Literal[
    "initialize",
    "discover",
    "ping",
    "list",
    "tool_call",
    "resource_read",
    "resource_subscribe",
    "resource_unsubscribe",
    "subscriptions_listen",
    "prompt_get",
    "completion",
    "logging_set_level",
    "task",
    "notification",
    "client_response",
    "sampling",
    "elicitation",
    "roots_list",
    "stream_open",  # legacy GET: the server-to-client SSE stream of a session
    "session_end",  # legacy DELETE of a session
    "unknown",
]

MODERN_VERSIONS: Final = frozenset({"2026-07-28"})
LEGACY_VERSIONS: Final = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
BATCH_VERSIONS: Final = frozenset({"2025-03-26"})

PROTOCOL_VERSION_META_KEY: Final = "io.modelcontextprotocol/protocolVersion"
PROTOCOL_VERSION_HEADER: Final = "mcp-protocol-version"
METHOD_HEADER: Final = "mcp-method"
NAME_HEADER: Final = "mcp-name"
PARAM_HEADER_PREFIX: Final = "mcp-param-"
SESSION_HEADER: Final = "mcp-session-id"

# Client -> server methods and the operation each one is.
_CLIENT_METHODS: Final[Mapping[str, OperationKind]] = {
    "initialize": "initialize",
    "server/discover": "discover",
    "ping": "ping",
    "tools/list": "list",
    "resources/list": "list",
    "resources/templates/list": "list",
    "prompts/list": "list",
    "tools/call": "tool_call",
    "resources/read": "resource_read",
    "resources/subscribe": "resource_subscribe",
    "resources/unsubscribe": "resource_unsubscribe",
    "subscriptions/listen": "subscriptions_listen",
    "prompts/get": "prompt_get",
    "completion/complete": "completion",
    "logging/setLevel": "logging_set_level",
    "tasks/get": "task",
    "tasks/result": "task",  # 2025-11-25
    "tasks/list": "task",  # 2025-11-25
    "tasks/cancel": "task",
    "tasks/update": "task",  # the 2026-07-28 tasks extension
}

# Client -> server notifications (every revision). A message without an id whose method is not one of these is
# not a harmless notification: a request method is refused (it needs an id), anything else is an unknown method.
CLIENT_NOTIFICATIONS: Final = frozenset({
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed", "notifications/tasks/status",
})

# Server -> client requests, as they appear on an SSE stream (legacy) or in inputRequests (modern).
SERVER_REQUEST_METHODS: Final[Mapping[str, OperationKind]] = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots_list",
    "ping": "ping",
}

# Which params member names the target, for the methods that have one.
_TARGET_PARAM: Final[Mapping[str, str]] = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
    "tasks/get": "taskId",
    "tasks/result": "taskId",
    "tasks/cancel": "taskId",
    "tasks/update": "taskId",
}
# The methods whose target the 2026-07-28 client mirrors in `Mcp-Name`.
_NAME_HEADER_METHODS: Final = frozenset({"tools/call", "prompts/get", "resources/read", "tasks/get", "tasks/update",
                                         "tasks/cancel"})

# What tells one kind of answer to a server->client request from another: the members each kind requires, and
# those it may have. An answer is of a kind when it has all of that kind's required members and none that only
# another kind has, so an answer shaped as two kinds at once (an elicitation result carrying a sampling result)
# is of neither.
_REQUIRED_MEMBERS: Final[Mapping[OperationKind, frozenset[str]]] = {
    "sampling": frozenset({"role", "content", "model"}),
    "elicitation": frozenset({"action"}),
    "roots_list": frozenset({"roots"}),
}
_OWN_MEMBERS: Final[Mapping[OperationKind, frozenset[str]]] = {
    "sampling": frozenset({"role", "content", "model", "stopReason"}),
    "elicitation": frozenset({"action", "content"}),
    "roots_list": frozenset({"roots"}),
}
_ALL_MEMBERS: Final = frozenset().union(*_REQUIRED_MEMBERS.values())
_MARKERS: Final[Mapping[OperationKind, frozenset[str]]] = {
    kind: _ALL_MEMBERS - own for kind, own in _OWN_MEMBERS.items()
}


@dataclass(frozen=True, slots=True)
class Operation:
    """What one JSON-RPC message asks the upstream to do, as the policy sees it."""

    kind: OperationKind
    method: str
    request_id: JsonRpcId = None
    name: str | None = None  # tool or prompt name, exactly as sent
    uri: str | None = None  # resource URI, exactly as sent
    arguments: Mapping[str, Any] | None = None  # tools/call arguments
    input_responses: tuple[OperationKind, ...] = ()  # 2026-07-28 retry: what the client's inputResponses answer
    task_ids: tuple[str, ...] = ()  # the tasks a tasks/* request or a subscriptions/listen names

    @property
    def target(self) -> str | None:
        return self.name if self.name is not None else self.uri


class MalformedParams(ValueError):
    """A known method whose params cannot be understood (e.g. tools/call without a string name)."""


def classify(message: Message) -> Operation:
    """Say what a client->server message asks for. Raises `MalformedParams` when a target is unreadable, and
    when a message without an id names a request method (the upstream would read it as a request to run)."""
    if message.kind in ("response", "error"):
        return Operation("client_response", "response", message.id)
    method = message.method or ""
    if message.kind == "notification":
        if method in CLIENT_NOTIFICATIONS:
            return Operation("notification", method)
        if method in _CLIENT_METHODS:
            raise MalformedParams(f"{method} is a request: it needs an id")
        return Operation("unknown", method)
    kind = _CLIENT_METHODS.get(method, "unknown")
    params = message.params if isinstance(message.params, dict) else {}
    answered = _input_response_kinds(params.get("inputResponses"))
    if method == "completion/complete":
        return _completion(message, params, answered)
    if method == "subscriptions/listen":
        return Operation(kind, method, message.id, input_responses=answered, task_ids=_listened_tasks(params))
    target_key = _TARGET_PARAM.get(method)
    if target_key is None:
        return Operation(kind, method, message.id, input_responses=answered)
    target = params.get(target_key)
    if not isinstance(target, str):
        raise MalformedParams(f"{method} needs a string params.{target_key}")
    if target_key == "taskId":
        return Operation(kind, method, message.id, input_responses=answered, task_ids=(target,))
    if _has_control_character(target):
        raise MalformedParams(f"{method} params.{target_key} contains a control character")
    if target_key == "uri":
        return Operation(kind, method, message.id, uri=target, input_responses=answered)
    arguments = params.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        raise MalformedParams(f"{method} params.arguments must be an object")
    return Operation(kind, method, message.id, name=target, arguments=arguments, input_responses=answered)


def _has_control_character(text: str) -> bool:
    """C0, DEL and C1 controls: a NUL or a line break in a name may end it early for the upstream's reader."""
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


def _listened_tasks(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The task ids a 2026-07-28 `subscriptions/listen` asks to hear about (`params.notifications.taskIds`)."""
    notifications = params.get("notifications")
    if notifications is None:
        return ()
    if not isinstance(notifications, dict):
        raise MalformedParams("subscriptions/listen params.notifications must be an object")
    task_ids = notifications.get("taskIds")
    if task_ids is None:
        return ()
    if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
        raise MalformedParams("subscriptions/listen params.notifications.taskIds must be a list of strings")
    return tuple(task_ids)


def _completion(message: Message, params: Mapping[str, Any], answered: tuple[OperationKind, ...]) -> Operation:
    """completion/complete names what it completes for: a prompt, or a resource template."""
    ref = params.get("ref")
    if not isinstance(ref, dict):
        raise MalformedParams("completion/complete needs a params.ref object")
    if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
        return Operation("completion", message.method or "", message.id, name=ref["name"], input_responses=answered)
    if ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
        return Operation("completion", message.method or "", message.id, uri=ref["uri"], input_responses=answered)
    raise MalformedParams("completion/complete ref must be ref/prompt with a name or ref/resource with a uri")


def _input_response_kinds(responses: Any) -> tuple[OperationKind, ...]:
    """What each answer in a 2026-07-28 retry's `inputResponses` responds to, told by its shape."""
    if responses is None:
        return ()
    if not isinstance(responses, dict):
        return ("unknown",)
    return tuple(dict.fromkeys(result_kind(response) for response in responses.values()))


def result_kind(result: Any) -> OperationKind:
    """Which server->client request `result` answers, by its shape: sampling, elicitation, roots_list, or
    unknown when it has the shape of none or of more than one."""
    if not isinstance(result, dict):
        return "unknown"
    members = result.keys()
    found = [kind for kind, required in _REQUIRED_MEMBERS.items()
             if required <= members and not (_MARKERS[kind] & members)]
    return found[0] if len(found) == 1 else "unknown"


def answers(result: Any, kind: str) -> bool:
    """Whether `result` is a fitting answer to a server->client request of `kind` (a ping's answer is an object
    with the members of no other kind's answer)."""
    if kind == "ping":
        return isinstance(result, dict) and not (result.keys() & _ALL_MEMBERS)
    return result_kind(result) == kind


def created_task(result: Any) -> tuple[str, float | None] | None:
    """(task id, time to live in seconds or None) when `result` says a task was created: 2025-11-25's
    `{"task": {"taskId", "ttl" ms}}`, or the 2026-07-28 extension's flat `{"resultType": "task", "taskId",
    "ttlMs"}`."""
    if not isinstance(result, dict):
        return None
    task = result.get("task") if isinstance(result.get("task"), dict) else None
    if task is None and result.get("resultType") == "task":
        task = result
    if task is None or not isinstance(task.get("taskId"), str):
        return None
    ttl = task.get("ttlMs", task.get("ttl"))
    seconds = ttl / 1000 if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0 else None
    return task["taskId"], seconds


def classify_server_request(message: Message) -> Operation:
    """Say what a server->client request (sampling, elicitation, roots, ping) asks of the client."""
    method = message.method or ""
    return Operation(SERVER_REQUEST_METHODS.get(method, "unknown"), method, message.id)


def meta_protocol_version(message: Message) -> str | None:
    """The 2026-07-28 per-request version from `params._meta`, if the message carries one."""
    params = message.params
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return None
    version = meta.get(PROTOCOL_VERSION_META_KEY)
    return version if isinstance(version, str) else None


def detect_era(messages: tuple[Message, ...], header_version: str | None) -> Era:
    """Modern when the header or any message's `_meta` names a version that is not a handshake-era one."""
    if header_version is not None and header_version not in LEGACY_VERSIONS:
        return "modern"
    for message in messages:
        version = meta_protocol_version(message)
        if version is not None and version not in LEGACY_VERSIONS:
            return "modern"
    return "legacy"


# ---- 2026-07-28 routing headers -------------------------------------------------------------

_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>[A-Za-z0-9+/=]*)\?=$")


def decode_header_value(value: str) -> str | None:
    """Undo the `=?base64?…?=` sentinel; None when the sentinel is malformed (so it never matches)."""
    match = _SENTINEL.fullmatch(value)
    if match is None:
        return None if value.startswith("=?base64?") else value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
    except binascii.Error:
        return None
    if base64.b64encode(decoded).decode("ascii") != payload:
        return None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


def routing_header_mismatch(
    message: Message,
    headers: Mapping[str, list[str]],
    tool_schema: Mapping[str, Any] | None,
) -> str | None:
    """Why a 2026-07-28 request's routing headers disagree with its body, or None when they agree.

    `headers` maps lowercase names to every value received (a repeated routing
    header is itself a mismatch: first-copy and last-copy readers disagree).
    `tool_schema` is the tools/call target's inputSchema when known, to check
    `Mcp-Param-*` headers; without it, only headers the body cannot support are refused.
    """
    for name in (PROTOCOL_VERSION_HEADER, METHOD_HEADER, NAME_HEADER):
        if len(headers.get(name, ())) > 1:
            return f"{name} header appears more than once"
    version = _single(headers, PROTOCOL_VERSION_HEADER)
    body_version = meta_protocol_version(message)
    if version is None:
        return "MCP-Protocol-Version header is missing"
    if body_version is None:
        return "params._meta carries no protocol version to match the MCP-Protocol-Version header"
    if version != body_version:
        return "MCP-Protocol-Version header does not match params._meta"
    if message.kind not in ("request", "notification"):
        return None
    method_header = _single(headers, METHOD_HEADER)
    if method_header is None:
        return "Mcp-Method header is missing"
    if method_header != message.method:
        return "Mcp-Method header does not match the body's method"
    params = message.params if isinstance(message.params, dict) else {}
    if message.method in _NAME_HEADER_METHODS:
        body_name = params.get(_TARGET_PARAM[message.method])
        raw = _single(headers, NAME_HEADER)
        if body_name is not None:
            if raw is None:
                return "Mcp-Name header is missing"
            if decode_header_value(raw) != body_name:
                return "Mcp-Name header does not match the body"
    if message.method == "tools/call":
        arguments = params.get("arguments")
        return _param_header_mismatch(arguments if isinstance(arguments, dict) else {}, headers, tool_schema)
    if any(name.startswith(PARAM_HEADER_PREFIX) for name in headers):
        return "Mcp-Param-* headers are only valid on tools/call"
    return None


def _single(headers: Mapping[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _param_header_mismatch(
    arguments: Mapping[str, Any], headers: Mapping[str, list[str]], schema: Mapping[str, Any] | None
) -> str | None:
    sent = {name[len(PARAM_HEADER_PREFIX) :]: values for name, values in headers.items()
            if name.startswith(PARAM_HEADER_PREFIX)}
    for token, values in sent.items():
        if len(values) > 1:
            return f"Mcp-Param-{token} header appears more than once"
    if schema is None:
        # Schema not learnt yet (no tools/list seen through this gateway): a header token need not
        # equal a property name, so only what is wrong on its face is refused; the upstream, which
        # knows the schema, checks the rest.
        for token, sent_values in sent.items():
            if decode_header_value(sent_values[0]) is None:
                return f"Mcp-Param-{token} header carries a malformed base64 sentinel"
        return None
    declared = param_header_paths(schema)
    for key, (token, path, prop_type) in declared.items():
        received = sent.pop(key, None)
        value = _at_path(arguments, path)
        rendered = _render(value) if value is not None else None
        if received is None:
            if rendered is not None:
                return f"Mcp-Param-{token} header is missing"
            continue
        decoded = decode_header_value(received[0])
        if decoded is None:
            return f"Mcp-Param-{token} header carries a malformed base64 sentinel"
        if rendered is None or not _same_value(prop_type, value, rendered, decoded):
            return f"Mcp-Param-{token} header does not match the body's {'.'.join(path)!r} argument"
    if sent:
        return f"Mcp-Param-{next(iter(sent))} header is not declared by the tool's input schema"
    return None


def param_header_paths(schema: Mapping[str, Any]) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Map each `x-mcp-header` token (lowercased) in an inputSchema to (token as declared, property path, JSON type).

    Only properties reached through a chain of `properties` keys count, as in the
    specification; other annotations are ignored (conforming clients send no header for them).
    """
    found: dict[str, tuple[str, tuple[str, ...], str]] = {}
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        token = node.get("x-mcp-header")
        if path and isinstance(token, str):
            found[token.lower()] = (token, path, str(node.get("type")))
        properties = node.get("properties")
        if isinstance(properties, dict):
            stack.extend(((*path, key), sub) for key, sub in properties.items())
    return found


def _at_path(arguments: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _render(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


_DECIMAL = re.compile(r"^-?[0-9]+(\.0+)?$")


def _same_value(prop_type: str, value: Any, rendered: str, decoded: str) -> bool:
    """Header and body agree; integers compare by value so `42` matches `42.0`."""
    if prop_type == "integer" and isinstance(value, int | float) and not isinstance(value, bool):
        if _DECIMAL.fullmatch(decoded) and float(value).is_integer():
            return int(decoded.split(".")[0]) == int(value)
        return False
    return decoded == rendered
