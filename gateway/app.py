"""`create_app(config)`: the reverse proxy, i.e. the middleware wrapped around a forwarding app per upstream.

Owns the gateway's own routes (`/healthz`, `/readyz`, `/metrics`) and the
lifespan that closes upstream connections. Everything on an upstream's path
goes through `MCPSecurityMiddleware`, exactly as it does around an in-process app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import logs
from gateway.config import Config, ConfigError, Upstream, load_config
from gateway.errors import StateUnavailable
from gateway.http_server import HeadDeadlineProtocol
from gateway.middleware import MCPSecurityMiddleware
from gateway.oauth.upstream import UpstreamCredential
from gateway.probes import Reachability
from gateway.proxy import UpstreamProxy
from gateway.runtime import Runtime
from gateway.stdio.upstream import StdioUpstream
from gateway.types import ASGIApp

CONFIG_ENV = "MCP_GATEWAY_CONFIG"
LISTEN_ENV = "MCP_GATEWAY_LISTEN"  # where `serve --workers N` listens, for each worker's start-up line


def app_from_environment() -> MCPSecurityMiddleware:
    """The app for each uvicorn worker (`serve --workers N`): the config path comes from MCP_GATEWAY_CONFIG. A
    worker is a fresh interpreter: its log lines take the config's format here, or they would not be written."""
    config = load_config(os.environ[CONFIG_ENV])
    logs.configure(config.log_level, config.log_format)
    app = create_app(config)
    app.runtime.listen = os.environ.get(LISTEN_ENV)
    HeadDeadlineProtocol.head_timeout_s = app.config.limits.client_header_timeout_s  # this worker's own class
    settle_garbage_collector()
    return app


def settle_garbage_collector() -> None:
    """For a process the gateway owns (`serve`), once the app is built: exempt everything built so far from
    collection. Measured with wrk (trivial upstream, c=32): a full collection walked every module, model and
    compiled pattern, and stalled requests for tens of ms (p99 41 ms); frozen, p99 was 13 ms. The youngest
    generation keeps its default threshold: collected every 10,000 allocations instead, each collection took
    2.3 ms (median) and was the p99 at one connection (2.4 ms against 1.1 ms, bench_lag.py, B12); the total
    time collecting is the same either way. Never called for an app embedded as middleware: the host
    process's collector is not the gateway's to tune."""
    gc.collect()
    gc.freeze()


def reverse_proxy_problems(config: Config) -> list[str]:
    """`FILE: key.path: why` for what keeps a config that loads from running as the reverse proxy: an upstream
    with neither url nor command, a process user the gateway cannot switch to. `create_app` refuses them and
    `check-config` reports them: one list, so the two never disagree."""
    problems = [f"{config.source}: upstreams.{i}.url: required to run as a reverse proxy (or command, for a "
                "stdio server)"
                for i, u in enumerate(config.upstreams) if u.url is None and u.command is None]
    problems += [f"{config.source}: upstreams.{i}.process: user and group need the gateway to run as root"
                 for i, u in enumerate(config.upstreams)
                 if (u.process.user or u.process.group) and os.geteuid() != 0]
    try:
        metrics_token(config)
    except (OSError, ValueError) as exc:
        problems.append(f"{config.source}: metrics_token_file: {exc}")
    return problems


def metrics_token(config: Config) -> bytes | None:
    """The token /metrics asks for (`metrics_token_file`, read once), or None: /metrics is open."""
    if config.metrics_token_file is None:
        return None
    token = config.metrics_token_file.read_bytes().strip()
    if len(token) < 16:
        raise ValueError(f"{config.metrics_token_file} holds {len(token)} bytes; a token is at least 16")
    return token


def create_app(config: Config | str | Path) -> MCPSecurityMiddleware:
    """The reverse-proxy gateway as one ASGI app: each upstream reached over HTTP (`url`) or run as a stdio
    program (`command`). Raises ConfigError for an upstream with neither, a process user the gateway cannot
    switch to, or a config loaded without its upstreams' credentials (`load_config(upstream_secrets=False)`)."""
    if not isinstance(config, Config):
        config = load_config(config)
    config.require_upstream_secrets()  # the proxies below send them
    problems = reverse_proxy_problems(config)
    if problems:
        raise ConfigError(problems)
    runtime = Runtime(config)
    proxies: dict[str, UpstreamProxy | StdioUpstream] = {
        u.path: UpstreamProxy(u, config.limits, config.public_url, _credential(u, runtime)) if u.url is not None
        else StdioUpstream(u, config.limits, config.sessions, runtime.metrics) for u in config.upstreams}
    runtime.upstream_apps = {p.upstream.name: p for p in proxies.values()}
    stdio = [p for p in proxies.values() if isinstance(p, StdioUpstream)]
    reachability = {p.upstream.name: Reachability(p.upstream) for p in proxies.values()
                    if isinstance(p, UpstreamProxy) and p.upstream.url is not None}

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        """Ready: config loaded (it is, or we would not run), started, the audit trail taking events, the session
        store answering (without it no session, task or revocation can be checked), and the external issuer's
        keys at hand (without them no token of its could be verified), and each HTTP upstream taking connections
        (without them every call to it is a 502): a connect probe, reused for a few seconds."""
        checks = {
            "started": runtime.started,
            "audit_sinks_writable": not runtime.audit.failing,
            "audit_accepting": runtime.audit.accepting(),
            "session_store": await runtime.sessions.ping(),
            "role_assignments": await runtime.assignments.ready(),  # every request reads it
        }
        jwks = await runtime.authenticator.jwks_ready()
        if jwks is not None:
            checks["jwks_keys"] = jwks
        for upstream in stdio:  # a program that keeps breaking as it starts serves nobody
            checks[f"stdio_{upstream.upstream.name}_not_crash_looping"] = not upstream.crash_looping
        whys = await asyncio.gather(*(r.why_not() for r in reachability.values()))
        unreachable = {name: why for name, why in zip(reachability, whys, strict=True) if why is not None}
        for name in reachability:
            checks[f"upstream_{name}_reachable"] = name not in unreachable
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not ready", "checks": checks,
                "failing_sinks": sorted(runtime.audit.failing), "unreachable_upstreams": unreachable,
                "policy_version": runtime.policy.version}
        return JSONResponse(body, status_code=200 if ready else 503)

    scrape_token = metrics_token(config)

    async def metrics(request: Request) -> Response:
        if scrape_token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), scrape_token):
                return JSONResponse({"error": "invalid_token"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        runtime.metrics.audit_queue_depth.set(runtime.audit.depth)
        with contextlib.suppress(StateUnavailable):  # the store's own failure shows in /readyz and in requests
            runtime.metrics.approvals_pending.set(await runtime.approvals.pending_count())
        return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        for proxy in proxies.values():
            await proxy.close()

    routes = Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)],
        lifespan=lifespan,
    )
    apps: dict[str, ASGIApp] = dict(proxies)
    return MCPSecurityMiddleware(routes, config, runtime=runtime, apps=apps)


def _credential(upstream: Upstream, runtime: Runtime) -> UpstreamCredential | None:
    """The gateway's own token source for an upstream that requires one (`upstreams[].oauth`)."""
    if upstream.oauth is None or upstream.url is None:
        return None
    fetches = runtime.metrics.upstream_token_fetches
    return UpstreamCredential(upstream.name, upstream.url, upstream.oauth,
                              on_fetch=lambda outcome: fetches.labels(upstream.name, outcome).inc())
