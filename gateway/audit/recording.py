"""Recording: what happened to one request, as audit events and metric updates.

Owns the mapping from an outcome to what is recorded. The events are built by
pure functions: one event per message with its own decision and result
(`message_events`), one for a request refused as a whole (`refusal_event`), one
for each server->client request the gateway decided (`server_request_event`).
`Recorder` is the edge that stamps each event with the exchange (who, from
where, which upstream, how long), queues it on the audit log, updates the
request and decision metrics, writes the log line and tells the request's trace
its outcome (`tracing`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from gateway.audit.event import AuditEvent, redact_arguments
from gateway.audit.writer import AuditLog, AuditUnavailable
from gateway.metrics import Metrics, method_label
from gateway.ratelimit.gate import STORE_UNAVAILABLE

if TYPE_CHECKING:
    from gateway.config import Audit
    from gateway.errors import GatewayRefusal
    from gateway.exchange import Exchange
    from gateway.jsonrpc import JsonRpcId
    from gateway.mcp import Operation
    from gateway.policy.engine import Decision

log = logging.getLogger("gateway")


def message_events(ex: Exchange, status: int, upstream_error: str | None,
                   config: Audit) -> list[tuple[Operation, AuditEvent]]:
    """One event per message (or one for a GET/DELETE), with its own decision and what became of it."""
    events = []
    for index, (op, decision) in enumerate(zip(ex.operations, ex.decisions, strict=False)):
        if op is None or decision is None:
            continue
        verdict = ex.approvals.get(index)
        if not decision.allowed:
            result, reason = _refused(decision), decision.reason
        elif upstream_error is not None or status in (502, 504):
            result, reason = "upstream_error", f"upstream:{upstream_error or status}"
        elif status >= 500:
            result, reason = "error", f"status:{status}"
        else:
            result, reason = "allowed", decision.reason
        events.append((op, AuditEvent(
            result=result,
            reason=reason,
            operation=op.method,
            request_id=_id_text(op.request_id),
            resource_accessed=op.uri,
            tool_executed=op.name if op.kind == "tool_call" else None,
            prompt=op.name if op.kind == "prompt_get" else None,
            roles=decision.roles,
            policy_version=decision.policy_version,
            rule=decision.reason,
            would_deny=decision.would_deny or None,
            security_level=decision.required_level,
            status=status,
            arguments=redact_arguments(op.arguments, config.redact_keys, config.max_arguments_bytes),
            approval_required=verdict is not None,
            approval_granted=None if verdict is None else _GRANTED[verdict.outcome],
            approval_id=None if verdict is None or verdict.approval is None else verdict.approval.id,
            approver=None if verdict is None or verdict.approval is None else verdict.approval.decided_by,
        )))
    return events


# approval_granted by what became of the call (withdrawn: a person approved it, the policy then refused it)
_GRANTED = {"granted": True, "pending": None, "denied": False, "expired": False, "withdrawn": True,
            "too_many": None, "too_large": None}


def refusal_event(ex: Exchange, refusal: GatewayRefusal) -> AuditEvent:
    """The one event for a request refused as a whole, named by its one message (or its HTTP method)."""
    return AuditEvent(
        result=refusal.refusal.audit_result,
        reason=refusal.reason,
        operation=_method_of(ex),
        request_id=_id_text(ex.only_id),
        status=refusal.refusal.http_status,
    )


def server_request_event(op: Operation, decision: Decision) -> AuditEvent:
    """A request from the server to the client (sampling, elicitation, roots) is a decision too."""
    return AuditEvent(
        result="allowed" if decision.allowed else _refused(decision),
        reason=decision.reason,
        operation=op.method,
        request_id=_id_text(op.request_id),
        roles=decision.roles,
        policy_version=decision.policy_version,
        rule=decision.reason,
        would_deny=decision.would_deny or None,
    )


class Recorder:
    """Writes what the request path decided: audit events, metrics, a log line."""

    def __init__(self, audit: AuditLog, metrics: Metrics, config: Audit) -> None:
        self._audit = audit
        self._metrics = metrics
        self._config = config

    def exchange(self, ex: Exchange, status: int, upstream_error: str | None = None) -> None:
        """Every message of a request that reached the decision, once its answer's status is known."""
        with ex.trace.span("audit"):
            for op, decision in zip(ex.operations, ex.decisions, strict=False):
                if op is not None and decision is not None:
                    self._decided(ex, op, decision)
            for op, event in message_events(ex, status, upstream_error, self._config):
                self.record(ex, event, "notification" if op.kind == "notification" else op.method)
        ex.trace.answered(ex, status, upstream_error=upstream_error)

    def refused(self, ex: Exchange, refusal: GatewayRefusal) -> None:
        with ex.trace.span("audit"):
            event = refusal_event(ex, refusal)
            self.record(ex, event, event.operation)
        ex.trace.answered(ex, refusal.refusal.http_status, refusal=refusal)

    def server_request(self, ex: Exchange, op: Operation, decision: Decision) -> None:
        self._decided(ex, op, decision)
        self.record(ex, server_request_event(op, decision), op.method)

    async def written(self, ex: Exchange) -> None:
        """Before the client can see `ex`'s answer end: under `audit.durability: written`, its events on every
        sink. Raises AuditUnavailable (counted, logged) if they are not within `write_timeout_s`, or if one of
        them could not even be queued; the caller withholds the answer."""
        try:
            if ex.unrecorded and self._config.durability == "written":
                raise AuditUnavailable("an event of this request could not be queued (the audit buffer is full)")
            await self._audit.written()
        except AuditUnavailable as unavailable:
            self._metrics.requests_refused_for_audit.inc()
            log.error("answer withheld: %s", unavailable, extra={"upstream": ex.upstream.name})
            raise

    def _decided(self, ex: Exchange, op: Operation, decision: Decision) -> None:
        """The decisions metric: by result and rule (and, under mode audit_only, the refusal it would have been),
        and by tool when the policy names the tool."""
        metrics, named = self._metrics, ex.policy.named_tools if ex.policy is not None else frozenset()
        tool = (op.name if op.name in named else "other") if op.kind == "tool_call" else ""
        if decision.would_deny:
            metrics.child(metrics.decisions, "would_deny", decision.would_deny, tool).inc()
        metrics.child(metrics.decisions, "allowed" if decision.allowed else decision.outcome, decision.reason,
                      tool).inc()

    def record(self, ex: Exchange, event: AuditEvent, method: str) -> None:
        elapsed = time.perf_counter() - ex.started
        principal = ex.principal
        event.duration_ms = round(elapsed * 1000, 3)
        event.connection_id = ex.session_id or ex.connection_id
        event.user_id = principal.subject if principal else None
        event.client_id = principal.client_id if principal else None
        event.upstream = ex.upstream.name
        event.upstream_process = ex.state.upstream_process
        event.source_ip = ex.source_ip
        event.protocol_version = ex.protocol_version
        event.http_method = ex.http_method
        metrics = self._metrics
        metrics.child(metrics.requests, ex.upstream.name, method_label(method), event.result).inc()
        metrics.child(metrics.request_seconds, ex.upstream.name).observe(elapsed)
        try:
            self._audit.record(event)
        except AuditUnavailable:
            ex.unrecorded = True
            log.error("audit buffer full: event %s could not be queued", event.id,
                      extra={"audit_id": event.id, "result": event.result, "reason": event.reason})
        if log.isEnabledFor(logging.INFO):
            log.info("request", extra=request_fields(event))


