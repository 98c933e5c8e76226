"""The Prometheus metric catalogue, in one place.

Every metric the gateway exports is declared here, on a registry owned by one
gateway instance (several gateways in one process, as in tests, never clash).
Label values are bounded: methods outside the MCP catalogue are `other`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.mcp import SERVER_REQUEST_METHODS

_KNOWN_METHODS = frozenset({
    "initialize", "server/discover", "ping", "tools/list", "tools/call", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "subscriptions/listen", "prompts/list", "prompts/get", "completion/complete", "logging/setLevel",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel", "notification", "response", "GET", "DELETE",
    *SERVER_REQUEST_METHODS,
})

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def method_label(method: str) -> str:
    return method if method in _KNOWN_METHODS else "other"


class Metrics:
    """The gateway's metrics, on their own registry."""

    def __init__(self) -> None:
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
        self.audit_queue_depth = Gauge(
            "mcp_gateway_audit_queue_depth", "Audit events waiting to be written.", registry=self.registry,
        )
        self.audit_refused = Counter(
            "mcp_gateway_audit_refused_total", "Requests refused because the audit queue was full.",
            registry=self.registry,
        )

        self.policy_reloads = Counter(
            "mcp_gateway_policy_reloads_total", "Policy reloads, by outcome (ok, invalid).",
            ["outcome"], registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
