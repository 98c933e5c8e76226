"""`AuditEvent`: the record of one decision, and how tools/call arguments are redacted into it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

RESULTS = ("allowed", "denied", "auth_failed", "invalid_request", "upstream_error", "error")


@dataclass(slots=True)
class AuditEvent:
    """One request (or one message of a batch) as the audit trail records it."""

    result: str
    reason: str
    operation: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timestamp: float = field(default_factory=time.time)
    connection_id: str | None = None
    request_id: str | None = None
    user_id: str | None = None
    client_id: str | None = None
    resource_accessed: str | None = None
    tool_executed: str | None = None
    prompt: str | None = None
    roles: tuple[str, ...] = ()
    policy_version: str | None = None
    upstream: str | None = None
    status: int | None = None
    duration_ms: float | None = None
    source_ip: str | None = None
    protocol_version: str | None = None
    http_method: str | None = None
    arguments: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REDACTED = "[REDACTED]"


def redact_arguments(arguments: Mapping[str, Any] | None, keys: Iterable[str], max_bytes: int) -> str | None:
    """Arguments as JSON with every value under a key containing one of `keys` replaced; capped at `max_bytes`."""
    if arguments is None:
        return None
    needles = tuple(k.lower() for k in keys)

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: REDACTED if any(n in str(k).lower() for n in needles) else scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    text = orjson.dumps(scrub(arguments)).decode()
    if len(text.encode()) > max_bytes:
        return text.encode()[: max_bytes].decode(errors="ignore") + "…[truncated]"
    return text
