"""Traces: a span per request with a child per stage, the client's W3C trace context as parent and the
gateway's passed upstream, no argument, token or caller in any attribute, nothing at all while tracing is off,
and OTLP/HTTP export from `mcp-gateway serve` to a real receiver."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway import ConfigError, load_config
from tests.harness import ROOT, Deployment, ServerThread, build_server, deploy, free_port, wait_for_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern

SECRET_ARGUMENT = "s3cret-argument-value"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STAGES = ["authenticate", "decide", "upstream", "audit"]


@pytest.fixture(params=["proxy", "middleware"])
def traced(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Deployment, InMemorySpanExporter]]:
    """The demo server behind a gateway that traces every request into an in-memory exporter."""
    deployment = deploy(request.param, tmp_path, tracing={"enabled": True,
                                                          "endpoint": f"http://127.0.0.1:{free_port()}/v1/traces"})
    exporter = InMemorySpanExporter()
    assert deployment.runtime.tracing is not None
    deployment.runtime.tracing.install(exporter)
    yield deployment, exporter
    deployment.stop()


def requests_of(exporter: InMemorySpanExporter, method: str, count: int = 1) -> list[ReadableSpan]:
    """The `mcp.request` spans of `method`, once `count` of them have ended (a span ends as the hop returns,
    which may be just after the client has its answer)."""
    deadline = time.monotonic() + 10
    while True:
        found = [s for s in exporter.get_finished_spans()
                 if s.name == "mcp.request" and s.attributes is not None and s.attributes.get("mcp.method") == method]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, f"{len(found)} {method} request spans, expected {count}"
            return found
        time.sleep(0.01)


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> dict[str, ReadableSpan]:
    assert parent.context is not None
    found = [s for s in exporter.get_finished_spans() if s.parent is not None
             and s.parent.span_id == parent.context.span_id]
    assert len({s.name for s in found}) == len(found), [s.name for s in found]
    return {s.name: s for s in found}


def attribute_text(spans: Sequence[ReadableSpan]) -> str:
    """Every attribute of every span, names and values, as one text to search."""
    return json.dumps([[dict(s.attributes or {}), dict(s.resource.attributes)] for s in spans], default=str)


def sdk_client(deployment: Deployment, token: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(deployment.url, http_client=http), mode="auto")


def post(deployment: Deployment, params: dict[str, Any], *, meta: dict[str, str] | None = None,
         **headers: str) -> httpx.Response:
    """A 2026-07-28 tools/call, with `meta` added to its `_meta` and `headers` (`_` for `-`) to its headers."""
    routing, body = modern("tools/call", params)
    body["params"]["_meta"].update(meta or {})
    extra = {name.replace("_", "-"): value for name, value in headers.items()}
    return httpx.post(deployment.url, json=body, headers={
        **BASE_HEADERS, **routing, **extra, "Authorization": f"Bearer {deployment.token()}"})


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def upstream_trace_context(deployment: Deployment) -> tuple[str, str, dict[str, Any]]:
    """The traceparent and tracestate headers and the `_meta` of the last tools/call the upstream received."""
    seen = [r for r in deployment.recorder.requests if r.method == "POST" and b'"tools/call"' in r.body][-1]
    return seen.headers.get("traceparent", ""), seen.headers.get("tracestate", ""), \
        json.loads(seen.body)["params"].get("_meta", {})


async def test_a_call_is_one_request_span_with_a_child_per_stage_and_no_secret(
        traced: tuple[Deployment, InMemorySpanExporter]) -> None:
    deployment, exporter = traced
    token = deployment.token()
    async with sdk_client(deployment, token) as session:
        called = await session.call_tool("echo", {"text": SECRET_ARGUMENT})
    assert called.content[0].text == SECRET_ARGUMENT  # type: ignore[union-attr]
    [request] = requests_of(exporter, "tools/call")
    stages = children(exporter, request)
    assert sorted(stages) == sorted(STAGES)
    assert request.kind == SpanKind.SERVER and stages["upstream"].kind == SpanKind.CLIENT
    [event] = [e for e in deployment.audit_events() if e["operation"] == "tools/call"]
    assert request.attributes is not None
    assert {k: request.attributes.get(k) for k in ("mcp.method", "mcp.tool", "mcp.decision", "mcp.rule",
                                                   "mcp.upstream", "mcp.era", "http.response.status_code")} == {
        "mcp.method": "tools/call", "mcp.tool": "echo", "mcp.decision": "allowed", "mcp.rule": event["rule"],
        "mcp.upstream": "demo", "mcp.era": "modern", "http.response.status_code": 200}
    assert request.resource.attributes["service.name"] == "mcp-gateway"
    for stage in stages.values():  # inside the request's time
        assert request.start_time is not None and request.end_time is not None
        assert stage.start_time is not None and stage.end_time is not None
        assert request.start_time <= stage.start_time <= stage.end_time <= request.end_time
    everything = attribute_text(exporter.get_finished_spans())
    for secret in (SECRET_ARGUMENT, token, "upstream-secret", "alice"):  # argument, token, header, subject
        assert secret not in everything
    assert "enduser.id" not in everything
    # the upstream's parent is the gateway's hop: same trace, the `upstream` span's id
    traceparent, _, _ = upstream_trace_context(deployment)
    assert traceparent.split("-")[1:3] == list(hex_ids(stages["upstream"]))


async def test_a_denied_call_has_its_decision_and_rule_and_no_upstream_span(
        traced: tuple[Deployment, InMemorySpanExporter]) -> None:
    deployment, exporter = traced
    async with sdk_client(deployment, deployment.token()) as session:
        with pytest.raises(MCPError):
            await session.call_tool("delete_file", {"path": SECRET_ARGUMENT})
    [request] = requests_of(exporter, "tools/call")
    assert request.attributes is not None
    assert (request.attributes["mcp.tool"], request.attributes["mcp.decision"], request.attributes["mcp.rule"]) == (
        "delete_file", "denied", "no-grant:tool")
    assert sorted(children(exporter, request)) == ["audit", "authenticate", "decide"]
    assert SECRET_ARGUMENT not in attribute_text(exporter.get_finished_spans())


def test_a_request_refused_as_a_whole_is_traced_with_its_reason(
        traced: tuple[Deployment, InMemorySpanExporter]) -> None:
    deployment, exporter = traced
    routing, body = modern("tools/call", {"name": "echo", "arguments": {"text": SECRET_ARGUMENT}})
    refused = httpx.post(deployment.url, json=body, headers={**BASE_HEADERS, **routing})  # no token
    assert refused.status_code == 401
    [request] = requests_of(exporter, "POST")  # refused before its body was read
    assert request.attributes is not None
    assert (request.attributes["mcp.decision"], request.attributes["mcp.rule"],
            request.attributes["http.response.status_code"]) == ("auth_failed", "no_token", 401)
    stages = children(exporter, request)
    assert sorted(stages) == ["audit", "authenticate"]
    assert stages["authenticate"].attributes == {"error.type": "AuthFailed"}


@pytest.mark.parametrize("carrier", ["header", "_meta"])
def test_the_clients_trace_context_is_the_parent_and_the_upstream_gets_the_gateways(
        traced: tuple[Deployment, InMemorySpanExporter], carrier: str) -> None:
    deployment, exporter = traced
    context = {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}
    params = {"name": "echo", "arguments": {"text": "hi"}}
    answer = post(deployment, params, **context) if carrier == "header" else post(deployment, params, meta=context)
    assert answer.status_code == 200
    [request] = requests_of(exporter, "tools/call")
    assert request.parent is not None and request.parent.is_remote
    assert (f"{request.parent.trace_id:032x}", f"{request.parent.span_id:016x}") == (TRACE_ID, PARENT_ID)
    assert hex_ids(request)[0] == TRACE_ID
    hop = children(exporter, request)["upstream"]
    traceparent, tracestate, meta = upstream_trace_context(deployment)
    assert (traceparent.split("-")[1:3], tracestate) == ([TRACE_ID, hex_ids(hop)[1]], "vendor=opaque")
    if carrier == "_meta":  # where the client put it, the upstream finds the gateway's (the SDKs read _meta)
        assert (meta["traceparent"], meta["tracestate"]) == (traceparent, "vendor=opaque")
    else:
        assert "traceparent" not in meta


@pytest.mark.parametrize("where", ["header", "_meta"])
def test_a_malformed_traceparent_starts_a_new_trace_and_never_fails_the_call(
        traced: tuple[Deployment, InMemorySpanExporter], where: str) -> None:
    deployment, exporter = traced
    params = {"name": "echo", "arguments": {"text": "hi"}}
    bad = f"00-{TRACE_ID}-{PARENT_ID}-zz"
    answer = post(deployment, params, traceparent=bad) if where == "header" else \
        post(deployment, params, meta={"traceparent": bad})
    assert answer.status_code == 200
    [request] = requests_of(exporter, "tools/call")
    assert request.parent is None and hex_ids(request)[0] != TRACE_ID
    traceparent, _, _ = upstream_trace_context(deployment)
    assert traceparent.split("-")[1] == hex_ids(request)[0]


def test_sample_ratio_samples_the_traces_the_gateway_starts_and_a_client_decides_for_its_own(
        tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, tracing={"enabled": True, "sample_ratio": 0.0,
                                                    "endpoint": f"http://127.0.0.1:{free_port()}/v1/traces"})
    exporter = InMemorySpanExporter()
    assert deployment.runtime.tracing is not None
    deployment.runtime.tracing.install(exporter)
    try:
        params = {"name": "echo", "arguments": {"text": "hi"}}
        assert post(deployment, params).status_code == 200
        unsampled, _, _ = upstream_trace_context(deployment)
        assert int(unsampled.split("-")[3], 16) & 1 == 0  # the upstream is told the trace is not recorded
        assert post(deployment, params, traceparent=TRACEPARENT).status_code == 200  # the client's: sampled
        [request] = requests_of(exporter, "tools/call")
        assert hex_ids(request)[0] == TRACE_ID and sorted(children(exporter, request)) == sorted(STAGES)
        assert len(exporter.get_finished_spans()) == 1 + len(STAGES)
    finally:
        deployment.stop()


def test_with_tracing_off_nothing_is_traced_and_the_clients_context_passes_as_sent(gateway: Deployment) -> None:
    assert gateway.runtime.tracing is None
    meta = {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}
    answer = post(gateway, {"name": "echo", "arguments": {"text": "hi"}}, meta=meta, traceparent=TRACEPARENT)
    assert answer.status_code == 200
    traceparent, _, forwarded_meta = upstream_trace_context(gateway)
    assert traceparent == TRACEPARENT
    assert {k: forwarded_meta[k] for k in meta} == meta


def test_with_tracing_off_the_gateway_loads_nothing_of_the_opentelemetry_sdk(tmp_path: Path) -> None:
    # In a fresh interpreter: a call through the reverse proxy with tracing off (the default). The OpenTelemetry
    # API itself may be loaded by others (redis-py, the MCP SDK); the tracer, SDK and exporter must not be.
    script = f"""
