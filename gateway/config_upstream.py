"""The `upstreams:` entries of the config: one MCP server behind the gateway each, over HTTP or stdio.

Owns each upstream's keys, defaults and validation (`Upstream`), and the bounds on a stdio upstream's
processes (`StdioProcesses`); `gateway.config` holds them in `Config.upstreams`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.config_auth import UpstreamOAuth, http_url
from gateway.yamlfile import StrictModel


class StdioProcesses(StrictModel):
    """How the processes of a stdio upstream are bounded (each limit is per process)."""

    max_processes: int = Field(50, gt=0)  # past it, a new caller gets a 503 JSON-RPC error, never another fork
    idle_timeout_s: float = Field(300, gt=0)  # a process unused this long is stopped
    memory_mb: int | None = Field(512, gt=0)  # RLIMIT_DATA
    cpu_s: int | None = Field(600, gt=0)  # RLIMIT_CPU
    open_files: int | None = Field(256, gt=0)  # RLIMIT_NOFILE
    user: str | None = None  # run as this user and group: only when the gateway runs as root
    group: str | None = None


class UpstreamTls(StrictModel):
    """How the gateway checks an https upstream, and proves itself to one that asks (mutual TLS)."""

    ca_file: Path | None = None  # PEM: trust these CAs instead of the system's bundle (an internal CA)
    client_cert: Path | None = None  # PEM: the certificate to present, with its key
    client_key: Path | None = None
    verify: bool = True  # false: any certificate, any name (a test upstream only; logged at every start)

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self


class Upstream(StrictModel):
    """One MCP server behind the gateway, served at `{public_url}{path}`: over HTTP (`url`), or a program the
    gateway runs and speaks to over stdio (`command`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(pattern=r"^/[^?#]*$")
    url: str | None = None  # `serve` needs url or command; neither when the gateway wraps an in-process app
    headers: dict[str, str] = Field(default_factory=dict)
    # Send the upstream who is calling: a 60 s JWT signed with the gateway's key (aud = the upstream's URL)
    # in X-MCP-Identity, verifiable with the gateway's JWKS. A client's own X-MCP-Identity never passes.
    identity_header: bool = False
    oauth: UpstreamOAuth | None = None  # the gateway obtains the upstream's own token (config_auth.UpstreamOAuth)
    # stdio: the argv (never a shell); the ONLY variables the child gets besides PATH, LANG, HOME and TMPDIR
    command: tuple[str, ...] | None = Field(None, min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    # per_principal: each caller its own process; per_session: each legacy session its own (2026-07-28
    # requests, which have no session, one per caller); shared: one for everyone (the operator's choice)
    isolation: Literal["per_principal", "per_session", "shared"] = "per_principal"
    process: StdioProcesses = StdioProcesses()
    # Tool definitions (`pinning`): warn pins each on first use and reports one that changes; enforce hides a tool
    # whose definition no operator approved and refuses its calls; off compares nothing.
    pinning: Literal["off", "warn", "enforce"] = "warn"
    pins_file: Path | None = None  # {tools: {NAME: HASH}} the operator commits: its pins win over the store's
    tls: UpstreamTls | None = None  # an https url's CA, client certificate (mutual TLS), verification

    @model_validator(mode="after")
    def _tls_for_https(self) -> Upstream:
        if self.tls is not None and not (self.url or "").startswith("https://"):
            raise ValueError("tls: only for an https:// url")
        return self

    @model_validator(mode="after")
    def _one_transport(self) -> Upstream:
        if self.url is not None and self.command is not None:
            raise ValueError("give url (an HTTP upstream) or command (a stdio upstream), not both")
        stdio_only = [k for k in ("env", "cwd", "isolation", "process") if k in self.model_fields_set]
        if self.command is None and stdio_only:
            raise ValueError(f"{', '.join(stdio_only)}: only for a stdio upstream (command)")
        http_only = [k for k in ("headers", "identity_header", "oauth") if k in self.model_fields_set]
        if self.command is not None and http_only:
            raise ValueError(f"{', '.join(http_only)}: only for an HTTP upstream (url); a stdio upstream's "
                             "credentials go in env")
        if self.oauth is not None and any(k.lower() == "authorization" for k in self.headers):
            raise ValueError("oauth and an Authorization header: the gateway sends the token oauth obtains")
        return self

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("path")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/") or "/"

    @field_validator("headers")
    @classmethod
    def _no_hop_headers(cls, value: dict[str, str]) -> dict[str, str]:
        forbidden = {"host", "content-length", "transfer-encoding", "connection"}
        bad = sorted(name for name in value if name.lower() in forbidden)
        if bad:
            raise ValueError(f"the gateway sets {', '.join(bad)} itself")
        for name, text in value.items():  # they are written into the upstream request as they are
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"the value of {name} contains a line break or NUL")
        return value
