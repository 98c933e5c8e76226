"""Issue 18's targets, read off the run `make bench` just made: each with its ratio, its spread over rounds, ✓/✗.

Every target is measured with the gateway as configured by default (`audit.durability: written`: an answer's
end waits for its event's commit); B1's are also shown with `queued`, which B11 compares. The figures come from
today's `bench/results/<date>.json`, where bench_http.py (B1, B2, B4) stored each target's ratio and spread as
it measured them side by side; this prints them as one table and records it in the same file under "targets".
Nothing is measured here and nothing is asserted: a ✗ is a finding, explained in bench/README.md.

    python bench/targets.py
"""

from __future__ import annotations

import datetime
import json
import operator
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, save

# (bench, key, what, comparison, target)
TARGETS = [
    ("B2", "trivial_p99_c1", "p99 at c=1, trivial upstream / nginx's p99", "<=", 2.0),
    ("B1", "sdk_p99_c1", "p99 at c=1, SDK upstream / direct p99", "<=", 1.5),
    ("B1", "sdk_p99_c32", "p99 at c=32, SDK upstream / direct p99", "<=", 1.5),
    ("B2", "trivial_rps_c32", "saturation at c=32, trivial upstream / nginx", ">=", 0.3),
    ("B2", "trivial_p50_c1", "p50 at c=1, trivial upstream / the upstream's own", "<=", 2.5),
    ("B1", "sdk_rps_c32", "throughput at c=32 in front of MCPServer / direct", ">=", 0.95),
    ("B1", "sdk_p99_c1_queued", "  the same p99 at c=1 with audit.durability: queued", "<=", 1.5),
    ("B1", "sdk_p99_c32_queued", "  the same p99 at c=32 with audit.durability: queued", "<=", 1.5),
    ("B1", "sdk_rps_c32_queued", "  the same throughput with audit.durability: queued", ">=", 0.95),
    ("B4", "sse_first_event", "first SSE event / direct", "<=", 1.1),
    ("B4", "read_100mb_time", "100 MB 2026-07-28 resources/read, time / direct", "<=", 1.1),
    ("B4", "read_100mb_rss_growth_mb", "100 MB 2026-07-28 resources/read, gateway RSS growth (MB)", "<", 20.0),
]
_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


def main() -> None:
    path = RESULTS / f"{datetime.date.today().isoformat()}.json"
    http: dict[str, Any] = json.loads(path.read_text()).get("http", {}) if path.exists() else {}
    print("\nIssue 18 targets (ratios measured side by side in this run; medians over rounds)")
    print(f"  {'':<62} {'measured':>9} {'spread':>7} {'target':>9}")
    table = {}
    for bench, key, what, comparison, target in TARGETS:
        found = http.get(bench, {}).get("targets", {}).get(key)
        if found is None:
            print(f"  {what:<62} {'not run':>9} {'':>7} {comparison + ' ' + format(target, 'g'):>9}")
            continue
        value, spread = found
        met = _COMPARE[comparison](value, target)
        table[key] = {"measured": value, "spread": spread, "target": f"{comparison} {target:g}", "met": met}
        print(f"  {what:<62} {value:>9.2f} {spread:>6.0%} {comparison + ' ' + format(target, 'g'):>9} "
              f"{'✓' if met else '✗'}")
    print(f"\nresults: {save('targets', table)}")


if __name__ == "__main__":
    main()
