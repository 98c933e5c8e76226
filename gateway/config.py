"""The gateway's configuration: one YAML file, validated into frozen pydantic models.

Owns: every config key, its default and its validation; `${VAR}` expansion
from the environment; `load_config(path) -> Config`, which raises
`ConfigError` listing every problem as `FILE: key.path: why` (the policy file
and the pins files it names included). Nothing else in the package reads YAML
or the environment for settings.

An upstream's credentials (`upstreams[].headers`, `.env`, `.oauth.client_secret`) are needed only by what talks
to the upstream: a command that does not (`audit query`, `issue-token`, ...) loads the config with
`upstream_secrets=False`, and a variable they name may then be unset. Such a value is left empty and the
config remembers why: `Config.require_upstream_secrets()`, called by whatever would send it, refuses it. A
variable unset anywhere else (an upstream's `oauth.token_url`, say) is a problem of the config for every command.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from gateway.config_auth import Auth, GatewayClients
from gateway.config_tracing import Tracing
from gateway.config_upstream import StdioProcesses as StdioProcesses
from gateway.config_upstream import Upstream as Upstream
from gateway.policy import Policy, PolicyError
from gateway.policy.source import load_policy_source
from gateway.ratelimit.rules import RateLimit
from gateway.yamlfile import ProblemsError, StrictModel, YamlFileError, format_validation, read_yaml


class ConfigError(ProblemsError):
    """The config (or a file it names) is invalid. `problems` holds one `FILE: key.path: why` line each."""


def check_port(value: int) -> int:
    """`value` if it is a TCP port a server can listen on (`listen.port`, `serve --port`)."""
    if not 1 <= value <= 65535:  # the OS would take 99999 modulo 65536 and bind another port without a word
        raise ValueError(f"{value} is not a port number (1 to 65535)")
    return value


class Listen(StrictModel):
    host: str = "127.0.0.1"
    port: int = 8080

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        return check_port(value)


class ListenerTls(StrictModel):
    """TLS on serve's listeners: PEM certificate (chain) and key, loaded again when either file changes."""

    cert_file: Path
    key_file: Path
    reload_interval_s: float = Field(5.0, gt=0)  # how often the two files are looked at


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
    # written: an answer's last byte waits until its events are on every sink, so a process killed at any
    # moment has lost no event of an answer a client received whole; past write_timeout_s the answer is cut off
    # (a refusal becomes the audit-unavailable one). queued: it waits only for the event to be queued.
    durability: Literal["written", "queued"] = "written"
    write_timeout_s: float = Field(3.0, gt=0)  # under the 5 s many HTTP clients give up at: they see why
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


