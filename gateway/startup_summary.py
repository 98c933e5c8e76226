"""The start-up summary: one log line, as a gateway starts serving, saying what it runs with, and no secret.

Owns what that line says (`startup_fields`): the version; where it listens; each upstream by name, kind
(http, stdio, or in-process: the app the middleware wraps) and path, with an HTTP upstream's URL; the policy's
file, version, engine and mode; the audit sinks and what their failure does; how callers authenticate; the
sessions backend; the number of rate-limit rules; whether tracing is on. A URL is shown without its user info
(a DSN's password), query or fragment (`url_redaction.redact_url`). Header values, client secrets and their hashes, key
material, and a stdio upstream's command and environment (either may hold a key) are never shown.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

from gateway.url_redaction import redact_url

if TYPE_CHECKING:
    from gateway.config import AuditSink, Config, Upstream
    from gateway.policy import Policy


def startup_fields(config: Config, policy: Policy, listen: str | None) -> dict[str, object]:
    """The line's fields, in order; `listen` is None when another app's server runs the gateway."""
    audit, sessions = config.audit, config.sessions
    return {
        "version": _version(),
        "listen": listen,
        "upstreams": [_upstream(u) for u in config.upstreams],
        "policy_file": policy.source,
        "policy_version": policy.version,
        "policy_engine": "yaml" if policy.engine is None else policy.engine.language,
        "policy_mode": policy.mode,
        "audit_sinks": [_sink(s) for s in audit.sinks],
        "audit_on_sink_failure": audit.on_sink_failure,
        "audit_durability": audit.durability,
        "auth": _auth(config),
        "sessions": f"{sessions.backend} {redact_url(sessions.url)}" if sessions.url else sessions.backend,
        "rate_limits": len(config.rate_limits),
        "tracing": "on" if config.tracing.enabled else "off",
    }


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _version() -> str:
    try:
        return importlib.metadata.version("mcp-security-gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _upstream(upstream: Upstream) -> str:
    if upstream.url is not None:
        return f"{upstream.name} http {upstream.path} -> {redact_url(upstream.url)}"
    if upstream.command is not None:
        return f"{upstream.name} stdio {upstream.path}"
    return f"{upstream.name} in-process {upstream.path}"


def _sink(sink: AuditSink) -> str:
    if sink.type == "postgres":
        return f"postgres {redact_url(sink.dsn or '')} table {sink.table}"
    return f"{sink.type} {sink.path}"


def _auth(config: Config) -> list[str]:
    """How a caller may prove who they are: the gateway's own tokens always; an external issuer's JWTs,
    introspection and the anonymous role when configured."""
    auth = config.auth
    modes = ["gateway-issued"]
    if auth.jwt is not None:
        modes.append(f"jwt {redact_url(auth.jwt.issuer)}")
    if auth.introspection is not None:
        modes.append(f"introspection {redact_url(auth.introspection.url)}")
    if auth.anonymous_role is not None:
        modes.append(f"anonymous as {auth.anonymous_role}")
    return modes
