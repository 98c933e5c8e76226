"""The gateway's configuration: one YAML file, validated into frozen pydantic models.

Owns: every config key, its default and its validation; `${VAR}` expansion
from the environment; `load_config(path) -> Config`, which raises
`ConfigError` listing every problem as `FILE: key.path: why` (the policy file
it names included). Nothing else in the package reads YAML or the environment
for settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.policy import Policy, PolicyError, load_policy
from gateway.principal import check_claim_types
from gateway.yamlfile import ProblemsError, StrictModel, YamlFileError, format_validation, read_yaml


class ConfigError(ProblemsError):
    """The config (or a file it names) is invalid. `problems` holds one `FILE: key.path: why` line each."""


class Listen(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Limits(StrictModel):
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    # A client must deliver a request's whole body within this long, or gets a 408 (a slow body holds no worker,
    # but it would hold its memory and a task for ever).
    client_body_timeout_s: float = Field(30.0, gt=0)
    # ... and its request head (request line and headers) within this long of its first byte, or is disconnected
    # (`serve` only: in middleware mode the host application's server reads heads).
    client_header_timeout_s: float = Field(10.0, gt=0)
    max_json_depth: int = Field(64, gt=0, le=1000)
    upstream_timeout_s: float = Field(300.0, gt=0)
    upstream_connect_timeout_s: float = Field(10.0, gt=0)
    # Open connections per upstream, streams included (a legacy GET stream holds one while it lasts). A request
    # finding all of them busy waits up to upstream_connect_timeout_s, then gets a 502.
    upstream_max_connections: int = Field(256, gt=0)
    # Answers the gateway must read whole to filter (lists; 2026-07-28 results that may ask for input),
    # and each SSE event: anything larger is refused rather than passed on unfiltered.
    max_inspected_bytes: int = Field(16 * 1024 * 1024, gt=0)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    # The upstream client would send user:password@ in its Host header, and URLs are logged as written.
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); put them in upstreams[].headers "
                         "(e.g. Authorization: Basic ...), or auth.introspection.client_id and client_secret")
    return value


class Upstream(StrictModel):
    """One MCP server behind the gateway, served at `{public_url}{path}`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(pattern=r"^/[^?#]*$")
    url: str | None = None  # required by `serve`; absent when the gateway wraps an in-process app
    headers: dict[str, str] = Field(default_factory=dict)
    # Send the upstream who is calling: a 60 s JWT signed with the gateway's key (aud = the upstream's URL)
    # in X-MCP-Identity, verifiable with the gateway's JWKS. A client's own X-MCP-Identity never passes.
    identity_header: bool = False

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

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


