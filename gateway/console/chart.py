"""The overview's chart of decisions over time: audit events counted per minute by outcome, laid out as stacked
bars in SVG user units.

Pure: events and the time now in, a `Chart` out (bars, axis ticks, legend); the template draws it as inline
SVG (no script, no style attributes: colours come from the stylesheet, by each bar's category). An event's
category is its audit `result` when that is allowed, denied or auth_failed, and `other` for every other result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CATEGORIES = ("allowed", "denied", "auth_failed", "other")
LABELS = {"allowed": "allowed", "denied": "denied", "auth_failed": "auth failed", "other": "other"}


def category(result: object) -> str:
    return result if isinstance(result, str) and result in CATEGORIES[:3] else "other"


@dataclass(frozen=True, slots=True)
class Bucket:
    """One minute: when it starts (UNIX seconds), and its counts in `CATEGORIES` order."""

    start: float
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def buckets(events: Iterable[Mapping[str, Any]], now: float, minutes: int = 60) -> list[Bucket]:
    """`minutes` one-minute buckets ending with the current minute; events outside them are not counted."""
    end = (math.floor(now / 60) + 1) * 60
    start = end - minutes * 60
    counts = [[0] * len(CATEGORIES) for _ in range(minutes)]
    for event in events:
        stamp = event.get("timestamp")
        if not isinstance(stamp, int | float) or not start <= stamp < end:
            continue
        counts[int((stamp - start) // 60)][CATEGORIES.index(category(event.get("result")))] += 1
    return [Bucket(start + i * 60, tuple(c)) for i, c in enumerate(counts)]


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    category: str
    title: str  # what a pointer resting on it reads


@dataclass(frozen=True, slots=True)
class Tick:
    position: float  # y for the value axis, x for the time axis
    label: str


@dataclass(frozen=True, slots=True)
class LegendEntry:
    x: float
    category: str
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: float
    height: float
    left: float
    top: float
    right: float
    bottom: float
    bars: tuple[Bar, ...]
    value_ticks: tuple[Tick, ...]
    time_ticks: tuple[Tick, ...]
    legend: tuple[LegendEntry, ...]
    totals: Mapping[str, int]


def scale(peak: int) -> tuple[int, int]:
    """(top of the value axis, step between its ticks): 1, 2 or 5 times a power of ten, about 4 steps."""
    if peak <= 0:
        return 4, 1
    raw = peak / 4
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return step * math.ceil(peak / step), step


def _clock(stamp: float) -> str:
    return time.strftime("%H:%M", time.gmtime(stamp))


def layout(minutes: list[Bucket], *, width: float = 760, height: float = 260) -> Chart:
    """Stacked bars (allowed at the bottom), the value axis in events per minute, time labels every 10 minutes."""
    left, top, right, bottom = 44.0, 12.0, width - 8, height - 52
    top_value, step = scale(max((b.total for b in minutes), default=0))
    slot = (right - left) / max(len(minutes), 1)
    per_unit = (bottom - top) / top_value
    bars: list[Bar] = []
    for i, bucket in enumerate(minutes):
        base = bottom
        for name, count in zip(CATEGORIES, bucket.counts, strict=True):
            if not count:
                continue
            height_of = count * per_unit
            base -= height_of
            bars.append(Bar(round(left + i * slot + slot * 0.1, 2), round(base, 2), round(slot * 0.8, 2),
                            round(height_of, 2), name, f"{_clock(bucket.start)} UTC: {count} {LABELS[name]}"))
    value_ticks = tuple(Tick(round(bottom - v * per_unit, 2), str(v)) for v in range(0, top_value + 1, step))
    time_ticks = tuple(Tick(round(left + i * slot, 2), _clock(b.start)) for i, b in enumerate(minutes)
                       if b.start % 600 == 0)
    totals = {name: sum(b.counts[k] for b in minutes) for k, name in enumerate(CATEGORIES)}
    legend = tuple(LegendEntry(left + k * 150, name, f"{LABELS[name]} ({totals[name]})")
                   for k, name in enumerate(CATEGORIES))
    return Chart(width, height, left, top, right, bottom, tuple(bars), value_ticks, time_ticks, legend, totals)
