"""The approval gate: the request-path stage between the decision and forwarding, for calls a person must approve.

Owns, for each message the policy allowed with `Decision.approval` set: binding
the call (`model.call_binding`), finding or creating its approval in the store,
holding the request until a decision (mode `hold`, bounded by `timeout_s`, with
progress notifications when the client can take them, and no longer than the
client stays) or refusing it at once with the approval's id (mode `retry`),
letting an approved call pass exactly once, and turning every other outcome
into a refusal: the decision is replaced by a denial, and `Exchange.approvals`
says why, for the answer and the audit.

A held request was decided before it waited, perhaps for hours: before an
approved call is let through, the caller's token is checked again and the call
decided again under the policy and roles in force (`Recheck`); a token revoked,
a role withdrawn or a policy that now refuses refuses the call, and the approval
stays unused. A tool redefined while the call waited is another call: it needs
its own approval. The other messages of a held batch are decided again too.

Also owns what an approver's decision does (`decide`): who may decide, the
compare-and-swap that makes a decision final, its metrics and its own audit event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import orjson

from gateway import errors
from gateway.approvals.model import (
    MAX_ARGUMENTS_BYTES,
    Approval,
    approver_refusal,
    call_binding,
    canonical_arguments,
    decided,
    new_approval,
    next_step,
)
from gateway.approvals.stream import Departure
from gateway.audit.event import AuditEvent, redact_arguments
from gateway.audit.writer import AuditUnavailable

if TYPE_CHECKING:
    from gateway.approvals.store import ApprovalStore
    from gateway.audit.writer import AuditLog
    from gateway.config import Audit
    from gateway.exchange import Exchange
    from gateway.mcp import Operation
    from gateway.metrics import Metrics
    from gateway.policy.engine import Decision
    from gateway.types import ASGIReceive

Progress = Callable[[str], Awaitable[None]]  # tells a held client, in words, that its call is waiting
Recheck = Callable[["Operation"], Awaitable["Decision"]]  # authenticate again, decide `op` again, as of now
PROGRESS_EVERY_S = 5.0
Outcome = Literal["granted", "pending", "denied", "expired", "withdrawn", "too_many", "too_large"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gate concluded for one message: `granted` passes; the others are refused. `withdrawn`: the
    call was approved, but decided again after the wait it is refused (`decision` says why)."""

    approval: Approval | None  # None when none was made (too_many, too_large)
    outcome: Outcome
    held: bool = False
    decision: Decision | None = None


