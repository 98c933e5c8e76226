"""The `tracing:` section of the config: OpenTelemetry traces of each request, exported over OTLP/HTTP.

Owns its keys, defaults and validation (`Tracing`); `gateway.config` holds it in `Config.tracing`, and
`gateway.tracing` acts on it. Off by default: then nothing of it runs on the request path.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from gateway.yamlfile import StrictModel


class Tracing(StrictModel):
    """A span per request (`mcp.request`) with children for authenticate, decide, upstream and audit, sent in
    batches to an OTLP/HTTP receiver (a collector, Jaeger, Tempo). Spans carry the method, the tool, prompt or
    resource, the decision and its rule: never arguments, tokens, header values or who the caller is."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # the receiver's full URL, path included
    service_name: str = Field("mcp-gateway", min_length=1)  # the resource's service.name
    # of the traces this gateway starts (a client's traceparent decides for the traces it started)
    sample_ratio: float = Field(1.0, ge=0, le=1)
    headers: dict[str, str] = Field(default_factory=dict)  # sent with each export, e.g. the receiver's API key

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL (OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces)")
        if "@" in parts.netloc:
            raise ValueError("must not carry credentials (user:password@); put them in tracing.headers")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"the value of {name} contains a line break or NUL")
        return value
