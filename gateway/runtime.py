"""What one running gateway holds between requests: policy, authenticator, audit log, metrics, tool schemas,
role assignments, approvals, tool pins and the tracer provider (when tracing is on).

Owns the start and stop of those resources, so that the reverse proxy
(`create_app`) and the ASGI middleware around an in-process app share one
lifecycle and one set of state; and the policy's hot reload: on SIGHUP and
when the file changes, the new file is compiled and swapped in whole, and an
invalid one is reported while the old policy stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

from gateway.approvals import ApprovalGate, definition_hash, open_approvals
from gateway.assignments import RoleAssignments, open_assignments
from gateway.audit.writer import AuditLog
from gateway.auth.authenticator import Authenticator
from gateway.auth.keys import load_or_create_signing_key
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.pinning import Pinning
from gateway.pins import open_pins
from gateway.policy import Policy, PolicyError
from gateway.policy.engine import annotation_level
from gateway.policy.lint import literal_lint, schema_lint
from gateway.policy.source import policy_files, reread_policy
from gateway.ratelimit.gate import RateLimiter
from gateway.sessions import SessionStore, open_sessions
from gateway.startup_summary import startup_fields
from gateway.tracing import open_tracing

if TYPE_CHECKING:
    from gateway.proxy import UpstreamProxy
    from gateway.stdio.upstream import StdioUpstream

log = logging.getLogger("gateway.policy")
lint_log = logging.getLogger("gateway.policy.lint")
startup_log = logging.getLogger("gateway")


class Runtime:
    """The stateful parts of a gateway, shared by every request it handles."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy: Policy = config.policy
        self.signing_key = load_or_create_signing_key(config.auth.clients.signing_key_file)
        self.metrics = Metrics()
        self.sessions: SessionStore = open_sessions(config.sessions)
        self.authenticator = Authenticator(config, self.signing_key, metrics=self.metrics, sessions=self.sessions)
        self.audit = AuditLog(config.audit, self.metrics)
        self.audit.policy_version = self.policy.version
        self.tracing = open_tracing(config.tracing)  # None when off: the request path then traces nothing
        # Per upstream: tool name -> inputSchema, learnt from tools/list results passing through,
        # so that 2026-07-28 Mcp-Param-* headers can be checked against the tool's declaration.
        self._tool_schemas: dict[str, LRUCache[str, Mapping[str, Any]]] = {
            u.name: LRUCache(maxsize=10_000) for u in config.upstreams
        }
        # ... and the hash of each tool's whole definition, which an approval is bound to.
        self._tool_definitions: dict[str, LRUCache[str, str]] = {
            u.name: LRUCache(maxsize=10_000) for u in config.upstreams
        }
        # ... and the level each tool's annotations ask for, which raises a level the policy leaves unsaid.
        self._tool_levels: dict[str, LRUCache[str, int]] = {u.name: LRUCache(maxsize=10_000) for u in config.upstreams}
        self.assignments: RoleAssignments = open_assignments(config.role_assignments)
        self._linted: LRUCache[tuple[str, str, str, str], bool] = LRUCache(maxsize=10_000)
        self.approvals = ApprovalGate(open_approvals(config.sessions), self.audit, self.metrics, config.audit,
                                      self.tool_definition)
        self.pins = Pinning(config, open_pins(config.sessions), self.audit, self.metrics)
        self.rate_limits = RateLimiter(config.rate_limits, self.sessions, config.rate_limits_on_store_failure,
                                       self.metrics)
        # The reverse proxy's forwarding app per upstream name (`create_app` fills it; none around an in-process
        # app), read by the console's health page.
        self.upstream_apps: dict[str, UpstreamProxy | StdioUpstream] = {}
        self.started = False
        # Where the server running this gateway listens, when the gateway runs it (`serve`): for the start-up line.
        self.listen: str | None = None
        self._announced = False
        self._watcher: asyncio.Task[None] | None = None
        self._policy_stamp = _stamp(self.policy)
        _warn_literals(self.policy)

    def start(self) -> None:
        """Start background work on the running loop (idempotent; also called lazily on first request), and say
        once what the gateway runs with (`startup_summary`)."""
        if self.started:
            return
        self.audit.start()
        loop = asyncio.get_running_loop()
        interval = self.config.policy_reload_interval_s
        if interval > 0:
            self._watcher = loop.create_task(self._watch_policy(interval), name="policy-watcher")
        if threading.current_thread() is threading.main_thread():
            try:
                loop.add_signal_handler(signal.SIGHUP, self.reload_policy)
            except (NotImplementedError, RuntimeError, AttributeError):
                log.info("no SIGHUP on this platform: the policy reloads on file change only")
        self.started = True
        if not self._announced:  # once: a start after close() is the same gateway
            self._announced = True
            startup_log.info("gateway started", extra=startup_fields(self.config, self.policy, self.listen))

    async def close(self) -> None:
        """Flush the audit trail and stop."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await self.audit.close()
        await self.authenticator.close()
        await self.sessions.close()
        await self.approvals.store.close()
        await self.pins.store.close()
        await self.assignments.close()
        if self.tracing is not None:
            await self.tracing.close()  # the spans still queued are exported
        self.started = False

    def reload_policy(self) -> bool:
        """Compile the policy file again and swap it in; on any problem keep the current one. True if swapped."""
        path = Path(self.policy.source)
        self._policy_stamp = _stamp(self.policy)
        try:
            fresh = reread_policy(self.policy)  # same language, same settings from the config
            unknown = fresh.unknown_upstreams([u.name for u in self.config.upstreams])
            if unknown:
                raise PolicyError([f"{path}: upstreams: names {', '.join(unknown)}, not an upstream of "
                                   f"{self.config.source}"])
        except PolicyError as exc:
            self.metrics.policy_reloads.labels("invalid").inc()
            for problem in exc.problems:
                log.error("policy reload refused, version %s stays: %s", self.policy.version, problem)
            return False
        if fresh.version != self.policy.version:
            log.info("policy %s reloaded: version %s -> %s", path, self.policy.version, fresh.version)
        self.policy = fresh
        self.audit.policy_version = fresh.version
        _warn_literals(fresh)
        self.metrics.policy_reloads.labels("ok").inc()
        return True

    async def _watch_policy(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if _stamp(self.policy) != self._policy_stamp:
                self.reload_policy()

    def tool_schema(self, upstream: str, tool: str) -> Mapping[str, Any] | None:
        return self._tool_schemas[upstream].get(tool)

    def tool_level(self, upstream: str, tool: str) -> int:
        """The level the tool's annotations ask for, as last listed (`policy.engine.annotation_level`)."""
        return self._tool_levels[upstream].get(tool, 0)

    def tool_definition(self, upstream: str, tool: str) -> str | None:
        return self._tool_definitions[upstream].get(tool)

    def learn_tools(self, upstream: str, result: Mapping[str, Any]) -> None:
        tools = result.get("tools")
        if not isinstance(tools, list):
            return
        cache, definitions = self._tool_schemas[upstream], self._tool_definitions[upstream]
        levels = self._tool_levels[upstream]
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            name, schema = tool.get("name"), tool.get("inputSchema")
            if isinstance(name, str) and isinstance(schema, dict):
                cache[name] = schema
                self._lint_arguments(upstream, name, schema)
            if isinstance(name, str):
                definitions[name] = definition_hash(tool)
                levels[name] = annotation_level(tool.get("annotations"))

    def _lint_arguments(self, upstream: str, tool: str, schema: Mapping[str, Any]) -> None:
        """Say (once per policy, tool and schema) where the policy constrains an argument the tool does not have,
        or has of another type: such a constraint refuses every call, or can never fail."""
        policy = self.policy.for_upstream(upstream)
        if not policy.constrained_tools.matches(tool):
            return
        key = (policy.version, upstream, tool, definition_hash(schema))
        if key in self._linted:
            return
        self._linted[key] = True
        for problem in schema_lint(policy, tool, schema):
            lint_log.warning("%s (upstream %s)", problem, upstream)


def _warn_literals(policy: Policy) -> None:
    for warning in literal_lint(policy):
        lint_log.warning("%s", warning)


def _stamp(policy: Policy) -> tuple[tuple[float, int] | None, ...]:
    """What tells a changed policy: each of its files' modification time and size (None while one is missing)."""
    stamps: list[tuple[float, int] | None] = []
    for path in policy_files(policy):
        try:
            status = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((status.st_mtime, status.st_size))
    return tuple(stamps)
