"""The approval gate: the request-path stage between the decision and forwarding, for calls a person must approve.

Owns, for each message the policy allowed with `Decision.approval` set: binding
the call (`model.call_binding`), finding or creating its approval in the store,
holding the request until a decision (mode `hold`, bounded by `timeout_s`, with
progress notifications when the client can take them) or refusing it at once
with the approval's id (mode `retry`), letting an approved call pass exactly
once, and turning every other outcome into a refusal: the decision is replaced
by a denial, and `Exchange.approvals` says why, for the answer and the audit.

Also owns what an approver's decision does (`decide`): who may decide, the
compare-and-swap that makes a decision final, its metrics and its own audit event.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from gateway.approvals.model import Approval, approver_refusal, call_binding, decided, new_approval, next_step
from gateway.audit.event import AuditEvent, redact_arguments
from gateway.audit.writer import AuditUnavailable
from gateway.exceptions import GatewayError

if TYPE_CHECKING:
    from gateway.approvals.store import ApprovalStore
    from gateway.audit.writer import AuditLog
    from gateway.config import Audit
    from gateway.exchange import Exchange
    from gateway.mcp import Operation
    from gateway.metrics import Metrics
    from gateway.policy.engine import Decision

Progress = Callable[[str], Awaitable[None]]  # tells a held client, in words, that its call is waiting
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gate concluded for one message: `granted` passes; the others are refused."""

    approval: Approval
    outcome: Literal["granted", "pending", "denied", "expired"]


class ApprovalRefused(GatewayError):
    """An approver's decision was refused: `status` 404 (no such approval) or 403 (not theirs to make)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status, self.why = status, why


class ApprovalGate:
    def __init__(self, store: ApprovalStore, audit: AuditLog, metrics: Metrics, config: Audit,
                 definition_of: Callable[[str, str], str | None]) -> None:
        self.store = store
        self._audit = audit
        self._metrics = metrics
        self._config = config
        self._definition_of = definition_of  # (upstream, tool) -> the hash of its definition as last listed

    async def check(self, ex: Exchange, progress: Progress | None = None) -> None:
        """Every message of `ex` that needs an approval: granted, or its decision replaced by a denial."""
        decisions = list(ex.decisions)
        for index, (op, decision) in enumerate(zip(ex.operations, decisions, strict=True)):
            if op is None or decision is None or not decision.allowed or decision.approval is None:
                continue
            verdict = await self._one(ex, op, decision, progress if len(ex.messages) == 1 else None)
            ex.approvals[index] = verdict
            if verdict.outcome != "granted":
                decisions[index] = replace(decision, allowed=False, outcome="denied",
                                           reason=f"approval:{verdict.outcome}")
        ex.decisions = tuple(decisions)

    async def _one(self, ex: Exchange, op: Operation, decision: Decision, progress: Progress | None) -> Verdict:
        assert ex.principal is not None and decision.approval is not None and op.name is not None
        spec, store = decision.approval, self.store
        definition = self._definition_of(ex.upstream.name, op.name)
        call, arguments_hash = call_binding(ex.principal.identity, ex.upstream.name, op.name, op.arguments,
                                            definition)
        told_at = 0.0
        while True:
            now = time.time()
            found = await store.for_call(call)
            step = next_step(found, now)
            if step == "use":
                assert found is not None
                used = replace(found, status="used")
                if await store.swap(found, used):  # exactly once: a racing request for the same call loses here
                    return Verdict(used, "granted")
                continue
            if step == "denied":
                assert found is not None
                return Verdict(found, "denied")
            if step == "expired":
                assert found is not None
                expired = replace(found, status="expired")
                if await store.swap(found, expired):
                    self.record_decision(expired, now)
                    return Verdict(expired, "expired")
                continue
            if step == "create":
                found = new_approval(
                    spec, call=call, caller=ex.principal.identity, upstream=ex.upstream.name, tool=op.name,
                    arguments=redact_arguments(op.arguments, self._config.redact_keys,
                                               self._config.max_arguments_bytes),
                    arguments_hash=arguments_hash, definition=definition, now=now)
                await store.put(found)
            assert found is not None
            if spec.mode == "retry":
                return Verdict(found, "pending")
            if progress is not None and now - told_at >= PROGRESS_EVERY_S:
                told_at = now
                await progress(f"waiting for approval {found.id} of {op.name} (until "
                               f"{time.strftime('%H:%M:%S', time.gmtime(found.expires_at))} UTC)")
            wait = found.expires_at - time.time()
            if progress is not None:
                wait = min(wait, PROGRESS_EVERY_S)
            if wait > 0:
                await store.changed(found, wait)

    async def decide(self, approval_id: str, *, approve: bool, by: str, roles: tuple[str, ...],
                     reason: str) -> Approval:
        """An approver's decision, made final in the store and recorded; ApprovalRefused if it may not be made."""
        found = await self.store.get(approval_id)
        if found is None:
            raise ApprovalRefused(404, f"no approval {approval_id!r}")
        now = time.time()
        why = approver_refusal(found, by, roles, now)
        if why is not None:
            raise ApprovalRefused(403, why)
        settled = decided(found, approve=approve, by=by, reason=reason, now=now)
        if not await self.store.swap(found, settled):
            raise ApprovalRefused(403, f"approval {approval_id} was decided meanwhile")
        self.record_decision(settled, now)
        return settled

    def record_decision(self, approval: Approval, now: float) -> None:
        """Metrics and the audit event of a decision (or of an approval that ran out)."""
        outcome = {"approved": "approved", "denied": "denied"}.get(approval.status, "expired")
        self._metrics.approval_decisions.labels(outcome).inc()
        self._metrics.approval_seconds.observe(max(0.0, now - approval.created_at))
        event = decision_event(approval, outcome)
        with contextlib.suppress(AuditUnavailable):  # counted by the audit log
            self._audit.record(event)

    async def pending_count(self) -> int:
        now = time.time()
        return sum(a.status == "pending" and a.live(now) for a in await self.store.listing())


def decision_event(approval: Approval, outcome: str) -> AuditEvent:
    """The audit event of one approval decision: who decided which call, and why."""
    _, subject, client = approval.caller
    return AuditEvent(
        result="allowed" if outcome == "approved" else "denied",
        reason=f"approval:{outcome} call_by={subject}" + (f" note={approval.reason[:200]}" if approval.reason else ""),
        operation=f"approvals/{outcome}",
        user_id=approval.decided_by or subject,
        client_id=client or None,
        upstream=approval.upstream,
        tool_executed=approval.tool,
        arguments=approval.arguments,
        approval_required=True,
        approval_granted=outcome == "approved",
        approval_id=approval.id,
        approver=approval.decided_by,
    )
