"""MCP semantics: which era a request belongs to, what it asks for, and what its answers hold.

Owns: ONE table of the client methods of every protocol revision (2024-11-05 …
2026-07-28), `METHODS`: the operation each method is, which params member names
its target, whether 2026-07-28 clients mirror that target in `Mcp-Name`, and,
for list methods, where the items are and what each item stands for. `classify`
(and so the policy), the response rules and the metrics all read it, so a new
method or list kind is one row here. Also `read_request(body, headers) -> Request | Invalid` (parse,
era, routing headers, classify every message), `classify(message) ->
Operation`, and the shapes of answers to server->client requests.

Pure: values in, values out; it imports nothing from the package but `jsonrpc`,
`mcp_headers` and the root exception. Decisions are taken from the parsed body; headers are only
compared with it (`mcp_headers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from gateway import jsonrpc
from gateway.exceptions import GatewayError
from gateway.jsonrpc import JsonRpcId, Message
from gateway.mcp_headers import PROTOCOL_VERSION_HEADER, meta_protocol_version, routing_header_mismatch
from gateway.types import first_value

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

SESSION_HEADER: Final = "mcp-session-id"


@dataclass(frozen=True, slots=True)
class Listing:
    """What a list method's result holds: the member with the items, what one item stands for, and which of the
    item's members names it. A `task` item is shown to its owner only; any other is shown when its operation is
    visible to the principal."""

    items: str
    item_kind: OperationKind
    item_key: str


@dataclass(frozen=True, slots=True)
class Method:
    """One client->server request method: the operation it is, and what the gateway reads in it."""

    kind: OperationKind
    target: str | None = None  # the params member that names its target
    mirrored: bool = False  # a 2026-07-28 client mirrors the target in `Mcp-Name`
    listing: Listing | None = None  # a list method: what its result holds
    cacheable: bool = False  # 2026-07-28: its result carries ttlMs and cacheScope


METHODS: Final[Mapping[str, Method]] = {
    "initialize": Method("initialize"),
    "server/discover": Method("discover"),
    "ping": Method("ping"),
    "tools/list": Method("list", listing=Listing("tools", "tool_call", "name"), cacheable=True),
    "prompts/list": Method("list", listing=Listing("prompts", "prompt_get", "name"), cacheable=True),
    "resources/list": Method("list", listing=Listing("resources", "resource_read", "uri"), cacheable=True),
    # a template is shown when one of its expansions is readable
    "resources/templates/list": Method("list", listing=Listing("resourceTemplates", "completion", "uriTemplate"),
                                       cacheable=True),
    "tools/call": Method("tool_call", "name", mirrored=True),
    "resources/read": Method("resource_read", "uri", mirrored=True, cacheable=True),
    "resources/subscribe": Method("resource_subscribe", "uri"),
    "resources/unsubscribe": Method("resource_unsubscribe", "uri"),
    "subscriptions/listen": Method("subscriptions_listen"),
    "prompts/get": Method("prompt_get", "name", mirrored=True),
    "completion/complete": Method("completion"),
    "logging/setLevel": Method("logging_set_level"),
    "tasks/get": Method("task", "taskId", mirrored=True),
    "tasks/result": Method("task", "taskId"),  # 2025-11-25
    "tasks/list": Method("task", listing=Listing("tasks", "task", "taskId")),  # 2025-11-25
    "tasks/cancel": Method("task", "taskId", mirrored=True),
    "tasks/update": Method("task", "taskId", mirrored=True),  # the 2026-07-28 tasks extension
}

# Client -> server notifications (every revision). A message without an id whose method is not one of these is
# not a harmless notification: a request method is refused (it needs an id), anything else is an unknown method.
CLIENT_NOTIFICATIONS: Final = frozenset({
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed", "notifications/tasks/status",
})

# Protocol plumbing: open to every authenticated caller, never a question for the policy (in any language).
PROTOCOL_KINDS: Final = frozenset({
    "initialize", "discover", "ping", "notification", "client_response", "task", "stream_open", "session_end",
})

# Server -> client requests, as they appear on an SSE stream (legacy) or in inputRequests (modern).
SERVER_REQUEST_METHODS: Final[Mapping[str, OperationKind]] = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots_list",
    "ping": "ping",
}

# What a metric's method label may be: every method above, and the names the gateway gives what has no method.
LABELLED_METHODS: Final = frozenset({*METHODS, *SERVER_REQUEST_METHODS, "notification", "response", "GET", "DELETE"})

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
    max_tokens: int | None = None  # sampling/createMessage: the maxTokens the server asks for (None: unreadable)

    @property
    def target(self) -> str | None:
        return self.name if self.name is not None else self.uri


class MalformedParams(GatewayError, ValueError):
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
        if method in METHODS:
            raise MalformedParams(f"{method} is a request: it needs an id")
        return Operation("unknown", method)
    spec = METHODS.get(method)
    kind: OperationKind = spec.kind if spec is not None else "unknown"
    params = message.params if isinstance(message.params, dict) else {}
    answered = _input_response_kinds(params.get("inputResponses"))
    if method == "completion/complete":
        return _completion(message, params, answered)
    if method == "subscriptions/listen":
        return Operation(kind, method, message.id, input_responses=answered, task_ids=_listened_tasks(params))
    target_key = spec.target if spec is not None else None
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
    kind = SERVER_REQUEST_METHODS.get(method, "unknown")
    if kind == "sampling":
        asked = message.params.get("maxTokens") if isinstance(message.params, dict) else None
        if isinstance(asked, int) and not isinstance(asked, bool):
            return Operation(kind, method, message.id, max_tokens=asked)
    return Operation(kind, method, message.id)


def detect_era(messages: tuple[Message, ...], header_version: str | None) -> Era:
    """Modern when the header or any message's `_meta` names a version that is not a handshake-era one."""
    if header_version is not None and header_version not in LEGACY_VERSIONS:
        return "modern"
    for message in messages:
        version = meta_protocol_version(message)
        if version is not None and version not in LEGACY_VERSIONS:
            return "modern"
    return "legacy"


