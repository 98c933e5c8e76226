"""The admin console's pure parts, by table: the decisions chart, CSRF tokens and where a form may come from, the
session cookie, and reading the audit trail newest first out of oldest-first pages. (The console itself, in a
real browser in front of a real gateway: `test_console`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.auth.keys import load_or_create_signing_key
from gateway.console import chart, session, trail

NOW = 1_800_000_030.0  # 30 s into a minute


@pytest.mark.parametrize(("results", "expected"), [
    ([], (0, 0, 0, 0)),
    (["allowed", "allowed", "denied"], (2, 1, 0, 0)),
    (["auth_failed", "invalid_request", "upstream_error", "error", None], (0, 0, 1, 4)),
])
def test_the_current_minute_counts_each_result_under_its_category(results: list[Any],
                                                                  expected: tuple[int, ...]) -> None:
    minutes = chart.buckets([{"timestamp": NOW - 1, "result": r} for r in results], NOW)
    assert len(minutes) == 60 and minutes[-1].counts == expected and minutes[-1].start == NOW - 30


@pytest.mark.parametrize(("age_s", "bucket"), [(0, 59), (30, 59), (31, 58), (60 * 59 + 30, 0)])
def test_an_event_falls_in_the_minute_it_happened(age_s: float, bucket: int) -> None:
    minutes = chart.buckets([{"timestamp": NOW - age_s, "result": "allowed"}], NOW)
    assert [i for i, b in enumerate(minutes) if b.total] == [bucket]


@pytest.mark.parametrize("age_s", [60 * 59 + 31, 3 * 3600, -60])
def test_events_outside_the_hour_are_not_counted(age_s: float) -> None:
    assert sum(b.total for b in chart.buckets([{"timestamp": NOW - age_s, "result": "denied"}], NOW)) == 0


@pytest.mark.parametrize(("peak", "axis"), [(0, (4, 1)), (1, (1, 1)), (7, (8, 2)), (37, (40, 10)), (100, (100, 50)),
                                            (999, (1000, 500))])
def test_the_value_axis_ends_on_a_round_number_at_or_above_the_peak(peak: int, axis: tuple[int, int]) -> None:
    assert chart.scale(peak) == axis


def test_bars_stack_their_categories_in_proportion_to_the_counts() -> None:
    events = [{"timestamp": NOW, "result": r} for r in ["allowed"] * 6 + ["denied"] * 2]
    drawn = chart.layout(chart.buckets(events, NOW))
    allowed, denied = drawn.bars
    assert (allowed.category, denied.category) == ("allowed", "denied")
    assert allowed.height == pytest.approx(3 * denied.height)
    assert allowed.y + allowed.height == pytest.approx(drawn.bottom) and denied.y + denied.height == allowed.y
    assert denied.title.endswith("UTC: 2 denied") and drawn.totals["allowed"] == 6
    assert [t.label for t in drawn.value_ticks] == ["0", "2", "4", "6", "8"]
    assert len(drawn.time_ticks) == 6  # every 10 minutes


def test_a_csrf_token_belongs_to_one_session_and_to_the_signing_key(tmp_path: Path) -> None:
    key = session.ConsoleKey(load_or_create_signing_key(tmp_path / "key.pem"))
    replica = session.ConsoleKey(load_or_create_signing_key(tmp_path / "key.pem"))
    stranger = session.ConsoleKey(load_or_create_signing_key(tmp_path / "other.pem"))
    token = key.csrf_token("jti-1")
    assert replica.csrf_ok("jti-1", token), "replicas sharing the signing key must agree"
    for offered, session_id, who in [(token, "jti-2", key), (None, "jti-1", key), ("", "jti-1", key),
                                     (token[:-1], "jti-1", key), (token.upper(), "jti-1", key),
                                     ("é" + token, "jti-1", key), (token, "jti-1", stranger)]:
        assert not who.csrf_ok(session_id, offered), (offered, session_id)
    assert key.flash_ok("done", "assigned", key.flash_seal("done", "assigned"))
    assert not key.flash_ok("error", "assigned", key.flash_seal("done", "assigned"))


@pytest.mark.parametrize(("headers", "refused"), [
    ({}, False),
    ({"origin": ["http://127.0.0.1:8080"], "sec-fetch-site": ["same-origin"]}, False),
    ({"origin": ["http://127.0.0.1:9999"]}, True),
    ({"origin": ["null"]}, True),
    ({"origin": ["null"], "sec-fetch-site": ["same-origin"]}, False),  # what no-referrer makes browsers send
    ({"origin": ["null"], "sec-fetch-site": ["same-site"]}, True),
    ({"origin": ["http://127.0.0.1:9999"], "sec-fetch-site": ["same-origin"]}, True),
    ({"origin": ["http://127.0.0.1:8080", "http://127.0.0.1:8080"]}, True),
    ({"sec-fetch-site": ["same-site"]}, True),
    ({"sec-fetch-site": ["cross-site"]}, True),
    ({"origin": ["http://127.0.0.1:8080"], "sec-fetch-site": ["none"]}, True),
])
def test_a_post_from_anywhere_but_the_console_is_refused(headers: dict[str, list[str]], refused: bool) -> None:
    assert (session.cross_site(headers, "http://127.0.0.1:8080") is not None) is refused


@pytest.mark.parametrize(("secure", "expected"), [
    (False, "mcpgw_console=T; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=1800"),
    (True, "mcpgw_console=T; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=1800; Secure"),
])
def test_the_session_cookie_is_http_only_strict_and_scoped_to_admin(secure: bool, expected: str) -> None:
    assert session.session_cookie("T", 1800, secure) == expected
    assert session.cleared_cookie(secure).startswith(
        "mcpgw_console=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0")


@pytest.mark.parametrize(("cookies", "token"), [
    ([], None), (["a=b"], None), (["a=b; mcpgw_console=T1"], "T1"), (["mcpgw_console=T1", "c=d"], "T1"),
    (["mcpgw_console=T1; mcpgw_console=T2"], None), (["mcpgw_console="], None), (["xmcpgw_console=T1"], None),
])
def test_the_session_is_read_from_exactly_one_cookie(cookies: list[str], token: str | None) -> None:
    assert session.cookie_token({"cookie": cookies}) == token


def _reader(events: list[dict[str, Any]], reads: list[dict[str, str]]) -> trail.Read:
    """A reader like `read_audit`: oldest first, at most `limit` (1000) per read."""
    async def read(params: dict[str, str]) -> list[dict[str, Any]]:
        reads.append(params)
        since, until = float(params["since"]), float(params["until"])
        found = [e for e in events if since <= e["timestamp"] < until
                 and all(e.get(k) == params[k] for k in trail.FILTERS if k in params)]
        return found[:int(params["limit"])]
    return read


@pytest.mark.parametrize(("gaps_s", "count", "params"), [
    ([0.01] * 20_000, 50, {}),  # a busy trail: a first window of 5 minutes is far too full
    ([600.0] * 500, 100, {}),  # a quiet one: the window widens
    ([86400.0] * 3, 50, {}),  # fewer events than asked for, days apart
    ([1.0] * 3000, 25, {"until": str(NOW - 1000)}),  # an older page
    ([1.0] * 3000, 500, {"since": "600s"}),  # since bounds the window
    ([0.5] * 5000, 40, {"result": "denied"}),
])
async def test_the_newest_events_are_found_however_the_trail_is_spread(gaps_s: list[float], count: int,
                                                                       params: dict[str, str]) -> None:
    events, stamp = [], NOW
    for i, gap in enumerate(gaps_s):
        stamp -= gap
        events.append({"id": str(i), "timestamp": stamp, "result": "denied" if i % 3 else "allowed"})
    events.reverse()
    reads: list[dict[str, str]] = []
    got = await trail.newest(_reader(events, reads), params, count, NOW)
    until = float(params.get("until", NOW + 1))
    since = NOW - 600 if "since" in params else float("-inf")
    wanted = [e for e in events if since <= e["timestamp"] < until and params.get("result") in (None, e["result"])]
    assert got == wanted[::-1][:count]
    assert len(reads) <= 12
