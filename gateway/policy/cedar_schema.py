"""The Cedar schema of the gateway: what a Cedar policy can name, and the types of what it reads.

Owns the entity, action and context model a Cedar policy is written against (`base_schema`), the one table
of actions (`ACTIONS`: every MCP method the policy decides, each with the entity types it applies to), the
argument types generated from an upstream's tools (`tool_schema`), and the check that a schema file kept
beside a policy is this schema with argument types added (`read_schema_file`).

    principal  Gateway::User::"<sub>"       subject, issuer, client_id ("" when none), roles, scopes, amr,
                                            acr ("" when none), max_level (0-3, 3 when none); every claim
                                            as a tag, a Set<String>: principal.getTag("groups")
    action     Gateway::Action::"tools/call", "resources/read", ... (the MCP method)
    resource   Gateway::Tool::"<name>"      name
               Gateway::Prompt::"<name>"    name
               Gateway::Resource::"<uri>"   uri (normalised), directory (the uri up to its last `/`)
               Gateway::Server::"upstream"  for lists, logging, subscriptions, sampling, elicitation, roots
    context    hinted_level (Long, what a tool's annotations ask for), era ("legacy" | "modern", "" not known),
               upstream (its name, "" not known), arguments (a tools/call's, optional)

In the base schema `Arguments` is an empty record (Cedar has no open record type): an argument read behind
`context.arguments has path` validates there untyped, one read without it does not. Against a schema generated
from the upstream's tools (`mcp-gateway policy cedar-schema`) every argument read is type-checked. JSON Schema
types map to Cedar types as string -> String,
integer -> Long, boolean -> Boolean, array -> Set of its items' type, object -> Record of its properties;
anything else (number, null, a union) has no Cedar type and is left out. Every argument is optional (a
client may leave any out), and a name two tools type differently is left out.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import cedarpy

from gateway.mcp import METHODS, PROTOCOL_KINDS, SERVER_REQUEST_METHODS, OperationKind

NAMESPACE: Final = "Gateway"

_TARGETS: Final[Mapping[str, tuple[str, ...]]] = {
    "tool_call": ("Tool",),
    "prompt_get": ("Prompt",),
    "resource_read": ("Resource",),
    "resource_subscribe": ("Resource",),
    "resource_unsubscribe": ("Resource",),
    "completion": ("Prompt", "Resource"),
}

# Every method a Cedar policy decides (the action's id), and the operation it is.
ACTIONS: Final[Mapping[str, OperationKind]] = {
    **{method: spec.kind for method, spec in METHODS.items() if spec.kind not in PROTOCOL_KINDS},
    **{method: kind for method, kind in SERVER_REQUEST_METHODS.items() if kind not in PROTOCOL_KINDS},
}

_DEPTH: Final = 16  # how deep a tool's inputSchema is read for argument types


def _set_of(element: str) -> dict[str, Any]:
    return {"type": "Set", "element": {"type": element}}


def _record(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "Record", "attributes": dict(attributes)}


def base_schema(arguments: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The gateway's Cedar schema (JSON form); `arguments` types `context.arguments` (a Record type)."""
    entity_types = {
        "User": {
            "shape": _record({
                "subject": {"type": "String"}, "issuer": {"type": "String"}, "client_id": {"type": "String"},
                "roles": _set_of("String"), "scopes": _set_of("String"), "amr": _set_of("String"),
                "acr": {"type": "String"}, "max_level": {"type": "Long"},
            }),
            "tags": _set_of("String"),
        },
        "Tool": {"shape": _record({"name": {"type": "String"}})},
        "Prompt": {"shape": _record({"name": {"type": "String"}})},
        "Resource": {"shape": _record({"uri": {"type": "String"}, "directory": {"type": "String"}})},
        "Server": {},
    }
    actions = {
        method: {"appliesTo": {"principalTypes": ["User"], "resourceTypes": list(_TARGETS.get(kind, ("Server",))),
                               "context": {"type": "Context"}}}
        for method, kind in ACTIONS.items()
    }
    common = {
        "Arguments": dict(arguments) if arguments is not None else _record({}),
        "Context": _record({"hinted_level": {"type": "Long"}, "era": {"type": "String"},
                            "upstream": {"type": "String"}, "arguments": {"type": "Arguments", "required": False}}),
    }
    return {NAMESPACE: {"commonTypes": common, "entityTypes": entity_types, "actions": actions}}


def tool_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The gateway's schema with `context.arguments` typed from the tools' `inputSchema`s (tools as listed)."""
    merged: dict[str, Any] | None = _record({})
    for tool in tools:
        merged = _merge(merged, _cedar_type({"type": "object", **_properties_of(tool.get("inputSchema"))}, _DEPTH))
    return base_schema(merged if merged is not None else _record({}))


def _properties_of(schema: object) -> dict[str, Any]:
    return {"properties": schema.get("properties")} if isinstance(schema, Mapping) else {}


def _cedar_type(schema: object, depth: int) -> dict[str, Any] | None:
    """The Cedar type of a JSON Schema, or None when it has none."""
    if not isinstance(schema, Mapping) or depth <= 0:
        return None
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: a null is dropped from the arguments, the string is typed
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind in ("string", "integer", "boolean"):
        return {"type": {"string": "String", "integer": "Long", "boolean": "Boolean"}[kind]}
    if kind == "array":
        element = _cedar_type(schema.get("items"), depth - 1)
        return {"type": "Set", "element": element} if element is not None else None
    if kind == "object":
        properties = schema.get("properties")
        attributes = {}
        for name, value in properties.items() if isinstance(properties, Mapping) else ():
            typed = _cedar_type(value, depth - 1)
            if isinstance(name, str) and typed is not None:
                attributes[name] = {**typed, "required": False}
        return _record(attributes)
    return None


def _merge(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """One type for two tools' arguments of the same name: records merge, anything else must agree."""
    if a is None or b is None:
        return None
    a, b = _bare(a), _bare(b)
    if a["type"] == b["type"] == "Record":
        attributes = dict(a["attributes"])
        for name, typed in b["attributes"].items():
            both = _merge(attributes[name], typed) if name in attributes else _bare(typed)
            if both is None:
                attributes.pop(name, None)
            else:
                attributes[name] = {**both, "required": False}
        return _record(attributes)
    if a["type"] == b["type"] == "Set":
        element = _merge(a["element"], b["element"])
        return {"type": "Set", "element": element} if element is not None else None
    return a if a == b else None


def _bare(typed: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in typed.items() if k != "required"}


def read_schema_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """A schema kept beside a policy (as `mcp-gateway policy cedar-schema` prints it): the gateway's own schema,
    with only `Arguments` allowed to differ. Raises ValueError saying why it is not."""
    data = path.read_bytes()
    try:
        schema = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    namespace = schema.get(NAMESPACE) if isinstance(schema, dict) else None
    arguments = namespace.get("commonTypes", {}).get("Arguments") if isinstance(namespace, dict) else None
    if not isinstance(arguments, dict) or arguments.get("type") != "Record":
        raise ValueError(f"{NAMESPACE}.commonTypes.Arguments must be a Record type")
    if schema != base_schema(arguments):
        raise ValueError("not the gateway's schema with argument types added (print it again with "
                         "`mcp-gateway policy cedar-schema`)")
    try:
        cedarpy.Schema.from_json_str(data.decode())
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return copy.deepcopy(schema), data
