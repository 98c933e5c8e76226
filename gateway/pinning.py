"""Tool pinning on the request path and the answer path, and what an operator does with pins.

Owns, per upstream and its `pinning` mode (`pins` holds the decisions and the store):

- `listed`: every `tools/list` answer passing through (either era, every page) before it is filtered for the
  caller: each tool's definition compared with its pin, recorded as last seen, pinned on first use (warn);
  each new or changed definition reported once per process and definition (an audit event `tools/new` or
  `tools/definition_changed`, and `mcp_gateway_tool_definition_changes_total`); and, under enforce, the names
  the caller must not see (a definition listed under the name is not the approved one). A store that cannot
  be read hides every tool under enforce, and hides nothing under warn.
- `check`: the stage between the state handles and the approval gate. Under enforce, a `tools/call` the policy
  allowed of a tool whose definition is not the approved one is refused: its decision is replaced by a denial
  (`pin:unapproved`), answered as `errors.TOOL_UNAPPROVED` (`refusals.denial`) and never forwarded. Before any
  approval is asked: nobody is asked to approve a call of a tool nobody approved.
- `tools`, `approve`, `pin_all`: listing, approving the last definition seen, pinning every one
  (`operators`, for the admin API, the console and `mcp-gateway tools`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

from gateway import errors
from gateway.approvals.model import definition_hash
from gateway.audit.event import AuditEvent
from gateway.audit.writer import AuditUnavailable
from gateway.pins import (
    BY_FILE,
    FIRST_USE,
    MAX_TOOLS,
    SEEN_REFRESH_S,
    Pin,
    PinStore,
    Seen,
    Sighting,
    call_passes,
    in_force,
    kept_definition,
    read_pins_file,
    short,
    sighting,
    status,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.audit.writer import AuditLog
    from gateway.config import Config, Upstream
    from gateway.exchange import Exchange
    from gateway.mcp import Operation
    from gateway.metrics import Metrics
    from gateway.policy.engine import Decision

log = logging.getLogger("gateway")
REFUSED = "pin:unapproved"  # the reason of a call refused for its tool's definition
_OPERATION = {"new": "tools/new", "changed": "tools/definition_changed"}


class Pinning:
    """The pins of one gateway: its upstreams' modes and pins files, the store, and what was reported."""

    def __init__(self, config: Config, store: PinStore, audit: AuditLog, metrics: Metrics) -> None:
        self.store = store
        self._upstreams = {u.name: u for u in config.upstreams}
        self._files = {u.name: read_pins_file(u.pins_file) for u in config.upstreams if u.pins_file is not None}
        self._audit = audit
        self._metrics = metrics
        self._reported: LRUCache[tuple[str, str, str], bool] = LRUCache(maxsize=10_000)

    def _file_pin(self, upstream: str, tool: str) -> str | None:
        return self._files.get(upstream, {}).get(tool)

    # ---- the answer path ------------------------------------------------------------------------------------

    async def listed(self, ex: Exchange, result: Mapping[str, Any]) -> frozenset[str]:
        """Learn the tools of a `tools/list` result (before it is filtered); the names the caller may not see."""
        mode, upstream = ex.upstream.pinning, ex.upstream.name
        listed = result.get("tools")
        if mode == "off" or not isinstance(listed, list):
            return frozenset()
        tools: dict[str, list[Any]] = {}  # name -> each definition listed under it (an upstream may repeat one)
        for tool in listed:
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                tools.setdefault(tool["name"], []).append(tool)
        try:
            return await self._learn(ex, tools)
        except errors.StateUnavailable:
            log.error("tool pins of %s unreachable: %s", upstream, "every tool hidden" if mode == "enforce"
                      else "definitions not compared")
            return frozenset(tools) if mode == "enforce" else frozenset()

    async def _learn(self, ex: Exchange, tools: Mapping[str, list[Any]]) -> frozenset[str]:
        mode, upstream, now = ex.upstream.pinning, ex.upstream.name, time.time()
        pins, seen = await self.store.tools(upstream)
        room = MAX_TOOLS - len(pins.keys() | seen.keys())
        found: dict[str, tuple[str, str | None, Sighting]] = {}  # name -> (definition, pin, sighting)
        chosen: dict[str, Any] = {}  # name -> the tool it stands for
        unrecorded = set()
        for name, variants in tools.items():
            if name not in pins and name not in seen:
                if room <= 0:
                    log.warning("%s lists more than %d tools: %s is not recorded", upstream, MAX_TOOLS, name)
                    unrecorded.add(name)
                    continue
                room -= 1
            pinned = in_force(self._file_pin(upstream, name), pins.get(name))
            hashes = [definition_hash(tool) for tool in variants]
            # a name listed twice stands for its definition that is not the pin, if one is not: the items are hidden
            # by name, and an approved twin must not carry an unapproved one through
            index = next((i for i, listed in enumerate(hashes) if listed != pinned), 0)
            chosen[name] = variants[index]
            found[name] = (hashes[index], pinned, sighting(mode, pinned, hashes[index]))
        first = {name: Pin(listed, now, FIRST_USE) for name, (listed, _, s) in found.items() if s.pin}
        for name, pin in (await self.store.pin(upstream, first, first=True)).items():
            if pin.hash != first[name].hash:  # another replica pinned another definition first: that one holds
                listed = first[name].hash
                found[name] = (listed, pin.hash, sighting(mode, pin.hash, listed))
        await self.store.saw(upstream, {
            name: Seen(listed, now, kept_definition(chosen[name])) for name, (listed, _, _) in found.items()
            if (last := seen.get(name)) is None or last.hash != listed or now - last.at >= SEEN_REFRESH_S})
        for name, (listed, pinned, seen_as) in found.items():
            if seen_as.kind != "same":
                self._report(ex, name, pinned, listed, seen_as)
        hidden = {name for name, (_, _, seen_as) in found.items() if not seen_as.shown}
        return frozenset(hidden | unrecorded if mode == "enforce" else hidden)

    def _report(self, ex: Exchange, tool: str, pinned: str | None, listed: str, seen_as: Sighting) -> None:
        """An audit event and a count for a new or changed definition: once per process and definition."""
        key = (ex.upstream.name, tool, listed)
        if key in self._reported:
            return
        self._reported[key] = True
        self._metrics.child(self._metrics.tool_definition_changes, ex.upstream.name, seen_as.kind).inc()
        then = "pinned on first use" if seen_as.pin else "served" if seen_as.shown else "hidden until approved"
        principal = ex.principal
        event = AuditEvent(
            result="allowed" if seen_as.shown else "denied",
            reason=f"pin:{seen_as.kind} {short(pinned)}->{short(listed)} {ex.upstream.pinning}: {then}",
            operation=_OPERATION[seen_as.kind], upstream=ex.upstream.name, tool_executed=tool,
            user_id=principal.subject if principal else None, client_id=principal.client_id if principal else None,
            connection_id=ex.session_id or ex.connection_id, source_ip=ex.source_ip,
            protocol_version=ex.protocol_version)
        with contextlib.suppress(AuditUnavailable):  # counted by the audit log
            self._audit.record(event)

    # ---- the request path -----------------------------------------------------------------------------------

    async def check(self, ex: Exchange) -> None:
        """Under enforce: each allowed call of a tool whose definition is not the approved one, refused."""
        if ex.upstream.pinning != "enforce":
            return
        ex.decisions = tuple([await self.decided(ex, op, decision) if op is not None and decision is not None
                              else decision for op, decision in zip(ex.operations, ex.decisions, strict=True)])

    async def decided(self, ex: Exchange, op: Operation, decision: Decision) -> Decision:
        """`decision`, or a denial when it allows a call of a tool whose definition is not the approved one (also
        asked again of a call approved after a wait: the tool may have changed meanwhile)."""
        if ex.upstream.pinning != "enforce" or not decision.allowed or op.kind != "tool_call" or op.name is None:
            return decision
        stored, seen = await self.store.tool(ex.upstream.name, op.name)
        pinned = in_force(self._file_pin(ex.upstream.name, op.name), stored)
        if call_passes("enforce", pinned, seen.hash if seen is not None else None):
            return decision
        return replace(decision, allowed=False, outcome="denied", reason=REFUSED)

    # ---- what an operator does ------------------------------------------------------------------------------

    def _upstream(self, name: str) -> Upstream:
        found = self._upstreams.get(name)
        if found is None:
            raise errors.GatewayRefusal(errors.NOT_FOUND, f"no upstream {name!r}", reason="tools:no_such_upstream")
        return found

    async def tools(self, upstream: str | None = None) -> list[dict[str, Any]]:
        """Every tool known of each upstream (or of `upstream`): its pin, the definition last seen, its status."""
        items = []
        for u in [self._upstream(upstream)] if upstream is not None else self._upstreams.values():
            pins, seen = await self.store.tools(u.name)
            files = self._files.get(u.name, {})
            for name in sorted(pins.keys() | seen.keys() | files.keys()):
                pin, last = pins.get(name), seen.get(name)
                pinned = in_force(files.get(name), pin)
                items.append({
                    "upstream": u.name, "tool": name, "mode": u.pinning, "pinned": pinned,
                    "pinned_by": BY_FILE if name in files else pin.by if pin else None,
                    "pinned_at": None if name in files or pin is None else pin.at,
                    "seen": last.hash if last else None, "seen_at": last.at if last else None,
                    "status": status(pinned, last.hash if last else None),
                    "definition": last.definition if last else None})
        return items

    async def approve(self, upstream: str, tool: str, by: str, expected: str | None = None) -> tuple[str | None, str]:
        """Pin the definition of `tool` last seen (only if it is `expected`, when given); (old pin, new pin)."""
        self._upstream(upstream)
        stored, seen = await self.store.tool(upstream, tool)
        if seen is None:
            raise errors.GatewayRefusal(errors.NOT_FOUND, f"{tool!r} was never listed by {upstream}",
                                        reason="tools:never_seen")
        if expected is not None and not seen.hash.startswith(expected.lower()):
            raise errors.GatewayRefusal(errors.CONFLICT, f"{tool} is now listed as {short(seen.hash)}, not as "
                                        f"{expected}: review it again", reason="tools:changed_meanwhile")
        held = self._file_pin(upstream, tool)
        if held is not None and held != seen.hash:
            raise errors.GatewayRefusal(errors.CONFLICT, f"the pins file of {upstream} pins {tool} to {short(held)}: "
                                        "write it anew (mcp-gateway tools pin --write) and restart",
                                        reason="tools:held_by_file")
        await self.store.pin(upstream, {tool: Pin(seen.hash, time.time(), by)})
        return in_force(held, stored), seen.hash

    async def pin_all(self, upstream: str, by: str) -> tuple[dict[str, str], list[str]]:
        """Pin every definition of `upstream` last seen. (every tool's pin, as a pins file would hold them: the
        definition last seen, else the pin in force; the tools whose pin the pins file holds to another)"""
        self._upstream(upstream)
        pins, seen = await self.store.tools(upstream)
        files = self._files.get(upstream, {})
        now = time.time()
        await self.store.pin(upstream, {name: Pin(last.hash, now, by) for name, last in seen.items()})
        every = {name: pinned for name in pins.keys() | files.keys()
                 if (pinned := in_force(files.get(name), pins.get(name))) is not None}
        every.update({name: last.hash for name, last in seen.items()})
        held = sorted(name for name, last in seen.items() if files.get(name, last.hash) != last.hash)
        return dict(sorted(every.items())), held
