"""Traces: what the request path tells the trace of one request, and the trace of a request nobody traces.

Owns the interface the stages call (`RequestTrace`) and its no-op, `NO_TRACE`, which every `Exchange`
carries while tracing is off: each of its methods returns at once and allocates nothing, so an untraced
request pays a few empty calls (measured in `bench/bench_http.py` B9). `open_tracing` is the one place that
loads OpenTelemetry (`gateway.tracing_otel`), and only when `tracing.enabled` is set: a gateway that does not
trace never imports the SDK or the exporter.

The request path, as the stages tell it:

    middleware   trace = tracing.request(scope)        the request starts (span `mcp.request`, kind SERVER)
                 with trace.span("authenticate"): ...  each stage timed as a child span
                 with trace.span("decide"): ...
    forwarding   carrier = trace.upstream(ex)          child `upstream` (kind CLIENT) starts; the W3C context
                 ... forward, with carrier's headers    to send upstream ({} when off: forward as received)
                 trace.upstream_done(status, error)
    recording    with trace.span("audit"): ...         the audit event queued
                 trace.answered(ex, status, ...)       attributes set; the trace ends with its last span
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.config_tracing import Tracing
    from gateway.errors import GatewayRefusal
    from gateway.exchange import Exchange
    from gateway.tracing_otel import OtelTracing

_NO_SPAN: AbstractContextManager[None] = nullcontext()  # stateless: one for every untraced stage
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})


class RequestTrace:
    """The trace of one request, as the stages report to it. This base traces nothing (`NO_TRACE`);
    `tracing_otel.SpanTrace` records spans."""

    __slots__ = ()

    def span(self, name: str) -> AbstractContextManager[None]:
        """A stage, timed as a child span `name` of the request's span."""
        return _NO_SPAN

    def upstream(self, ex: Exchange) -> Mapping[str, str]:
        """The forwarding hop starts: the W3C trace context (`traceparent`, `tracestate`) the upstream is sent
        in place of the client's, naming the hop's span as parent; empty when nothing is traced."""
        return _NO_CONTEXT

    def upstream_done(self, status: int, error: str | None) -> None:
        """The forwarding hop has ended, with the answer's status (and the upstream's failure, if any)."""

    def answered(self, ex: Exchange, status: int, *, upstream_error: str | None = None,
                 refusal: GatewayRefusal | None = None) -> None:
        """The request's outcome is recorded: `status`, and what refused it as a whole, if anything did."""


NO_TRACE = RequestTrace()


def open_tracing(config: Tracing) -> OtelTracing | None:
    """The tracer provider `config` asks for, exporting over OTLP/HTTP; None (and nothing imported) when off."""
    if not config.enabled:
        return None
    from gateway.tracing_otel import OtelTracing

    return OtelTracing(config)
