"""Tool-definition pins: the definition of each tool that was approved (by an operator, by the pins file, or on
first use), the definition last seen; every decision about them (pure); where they live; the pins file.

A definition is the whole tool object of a `tools/list` answer, hashed in canonical JSON
(`approvals.definition_hash`): a new description, title, schema or annotation is a new definition, and a
renamed tool is a new tool. What each mode (`upstreams[].pinning`) makes of a tool in a list answer
(`sighting`):

    pin          none yet                           the same                 another (changed)
    off          nothing is compared nor recorded
    warn         pinned (trust on first use)        shown                    recorded and reported, shown
    enforce      reported, hidden (new)             shown                    reported, hidden

and of a call (`call_passes`): under enforce only a tool whose `status` is `pinned` may be called.

    status       pinned     the last definition seen is the pin, or none was seen since it was pinned
                 changed    the last definition seen is not the pin
                 new        nothing pinned

The pins file (`upstreams[].pins_file`, `{tools: {NAME: HASH}}`, committed by the operator, written by
`mcp-gateway tools pin --write`) is read at start; a pin in it wins over the store's.

    memory   one process (a restart forgets pins: under enforce, give a pins file)
    redis    the sessions' Redis, shared by every replica:
             mcpgw:pins:<upstream>        hash: tool -> the pin (JSON: hash, at, by)
             mcpgw:pins-seen:<upstream>   hash: tool -> the definition last seen (JSON: hash, at, definition)

A store that cannot be reached raises `StateUnavailable`: a call that must be checked is refused (503).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import orjson
import yaml

from gateway.sessions import reached, redis_client
from gateway.yamlfile import ProblemsError, read_yaml

if TYPE_CHECKING:
    from pathlib import Path

    from gateway.config import Sessions

Mode = Literal["off", "warn", "enforce"]
Kind = Literal["same", "new", "changed"]
Status = Literal["pinned", "changed", "new"]
FIRST_USE = "first-use"  # who pinned a definition trusted on first use
BY_FILE = "pins-file"
MAX_TOOLS = 10_000  # per upstream: past it a tool never seen before is not recorded (under enforce: hidden)
MAX_DEFINITION_BYTES = 64 * 1024  # a longer definition is kept by its hash alone
SEEN_REFRESH_S = 60.0  # how stale "when seen" may grow before a list answer records it again
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Pin:
    hash: str
    at: float
    by: str  # the operator, FIRST_USE or BY_FILE


@dataclass(frozen=True, slots=True)
class Seen:
    hash: str
    at: float
    definition: str | None = None  # canonical JSON of the tool, for the operator who approves it


_Record = TypeVar("_Record", Pin, Seen)


@dataclass(frozen=True, slots=True)
class Sighting:
    """What one tool of a list answer is, and what to do with it: pin it (first use), show it to the caller."""

    kind: Kind
    pin: bool
    shown: bool


def sighting(mode: Mode, pinned: str | None, listed: str) -> Sighting:
    """What `mode` makes of a tool listed with definition `listed` when `pinned` is its pin."""
    kind: Kind = "new" if pinned is None else "same" if pinned == listed else "changed"
    if mode == "enforce":
        return Sighting(kind, pin=False, shown=kind == "same")
    return Sighting(kind, pin=mode == "warn" and kind == "new", shown=True)


def status(pinned: str | None, seen: str | None) -> Status:
    if pinned is None:
        return "new"
    return "changed" if seen is not None and seen != pinned else "pinned"


def call_passes(mode: Mode, pinned: str | None, seen: str | None) -> bool:
    """Whether a call of a tool may be forwarded: under enforce, only while its definition is the approved one."""
    return mode != "enforce" or status(pinned, seen) == "pinned"


def in_force(file_pin: str | None, stored: Pin | None) -> str | None:
    """The pin that holds: the pins file's, else the store's."""
    return file_pin if file_pin is not None else stored.hash if stored is not None else None


def short(value: str | None) -> str:
    """A hash as the audit trail and the CLI show it."""
    return value[:12] if value else "-"


def kept_definition(tool: Any) -> str | None:
    text = orjson.dumps(tool, option=orjson.OPT_SORT_KEYS)
    return text.decode() if len(text) <= MAX_DEFINITION_BYTES else None


# ---- the pins file ----------------------------------------------------------------------------------------------

def read_pins_file(path: Path) -> dict[str, str]:
    """The pins of a pins file, by tool name; `ProblemsError` naming the file, key and why if it is not one."""
    raw, _ = read_yaml(path)
    tools = raw.get("tools", {}) if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or set(raw) - {"tools"} or not isinstance(tools, dict):
        raise ProblemsError([f"{path}: (top level): must be a mapping with one key, tools: {{NAME: HASH}}"])
    problems = [f"{path}: tools.{name}: must be a SHA-256 hash (64 hex digits), as `mcp-gateway tools list` shows"
                for name, value in tools.items() if not isinstance(value, str) or not _HASH.fullmatch(value)]
    problems += [f"{path}: tools.{name!r}: a tool name is a string" for name in tools if not isinstance(name, str)]
    if problems:
        raise ProblemsError(problems)
    return dict(tools)


def pins_file_text(pins: Mapping[str, str]) -> str:
    """A pins file holding `pins` (what `read_pins_file` reads back)."""
    return ("# Tool definitions approved for this upstream (mcp-gateway tools pin --write): a pin here wins over\n"
            "# the gateway's store. Hash: SHA-256 of the tool's canonical JSON, as `mcp-gateway tools list` shows.\n"
            + yaml.safe_dump({"tools": dict(sorted(pins.items()))}, sort_keys=False))


# ---- the store ------------------------------------------------------------------------------------------------------

class PinStore(Protocol):
    async def tools(self, upstream: str) -> tuple[dict[str, Pin], dict[str, Seen]]:
        """Every pin and every last sighting of `upstream`'s tools, by name."""

    async def tool(self, upstream: str, name: str) -> tuple[Pin | None, Seen | None]: ...

    async def pin(self, upstream: str, pins: Mapping[str, Pin], *, first: bool = False) -> dict[str, Pin]:
        """Record `pins` (with `first`: each only where the tool has none yet, so replicas that race to pin a tool
        on first use agree on one); the pins in force for those tools afterwards."""

    async def saw(self, upstream: str, seen: Mapping[str, Seen]) -> None:
        """Record these as the definitions last seen."""

    async def close(self) -> None: ...