import sys
from pathlib import Path
import httpx
from tests.harness import deploy
from tests.test_bad_input import BASE_HEADERS, modern
deployment = deploy("proxy", Path({str(tmp_path)!r}))
try:
    routing, body = modern("tools/call", {{"name": "echo", "arguments": {{"text": "hi"}}}})
    answer = httpx.post(deployment.url, json=body,
                        headers={{**BASE_HEADERS, **routing, "Authorization": f"Bearer {{deployment.token()}}"}})
    assert answer.status_code == 200, answer.text
    assert deployment.runtime.tracing is None
finally:
    deployment.stop()
print(sorted(m for m in sys.modules if m.startswith(("gateway.tracing_otel", "opentelemetry.sdk.trace",
                                                     "opentelemetry.exporter"))))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_tracing_is_off_by_default_and_a_bad_setting_is_named(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, "http://127.0.0.1:1/mcp")).tracing.enabled is False
    for setting, problem in [
        ({"endpoint": "grpc://127.0.0.1:4317"}, "tracing.endpoint: must be an http:// or https:// URL"),
        ({"endpoint": "http://user:pw@127.0.0.1:4318/v1/traces"}, "tracing.endpoint: must not carry"),
        ({"sample_ratio": 1.5}, "tracing.sample_ratio: Input should be less than or equal to 1"),
        ({"headers": {"bad name": "x"}}, "tracing.headers: 'bad name' is not a valid header name"),
        ({"exporter": "zipkin"}, "tracing.exporter: unknown key"),
    ]:
        with pytest.raises(ConfigError) as raised:
            load_config(write_config(tmp_path, "http://127.0.0.1:1/mcp", tracing={"enabled": True, **setting}))
        assert any(problem in line for line in raised.value.problems), (setting, raised.value.problems)


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback: every ExportTraceServiceRequest POSTed to /v1/traces, decoded."""

    def __init__(self) -> None:
        self.exports: list[tuple[ExportTraceServiceRequest, dict[str, str]]] = []
        super().__init__(("127.0.0.1", free_port()), _ReceiverHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def spans(self) -> list[tuple[str, str, Any]]:
        """(service.name, span name, span) of everything received."""
        out = []
        for export, _ in self.exports:
            for resource_spans in export.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                out += [(service, span.name, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return out


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.server.exports.append((export, {k.lower(): v for k, v in self.headers.items()}))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        return None


def test_serve_exports_its_spans_over_otlp_http_to_the_configured_receiver(tmp_path: Path) -> None:
    receiver = Receiver()
    upstream = ServerThread(build_server().streamable_http_app(stateless_http=True, json_response=True)).start()
    port = free_port()
    config = write_config(tmp_path, f"{upstream.url}/mcp", public_url=f"http://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port}, log_level="WARNING",
                          tracing={"enabled": True, "endpoint": receiver.endpoint, "service_name": "gateway-under-test",
                                   "headers": {"x-receiver-key": "k-1"}})
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        token = subprocess.run([sys.executable, "-m", "gateway.cli", "issue-token", "--config", str(config),
                                "--subject", "alice", "--scope", "mcp:tools"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout.strip()
        routing, body = modern("tools/call", {"name": "echo", "arguments": {"text": SECRET_ARGUMENT}})
        answer = httpx.post(f"http://127.0.0.1:{port}/mcp", json=body, headers={
            **BASE_HEADERS, **routing, "Authorization": f"Bearer {token}", "traceparent": TRACEPARENT})
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)  # a clean stop exports what is still queued
        _, errors = process.communicate(timeout=30)
        assert process.returncode in (0, -signal.SIGTERM), errors  # uvicorn raises the signal again once stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        upstream.stop()
        receiver.shutdown()
        receiver.server_close()
    spans = receiver.spans()
    assert {service for service, _, _ in spans} == {"gateway-under-test"}
    assert sorted(name for _, name, _ in spans) == sorted(["mcp.request", *STAGES])
    assert {span.trace_id.hex() for _, _, span in spans} == {TRACE_ID}
    assert all(headers.get("x-receiver-key") == "k-1" for _, headers in receiver.exports)
    assert SECRET_ARGUMENT.encode() not in b"".join(e.SerializeToString() for e, _ in receiver.exports)
    assert token.encode() not in b"".join(e.SerializeToString() for e, _ in receiver.exports)