class RoleAssignmentsStore(StrictModel):
    """Where roles granted at run time (`mcp-gateway roles assign`) live: every replica must share one store.
    Default: a SQLite file, or the sessions' Redis when `sessions.backend` is redis."""

    backend: Literal["sqlite", "postgres", "redis"] = "sqlite"
    path: Path = Path("state.db")  # sqlite (created 0600); in data_dir unless absolute
    dsn: str | None = None  # postgres, e.g. postgresql://127.0.0.1/test
    # postgres; `<table>_generation` beside it: short enough that both are PostgreSQL identifiers (63 bytes)
    table: str = Field("role_assignments", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,51}$")
    url: str | None = None  # redis://127.0.0.1:6379/0

    @model_validator(mode="after")
    def _where(self) -> RoleAssignmentsStore:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("the postgres backend needs dsn")
        if self.backend == "redis" and not (self.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("the redis backend needs url: redis://host:port/db")
        owners = {"path": "sqlite", "dsn": "postgres", "table": "postgres", "url": "redis"}
        foreign = [k for k in sorted(self.model_fields_set)
                   if owners.get(k, self.backend) != self.backend and getattr(self, k) is not None]
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not a setting of the {self.backend} backend")
        return self


class Admin(StrictModel):
    """The admin API and console: the scope each part needs (the audit and sessions endpoints keep theirs, in
    audit.read_scope and sessions.admin_scope) and how long a console sign-in lasts."""

    scope: str = "gateway:admin"  # opens a console session (the one-time URL `mcp-gateway admin-login` prints)
    approvals_scope: str = "approvals:decide"  # list approvals, and decide them (as an approver the policy names)
    roles_scope: str = "roles:admin"  # assign and revoke roles at runtime
    tools_scope: str = "tools:admin"  # list tool pins, approve tool definitions
    login_ttl_s: int = Field(300, gt=0, le=3600)  # the one-time URL is good for this long, and once
    console_session_ttl_s: int = Field(1800, gt=0, le=43200)


class Config(StrictModel):
    """The whole gateway configuration. `policy` is the compiled policy the `policy:` key names."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    listen: Listen = Listen()
    # serve: /metrics, /admin and the console on a listener of their own (and off the public one)
    admin_listen: Listen | None = None
    metrics_token_file: Path | None = None  # /metrics answers only `Authorization: Bearer <the file's token>`
    tls: ListenerTls | None = None  # serve's listeners speak TLS (else plain HTTP behind a TLS-terminating proxy)
    # addresses or networks (of a load balancer) whose X-Forwarded-For names the caller; by default nobody's
    trusted_proxies: tuple[str, ...] = ()
    public_url: str = "http://127.0.0.1:8080"
    allowed_origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    upstreams: tuple[Upstream, ...] = Field(min_length=1)
    auth: Auth = Auth()
    policy: Policy
    audit: Audit = Audit()
    sessions: Sessions = Sessions()
    admin: Admin = Admin()
    role_assignments: RoleAssignmentsStore = RoleAssignmentsStore()
    tracing: Tracing = Tracing()  # OpenTelemetry traces (config_tracing): off by default
    rate_limits: tuple[RateLimit, ...] = ()  # gateway.ratelimit.rules: token buckets per principal, tool, ...
    # the buckets' store (the sessions' Redis, shared by replicas) unreachable: refuse (closed) or let through
    rate_limits_on_store_failure: Literal["closed", "open"] = "closed"
    policy_reload_interval_s: float = Field(2.0, ge=0)  # how often the policy file is checked; 0: SIGHUP only
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    source: Path | None = None
    # where the files the gateway creates resolve when given relative (default: $MCP_GATEWAY_DATA_DIR, else the
    # config file's directory); what it only reads (the policy, pins, certificates) resolves beside the config
    data_dir: Path | None = None
    # `FILE: key: why` of each upstream credential left unset by load_config(upstream_secrets=False)
    _unset_secrets: tuple[str, ...] = PrivateAttr(())

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(proxy, strict=False)) for proxy in value)  # ValueError names it

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
        if self.admin_listen is not None and self.admin_listen.port == self.listen.port:
            raise ValueError(f"admin_listen: port {self.admin_listen.port} is the public listener's (listen.port)")
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
        unknown = self.policy.unknown_upstreams(names)
        if unknown:
            raise ValueError(f"the policy's upstreams: section names {', '.join(unknown)}, not an upstream of this "
                             f"config (have: {', '.join(names)})")
        ids = [rule.id or f"rate_limits[{i}]" for i, rule in enumerate(self.rate_limits)]
        for rule_id in sorted({i for i in ids if ids.count(i) > 1}):
            at = ", ".join(f"rate_limits[{i}]" for i, other in enumerate(ids) if other == rule_id)
            raise ValueError(f"rate_limits: {at} have one id, {rule_id!r}")
        for index, rule in enumerate(self.rate_limits):
            if rule.match.role is not None and self.policy.engine is None and rule.match.role not in self.policy.roles:
                raise ValueError(f"rate_limits[{index}].match.role: {rule.match.role!r} is not a role in the policy")
        role = self.auth.anonymous_role
        # a Cedar policy has no roles of its own: it reads principal.roles as any other attribute
        if role is not None and self.policy.engine is None and role not in self.policy.roles:
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

    @property
    def admin_resource(self) -> str:
        """The protected resource of the admin API and console: what their tokens' `aud` names."""
        return f"{self.public_url}/admin"

    def resource_url(self, upstream: Upstream) -> str:
        """The protected resource's URL for an upstream: what tokens' `aud` must name."""
        return self.auth.resource or f"{self.public_url}{upstream.path}"

    def require_upstream_secrets(self) -> None:
        """ConfigError naming each upstream credential whose variable was unset when this config was loaded
        with upstream_secrets=False: called before anything reaches an upstream with them."""
        if self._unset_secrets:
            raise ConfigError(list(self._unset_secrets))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Where an upstream's credentials live: its headers, a stdio upstream's environment, its OAuth client secret
# (config_upstream, config_auth.UpstreamOAuth). Its other settings are needed to load the config at all.
_UPSTREAM_SECRET = re.compile(r"^upstreams\.\d+\.(headers\..+|env\..+|oauth\.client_secret)$")


def _expand(value: Any, env: Mapping[str, str], file: Path, where: str, problems: list[str],
            deferred: list[str] | None = None) -> Any:
    """Replace `${VAR}` (or `${VAR:-default}`) in every string; an unset VAR without default is a problem, or
    (given `deferred`) for an upstream's credential, a note in `deferred`."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            unset = f"{file}: {where}: environment variable {name} is not set"
            (deferred if deferred is not None and _UPSTREAM_SECRET.match(where) else problems).append(unset)
            return ""

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, file, f"{where}.{k}" if where else str(k), problems, deferred)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, file, f"{where}.{i}", problems, deferred) for i, v in enumerate(value)]
    return value


def load_config(path: str | Path, env: Mapping[str, str] | None = None, *, upstream_secrets: bool = True) -> Config:
    """Load and validate the config file and the policy it names. Raises ConfigError with every problem.

    upstream_secrets=False: for a caller that never talks to an upstream, a variable left unset in an upstream's
    headers, env or oauth.client_secret is no problem; `Config.require_upstream_secrets()` refuses the config where
    it is."""
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
    deferred: list[str] | None = None if upstream_secrets else []
    data = _expand(raw, os.environ if env is None else env, path, "", problems, deferred)
    policy_ref = data.get("policy")
    if policy_ref is None:
        problems.append(f"{path}: policy: required (the policy file to enforce)")
    else:
        try:
            data["policy"] = load_policy_source(policy_ref, path)  # a path, or {engine, file, ...}
        except PolicyError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    data_dir = data.get("data_dir") or (os.environ if env is None else env).get("MCP_GATEWAY_DATA_DIR")
    data["data_dir"] = path.parent / data_dir if isinstance(data_dir, str) and data_dir else path.parent
    _resolve_relative_paths(data, path.parent, data["data_dir"])
    data["source"] = path
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(str(path), exc)) from None
    from gateway.pins import read_pins_file  # the format of a pins file is the pins'

    for pins_file in (u.pins_file for u in config.upstreams if u.pins_file is not None):
        try:
            read_pins_file(pins_file)
        except ProblemsError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    config._unset_secrets = tuple(deferred or ())
    return config


def _resolve_relative_paths(data: dict[str, Any], base: Path, state: Path) -> None:
    """Paths in the config (given or defaulted) are relative to the config file's directory `base`, never to the
    working directory; those of the files the gateway creates and writes (its signing key, the audit chain key,
    audit files, the role assignments database) to the data directory `state`."""
    auth = data.setdefault("auth", {})
    clients = auth.setdefault("clients", {}) if isinstance(auth, dict) else None
    if isinstance(clients, dict):
        key_file = clients.get("signing_key_file", str(GatewayClients.model_fields["signing_key_file"].default))
        if isinstance(key_file, str):
            clients["signing_key_file"] = str(state / key_file)
    if data.get("audit") is None:
        data["audit"] = {}
    audit = data["audit"]
    if isinstance(audit, dict):
        audit.setdefault("sinks", [{"type": "sqlite", "path": "audit.db"}])
        if isinstance(audit["sinks"], list):
            for sink in audit["sinks"]:
                if isinstance(sink, dict) and isinstance(sink.get("path"), str):
                    sink["path"] = str(state / sink["path"])
        key_file = audit.get("chain_key_file", str(Audit.model_fields["chain_key_file"].default))
        if isinstance(key_file, str):
            audit["chain_key_file"] = str(state / key_file)
    if data.get("role_assignments") is None:
        # Not given: where the other shared state lives. A gateway whose sessions are in Redis is one of several
        # replicas or workers, and a role granted or withdrawn through one must hold on every other.
        sessions = data.get("sessions")
        if isinstance(sessions, dict) and sessions.get("backend") == "redis":
            data["role_assignments"] = {"backend": "redis", "url": sessions.get("url")}
        else:
            data["role_assignments"] = {}
    assignments = data["role_assignments"]
    if isinstance(assignments, dict) and assignments.get("backend", "sqlite") == "sqlite":
        store = assignments.get("path", str(RoleAssignmentsStore.model_fields["path"].default))
        if isinstance(store, str):
            assignments["path"] = str(state / store)
    if isinstance(data.get("metrics_token_file"), str):
        data["metrics_token_file"] = str(base / data["metrics_token_file"])
    listener_tls = data.get("tls")
    for key in ("cert_file", "key_file"):
        if isinstance(listener_tls, dict) and isinstance(listener_tls.get(key), str):
            listener_tls[key] = str(base / listener_tls[key])
    upstreams = data.get("upstreams")
    for upstream in upstreams if isinstance(upstreams, list) else ():
        for key in ("cwd", "pins_file"):
            if isinstance(upstream, dict) and isinstance(upstream.get(key), str):
                upstream[key] = str(base / upstream[key])
        tls = upstream.get("tls") if isinstance(upstream, dict) else None
        for key in ("ca_file", "client_cert", "client_key"):
            if isinstance(tls, dict) and isinstance(tls.get(key), str):
                tls[key] = str(base / tls[key])
