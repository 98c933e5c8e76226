"""The Prometheus metric catalogue, in one place.

Every metric the gateway exports is declared here, on a registry owned by one
gateway instance (several gateways in one process, as in tests, never clash).
With PROMETHEUS_MULTIPROC_DIR set (several uvicorn workers), /metrics adds up
every worker's values. Label values are bounded: methods outside the MCP
catalogue are `other`; a tool name is a label only when the policy names it.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from gateway.mcp import LABELLED_METHODS

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def method_label(method: str) -> str:
    return method if method in LABELLED_METHODS else "other"


class Metrics:
    """The gateway's metrics, on their own registry."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mcp_gateway_requests_total", "Messages handled, by upstream, method and audit result.",
            ["upstream", "method", "result"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "mcp_gateway_request_duration_seconds", "Time from request to the end of the response.",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.upstream_errors = Counter(
            "mcp_gateway_upstream_errors_total", "Failures talking to an upstream, by kind.",
            ["upstream", "kind"], registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "mcp_gateway_upstream_duration_seconds", "Time the upstream took to start answering.",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.gateway_seconds = Histogram(
            "mcp_gateway_overhead_duration_seconds", "Time the gateway itself added (total minus upstream).",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.auth_attempts = Counter(
            "mcp_gateway_auth_attempts_total", "Authentication attempts, by source and outcome.",
            ["source", "outcome"], registry=self.registry,
        )
        self.token_cache = Counter(
            "mcp_gateway_token_cache_total", "Verified-token cache lookups, by hit or miss.",
            ["outcome"], registry=self.registry,
        )
        self.decisions = Counter(
            "mcp_gateway_decisions_total", "Policy decisions, by result, the rule that decided, and tool "
            "(a tool name appears only when the policy names it; others are 'other').",
            ["result", "reason", "tool"], registry=self.registry,
        )
        self.audit_written = Counter(
            "mcp_gateway_audit_events_written_total", "Audit events written, by sink.", ["sink"],
            registry=self.registry,
        )
        self.audit_queue_depth = Gauge(
            "mcp_gateway_audit_queue_depth", "Audit events waiting to be written.", registry=self.registry,
        )
        self.audit_buffered = Gauge(
            "mcp_gateway_audit_buffered_events", "Audit events held in memory while a sink is failing.",
            registry=self.registry,
        )
        self.audit_refused = Counter(
            "mcp_gateway_audit_refused_total", "Events that could not be queued (requests refused instead).",
            registry=self.registry,
        )
        self.audit_sink_errors = Counter(
            "mcp_gateway_audit_sink_errors_total", "Failed writes to an audit sink, by sink.", ["sink"],
            registry=self.registry,
        )
        self.requests_refused_for_audit = Counter(
            "mcp_gateway_requests_refused_audit_total",
            "Requests refused with 503, or answers withheld, because the audit trail could not take or write them.",
            registry=self.registry,
        )
        self.active_sessions = Gauge(
            "mcp_gateway_active_sessions", "Legacy-era sessions bound to a principal and not ended.",
            registry=self.registry, multiprocess_mode="livemax",
        )
        self.stdio_processes = Gauge(
            "mcp_gateway_stdio_processes", "Processes of stdio upstreams running now.", ["upstream"],
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.upstream_token_fetches = Counter(
            "mcp_gateway_upstream_token_fetches_total", "Requests to an upstream's token endpoint (upstreams[].oauth), "
            "by outcome.", ["upstream", "outcome"], registry=self.registry,
        )
        self.stdio_spawns = Counter(
            "mcp_gateway_stdio_spawns_total", "Processes of stdio upstreams started.", ["upstream"],
            registry=self.registry,
        )
        self.stdio_exits = Counter(
            "mcp_gateway_stdio_exits_total", "Processes of stdio upstreams ended, by why (idle, exited, protocol, "
            "timeout, session_end, shutdown).", ["upstream", "reason"], registry=self.registry,
        )
        self.session_refusals = Counter(
            "mcp_gateway_session_refusals_total", "Requests refused for their session id (hijack, unknown).",
            ["kind"], registry=self.registry,
        )
        self.revocations = Counter(
            "mcp_gateway_revocations_total", "Tokens revoked (POST /oauth/revoke, /admin/sessions).",
            registry=self.registry,
        )
        self.introspections = Counter(
            "mcp_gateway_introspections_total", "RFC 7662 introspection calls, by outcome (active, inactive, error).",
            ["outcome"], registry=self.registry,
        )
        self.jwks_refreshes = Counter(
            "mcp_gateway_jwks_refreshes_total", "Fetches of the external issuer's JWKS, by outcome.",
            ["outcome"], registry=self.registry,
        )
        self.approvals_pending = Gauge(
            "mcp_gateway_approvals_pending", "Tool calls waiting for a person's approval (read from the state store).",
            registry=self.registry, multiprocess_mode="livemax",
        )
        self.rate_limited = Counter(
            "mcp_gateway_rate_limited_total", "Messages refused by a rate limit, by the rule (rate_limits[].id).",
            ["rule"], registry=self.registry,
        )
        self.rate_limit_store_failures = Counter(
            "mcp_gateway_rate_limit_store_failures_total", "Rate limits that could not be counted (the store "
            "unreachable), by what was done: closed (refused) or open (let through).", ["policy"],
            registry=self.registry,
        )
        self.approval_decisions = Counter(
            "mcp_gateway_approval_decisions_total", "Approval requests decided, by outcome (approved, denied, "
            "expired).", ["outcome"], registry=self.registry,
        )
        self.approval_seconds = Histogram(
            "mcp_gateway_approval_decision_seconds", "Time from an approval request to its decision or expiry.",
            registry=self.registry, buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 86400),
        )
        self.tool_definition_changes = Counter(
            "mcp_gateway_tool_definition_changes_total", "Tool definitions listed that differ from their pin "
            "(changed) or have none (new), by upstream; each definition counted once per process.",
            ["upstream", "kind"], registry=self.registry,
        )
        self.role_changes = Counter(
            "mcp_gateway_role_assignment_changes_total", "Runtime role assignments made or withdrawn, by action.",
            ["action"], registry=self.registry,
        )
        self.policy_reloads = Counter(
            "mcp_gateway_policy_reloads_total", "Policy reloads, by outcome (ok, invalid).",
            ["outcome"], registry=self.registry,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus_client takes a lock and builds a key on every
        `labels()` call, and the request path makes several per request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # uvicorn --workers N: every worker writes its values to files; the scrape adds them up.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
