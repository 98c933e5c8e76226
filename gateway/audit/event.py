"""`AuditEvent`: the record of one decision; its canonical form and keyed hash chain; argument redaction.

Tamper evidence: every writer (one gateway process) keeps its own chain in
each sink, named by the event's `chain`. An event's `record` is its canonical
JSON (sorted keys, no `hash`/`prev_hash`); its `hash` is HMAC-SHA256, under the
chain key, over `prev_hash` and that record. The key is a secret kept apart
from the sinks: whoever can write a sink but not read the key cannot seal an
edited event, so recomputing the chain after an edit does not hide it. Each
record names the key that sealed it by `key_id`, a digest that does not reveal
the key. A chain's first event is anchored to the last event the sink held
when the writer started (or to the genesis value), so several workers or
replicas can share a sink, and a deleted earlier chain is found because the
anchor that named it is gone. An edited, deleted, inserted or reordered event
breaks its chain at that point, which `verify_chain` reports. (Cutting the
newest events off the end of a sink cannot be told from an idle gateway by any
hash chain; ship the sink elsewhere to protect the tail.)
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

GENESIS = "0" * 64  # prev_hash of the first event in a sink


def _reset_ids() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4)))


_ID_PREFIX = ""
_ID_COUNTER = itertools.count()
_reset_ids()
os.register_at_fork(after_in_child=_reset_ids)


def new_id() -> str:
    """A unique id of 32 hex digits: 64 random bits per process, then a counter. As unique as uuid4 across
    processes and replicas, at a fraction of its cost (it is made for every event)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


@dataclass(slots=True)
class AuditEvent:
    """One request (or one message of a batch, or one server request) as the audit trail records it."""

    result: str
    reason: str
    operation: str = ""
    id: str = field(default_factory=new_id)
    timestamp: float = field(default_factory=lambda: round(time.time(), 6))
    connection_id: str | None = None
    request_id: str | None = None
    user_id: str | None = None
    client_id: str | None = None
    resource_accessed: str | None = None
    tool_executed: str | None = None
    prompt: str | None = None
    approval_required: bool = False
    approval_granted: bool | None = None
    approval_id: str | None = None  # the approval this call needed (gateway.approvals)
    approver: str | None = None  # who decided it
    roles: tuple[str, ...] = ()
    policy_version: str | None = None  # the policy in force: a digest of its file
    rule: str | None = None  # the rule or check that decided (a decision's reason, kept when `reason` says more)
    would_deny: str | None = None  # allowed under mode audit_only: the rule that would have refused it
    security_level: str | None = None
    upstream: str | None = None
    upstream_process: int | None = None  # the pid of the stdio upstream process that served it
    status: int | None = None
    duration_ms: float | None = None
    source_ip: str | None = None
    protocol_version: str | None = None
    http_method: str | None = None
    arguments: str | None = None
    chain: str = ""  # the writer whose hash chain this event is in
    key_id: str = ""  # the chain key that sealed this event (`ChainKey.id`), set when it is sealed

    def to_dict(self) -> dict[str, Any]:
        # Field by field: dataclasses.asdict deep-copies, which costs more than the rest of a denial.
        data = {name: getattr(self, name) for name in COLUMNS}
        data["roles"] = list(self.roles)
        return data


COLUMNS: tuple[str, ...] = tuple(AuditEvent.__dataclass_fields__)


