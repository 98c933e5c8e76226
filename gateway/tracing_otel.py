"""Traces with OpenTelemetry: the tracer provider and its OTLP/HTTP export, and the spans of one request.

Owns the provider `tracing:` configures (a batch processor sending to the OTLP/HTTP receiver at
`tracing.endpoint`, sampled `ParentBased(TraceIdRatioBased(sample_ratio))`, flushed and shut down when the
runtime closes), and `SpanTrace`, the `RequestTrace` of a traced request. Imported only by
`tracing.open_tracing`, when tracing is on. The provider is the gateway's own, never the process-wide one:
an app the gateway wraps keeps its OpenTelemetry setup, and the gateway's spans go where its config says.

One request's spans:

    mcp.request (SERVER)   parent: the client's W3C `traceparent` (+ `tracestate`) header, else the one in
    |                      `params._meta` of a single-message request (SEP-414); a malformed one is ignored
    |                      (a new trace). Attributes: mcp.method, mcp.tool | mcp.prompt | mcp.resource,
    |                      mcp.decision, mcp.rule, mcp.upstream, mcp.era, http.response.status_code, ...
    +- authenticate        (once more for a call let through after an approval's wait)
    +- decide
    +- upstream (CLIENT)   the forwarding hop; the upstream gets its context as `traceparent`
    +- audit               the audit event queued

Privacy: no argument, token, header value or identity of the caller (subject, client id) becomes an
attribute. A resource's URI does, in the normalised form it was decided in.

The request's span is made once its parent can be known (the `_meta` one is in the body, read after
authentication): when the hop starts, or when the outcome is recorded. Stages before that are timed as
they run and become spans with their own times. The request's span ends with the last of its outcome being
recorded and the hop ending, so that no child outlives it; a legacy GET stream's lasts as long as the stream.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.tracing import RequestTrace

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    from gateway.config_tracing import Tracing
    from gateway.errors import GatewayRefusal
    from gateway.exchange import Exchange
    from gateway.jsonrpc import Message
    from gateway.types import ASGIScope

Attributes = dict[str, str | int]

_SCOPE = "mcp-security-gateway"  # the instrumentation scope the gateway's spans are recorded under
_PROPAGATOR = TraceContextTextMapPropagator()


class OtelTracing:
    """The gateway's tracer provider (see the module docstring); `request(scope)` starts a request's trace."""

    def __init__(self, config: Tracing) -> None:
        self._config = config
        exporter = OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers))
        self._provider = self._new_provider(BatchSpanProcessor(exporter))
        self.tracer = self._provider.get_tracer(_SCOPE)

    def _new_provider(self, processor: SpanProcessor) -> TracerProvider:
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(self._config.sample_ratio)),
                                  resource=Resource.create({SERVICE_NAME: self._config.service_name}),
                                  shutdown_on_exit=False)  # the runtime shuts it down, flushing what is queued
        provider.add_span_processor(processor)
        return provider

    def install(self, exporter: SpanExporter) -> None:
        """From now on send each span to `exporter` as it ends, instead of the OTLP receiver (tests, bench)."""
        replaced = self._provider
        self._provider = self._new_provider(SimpleSpanProcessor(exporter))
        self.tracer = self._provider.get_tracer(_SCOPE)
        replaced.shutdown()

    async def close(self) -> None:
        """Export what is queued and stop (off the event loop: an export is a blocking HTTP request)."""
        await asyncio.to_thread(self._provider.shutdown)

    def request(self, scope: ASGIScope) -> SpanTrace:
        return SpanTrace(self, scope["headers"])

    def parent(self, headers: Sequence[tuple[bytes, bytes]], messages: Sequence[Message]) -> Context | None:
        """The client's trace context: from its headers (exactly one valid `traceparent`), else from
        `params._meta` of its one message; None (the current context: a new trace) when it sent none valid."""
        parents = [value for name, value in headers if name == b"traceparent"]
        if len(parents) == 1:
            states = [value.decode("latin-1") for name, value in headers if name == b"tracestate"]
            found = _extract(parents[0].decode("latin-1"), ",".join(states))
            if found is not None:
                return found
        params = messages[0].params if len(messages) == 1 else None
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("traceparent"), str):
            state = meta.get("tracestate")
            return _extract(meta["traceparent"], state if isinstance(state, str) else "")
        return None


def _extract(traceparent: str, tracestate: str) -> Context | None:
    carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
    context = _PROPAGATOR.extract(carrier)
    return context if get_current_span(context).get_span_context().is_valid else None


class SpanTrace(RequestTrace):
    """The spans of one traced request (see the module docstring)."""

    __slots__ = ("_answered", "_attributes", "_ex", "_headers", "_hop", "_owner", "_root", "_stages", "_start")

    def __init__(self, owner: OtelTracing, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self._owner = owner
        self._headers = headers
        self._start = time.time_ns()
        self._stages: list[tuple[str, int, int, str | None]] = []  # name, start, end, error type
        self._root: Span | None = None
        self._hop: Span | None = None
        self._ex: Exchange | None = None
        self._attributes: Attributes = {}
        self._answered = False

    def span(self, name: str) -> AbstractContextManager[None]:
        return _Stage(self._stages, name)

    def upstream(self, ex: Exchange) -> Mapping[str, str]:
        root = self._root_of(ex)
        if root.is_recording():
            self._hop = self._owner.tracer.start_span("upstream", set_span_in_context(root), SpanKind.CLIENT,
                                                      {"mcp.upstream": ex.upstream.name})
        carrier: dict[str, str] = {}  # a trace not sampled: the upstream is told so, under the request's span
        _PROPAGATOR.inject(carrier, set_span_in_context(self._hop or root))
        return carrier

    def upstream_done(self, status: int, error: str | None) -> None:
        hop, self._hop = self._hop, None
        if hop is None:
            return
        hop.set_attribute("http.response.status_code", status)
        if error is not None:
            hop.set_attribute("error.type", error)
        if error is not None or status >= 500:
            hop.set_status(Status(StatusCode.ERROR))
        hop.end()
        if self._answered:
            self._end()

    def answered(self, ex: Exchange, status: int, *, upstream_error: str | None = None,
                 refusal: GatewayRefusal | None = None) -> None:
        if self._answered:
            return
        self._ex, self._answered = ex, True
        self._attributes = _attributes(ex, status, upstream_error, refusal)
        if self._hop is None:
            self._end()

    def _root_of(self, ex: Exchange) -> Span:
        if self._root is None:
            self._root = self._owner.tracer.start_span(
                "mcp.request", self._owner.parent(self._headers, ex.messages), SpanKind.SERVER,
                start_time=self._start)
        return self._root

    def _end(self) -> None:
        assert self._ex is not None
        root = self._root_of(self._ex)
        if not root.is_recording():  # not sampled: nothing of it is kept
            return
        parent = set_span_in_context(root)
        for name, start, end, error in self._stages:
            stage = self._owner.tracer.start_span(name, parent, start_time=start)
            if error is not None:
                stage.set_attribute("error.type", error)
                stage.set_status(Status(StatusCode.ERROR))
            stage.end(end)
        self._stages.clear()
        root.set_attributes(self._attributes)
        if "error.type" in self._attributes or int(self._attributes["http.response.status_code"]) >= 500:
            root.set_status(Status(StatusCode.ERROR))
        root.end()


class _Stage:
    """One stage's times (and the type of what it raised), kept until the request's span exists."""

    __slots__ = ("_name", "_stages", "_start")

    def __init__(self, stages: list[tuple[str, int, int, str | None]], name: str) -> None:
        self._stages, self._name, self._start = stages, name, 0

    def __enter__(self) -> None:
        self._start = time.time_ns()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stages.append((self._name, self._start, time.time_ns(), None if kind is None else kind.__name__))


def _attributes(ex: Exchange, status: int, upstream_error: str | None, refusal: GatewayRefusal | None) -> Attributes:
    """What the request's span says about it: what was asked, of which upstream, and what was decided. Never
    arguments, tokens, header values or who asked."""
    out: Attributes = {"mcp.upstream": ex.upstream.name, "http.request.method": ex.http_method,
                       "http.response.status_code": status}
    if ex.era is not None:
        out["mcp.era"] = ex.era
    if len(ex.messages) == 1:
        out["mcp.method"] = ex.messages[0].method or "response"
    elif ex.messages:
        out["mcp.batch.size"] = len(ex.messages)
    else:  # a GET or DELETE, or a POST refused before its body was read
        out["mcp.method"] = ex.http_method
    decided = [(op, decision) for op, decision in zip(ex.operations, ex.decisions, strict=False)
               if op is not None and decision is not None]
    if len(ex.operations) == 1 and ex.operations[0] is not None:
        op = ex.operations[0]
        if op.kind == "tool_call" and op.name is not None:
            out["mcp.tool"] = op.name
        elif op.kind == "prompt_get" and op.name is not None:
            out["mcp.prompt"] = op.name
        uri = decided[0][1].uri if decided and decided[0][1].uri is not None else op.uri
        if uri is not None and op.kind != "completion":
            out["mcp.resource"] = uri
    if refusal is not None:
        out["mcp.decision"], out["mcp.rule"] = refusal.refusal.audit_result, refusal.reason
    elif decided:
        outcomes = {"allowed" if decision.allowed else decision.outcome for _, decision in decided}
        out["mcp.decision"] = outcomes.pop() if len(outcomes) == 1 else "mixed"
        if len(decided) == 1:
            out["mcp.rule"] = decided[0][1].reason
    if len(ex.approvals) == 1:
        out["mcp.approval"] = next(iter(ex.approvals.values())).outcome
    if upstream_error is not None:
        out["error.type"] = upstream_error
    return out
