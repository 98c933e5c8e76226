"""The 2026-07-28 routing headers and the per-request protocol version in `params._meta`.

Owns: `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name` and `Mcp-Param-*` (with
the `=?base64?…?=` sentinel) and whether they agree with the body. Pure; it
imports nothing from the package but `jsonrpc` and `types`, and knows no
method catalogue: `mcp` says which params member a method mirrors in `Mcp-Name`.

Headers are only ever compared with the body; a header that disagrees is a
reason to refuse, never a source of truth.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any, Final

from gateway.jsonrpc import Message
from gateway.types import first_value

PROTOCOL_VERSION_META_KEY: Final = "io.modelcontextprotocol/protocolVersion"
PROTOCOL_VERSION_HEADER: Final = "mcp-protocol-version"
METHOD_HEADER: Final = "mcp-method"
NAME_HEADER: Final = "mcp-name"
PARAM_HEADER_PREFIX: Final = "mcp-param-"


def meta_protocol_version(message: Message) -> str | None:
    """The 2026-07-28 per-request version from `params._meta`, if the message carries one."""
    return params_protocol_version(message.params)


def params_protocol_version(params: object) -> str | None:
    """The per-request version in a message's `params` (a decoded JSON value), if there is one."""
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return None
    version = meta.get(PROTOCOL_VERSION_META_KEY)
    return version if isinstance(version, str) else None


_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>[A-Za-z0-9+/=]*)\?=$")


def encode_header_value(value: str) -> str:
    """A value as a client puts it in a routing header: as it is when plain printable ASCII without edge
    spaces, else in the `=?base64?…?=` sentinel (the inverse of `decode_header_value`)."""
    if value.isascii() and value.isprintable() and value == value.strip() and not value.startswith("=?base64?"):
        return value
    return f"=?base64?{base64.b64encode(value.encode()).decode('ascii')}?="


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
    *,
    name_param: str | None,
    tool_schema: Mapping[str, Any] | None,
) -> str | None:
    """Why a 2026-07-28 request's routing headers disagree with its body, or None when they agree.

    `headers` maps lowercase names to every value received (a repeated routing
    header is itself a mismatch: first-copy and last-copy readers disagree).
    `name_param` is the params member the method mirrors in `Mcp-Name` (None: it
    mirrors none). `tool_schema` is the tools/call target's inputSchema when
    known, to check `Mcp-Param-*` headers; without it, only headers the body
    cannot support are refused.
    """
    for name in (PROTOCOL_VERSION_HEADER, METHOD_HEADER, NAME_HEADER):
        if len(headers.get(name, ())) > 1:
            return f"{name} header appears more than once"
    version = first_value(headers, PROTOCOL_VERSION_HEADER)
    body_version = meta_protocol_version(message)
    if version is None:
        return "MCP-Protocol-Version header is missing"
    if body_version is None:
        return "params._meta carries no protocol version to match the MCP-Protocol-Version header"
    if version != body_version:
        return "MCP-Protocol-Version header does not match params._meta"
    if message.kind not in ("request", "notification"):
        return None
    method_header = first_value(headers, METHOD_HEADER)
    if method_header is None:
        return "Mcp-Method header is missing"
    if method_header != message.method:
        return "Mcp-Method header does not match the body's method"
    params = message.params if isinstance(message.params, dict) else {}
    if name_param is not None:
        body_name = params.get(name_param)
        raw = first_value(headers, NAME_HEADER)
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