def record_bytes(event: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an event: what its hash covers and what a sink stores."""
    return orjson.dumps({k: v for k, v in event.items() if k not in ("hash", "prev_hash")},
                        option=orjson.OPT_SORT_KEYS)


KEY_BYTES = 32  # a chain key is at least this many random bytes
_KEY_ID_LABEL = b"mcp-gateway audit chain key id\n"  # keeps key_id apart from any other digest of the key


class ChainKey:
    """The secret that seals a chain: HMAC-SHA256 over `prev_hash` and the record.

    Build it once per process: the key is prepared here, and each `seal` copies that prepared state instead
    of starting from the key again. `id` names the key in every record it seals without revealing it (the
    first 16 hex digits of SHA-256 over a fixed label and the key).
    """

    __slots__ = ("_mac", "id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < KEY_BYTES:
            raise ValueError(f"a chain key needs at least {KEY_BYTES} bytes, not {len(secret)}")
        self.id = hashlib.sha256(_KEY_ID_LABEL + secret).hexdigest()[:16]
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return f"ChainKey(id={self.id!r})"

    def seal(self, prev_hash: str, record: bytes) -> str:
        """The `hash` of an event whose canonical record is `record` and whose predecessor is `prev_hash`."""
        mac = self._mac.copy()
        mac.update(prev_hash.encode() + b"\n" + record)
        return mac.hexdigest()


@dataclass(frozen=True, slots=True)
class Sealed:
    """An event ready for one sink: its canonical record and its place in that sink's chain."""

    event: AuditEvent
    record: bytes
    prev_hash: str
    hash: str


def seal(events: Iterable[AuditEvent], prev_hash: str, key: ChainKey) -> list[Sealed]:
    """Chain `events` after `prev_hash` under `key`; each event is marked with the key that sealed it."""
    out = []
    for event in events:
        event.key_id = key.id
        record = record_bytes(event.to_dict())
        digest = key.seal(prev_hash, record)
        out.append(Sealed(event, record, prev_hash, digest))
        prev_hash = digest
    return out


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What `verify_chain` found: how many events were checked, and the first broken link if any."""

    count: int
    broken_at: int | None = None  # position (1-based) of the first bad event
    event_id: str | None = None
    why: str | None = None

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify_chain(rows: Iterator[tuple[bytes, str, str, Mapping[str, Any] | None]], key: ChainKey) -> ChainReport:
    """Check (record, prev_hash, hash, columns) rows in stored order against `key`; `columns` are the queryable
    copies, if any. Every event must have been sealed with `key`: one that names no key or another key cannot be
    vouched for, whatever its hash says."""
    tails: dict[str, str] = {}  # chain -> hash of its latest event
    seen: set[str] = {GENESIS}
    count = 0
    for record, prev_hash, digest, columns in rows:
        count += 1
        try:
            event = orjson.loads(record)
        except orjson.JSONDecodeError:
            return ChainReport(count, count, None, "record is not JSON")
        if not isinstance(event, dict):
            return ChainReport(count, count, None, "record is not an object")
        event_id, chain = event.get("id"), str(event.get("chain", ""))
        expected = tails.get(chain)
        if expected is None and prev_hash not in seen:
            return ChainReport(count, count, event_id, "a chain starts from an event that is not there "
                               "(earlier events were deleted)")
        if expected is not None and prev_hash != expected:
            return ChainReport(count, count, event_id, "prev_hash does not name the event before it "
                               "(an event was deleted, inserted or moved)")
        key_id = event.get("key_id")
        if not key_id:
            return ChainReport(count, count, event_id, "sealed without a chain key (written before keyed "
                               "chains, or forged): it cannot be verified")
        if key_id != key.id:
            return ChainReport(count, count, event_id, f"sealed with key {key_id}, this key is {key.id}")
        if not hmac.compare_digest(key.seal(prev_hash, record).encode(), str(digest).encode()):
            return ChainReport(count, count, event_id, "hash does not match the record under this key "
                               "(the event was edited, or its hash recomputed without the key)")
        if record_bytes(event) != record:
            return ChainReport(count, count, event_id, "record is not in canonical form")
        if columns is not None:
            for name, value in columns.items():
                if _column(event.get(name)) != _column(value):
                    return ChainReport(count, count, event_id, f"column {name} differs from the sealed record")
        tails[chain] = digest
        seen.add(digest)
    return ChainReport(count)


def _column(value: Any) -> Any:
    """Values as a sink's columns store them (roles joined, booleans as 0/1), for comparison."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return int(value)
    return value


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
        return text.encode()[:max_bytes].decode(errors="ignore") + "…[truncated]"
    return text