class MemoryPins:
    def __init__(self) -> None:
        self._pins: dict[str, dict[str, Pin]] = {}
        self._seen: dict[str, dict[str, Seen]] = {}

    async def tools(self, upstream: str) -> tuple[dict[str, Pin], dict[str, Seen]]:
        return dict(self._pins.get(upstream, {})), dict(self._seen.get(upstream, {}))

    async def tool(self, upstream: str, name: str) -> tuple[Pin | None, Seen | None]:
        return self._pins.get(upstream, {}).get(name), self._seen.get(upstream, {}).get(name)

    async def pin(self, upstream: str, pins: Mapping[str, Pin], *, first: bool = False) -> dict[str, Pin]:
        held = self._pins.setdefault(upstream, {})
        for name, pin in pins.items():
            if not first or name not in held:
                held[name] = pin
        return {name: held[name] for name in pins}

    async def saw(self, upstream: str, seen: Mapping[str, Seen]) -> None:
        self._seen.setdefault(upstream, {}).update(seen)

    async def close(self) -> None:
        return None


class RedisPins:
    _PINS = "mcpgw:pins:"
    _SEEN = "mcpgw:pins-seen:"

    def __init__(self, config: Sessions) -> None:
        self._redis = redis_client(config)

    @reached
    async def tools(self, upstream: str) -> tuple[dict[str, Pin], dict[str, Seen]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._PINS + upstream)
            pipe.hgetall(self._SEEN + upstream)
            pins, seen = await pipe.execute()
        return ({_text(k): _read(Pin, v) for k, v in pins.items()},
                {_text(k): _read(Seen, v) for k, v in seen.items()})

    @reached
    async def tool(self, upstream: str, name: str) -> tuple[Pin | None, Seen | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._PINS + upstream, name)
            pipe.hget(self._SEEN + upstream, name)
            pin, seen = await pipe.execute()
        return None if pin is None else _read(Pin, pin), None if seen is None else _read(Seen, seen)

    @reached
    async def pin(self, upstream: str, pins: Mapping[str, Pin], *, first: bool = False) -> dict[str, Pin]:
        if not pins:
            return {}
        key, names = self._PINS + upstream, list(pins)
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, pin in pins.items():
                (pipe.hsetnx if first else pipe.hset)(key, name, orjson.dumps(asdict(pin)))
            pipe.hmget(key, names)
            *_, held = await pipe.execute()
        return {name: _read(Pin, raw) for name, raw in zip(names, held, strict=True) if raw is not None}

    @reached
    async def saw(self, upstream: str, seen: Mapping[str, Seen]) -> None:
        if seen:
            await self._redis.hset(self._SEEN + upstream, mapping={k: orjson.dumps(asdict(v)) for k, v in seen.items()})

    async def close(self) -> None:
        await self._redis.aclose()


def _read(kind: type[_Record], raw: bytes) -> _Record:
    """A record as stored; fields it does not know (a newer gateway's, mid-upgrade) are left out."""
    return kind(**{k: v for k, v in orjson.loads(raw).items() if k in kind.__dataclass_fields__})


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_pins(config: Sessions) -> PinStore:
    """Pins live with the other shared state: in memory, or in the sessions' Redis."""
    return RedisPins(config) if config.backend == "redis" else MemoryPins()