class RegisteredClient(StrictModel):
    """A machine client that may get tokens from POST /oauth/token (client_credentials)."""

    client_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    secret_hash: str = Field(pattern=r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")
    scopes: tuple[str, ...] = ()
    claims: dict[str, Any] = Field(default_factory=dict)
    security_level: Literal["low", "standard", "high", "critical"] = "standard"  # the most this client reaches

    @field_validator("claims")
    @classmethod
    def _claims_of_their_types(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_claim_types(value)  # a token the gateway signs with them would be refused by the gateway itself
        return value


class GatewayClients(StrictModel):
    """Tokens the gateway signs itself: for registered clients (POST /oauth/token) and `mcp-gateway issue-token`."""

    signing_key_file: Path = Path("gateway-signing-key.pem")
    token_ttl_s: int = Field(900, gt=0)
    registered: tuple[RegisteredClient, ...] = ()
    max_failures: int = Field(5, gt=0)  # failed secrets per client or source before answers slow down


_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class ExternalJwt(StrictModel):
    """Bearer JWTs from an external authorization server, verified with its JWKS."""

    issuer: str
    jwks_uri: str | None = None  # default: discovered from the issuer's RFC 8414 / OIDC metadata
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: int = Field(30, ge=0, le=300)
    jwks_cache_s: float = Field(3600, gt=0)  # how long fetched keys are trusted before a routine refresh
    # JWKS fetches on demand (unknown kid, stale or no keys): a burst of `refresh_burst`, then one per interval;
    # a kid a fetch did not contain is refused without another fetch for one interval. 0: no limit.
    min_refresh_interval_s: float = Field(30, ge=0)
    refresh_burst: int = Field(3, ge=1, le=100)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [alg for alg in value if alg not in _ASYMMETRIC]
        if bad:
            raise ValueError(f"{', '.join(bad)} not allowed: only asymmetric algorithms ({', '.join(_ASYMMETRIC)})")
        if not value:
            raise ValueError("at least one algorithm")
        return value


class Introspection(StrictModel):
    """RFC 7662 token introspection, for opaque tokens (and JWTs no configured key can verify)."""

    url: str
    client_id: str
    client_secret: str  # write ${INTROSPECTION_SECRET}: the value comes from the environment
    issuer: str | None = None  # when set, an answer naming another `iss` is refused
    cache_s: float = Field(60, ge=0)  # an answer is reused for at most this long (and never past the token's exp)
    timeout_s: float = Field(5, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value)


class Auth(StrictModel):
    anonymous_role: str | None = None
    # The protected resource's URL, which tokens' `aud` must name. Default: public_url + the upstream's path.
    # Only with one upstream: each upstream is its own resource.
    resource: str | None = None
    clients: GatewayClients = GatewayClients()
    jwt: ExternalJwt | None = None
    introspection: Introspection | None = None
    # Authorization servers advertised in the RFC 9728 metadata; default: jwt.issuer, and the gateway itself.
    authorization_servers: tuple[str, ...] | None = None
    # Scopes advertised in the RFC 9728 metadata; default: every scope the policy binds.
    scopes_supported: tuple[str, ...] | None = None
    # A broader scope implies narrower ones (transitively): {mcp:admin: [mcp:tools, mcp:read]}.
    scope_hierarchy: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("resource")
    @classmethod
    def _resource_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an absolute http:// or https:// URL without query or fragment")
        return value.rstrip("/")


class AuditSink(StrictModel):
    type: Literal["sqlite", "jsonl", "postgres"]
    path: Path | None = None  # sqlite, jsonl
    dsn: str | None = None  # postgres, e.g. postgresql://127.0.0.1/test
    table: str = Field("audit_events", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")  # postgres
    rotate_mb: float | None = Field(None, gt=0)  # jsonl

    @model_validator(mode="after")
    def _where(self) -> AuditSink:
        if self.type == "postgres" and not self.dsn:
            raise ValueError("a postgres sink needs dsn")
        if self.type != "postgres" and self.path is None:
            raise ValueError(f"a {self.type} sink needs path")
        return self


class Audit(StrictModel):
    sinks: tuple[AuditSink, ...] = Field((AuditSink(type="sqlite", path=Path("audit.db")),), min_length=1)
    # fail_closed: refuse requests (503) while a sink cannot write; buffer: keep up to max_buffer events in
    # memory and retry, refusing only when that is full. Neither drops an event without counting it.
    on_sink_failure: Literal["fail_closed", "buffer"] = "fail_closed"
    max_buffer: int = Field(100_000, gt=0)
    batch_size: int = Field(500, gt=0)
    redact_keys: tuple[str, ...] = ("password", "secret", "token", "key", "authorization")
    max_arguments_bytes: int = Field(4096, gt=0)
    read_scope: str = "audit:read"  # the scope GET /admin/audit requires
    # The secret that seals the hash chain (HMAC-SHA256), created (0600) when absent. Tamper evidence holds
    # only against those who cannot read it: keep it away from whoever can write the sinks.
    chain_key_file: Path = Path("audit-chain.key")


class Sessions(StrictModel):
    """Where legacy-era session bindings (session id -> principal), token sessions and revocations live."""

    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None  # redis://127.0.0.1:6379/0
    ttl_s: float = Field(3600, gt=0)  # a binding unused this long ends
    max_sessions: int = Field(100_000, gt=0)  # memory backend
    admin_scope: str = "sessions:admin"  # the scope /admin/sessions (and `mcp-gateway sessions`) requires

    @model_validator(mode="after")
    def _redis_url(self) -> Sessions:
        if self.backend == "redis" and not (self.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("the redis backend needs url: redis://host:port/db")
        return self


class Config(StrictModel):
    """The whole gateway configuration. `policy` is the compiled policy the `policy:` key names."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    listen: Listen = Listen()
    public_url: str = "http://127.0.0.1:8080"
    allowed_origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    upstreams: tuple[Upstream, ...] = Field(min_length=1)
    auth: Auth = Auth()
    policy: Policy
    audit: Audit = Audit()
    sessions: Sessions = Sessions()
    policy_reload_interval_s: float = Field(2.0, ge=0)  # how often the policy file is checked; 0: SIGHUP only
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    source: Path | None = None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            parts = urlsplit(origin)
            if origin != "null" and (not parts.scheme or not parts.netloc or parts.path not in ("", "/")):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        return tuple(origin.rstrip("/") for origin in value)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        seen_paths: dict[str, str] = {}
        for upstream in self.upstreams:
            if upstream.path in seen_paths:
                raise ValueError(f"upstreams {seen_paths[upstream.path]!r} and {upstream.name!r} share path")
            seen_paths[upstream.path] = upstream.name
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        if self.auth.resource is not None and len(self.upstreams) > 1:
            raise ValueError("auth.resource names one protected resource: with several upstreams, each is "
                             "public_url + its path")
        role = self.auth.anonymous_role
        if role is not None and role not in self.policy.roles:
            raise ValueError(f"auth.anonymous_role {role!r} is not a role in the policy")
        return self

    @property
    def public_origin(self) -> str:
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}".lower()

    @property
    def public_path_prefix(self) -> str:
        """The path part of public_url (a gateway served under a sub-path)."""
        return urlsplit(self.public_url).path.rstrip("/")

    def resource_url(self, upstream: Upstream) -> str:
        """The protected resource's URL for an upstream: what tokens' `aud` must name."""
        return self.auth.resource or f"{self.public_url}{upstream.path}"


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, env: Mapping[str, str], file: Path, where: str, problems: list[str]) -> Any:
    """Replace `${VAR}` (or `${VAR:-default}`) in every string; an unset VAR without default is a problem."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{file}: {where}: environment variable {name} is not set")
            return ""

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, file, f"{where}.{k}" if where else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, file, f"{where}.{i}", problems) for i, v in enumerate(value)]
    return value


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the config file and the policy it names. Raises ConfigError with every problem."""
    path = Path(path)
    try:
        raw, _ = read_yaml(path)
    except YamlFileError as exc:
        raise ConfigError(exc.problems) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: (top level): must be a mapping of keys"])
    problems: list[str] = []
    data = _expand(raw, os.environ if env is None else env, path, "", problems)
    policy_ref = data.get("policy")
    if policy_ref is None:
        problems.append(f"{path}: policy: required (the policy file to enforce)")
    elif not isinstance(policy_ref, str):
        problems.append(f"{path}: policy: must be a path to a policy file")
    else:
        policy_path = Path(policy_ref)
        if not policy_path.is_absolute():
            policy_path = path.parent / policy_path
        try:
            data["policy"] = load_policy(policy_path)
        except PolicyError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    _resolve_relative_paths(data, path.parent)
    data["source"] = path
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(str(path), exc)) from None


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    """Paths in the config (given or defaulted) are relative to the config file, not to the working directory."""
    auth = data.setdefault("auth", {})
    clients = auth.setdefault("clients", {}) if isinstance(auth, dict) else None
    if isinstance(clients, dict):
        key_file = clients.get("signing_key_file", str(GatewayClients.model_fields["signing_key_file"].default))
        if isinstance(key_file, str):
            clients["signing_key_file"] = str(base / key_file)
    if data.get("audit") is None:
        data["audit"] = {}
    audit = data["audit"]
    if isinstance(audit, dict):
        audit.setdefault("sinks", [{"type": "sqlite", "path": "audit.db"}])
        if isinstance(audit["sinks"], list):
            for sink in audit["sinks"]:
                if isinstance(sink, dict) and isinstance(sink.get("path"), str):
                    sink["path"] = str(base / sink["path"])
        key_file = audit.get("chain_key_file", str(Audit.model_fields["chain_key_file"].default))
        if isinstance(key_file, str):
            audit["chain_key_file"] = str(base / key_file)