class ApprovalGate:
    def __init__(self, store: ApprovalStore, audit: AuditLog, metrics: Metrics, config: Audit,
                 definition_of: Callable[[str, str], str | None]) -> None:
        self.store = store
        self._audit = audit
        self._metrics = metrics
        self._config = config
        self._definition_of = definition_of  # (upstream, tool) -> the hash of its definition as last listed

    async def check(self, ex: Exchange, receive: ASGIReceive, recheck: Recheck,
                    progress: Progress | None = None) -> None:
        """Every message of `ex` that needs an approval: granted, or its decision replaced by a denial.

        `receive` is the client's (its body already read): a held call stops waiting when the client leaves,
        and its approval stays pending (a person may still decide it; the same call made again then passes).
        The messages of a batch wait side by side, so approvers see all of them at once."""
        asked = [(i, op, d) for i, (op, d) in enumerate(zip(ex.operations, ex.decisions, strict=True))
                 if op is not None and d is not None and d.allowed and d.approval is not None]
        indices = [i for i, _, _ in asked]
        gone = Departure(receive)
        try:
            async with asyncio.TaskGroup() as group:  # one failing (the store, the token) stops the others
                tasks = [group.create_task(self._one(ex, op, d, progress if len(ex.messages) == 1 else None,
                                                     gone, recheck)) for _, op, d in asked]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        finally:
            gone.stop_watching()
        decisions = list(ex.decisions)
        for index, task in zip(indices, tasks, strict=True):
            verdict = ex.approvals[index] = task.result()
            decision = decisions[index]
            assert decision is not None
            if verdict.decision is not None:
                decisions[index] = verdict.decision
            elif verdict.outcome != "granted":
                decisions[index] = replace(decision, allowed=False, outcome="denied",
                                           reason=f"approval:{verdict.outcome}")
        if any(task.result().held for task in tasks):  # the rest was decided before the wait: decide it again
            for index, op in enumerate(ex.operations):
                before = decisions[index]
                if op is None or before is None or not before.allowed or index in ex.approvals:
                    continue
                fresh = await recheck(op)
                decisions[index] = fresh if fresh.approval is None else replace(
                    fresh, allowed=False, outcome="denied", reason="approval:required_since_asked")
        ex.decisions = tuple(decisions)

    async def _one(self, ex: Exchange, op: Operation, decision: Decision, progress: Progress | None,
                   gone: Departure, recheck: Recheck) -> Verdict:
        assert ex.principal is not None and decision.approval is not None and op.name is not None
        spec, store, caller = decision.approval, self.store, ex.principal.identity
        arguments = canonical_arguments(op.arguments)
        if len(arguments) > MAX_ARGUMENTS_BYTES:
            return Verdict(None, "too_large")
        held, told_at, mine = False, 0.0, None
        while True:
            definition = self._definition_of(ex.upstream.name, op.name)  # a tool redefined meanwhile: another call
            call, arguments_hash = call_binding(caller, ex.upstream.name, op.name, op.arguments, definition)
            now = time.time()
            # a held request follows its own approval (another request for the call may have made another)
            found = await (store.get(mine.id) if mine is not None and mine.call == call else store.for_call(call))
            step = next_step(found, now)
            if step == "use":
                assert found is not None
                if held:
                    fresh = await recheck(op)
                    if not fresh.allowed or fresh.approval is None:
                        return Verdict(found, "withdrawn", held, fresh)
                    if fresh.approval.approvers != found.approvers or \
                            fresh.approval.allow_self_approval != found.allow_self_approval:
                        spec = fresh.approval  # approved by people the policy no longer names: ask anew
                        lapsed = replace(found, status="expired")
                        if await store.swap(found, lapsed):
                            self.record_decision(lapsed, now)
                        mine = None
                        continue
                used = replace(found, status="used")
                if await store.swap(found, used):  # exactly once: a racing request for the same call loses here
                    return Verdict(used, "granted", held)
                continue
            if step == "denied":
                assert found is not None
                return Verdict(found, "denied", held)
            if step == "expired":
                assert found is not None
                expired = replace(found, status="expired")
                if await store.swap(found, expired):
                    self.record_decision(expired, now)
                    return Verdict(expired, "expired", held)
                continue
            if step == "create":
                found = await store.create(new_approval(
                    spec, call=call, caller=caller, upstream=ex.upstream.name, tool=op.name,
                    arguments=arguments.decode(), arguments_hash=arguments_hash, definition=definition, now=now))
                if found is None:
                    return Verdict(None, "too_many", held)
            assert found is not None
            mine = found
            if spec.mode == "retry":
                return Verdict(found, "pending", held)
            if progress is not None and now - told_at >= PROGRESS_EVERY_S:
                told_at = now
                await progress(f"waiting for approval {found.id} of {op.name} (until "
                               f"{time.strftime('%H:%M:%S', time.gmtime(found.expires_at))} UTC)")
            wait = found.expires_at - time.time()
            if progress is not None:
                wait = min(wait, PROGRESS_EVERY_S)
            held = True
            if wait > 0 and await gone.before(store.changed(found, wait)):
                return Verdict(found, "pending", held)

    async def decide(self, approval_id: str, *, approve: bool, by: str, roles: tuple[str, ...],
                     reason: str) -> Approval:
        """An approver's decision, made final in the store and recorded; a GatewayRefusal (404 no such approval,
        403 not theirs to make, 409 decided meanwhile) if it may not be made."""
        found = await self.store.get(approval_id)
        if found is None:
            raise errors.GatewayRefusal(errors.NOT_FOUND, f"no approval {approval_id!r}",
                                        reason=f"approval:unknown:{approval_id}")
        now = time.time()
        why = approver_refusal(found, by, roles, now)
        if why is not None:
            raise errors.GatewayRefusal(errors.FORBIDDEN, why, reason=f"approval:refused:{approval_id}")
        settled = decided(found, approve=approve, by=by, reason=reason, now=now)
        if not await self.store.swap(found, settled):
            raise errors.GatewayRefusal(errors.CONFLICT, f"approval {approval_id} was decided meanwhile",
                                        reason=f"approval:conflict:{approval_id}")
        self.record_decision(settled, now)
        return settled

    def record_decision(self, approval: Approval, now: float) -> None:
        """Metrics and the audit event of a decision (or of an approval that ran out)."""
        outcome = {"approved": "approved", "denied": "denied"}.get(approval.status, "expired")
        self._metrics.approval_decisions.labels(outcome).inc()
        self._metrics.approval_seconds.observe(max(0.0, now - approval.created_at))
        event = decision_event(approval, outcome, self._config)
        with contextlib.suppress(AuditUnavailable):  # counted by the audit log
            self._audit.record(event)

    async def pending_count(self) -> int:
        now = time.time()
        return sum(a.status_at(now) == "pending" for a in await self.store.listing())


def decision_event(approval: Approval, outcome: str, config: Audit) -> AuditEvent:
    """The audit event of one approval decision: who decided (the actor; the caller, for an expiry) which call,
    and why. The arguments are redacted as in every other event."""
    _, subject, client = approval.caller
    note = f" note={approval.reason[:200]}" if approval.reason else ""
    return AuditEvent(
        result="allowed" if outcome == "approved" else "denied",
        reason=f"approval:{outcome} call_by={subject}" + (f" client={client}" if client else "") + note,
        operation=f"approvals/{outcome}",
        user_id=approval.decided_by or subject,
        client_id=None if approval.decided_by else client or None,
        upstream=approval.upstream,
        tool_executed=approval.tool,
        arguments=redact_arguments(orjson.loads(approval.arguments), config.redact_keys,
                                   config.max_arguments_bytes),
        approval_required=True,
        approval_granted=outcome == "approved",
        approval_id=approval.id,
        approver=approval.decided_by,
    )
