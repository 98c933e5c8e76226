"""An approval request for one tool call, and every decision about it. Pure: values in, values out (the clock
is passed in).

Owns `Approval` (the record a person decides on), the binding that ties it to
exactly one call (`call_binding`: the caller's identity, the upstream, the
tool, a canonical hash of the arguments, the hash of the tool's definition as
last listed), who may decide it (`approver_refusal`), what a decision makes of
it (`decided`), and what the gate does with what it finds (`next_step`).

    status     means                                      until
    pending    asked, undecided                           created_at + timeout_s, then expired
    approved   the call may pass once                     decided_at + timeout_s, then expired
    denied     the same call is refused as denied         decided_at + timeout_s, then forgotten
    used       the approved call passed: a new approval is needed for another
    expired    nobody decided in time, or the approval went unused in time

The record keeps the call's whole arguments (canonical JSON, at most
`MAX_ARGUMENTS_BYTES`): an approver decides on exactly what will be sent, never
on the audit log's redacted, truncated rendering. A call whose arguments are
larger is not put before anyone: it is refused.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import orjson

from gateway.policy.model import ApprovalSpec

Identity = tuple[str, str, str]  # issuer, subject, client
Status = Literal["pending", "approved", "denied", "used", "expired"]
Step = Literal["use", "wait", "create", "denied", "expired"]
MAX_ARGUMENTS_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Approval:
    """One call waiting for (or having had) a person's decision. `id` is a random 128-bit nonce: knowing one
    approval's id tells nothing of another's."""

    id: str
    call: str  # the binding (`call_binding`): the same call, and only it, has the same value
    caller: Identity
    upstream: str
    tool: str
    arguments: str  # the whole arguments, canonical JSON: what the approver reads, and what will be sent
    arguments_hash: str
    definition_hash: str | None  # the tool's definition when the call was made (None: never listed)
    mode: Literal["hold", "retry"]
    approvers: tuple[str, ...]
    allow_self_approval: bool
    timeout_s: float
    created_at: float
    expires_at: float
    status: Status = "pending"
    decided_by: str | None = None
    decided_at: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> bytes:
        """Always the same bytes for the same record: stores compare them to change a record only if unchanged."""
        return orjson.dumps(self.as_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Approval:
        """The record `to_json` wrote; fields it does not know (a newer gateway's, mid-upgrade) are left out."""
        raw = {k: v for k, v in orjson.loads(data).items() if k in _FIELDS}
        raw["caller"] = tuple(raw["caller"])
        raw["approvers"] = tuple(raw["approvers"])
        return cls(**raw)

    def live(self, now: float) -> bool:
        return now < self.expires_at

    def status_at(self, now: float) -> Status:
        """The status as of `now`: a pending or approved approval past its expiry has expired."""
        return "expired" if self.status in ("pending", "approved") and not self.live(now) else self.status


_FIELDS = frozenset(Approval.__dataclass_fields__)


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def canonical_arguments(arguments: Any) -> bytes:
    """A call's arguments as canonical JSON (sorted keys, as decoded): what is hashed and shown."""
    return orjson.dumps(arguments if arguments is not None else {}, option=orjson.OPT_SORT_KEYS)


def call_binding(caller: Identity, upstream: str, tool: str, arguments: Any,
                 definition_hash: str | None) -> tuple[str, str]:
    """(call, arguments_hash): the arguments hashed in canonical JSON, and the whole binding hashed over them.
    Another caller, upstream, tool, argument set or tool definition is another call."""
    arguments_hash = hashlib.sha256(canonical_arguments(arguments)).hexdigest()
    return _digest([*caller, upstream, tool, arguments_hash, definition_hash]), arguments_hash


def definition_hash(tool: Any) -> str:
    """The hash of a tool's whole definition as `tools/list` gave it (canonical JSON)."""
    return _digest(tool)


def new_approval(spec: ApprovalSpec, *, call: str, caller: Identity, upstream: str, tool: str,
                 arguments: str, arguments_hash: str, definition: str | None, now: float) -> Approval:
    return Approval(
        id=secrets.token_hex(16), call=call, caller=caller, upstream=upstream, tool=tool, arguments=arguments,
        arguments_hash=arguments_hash, definition_hash=definition, mode=spec.mode, approvers=spec.approvers,
        allow_self_approval=spec.allow_self_approval, timeout_s=spec.timeout_s, created_at=now,
        expires_at=now + spec.timeout_s)


def next_step(found: Approval | None, now: float) -> Step:
    """What the gate does with the latest approval of a call: pass it once (`use`), wait for the decision or
    refuse until it comes (`wait`), answer its outcome (`denied`, `expired`), or ask anew (`create`)."""
    if found is None or found.status in ("used", "expired"):
        return "create"
    if found.status == "denied":
        return "denied" if found.live(now) else "create"
    if found.status_at(now) == "expired":
        return "expired"
    return "use" if found.status == "approved" else "wait"


def approver_refusal(approval: Approval, subject: str, roles: tuple[str, ...], now: float) -> str | None:
    """Why `subject` (holding `roles`) may not decide `approval`; None if they may."""
    status = approval.status_at(now)
    if status != "pending":
        return f"approval {approval.id} is {status}, not pending"
    if subject == approval.caller[1] and not approval.allow_self_approval:
        return "an approver cannot approve their own call (the policy does not allow self-approval)"
    held = set(roles)
    for approver in approval.approvers:
        kind, _, name = approver.partition(":")
        if (kind == "role" and name in held) or (kind == "subject" and name == subject):
            return None
    return f"only {', '.join(approval.approvers)} may decide this approval"


def decided(approval: Approval, *, approve: bool, by: str, reason: str, now: float) -> Approval:
    """The approval once `by` decided it: an approved call has `timeout_s` from now to pass once."""
    return replace(approval, status="approved" if approve else "denied", decided_by=by, decided_at=now,
                   reason=reason, expires_at=now + approval.timeout_s)
