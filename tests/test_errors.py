"""The refusal catalogue is complete and unambiguous: the audit log and clients can rely on its rows."""

from __future__ import annotations

from gateway import errors

RESULTS = {"allowed", "denied", "rate_limited", "auth_failed", "invalid_request", "upstream_error", "error"}


def test_every_refusal_is_in_the_catalogue_once_with_a_known_audit_result() -> None:
    defined = {value for value in vars(errors).values() if isinstance(value, errors.Refusal)}
    assert defined == set(errors.CATALOGUE)
    assert len({r.name for r in errors.CATALOGUE}) == len(errors.CATALOGUE)
    assert {r.audit_result for r in errors.CATALOGUE} <= RESULTS - {"allowed"}
    assert all(400 <= r.http_status < 600 and -32768 <= r.code <= -32000 for r in errors.CATALOGUE)


def test_every_row_is_in_the_table_at_the_top_of_the_module() -> None:
    table = errors.__doc__ or ""
    missing = [r.name for r in errors.CATALOGUE if r.name.upper() not in table]
    assert missing == []