def mirrored_param(method: str | None) -> str | None:
    """The params member a 2026-07-28 client mirrors in `Mcp-Name` for `method`, if any."""
    spec = METHODS.get(method or "")
    return spec.target if spec is not None and spec.mirrored else None


def item_operation(listing: Listing, method: str, item: Mapping[str, Any]) -> Operation | None:
    """The operation a list item stands for (calling the tool, getting the prompt, reading the resource), or
    None when the item does not name it."""
    value = item.get(listing.item_key)
    if not isinstance(value, str):
        return None
    if listing.item_key == "name":
        return Operation(listing.item_kind, method, name=value)
    return Operation(listing.item_kind, method, uri=value)


# ---- one POST body, read whole ---------------------------------------------------------------

InvalidKind = Literal["parse", "invalid", "batch", "header_mismatch", "params"]


@dataclass(frozen=True, slots=True)
class Request:
    """What one POST body asks for: every message, and the operation each one is."""

    era: Era
    protocol_version: str | None
    messages: tuple[Message, ...]
    operations: tuple[Operation, ...]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a POST body cannot be acted on, with what was read of it before that was known."""

    kind: InvalidKind
    why: str
    messages: tuple[Message, ...] = ()
    protocol_version: str | None = None


def read_request(
    body: bytes,
    headers: Mapping[str, list[str]],
    *,
    max_depth: int,
    tool_schema: Callable[[str], Mapping[str, Any] | None],
) -> Request | Invalid:
    """Parse a POST body, find its era and version, check its routing headers, and classify every message.

    `headers` maps lowercase names to every value received; `tool_schema(name)` is the inputSchema of a tool as
    last listed (to check `Mcp-Param-*`), or None when it is not known yet.
    """
    version = first_value(headers, PROTOCOL_VERSION_HEADER)
    try:
        parsed = jsonrpc.parse_body(body, max_depth=max_depth)
    except jsonrpc.NotJson as exc:
        return Invalid("parse", str(exc), protocol_version=version)
    except jsonrpc.NotJsonRpc as exc:
        return Invalid("invalid", str(exc), protocol_version=version)
    messages = parsed.messages
    era = detect_era(messages, version)
    if parsed.is_batch and (era == "modern" or (version or "2025-03-26") not in BATCH_VERSIONS):
        return Invalid("batch", "batches are allowed only in protocol 2025-03-26", messages, version)
    first = messages[0]
    params = first.params if isinstance(first.params, dict) else {}
    if era == "modern":
        version = meta_protocol_version(first) or version
        name = params.get("name")
        schema = tool_schema(name) if first.method == "tools/call" and isinstance(name, str) else None
        mismatch = routing_header_mismatch(first, headers, name_param=mirrored_param(first.method),
                                           tool_schema=schema)
        if mismatch is not None:
            return Invalid("header_mismatch", mismatch, messages, version)
    elif first.method == "initialize" and isinstance(params.get("protocolVersion"), str):
        version = params["protocolVersion"]
    try:
        operations = tuple(classify(m) for m in messages)
    except MalformedParams as exc:
        return Invalid("params", str(exc), messages, version)
    return Request(era, version, messages, operations)

