"""Every parser on the request and answer paths under generated input (bounded here; `make fuzz` runs long).

The properties live in `tests/fuzzing.py`; a counterexample hypothesis finds is printed whole, and is added to the
table of the test that owns that rule once fixed.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fuzzing

BOUNDED = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@BOUNDED
@given(fuzzing.bodies())
def test_parse_body_and_classify_raise_only_their_own_refusals(body: bytes) -> None:
    fuzzing.check_parse_body(body)


@BOUNDED
@given(fuzzing.messages(), fuzzing.routing_headers(), fuzzing.json_values)
def test_routing_header_checks_never_raise(message: dict[str, Any], headers: dict[str, list[str]],
                                           schema: Any) -> None:
    fuzzing.check_routing(message, headers, schema)


@BOUNDED
@given(fuzzing.uris)
def test_an_accepted_uri_has_no_dot_segment_however_it_is_decoded(uri: str) -> None:
    fuzzing.check_uri(uri)


@BOUNDED
@given(fuzzing.sse_streams, st.lists(st.integers(0, 400), max_size=6))
def test_the_sse_decoder_gives_the_same_events_however_the_stream_is_cut(stream: bytes, cuts: list[int]) -> None:
    fuzzing.check_sse(stream, cuts)


@BOUNDED
@given(fuzzing.answers(), st.booleans())
def test_the_inspector_answers_once_and_never_passes_what_it_could_not_read(
        answer: tuple[bytes | None, int, list[bytes]], listing: bool) -> None:
    fuzzing.check_inspector(answer, listing)


@BOUNDED
@given(fuzzing.raw_answers(), st.lists(st.integers(0, 200), max_size=5))
def test_the_upstream_client_accepts_no_answer_h11_refuses_and_reads_the_rest_as_h11_does(
        data: bytes, cuts: list[int]) -> None:
    fuzzing.check_upstream_client(data, cuts)


def test_the_http_fuzzer_finds_nothing_against_serve() -> None:
    from tests.fuzz_http import fuzz_serve

    assert fuzz_serve(300, derandomize=True), "see the printed counterexample"
