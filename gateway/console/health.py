"""The upstreams page's facts: for each upstream, whether it can be reached now and what is running for it.

Owns `survey`: an HTTP upstream is probed with a TCP connect to its host and port (at most `PROBE_TIMEOUT_S`,
every upstream at once) and shown with its latency and the gateway's counts of failures talking to it
(`mcp_gateway_upstream_errors_total`); a stdio upstream with its running processes (pid, whose, since when,
idle for how long) and whether it is crash-looping. Around an in-process app (middleware mode) the gateway
forwards to no upstream of its own, and says so. Never shows an upstream's configured headers, nor a URL's
credentials or query.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.stdio.pool import Running
from gateway.stdio.upstream import StdioUpstream
from gateway.url_redaction import redact_url

if TYPE_CHECKING:
    from gateway.config import Upstream
    from gateway.metrics import Metrics
    from gateway.runtime import Runtime

PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Probe:
    reachable: bool
    latency_ms: float | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    name: str
    path: str
    transport: str  # http, stdio, in-process
    target: str  # the URL (scheme, host, port, path) or the command line
    probe: Probe | None = None
    errors: tuple[tuple[str, int], ...] = ()  # (kind, count) of failures talking to it since the gateway started
    processes: tuple[Running, ...] = ()
    crash_looping: bool | None = None


async def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Whether a TCP connection to the URL's host and port opens within `timeout_s`, and how long it took."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Probe(False, None, f"no connection within {timeout_s:g} s")
    except OSError as exc:
        return Probe(False, None, exc.strerror or type(exc).__name__)
    latency = round((time.perf_counter() - started) * 1000, 2)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Probe(True, latency)


def error_counts(metrics: Metrics, upstream: str) -> tuple[tuple[str, int], ...]:
    found = [(sample.labels["kind"], int(sample.value)) for family in metrics.upstream_errors.collect()
             for sample in family.samples
             if sample.name.endswith("_total") and sample.labels.get("upstream") == upstream and sample.value]
    return tuple(sorted(found))


async def survey(runtime: Runtime) -> list[Health]:
    """Every configured upstream's health, the HTTP ones probed concurrently."""
    apps = runtime.upstream_apps

    async def one(upstream: Upstream) -> Health:
        app = apps.get(upstream.name)
        if isinstance(app, StdioUpstream):
            return Health(upstream.name, upstream.path, "stdio", " ".join(upstream.command or ()),
                          processes=tuple(app.processes()), crash_looping=app.crash_looping)
        if app is None or upstream.url is None:
            return Health(upstream.name, upstream.path, "in-process", "the app this middleware wraps")
        return Health(upstream.name, upstream.path, "http", redact_url(upstream.url), await probe(upstream.url),
                      error_counts(runtime.metrics, upstream.name))

    return list(await asyncio.gather(*(one(u) for u in runtime.config.upstreams)))
