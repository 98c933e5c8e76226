"""Argument constraints as a specification: (constraint, argument value) -> the rule that fails, table by table."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from gateway.policy.constraint_schema import schema_problems
from gateway.policy.constraints import (
    ArgumentConstraint,
    ArgumentPath,
    Constraints,
    Violation,
    compile_constraints,
)
from gateway.policy.locations import normalize_path, parse_url
from gateway.policy.uri import InvalidUri

BOUNDED = settings(max_examples=200, deadline=None, database=None, derandomize=True)

POLICY_YAML = r"""
path: {kind: path, within: ["/srv/docs/**"]}
url: {kind: url, hosts: ["*.example.com"], schemes: [https], ports: [443]}
sql: {max_length: 2000, not_matches: ["(?i)\\bdrop\\b"]}
limit: {range: [1, 1000]}
env: {in: [staging, dev]}
options.mode: {equals: fast, optional: true}
"""
GOOD = {"path": "/srv/docs/a.txt", "url": "https://api.example.com/v1", "sql": "select 1", "limit": 10, "env": "dev"}


def constraints(mapping: dict[str, Any]) -> Constraints:
    return compile_constraints({path: ArgumentConstraint.model_validate(spec) for path, spec in mapping.items()})


def rule(spec: dict[str, Any], value: Any) -> str | None:
    """The rule that `value`, as argument `a`, breaks under `spec`; None when it passes."""
    violation = constraints({"a": spec}).check({"a": value})
    return violation.rule if violation else None


# --- the brief's example policy, end to end ---------------------------------------------------------------

EXAMPLE = constraints(yaml.safe_load(POLICY_YAML))


@pytest.mark.parametrize(("change", "argument", "expected"), [
    ({}, None, None),
    ({"path": "/srv/docs/a/../b.txt"}, None, None),
    ({"path": "/srv/docs/../../etc/shadow"}, "path", "within"),
    ({"path": "docs/a.txt"}, "path", "path"),
    ({"url": "https://API.Example.COM.:443/x"}, None, None),
    ({"url": "https://example.com/"}, "url", "hosts"),
    ({"url": "https://example.com@evil.test/"}, "url", "url"),
    ({"url": "http://api.example.com/"}, "url", "schemes"),
    ({"url": "https://api.example.com:8443/"}, "url", "ports"),
    ({"sql": "DROP TABLE users"}, "sql", "not_matches"),
    ({"sql": "select dropped from t"}, None, None),
    ({"sql": "x" * 2001}, "sql", "max_length"),
    ({"limit": 0}, "limit", "range"),
    ({"limit": "10"}, "limit", "type"),
    ({"env": "prod"}, "env", "in"),
    ({"options": {"mode": "fast"}}, None, None),
    ({"options": {"mode": "slow"}}, "options.mode", "equals"),
    ({"options": {}}, None, None),
])
def test_the_example_policy_decides_each_argument(change: dict[str, Any], argument: str | None,
                                                  expected: str | None) -> None:
    violation = EXAMPLE.check({**GOOD, **change})
    assert ((violation.argument, violation.rule) if violation else (None, None)) == (argument, expected)


def test_the_first_broken_constraint_in_policy_order_is_reported() -> None:
    violation = EXAMPLE.check({**GOOD, "path": "/etc/passwd", "limit": -1})
    assert violation == Violation("path", "within", "'/etc/passwd' is not within the allowed paths")


def test_no_arguments_at_all_is_missing_for_a_required_constraint() -> None:
    assert EXAMPLE.check(None) == Violation("path", "missing", "the argument is missing")
    assert constraints({"a": {"equals": 1, "optional": True}}).check(None) is None
    assert compile_constraints({}).check({"anything": 1}) is None


# --- value operators ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "value", "expected"), [
    ({"equals": "fast"}, "fast", None),
    ({"equals": "fast"}, "Fast", "equals"),
    ({"equals": 1}, 1, None),
    ({"equals": 1}, 1.0, None),
    ({"equals": 1}, True, "equals"),
    ({"equals": True}, 1, "equals"),
    ({"equals": 0}, False, "equals"),
    ({"equals": None}, None, None),
    ({"equals": None}, 0, "equals"),
    ({"equals": "1"}, 1, "equals"),
    ({"equals": [1, "a"]}, [1, "a"], None),
    ({"equals": [1, "a"]}, [True, "a"], "equals"),
    ({"equals": [1, "a"]}, [1, "a", 2], "equals"),
    ({"equals": {"k": [1]}}, {"k": [1.0]}, None),
    ({"equals": {"k": [1]}}, {"k": [1], "j": 2}, "equals"),
    ({"in": ["a", 2, None]}, 2, None),
    ({"in": ["a", 2, None]}, None, None),
    ({"in": ["a", 2, None]}, "b", "in"),
    ({"in": [1, 2]}, True, "in"),
    ({"in": [True]}, 1, "in"),
    ({"not_in": ["root", 0]}, "admin", None),
    ({"not_in": ["root", 0]}, "root", "not_in"),
    ({"not_in": ["root", 0]}, 0.0, "not_in"),
    ({"not_in": ["root", 0]}, False, None),
    ({"range": [1, 10]}, 1, None),
    ({"range": [1, 10]}, 10, None),
    ({"range": [1, 10]}, 5.5, None),
    ({"range": [1, 10]}, 0, "range"),
    ({"range": [1, 10]}, 10.001, "range"),
    ({"range": [None, 10]}, -1e300, None),
    ({"range": [0, None]}, 10**30, None),
    ({"range": [0, None]}, -1, "range"),
    ({"range": [0, None]}, float("inf"), "range"),
    ({"range": [0, None]}, float("nan"), "range"),
    ({"range": [0, 1]}, True, "type"),
    ({"range": [0, 1]}, "1", "type"),
    ({"range": [0, 1]}, None, "type"),
    ({"range": [0, 1]}, [1], "type"),
    ({"max_length": 3}, "abc", None),
    ({"max_length": 3}, "abcd", "max_length"),
    ({"max_length": 3}, "ééé", None),
    ({"max_length": 2}, [1, 2], None),
    ({"max_length": 2}, [1, 2, 3], "max_length"),
    ({"max_length": 0}, "", None),
    ({"max_length": 3}, 123, "type"),
    ({"max_length": 3}, {"a": 1}, "type"),
    ({"matches": ["^[a-z]+$"]}, "abc", None),
    ({"matches": ["^[a-z]+$"]}, "abc1", "matches"),
    ({"matches": ["b"]}, "abc", None),
    ({"matches": ["a", "z"]}, "abc", "matches"),
    ({"matches": ["é"]}, "café", None),
    ({"matches": ["a"]}, 1, "type"),
    ({"matches": ["a"]}, "\ud800a", "matches"),
    ({"not_matches": ["(?i)drop"]}, "select", None),
    ({"not_matches": ["(?i)drop"]}, "DROP", "not_matches"),
    ({"not_matches": ["x", "y"]}, "y", "not_matches"),
    ({"not_matches": ["x"]}, ["x"], "type"),
    ({"max_length": 5, "matches": ["^a"]}, "abcdef", "max_length"),
    ({"in": ["a", "abc"], "matches": ["c$"]}, "abc", None),
    ({"in": ["a", "abc"], "matches": ["c$"]}, "a", "matches"),
])
def test_value_operators(spec: dict[str, Any], value: Any, expected: str | None) -> None:
    assert rule(spec, value) == expected


def test_a_catastrophic_backtracking_regex_finishes() -> None:
    evil = "a" * 50000 + "!"  # exponential for a backtracking engine: every split of the a's is tried
    assert rule({"matches": ["(a+)+$"]}, evil) == "matches"
    assert rule({"not_matches": ["(a+)+$"]}, evil) is None
    assert rule({"not_matches": ["(a|aa)+b", "^(a*)*$"]}, evil) is None
    assert rule({"matches": ["(a+)+!$"]}, evil) is None


def test_a_reason_never_echoes_much_of_the_callers_value() -> None:
    for spec, value in [({"in": ["x"]}, "A" * 10_000), ({"kind": "path", "within": ["/srv/**"]}, "/" + "B" * 10_000),
                        ({"kind": "url", "hosts": ["x.test"]}, "https://" + "c" * 60 + "." + "d" * 60 + "/"),
                        ({"kind": "url", "hosts": ["x.test"]}, "https://u@" + "e" * 10_000),
                        ({"matches": ["^z"]}, "F" * 10_000), ({"range": [0, 1]}, 10**5000),
                        ({"equals": 1}, list(range(10_000)))]:
        violation = constraints({"a": spec}).check({"a": value})
        assert violation is not None
        assert max(violation.why.count(c) for c in "ABcdeF") <= 80, violation
        assert len(violation.why) < 200, violation


# --- dotted paths, absence, optional ------------------------------------------------------------------------

@pytest.mark.parametrize(("arguments", "expected"), [
    ({"options": {"mode": "fast"}}, None),
    ({"options": {"mode": "slow"}}, "equals"),
    ({"options": {"mode": {"deep": 1}}}, "equals"),
    ({"options": {}}, "missing"),
    ({"options": None}, "missing"),
    ({"options": "mode"}, "missing"),
    ({"options": ["mode"]}, "missing"),
    ({"options.mode": "fast"}, "missing"),  # a key containing a dot is not reachable
    ({}, "missing"),
    ({"options": {"mode": None}}, "equals"),  # null is a value, not an absence
])
def test_a_dotted_path_reaches_a_nested_property(arguments: dict[str, Any], expected: str | None) -> None:
    violation = constraints({"options.mode": {"equals": "fast"}}).check(arguments)
    assert (violation.rule if violation else None) == expected
    assert violation is None or violation.argument == "options.mode"


@pytest.mark.parametrize(("arguments", "expected"), [
    ({}, None),
    ({"options": {}}, None),
    ({"options": 3}, None),
    ({"options": {"mode": "fast"}}, None),
    ({"options": {"mode": "slow"}}, "equals"),
    ({"options": {"mode": None}}, "equals"),
])
def test_an_optional_argument_may_be_absent_but_not_wrong(arguments: dict[str, Any], expected: str | None) -> None:
    violation = constraints({"options.mode": {"equals": "fast", "optional": True}}).check(arguments)
    assert (violation.rule if violation else None) == expected


def test_deep_paths_and_several_constraints_on_one_object() -> None:
    checks = constraints({"a.b.c": {"range": [0, 5]}, "a.list": {"max_length": 1}, "a.b": {"not_in": [{}]}})
    assert checks.check({"a": {"b": {"c": 3}, "list": []}}) is None
    assert checks.check({"a": {"b": {"c": 6}, "list": []}}) == Violation("a.b.c", "range", "6 is above the maximum 5")
    assert checks.check({"a": {"b": {"c": 3}, "list": [1, 2]}}) == Violation("a.list", "max_length",
                                                                            "2 items, at most 1")
    assert checks.check({"a": {"b": {"c": 3}, "list": 5}}) == Violation("a.list", "type",
                                                                       "must be an array or a string, got a number")
    assert checks.check({"a": {"b": {}, "list": []}}) == Violation("a.b.c", "missing", "the argument is missing")


# --- kind path ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "normalised"), [
    ("/srv/docs/a.txt", "/srv/docs/a.txt"),
    ("/srv/docs/a/../b.txt", "/srv/docs/b.txt"),
    ("/srv/docs/./a/./b", "/srv/docs/a/b"),
    ("/srv/docs/../../etc/shadow", "/etc/shadow"),
    ("/srv//docs///a", "/srv/docs/a"),
    ("/srv/docs/a//../../etc", "/srv/etc"),  # as a file system reads it, not /srv/docs/etc
    ("/srv/docs/", "/srv/docs"),
    ("/srv/docs/.", "/srv/docs"),
    ("/", "/"),
    ("//", "/"),
    ("/srv/docs/a b?c#d%", "/srv/docs/a b?c#d%"),  # characters of a plain path, not URI delimiters
    ("/srv/docs/café", "/srv/docs/café"),
    ("file:///srv/docs/a.txt", "/srv/docs/a.txt"),
    ("FILE:///srv/docs/a.txt", "/srv/docs/a.txt"),
    ("file://localhost/srv/docs/a.txt", "/srv/docs/a.txt"),
    ("file:/srv/docs/a.txt", "/srv/docs/a.txt"),
    ("file:///srv/docs/%2e%2e/%2E%2E/etc/shadow", "/etc/shadow"),
    ("file:///srv/docs/%61.txt", "/srv/docs/a.txt"),
    ("file:///srv/docs/a%20b", "/srv/docs/a b"),
    ("file:///srv/docs/%252e%252e/x", "/srv/docs/%2e%2e/x"),  # decoded once
    ("file:///srv/docs/caf%C3%A9", "/srv/docs/café"),
    ("file:////srv/docs/a", "/srv/docs/a"),
])
def test_a_path_is_normalised(value: str, normalised: str) -> None:
    assert normalize_path(value) == normalised


@pytest.mark.parametrize("value", [
    "srv/docs/a.txt", "./a", "../a", "", "~/a", " /srv/docs/a",
    "/srv/docs/../../../etc", "/..", "file:///..",
    "/srv/docs/a\x00", "/srv/docs/\n/a", "/srv/docs/a\x7f", "/srv/docs/\ud800",
    "/srv/docs\\..\\..\\etc", "file:///srv/docs/a\\b",
    "/srv/docs/%2e%2e/x", "/srv/docs/a%2Fb", "/srv/docs/a%20b",
    "file:///srv/docs/a%2Fb", "file:///srv/docs/a%2fb", "file:///srv/docs/a%5Cb", "file:///srv/docs/a%00",
    "file:///srv/docs/a%0Ab", "file:///srv/docs/%ZZ", "file:///srv/docs/%C0%AE%C0%AE/x",
    "/srv/docs/\uff0e\uff0e/x", "/srv/docs\uff0fetc", "/srv/docs/\u2024\u2024/x", "file:///srv/docs/%EF%BC%8E%EF%BC%8E",
    "file://evil.test/srv/docs/a", "file://user@/srv/docs/a", "file:///srv/docs/a?b", "file:///srv/docs/a#b",
    "file:relative/a", "file://[/srv",
])
def test_an_ambiguous_path_is_refused(value: str) -> None:
    with pytest.raises(InvalidUri):
        normalize_path(value)
    assert rule({"kind": "path", "within": ["/**"]}, value) == "path"


@pytest.mark.parametrize(("within", "value", "expected"), [
    (["/srv/docs/**"], "/srv/docs/a.txt", None),
    (["/srv/docs/**"], "/srv/docs/a/b/c.txt", None),
    (["/srv/docs/**"], "/srv/docs/a/../b.txt", None),
    (["/srv/docs/**"], "/srv/docs", "within"),
    (["/srv/docs/**"], "/srv/docs/", "within"),
    (["/srv/docs", "/srv/docs/**"], "/srv/docs/", None),
    (["/srv/docs/**"], "/srv/docs/../../etc/shadow", "within"),
    (["/srv/docs/**"], "/srv/docs/../docs2/a", "within"),
    (["/srv/docs/**"], "/srv/docsx/a", "within"),
    (["/srv/docs/**"], "/srv/docs/a//../../etc/shadow", "within"),
    (["/srv/docs/**"], "file:///srv/docs/%2e%2e/secret", "within"),
    (["/srv/docs/**"], "file:///srv/docs/a", None),
    (["/srv/docs/**"], "/SRV/docs/a", "within"),
    (["/srv/docs/*.txt"], "/srv/docs/a.txt", None),
    (["/srv/docs/*.txt"], "/srv/docs/sub/a.txt", "within"),
    (["/srv/*/public/**"], "/srv/x/public/a", None),
    (["/srv/*/public/**"], "/srv/x/y/public/a", "within"),
    (["/srv/a/**", "/tmp/**"], "/tmp/x", None),
    (["/"], "/", None),
    (["/"], "/a", "within"),
    (["/**"], "/anything/at/all", None),
    (["/srv/docs/**"], 42, "type"),
    (["/srv/docs/**"], ["/srv/docs/a"], "type"),
    (["/srv/docs/**"], None, "type"),
])
def test_within(within: list[str], value: Any, expected: str | None) -> None:
    assert rule({"kind": "path", "within": within}, value) == expected


@pytest.mark.parametrize(("spec", "value", "expected"), [
    ({"kind": "path", "equals": "/srv/docs/a"}, "/srv/docs/x/../a", None),
    ({"kind": "path", "equals": "/srv/docs/a/"}, "file:///srv/docs/a", None),
    ({"kind": "path", "in": ["/etc/hosts", "/etc/hostname"]}, "/etc/./hosts", None),
    ({"kind": "path", "not_in": ["/etc/shadow"]}, "/srv/../etc/shadow", "not_in"),
    ({"kind": "path", "not_matches": [r"/\.env$"]}, "/srv/app/.env/.", "not_matches"),
    ({"kind": "path", "matches": [r"\.txt$"]}, "/srv/a.txt/", None),
    ({"kind": "path", "max_length": 10}, "/a/./././././b", "max_length"),  # the value as sent
])
def test_other_operators_see_the_normalised_path(spec: dict[str, Any], value: Any, expected: str | None) -> None:
    assert rule(spec, value) == expected


# --- kind url -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "scheme", "host", "is_ip", "port", "canonical"), [
    ("https://example.com/a", "https", "example.com", False, 443, "https://example.com/a"),
    ("HTTPS://Example.COM/A", "https", "example.com", False, 443, "https://example.com/A"),
    ("https://example.com./", "https", "example.com", False, 443, "https://example.com/"),
    ("https://example.com:443/", "https", "example.com", False, 443, "https://example.com/"),
    ("https://example.com:/", "https", "example.com", False, 443, "https://example.com/"),
    ("https://example.com:8443", "https", "example.com", False, 8443, "https://example.com:8443"),
    ("http://example.com:0080/", "http", "example.com", False, 80, "http://example.com/"),
    ("ws://example.com/", "ws", "example.com", False, 80, "ws://example.com/"),
    ("wss://example.com/", "wss", "example.com", False, 443, "wss://example.com/"),
    ("ftp://example.com/", "ftp", "example.com", False, None, "ftp://example.com/"),
    ("https://example.com/a/./b/../c?q=%7e#f", "https", "example.com", False, 443, "https://example.com/a/c?q=~#f"),
    ("https://bücher.de/", "https", "xn--bcher-kva.de", False, 443, "https://xn--bcher-kva.de/"),
    ("https://BÜCHER.de/", "https", "xn--bcher-kva.de", False, 443, "https://xn--bcher-kva.de/"),
    ("https://\uff45xample.com/", "https", "example.com", False, 443, "https://example.com/"),
    ("https://a\u3002example.com/", "https", "a.example.com", False, 443, "https://a.example.com/"),
    ("https://my_service:8080/", "https", "my_service", False, 8080, "https://my_service:8080/"),
    ("http://127.0.0.1/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://127.0.0.1./", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://2130706433/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://0x7f.1/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://0X7F.0.0.1/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://0177.0.0.1/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://127.1/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://127.0.1/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://0x7f000001/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://0/", "http", "0.0.0.0", True, 80, "http://0.0.0.0/"),
    ("http://\uff11\uff12\uff17.0.0.1/", "http", "127.0.0.1", True, 80, "http://127.0.0.1/"),
    ("http://169.254.169.254/latest", "http", "169.254.169.254", True, 80, "http://169.254.169.254/latest"),
    ("http://[::1]/", "http", "::1", True, 80, "http://[::1]/"),
    ("http://[0:0:0:0:0:0:0:1]:8080/", "http", "::1", True, 8080, "http://[::1]:8080/"),
    ("http://[::FFFF:7F00:1]/", "http", "::ffff:7f00:1", True, 80, "http://[::ffff:7f00:1]/"),
])
def test_a_url_is_parsed_and_normalised(value: str, scheme: str, host: str, is_ip: bool, port: int | None,
                                        canonical: str) -> None:
    url = parse_url(value)
    assert (url.scheme, url.host, url.is_ip, url.port, url.canonical) == (scheme, host, is_ip, port, canonical)


@pytest.mark.parametrize("value", [
    "example.com", "//example.com/", "/a/b", "https:example.com", "https:///a", "https://", "mailto:a@example.com",
    "https://example.com@evil.test/", "https://user:pass@example.com/", "https://@example.com/",
    "https://evil.test\\@example.com/", "https://example.com\\evil.test/", "https://example.com/a\\b",
    "https://exa%6Dple.com/", "https://example.com%2F@evil.test/", "https://[::1%25eth0]/",
    "https://exa mple.com/", " https://example.com/", "https://example.com/\n", "https://example.com\t/",
    "https://example.com/\x00", "https://\ud800.com/",
    "https://example.com:65536/", "https://example.com:-1/", "https://example.com:8o/", "https://example.com:1:2/",
    "https://example.com:\uff18\uff10/",
    "https://[::1/", "https://[::1]x/", "https://[not-ip]/", "https://[127.0.0.1]/",
    "http://256.0.0.1/", "http://1.2.3.4.5/", "http://0x100000000/", "http://4294967296/", "http://1.256.1/",
    "http://08.0.0.1/", "http://foo.0x7f/", "http://example.123/", "http://1..2/",
    "https://exa*mple.com/", "https://a..b/", "https://" + "a" * 64 + ".com/", "https://example.com/../a", "https://example.com/%ZZ",
])
def test_an_ambiguous_or_malformed_url_is_refused(value: str) -> None:
    with pytest.raises(InvalidUri):
        parse_url(value)
    assert rule({"kind": "url", "hosts": ["*.example.com", "example.com"]}, value) == "url"


@pytest.mark.parametrize(("hosts", "value", "expected"), [
    (["*.example.com"], "https://api.example.com/", None),
    (["*.example.com"], "https://a.b.example.com/", None),
    (["*.example.com"], "https://API.EXAMPLE.COM./", None),
    (["*.example.com"], "https://example.com/", "hosts"),
    (["*.example.com"], "https://evilexample.com/", "hosts"),
    (["*.example.com"], "https://example.com.evil.test/", "hosts"),
    (["*.example.com"], "https://api.example.com.evil.test/", "hosts"),
    (["*.example.com", "example.com"], "https://example.com/", None),
    (["Example.COM."], "https://example.com/", None),
    (["example.com"], "https://www.example.com/", "hosts"),
    (["bücher.de"], "https://xn--bcher-kva.de/", None),
    (["xn--bcher-kva.de"], "https://BÜCHER.de/", None),
    (["127.0.0.1"], "http://2130706433/", None),
    (["127.0.0.1"], "http://0x7f.1/", None),
    (["2130706433"], "http://127.0.0.1/", None),
    (["localhost"], "http://127.0.0.1/", "hosts"),
    (["127.0.0.1"], "http://localhost/", "hosts"),
    (["::1"], "http://[0::1]/", None),
    (["[::1]"], "http://[::1]:8080/", None),
    (["*.example.com"], "https://[::1]/", "hosts"),
    (["*.example.com"], 5, "type"),
])
def test_hosts(hosts: list[str], value: Any, expected: str | None) -> None:
    assert rule({"kind": "url", "hosts": hosts}, value) == expected


@pytest.mark.parametrize(("spec", "value", "expected"), [
    ({"schemes": ["https"]}, "https://x.test/", None),
    ({"schemes": ["https"]}, "HTTPS://x.test/", None),
    ({"schemes": ["HTTPS"]}, "https://x.test/", None),
    ({"schemes": ["https"]}, "http://x.test/", "schemes"),
    ({"schemes": ["https"]}, "javascript://x.test/", "schemes"),
    ({"ports": [443]}, "https://x.test/", None),
    ({"ports": [443]}, "https://x.test:443/", None),
    ({"ports": [443]}, "http://x.test:443/", None),
    ({"ports": [443]}, "http://x.test/", "ports"),
    ({"ports": [443]}, "https://x.test:8443/", "ports"),
    ({"ports": [80, 8080]}, "ws://x.test/", None),
    ({"ports": [21]}, "ftp://x.test/", "ports"),
    ({"ports": [21]}, "ftp://x.test:21/", None),
    ({"equals": "https://x.test/a"}, "HTTPS://X.TEST:443/b/../a", None),
    ({"in": ["https://x.test/a"]}, "https://x.test/b", "in"),
    ({"not_matches": ["/admin"]}, "https://x.test/%61dmin", "not_matches"),
    ({"matches": ["^https://x\\.test/"]}, "https://X.test./p", None),
    ({"max_length": 20}, "https://x.test/" + "a" * 10, "max_length"),
])
def test_schemes_ports_and_the_canonical_url(spec: dict[str, Any], value: Any, expected: str | None) -> None:
    assert rule({"kind": "url", **spec}, value) == expected


# --- validation of the policy's constraints ------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "message"), [
    ({}, "at least one operator"),
    ({"optional": True}, "at least one operator"),
    ({"kind": "path"}, "at least one operator"),
    ({"range": None}, "at least one operator"),
    ({"kind": "file", "equals": 1}, "kind"),
    ({"equals": 1, "unknown": 2}, "Extra inputs are not permitted"),
    ({"in_": [1]}, "Extra inputs are not permitted"),
    ({"in": []}, "at least 1 item"),
    ({"not_matches": []}, "at least 1 item"),
    ({"within": ["/srv/**"]}, "within applies to kind path only"),
    ({"kind": "url", "within": ["/srv/**"]}, "within applies to kind path only"),
    ({"hosts": ["example.com"]}, "hosts applies to kind url only"),
    ({"kind": "path", "schemes": ["https"]}, "schemes applies to kind url only"),
    ({"kind": "value", "ports": [443]}, "ports applies to kind url only"),
    ({"kind": "path", "range": [0, 1]}, "range applies to kind value only"),
    ({"kind": "url", "range": [0, 1]}, "range applies to kind value only"),
    ({"range": [0, 1], "matches": ["a"]}, "no value is both a number (range) and a string (matches)"),
    ({"range": [0, 1], "max_length": 3}, "no value is both an array or a string (max_length) and a number (range)"),
    ({"range": [None, None]}, "at least one bound"),
    ({"range": [1]}, "range"),
    ({"range": [1, 2, 3]}, "range"),
    ({"range": [True, 2]}, "range"),
    ({"range": ["1", 2]}, "range"),
    ({"range": [float("nan"), 2]}, "finite"),
    ({"range": [5, 1]}, "the minimum 5 is above the maximum 1"),
    ({"max_length": -1}, "greater than or equal to 0"),
    ({"max_length": True}, "max_length"),
    ({"max_length": "3"}, "max_length"),
    ({"matches": ["(unclosed"]}, "matches: '(unclosed' is not a valid RE2 expression: missing )"),
    ({"not_matches": ["a(?=b)"]}, "not_matches: 'a(?=b)' is not a valid RE2 expression"),
    ({"matches": [r"(a)\1"]}, "is not a valid RE2 expression"),
    ({"matches": [1]}, "matches"),
    ({"kind": "path", "within": ["srv/docs/**"]}, "not a normalised absolute path"),
    ({"kind": "path", "within": ["/srv/docs/"]}, "not a normalised absolute path"),
    ({"kind": "path", "within": ["/srv//docs/**"]}, "not a normalised absolute path"),
    ({"kind": "path", "within": ["/srv/docs/../**"]}, "not a normalised absolute path"),
    ({"kind": "path", "within": ["/srv/./docs/**"]}, "not a normalised absolute path"),
    ({"kind": "path", "equals": 5}, "equals: a path is a string, not 5"),
    ({"kind": "path", "in": ["/srv/../../x"]}, "in: '/srv/../../x': '..' climbs above the root"),
    ({"kind": "path", "not_in": ["relative"]}, "not_in: 'relative': not an absolute path"),
    ({"kind": "url", "equals": "https://u@x.test/"}, "equals: 'https://u@x.test/': credentials"),
    ({"kind": "url", "hosts": ["*"]}, "hosts: '*': not a valid host name"),
    ({"kind": "url", "hosts": ["a.*.example.com"]}, "hosts: 'a.*.example.com'"),
    ({"kind": "url", "hosts": ["*.127.0.0.1"]}, "a wildcard applies to domain names, not to IP addresses"),
    ({"kind": "url", "hosts": ["*.[::1]"]}, "hosts: '*.[::1]'"),
    ({"kind": "url", "hosts": ["foo.0x7f"]}, "not an IPv4 address"),
    ({"kind": "url", "hosts": ["exa_mple.com", "bad host"]}, "hosts: 'bad host'"),
    ({"kind": "url", "schemes": ["ht tp"]}, "schemes: 'ht tp' is not a URL scheme"),
    ({"kind": "url", "schemes": ["1http"]}, "schemes: '1http' is not a URL scheme"),
    ({"kind": "url", "ports": [0]}, "greater than or equal to 1"),
    ({"kind": "url", "ports": [65536]}, "less than or equal to 65535"),
    ({"kind": "url", "ports": ["443"]}, "ports"),
    ({"kind": "url", "ports": [True]}, "ports"),
    ({"optional": "yes", "equals": 1}, "optional"),
])
def test_an_incoherent_constraint_is_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ArgumentConstraint.model_validate(spec)
    assert message in str(caught.value)


def test_a_yaml_date_is_not_a_json_value() -> None:
    with pytest.raises(ValidationError):
        ArgumentConstraint.model_validate(yaml.safe_load("equals: 2024-01-01"))
    assert rule(yaml.safe_load("equals: '2024-01-01'"), "2024-01-01") is None


def test_equals_null_is_an_operator_and_in_is_spelt_in() -> None:
    assert ArgumentConstraint.model_validate({"equals": None}).operators() == ("equals",)
    spec = ArgumentConstraint.model_validate({"in": [1], "not_in": [2], "max_length": 3})
    assert spec.operators() == ("max_length", "in", "not_in")
    assert spec.operator("in") == (1,)


class _Tool(BaseModel):
    arguments: dict[ArgumentPath, ArgumentConstraint]


@pytest.mark.parametrize("path", ["", ".a", "a.", "a..b", "."])
def test_a_malformed_argument_path_is_refused(path: str) -> None:
    with pytest.raises(ValidationError, match="property names joined by dots"):
        _Tool.model_validate({"arguments": {path: {"equals": 1}}})
    with pytest.raises(ValueError, match="property names joined by dots"):
        constraints({path: {"equals": 1}})


def test_a_well_formed_argument_path_is_kept() -> None:
    assert list(_Tool.model_validate({"arguments": {"a.b_c.d-e": {"equals": 1}}}).arguments) == ["a.b_c.d-e"]


# --- properties ---------------------------------------------------------------------------------------------

SEGMENT = st.text(st.sampled_from("abcxyz._-"), min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
WITHIN_DOCS = constraints({"p": {"kind": "path", "within": ["/srv/docs/**"]}})


@BOUNDED
@given(st.lists(SEGMENT, max_size=4), st.integers(1, 8), st.lists(SEGMENT, max_size=4), st.booleans())
def test_climbing_out_of_the_allowed_directory_never_passes(down: list[str], up: int, after: list[str],
                                                             as_uri: bool) -> None:
    climbed = "".join(f"{s}/" for s in down) + "../" * up + "/".join(after)
    path = f"{'file://' if as_uri else ''}/srv/docs/{climbed}"
    inside = len(down) >= up  # stays at or below /srv/docs/ only when it climbs no further than it went down
    violation = WITHIN_DOCS.check({"p": path})
    if not inside or (len(down) == up and not after):
        assert violation is not None, path
    else:
        assert violation is None, path


@BOUNDED
@given(st.lists(st.tuples(SEGMENT, st.sampled_from(["/", "//", "/./", "/.//./"])), min_size=1, max_size=5),
       st.sampled_from(["", "/", "/.", "//"]))
def test_redundant_slashes_and_dots_never_change_the_path(parts: list[tuple[str, str]], end: str) -> None:
    path = "/srv/docs" + "".join(separator + segment for segment, separator in parts) + end
    normalised = "/srv/docs/" + "/".join(segment for segment, _ in parts)
    assert normalize_path(path) == normalised
    assert normalize_path("file://" + path) == normalised
    assert WITHIN_DOCS.check({"p": path}) is None


LABEL = st.text(st.sampled_from("abcdexmplo0123-"), min_size=1, max_size=8)
UNDER_EXAMPLE = constraints({"u": {"kind": "url", "hosts": ["*.example.com"]}})


TAILS = ["", ".example.com", "example.com", ".EXAMPLE.com", ".example.com.evil.test", ".example.comx", "-example.com"]
SUFFIXES = ["/", "./", ":443/", "@example.com/", "\\.example.com/", "%2eexample.com/", "#.example.com", "?.example.com",
            ":@example.com/"]


@BOUNDED
@given(st.lists(LABEL, min_size=1, max_size=3), st.sampled_from(TAILS), st.sampled_from(SUFFIXES))
def test_a_host_not_under_example_com_never_passes(labels: list[str], tail: str, suffix: str) -> None:
    host = ".".join(labels) + tail
    url = f"https://{host}{suffix}"
    violation = UNDER_EXAMPLE.check({"u": url})
    if not host.lower().endswith(".example.com") or "@" in suffix or "\\" in suffix or "%" in suffix:
        assert violation is not None, url
    else:
        assert violation is None, url


@BOUNDED
@given(st.text(st.characters(exclude_categories=()), max_size=40))
def test_any_text_is_judged_without_an_exception(text: str) -> None:
    for checks in (WITHIN_DOCS, UNDER_EXAMPLE, constraints({"v": {"matches": ["a"], "max_length": 30}})):
        for value in (text, "/srv/docs/" + text, "file:///srv/docs/" + text, "https://" + text,
                      "https://a.test/" + text):
            violation = checks.check({"p": value, "u": value, "v": value})
            assert violation is None or isinstance(violation, Violation)


# --- the inputSchema cross-check ----------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "sql": {"type": "string"},
        "limit": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array"},
        "maybe": {"type": ["string", "null"]},
        "anything": {},
        "options": {"type": "object", "properties": {"mode": {"type": "string"}, "depth": {"type": "integer"}}},
        "loose": {"type": "object"},
    },
}


@pytest.mark.parametrize(("spec", "path", "problem"), [
    ({"max_length": 10}, "sql", None),
    ({"range": [0, 1]}, "limit", None),
    ({"range": [0, 1]}, "ratio", None),
    ({"max_length": 3}, "tags", None),
    ({"matches": ["a"]}, "maybe", None),
    ({"range": [0, 1]}, "anything", None),
    ({"equals": True}, "flag", None),
    ({"in": ["fast"]}, "options.mode", None),
    ({"kind": "path", "within": ["/srv/**"]}, "sql", None),
    ({"equals": 1}, "nope", 'arguments.nope: the tool\'s inputSchema has no property "nope"'),
    ({"equals": 1}, "options.nope", 'arguments.options.nope: the tool\'s inputSchema has no property "options.nope"'),
    ({"equals": 1}, "nope.mode", 'arguments.nope.mode: the tool\'s inputSchema has no property "nope"'),
    ({"equals": 1}, "sql.x", 'arguments.sql.x: the tool\'s inputSchema has no property "sql.x"'),
    ({"equals": 1}, "loose.x", 'arguments.loose.x: the tool\'s inputSchema has no property "loose.x"'),
    ({"range": [0, 1]}, "sql", "arguments.sql: range needs a number, the schema says string"),
    ({"range": [0, 1]}, "options.mode", "arguments.options.mode: range needs a number, the schema says string"),
    ({"kind": "path", "within": ["/srv/**"]}, "limit",
     "arguments.limit: kind path needs a string, the schema says integer"),
    ({"kind": "url", "hosts": ["a.test"]}, "flag", "arguments.flag: kind url needs a string, the schema says boolean"),
    ({"max_length": 3}, "flag", "arguments.flag: max_length needs an array or a string, the schema says boolean"),
    ({"max_length": 3}, "options", "arguments.options: max_length needs an array or a string, the schema says object"),
    ({"matches": ["a"]}, "tags", "arguments.tags: matches needs a string, the schema says array"),
    ({"not_matches": ["a"]}, "options.depth",
     "arguments.options.depth: not_matches needs a string, the schema says integer"),
    ({"range": [0, 1]}, "maybe", "arguments.maybe: range needs a number, the schema says string or null"),
])
def test_schema_problems(spec: dict[str, Any], path: str, problem: str | None) -> None:
    mapping = {path: ArgumentConstraint.model_validate(spec)}
    assert schema_problems(mapping, SCHEMA) == ([problem] if problem else [])


def test_schema_problems_lists_one_line_per_mismatch_in_policy_order() -> None:
    mapping = {path: ArgumentConstraint.model_validate(spec) for path, spec in yaml.safe_load(POLICY_YAML).items()}
    schema = {"type": "object", "properties": {"path": {"type": "string"}, "url": {"type": "string"},
                                               "limit": {"type": "string"}, "env": {"type": "string"}}}
    assert schema_problems(mapping, schema) == [
        'arguments.sql: the tool\'s inputSchema has no property "sql"',
        "arguments.limit: range needs a number, the schema says string",
        'arguments.options.mode: the tool\'s inputSchema has no property "options"',
    ]
    assert schema_problems(mapping, {}) == [
        f'arguments.{p}: the tool\'s inputSchema has no property "{p.split(".")[0]}"' for p in mapping]
