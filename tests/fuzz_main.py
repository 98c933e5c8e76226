"""`make fuzz`: each property of tests/fuzzing.py for many generated inputs, then the HTTP fuzzer against serve.

Prints, per target, how many inputs ran, how fast, and the first counterexample if one is found (exit 1).
Usage: python -m tests.fuzz_main [--bodies N] [--others N] [--http N] [--only NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import fuzzing

MUTANTS = 49  # per generated body, for the long run of the body target

TARGETS = {
    "parse_body+classify": (st.tuples(fuzzing.bodies(), st.integers(0, 2**32)),
                            lambda args: fuzzing.check_parse_body_and_mutants(*args, MUTANTS)),
    "routing headers": (st.tuples(fuzzing.messages(), fuzzing.routing_headers(), fuzzing.json_values),
                        lambda args: fuzzing.check_routing(*args)),
    "uri normalisation": (fuzzing.uris, fuzzing.check_uri),
    "sse decoder": (st.tuples(fuzzing.sse_streams, st.lists(st.integers(0, 400), max_size=6)),
                    lambda args: fuzzing.check_sse(*args)),
    "response inspector": (st.tuples(fuzzing.answers(), st.booleans()), lambda args: fuzzing.check_inspector(*args)),
    "upstream client vs h11": (st.tuples(fuzzing.raw_answers(), st.lists(st.integers(0, 200), max_size=5)),
                               lambda args: fuzzing.check_upstream_client(*args)),
}


def run(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], int | None], inputs: int) -> bool:
    """Run `check` on generated values until `inputs` inputs were checked (a check may count several)."""
    count = 0
    per_example = MUTANTS + 1 if name == "parse_body+classify" else 1

    @settings(max_examples=max(1, inputs // per_example), deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def case(value: Any) -> None:
        nonlocal count
        count += check(value) or 1

    started = time.perf_counter()
    try:
        case()
    except Exception as failure:  # a counterexample: hypothesis has printed it, shrunk
        print(f"{name:<26} FAILED after {count:,} inputs: {failure!r}")
        return False
    elapsed = time.perf_counter() - started
    print(f"{name:<26} {count:>10,} inputs  {count / elapsed:>9,.0f}/s  {elapsed:>7.1f} s  0 failures", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bodies", type=int, default=1_000_000, help="inputs for parse_body+classify")
    parser.add_argument("--others", type=int, default=100_000, help="inputs for each other function target")
    parser.add_argument("--http", type=int, default=20_000, help="requests for the HTTP fuzzer against serve")
    parser.add_argument("--only", help="run one target (a name from the table, or 'http')")
    args = parser.parse_args(argv)
    ok = True
    for name, (strategy, check) in TARGETS.items():
        if args.only in (None, name):
            ok &= run(name, strategy, check, args.bodies if name == "parse_body+classify" else args.others)
    if args.only in (None, "http"):
        from tests.fuzz_http import fuzz_serve

        ok &= fuzz_serve(args.http)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