def request_fields(event: AuditEvent) -> dict[str, object]:
    """The request line's fields (`logs`): always these, in this order, then the reason when it says more than the
    rule (a refusal's, an upstream's failure) and what a rule in audit_only mode would have refused."""
    fields: dict[str, object] = {
        "audit_id": event.id, "user": event.user_id, "client": event.client_id, "method": event.operation,
        "target": event.tool_executed or event.resource_accessed or event.prompt, "result": event.result,
        "rule": event.rule, "status": event.status, "duration_ms": event.duration_ms, "upstream": event.upstream,
        "source_ip": event.source_ip,
    }
    if event.reason != event.rule:
        fields["reason"] = event.reason
    if event.would_deny:
        fields["would_deny"] = event.would_deny
    return fields


def _refused(decision: Decision) -> str:
    """The `result` of a refused message: rate_limited, error (what could not be counted), or denied."""
    if decision.reason == STORE_UNAVAILABLE:
        return "error"  # as every other refusal for a shared store out of reach
    return "rate_limited" if decision.outcome == "rate_limited" else "denied"


def _method_of(ex: Exchange) -> str:
    if len(ex.messages) == 1:
        return ex.messages[0].method or "response"
    return ex.http_method


def _id_text(value: JsonRpcId) -> str | None:
    return None if value is None else str(value)
