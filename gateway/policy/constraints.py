"""Argument constraints: what a role may call a tool *with*, compiled once per policy load, checked per call.

Owns the YAML form of one argument's constraint (`ArgumentConstraint`), its compilation
(`compile_constraints`), and the check of a call's arguments (`Constraints.check`: the first `Violation`,
or None; it never raises). Pure: no I/O, no clock. `policy.constraint_schema` holds them against a tool's
`inputSchema`.

An argument is named by a dotted path into the arguments object: `options.mode` is the `mode` property of
the object `options`, so a key that itself contains a dot cannot be named. An argument that is absent, or
whose path runs through something other than an object, fails with rule `missing` unless the constraint
is `optional`; a JSON null is a value, not an absence.

Operators (every one given must hold; a failure's `rule` is the operator's name), in the order checked:

    max_length              characters of a string, items of an array, of the value as sent
    within                  kind path: globs, `*` within one segment, `**` across segments
    schemes, hosts, ports   kind url: `*.example.com` is any subdomain, not example.com itself; the port
                            is the explicit one or the scheme's default (`locations.DEFAULT_PORTS`)
    equals, in, not_in      exact JSON equality: true is not 1, 1 is 1.0
    range: [min, max]       a number (never a boolean) within inclusive bounds; a null bound is open
    matches, not_matches    RE2 expressions (linear time, no catastrophic backtracking), searched anywhere

A value of the wrong JSON type for an operator fails with rule `type`. Kind `path` and `url` values are
strings normalised by `policy.locations`, refused with rule `path` / `url` when ambiguous; every operator
but `max_length` then sees the normalised form (and the policy's own `equals` / `in` / `not_in` values
are normalised alike): the absolute path without a trailing slash, so `/srv/docs/**` does not cover
`/srv/docs` itself (list it too); the URL with scheme and host lower-cased, the host IDNA-encoded or an IP
address in canonical form, a default port dropped. Before any operator, an argument fails with rule
`missing`, then `type`; `path` / `url` come right after `max_length`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import re2  # type: ignore[import-untyped]
from pydantic import AfterValidator, Field, JsonValue, StrictBool, StrictFloat, StrictInt, model_validator

from gateway.policy.globs import glob_regex
from gateway.policy.locations import Url, normalize_host, normalize_path, parse_url
from gateway.policy.uri import InvalidUri
from gateway.yamlfile import StrictModel

Number = StrictInt | StrictFloat
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Test = Callable[[Any], str | None]  # a reason when the value fails, else None

_OPERATORS = ("max_length", "within", "schemes", "hosts", "ports", "equals", "in", "not_in", "range", "matches",
              "not_matches")  # in check order
_KIND_ONLY = {"within": "path", "hosts": "url", "schemes": "url", "ports": "url"}
_NEEDS = {"range": frozenset({"number"}), "max_length": frozenset({"string", "array"}),
          "matches": frozenset({"string"}), "not_matches": frozenset({"string"})}
_JSON_TYPES = frozenset({"null", "boolean", "number", "string", "array", "object"})
_A = {"null": "null", "boolean": "a boolean", "number": "a number", "string": "a string", "array": "an array",
      "object": "an object"}
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad expression is reported as a policy problem, not on stderr


def _argument_path(path: str) -> str:
    if not all(path.split(".")):
        raise ValueError(f"{path!r}: an argument is named by property names joined by dots")
    return path


ArgumentPath = Annotated[str, AfterValidator(_argument_path)]
"""A constrained argument's dotted path, for a policy model's `dict[ArgumentPath, ArgumentConstraint]`."""


class ArgumentConstraint(StrictModel):
    """What one argument of a tool call must be; see the module docstring for the operators."""

    kind: Literal["value", "path", "url"] = "value"
    equals: JsonValue = None
    in_: tuple[JsonValue, ...] | None = Field(None, alias="in", min_length=1)
    not_in: tuple[JsonValue, ...] | None = Field(None, min_length=1)
    range: tuple[Number | None, Number | None] | None = None
    max_length: StrictInt | None = Field(None, ge=0)
    matches: tuple[str, ...] | None = Field(None, min_length=1)
    not_matches: tuple[str, ...] | None = Field(None, min_length=1)
    within: tuple[str, ...] | None = Field(None, min_length=1)
    hosts: tuple[str, ...] | None = Field(None, min_length=1)
    schemes: tuple[str, ...] | None = Field(None, min_length=1)
    ports: tuple[Port, ...] | None = Field(None, min_length=1)
    optional: StrictBool = False

    def operator(self, name: str) -> Any:
        """The value of operator `name` (spelt as in YAML), None when not given (`equals: null` is given)."""
        if name == "equals":
            return self.equals if "equals" in self.model_fields_set else None
        return getattr(self, "in_" if name == "in" else name)

    def operators(self) -> tuple[str, ...]:
        """The operators given, in check order."""
        return tuple(name for name in _OPERATORS if (name == "equals" and "equals" in self.model_fields_set)
                     or (name != "equals" and self.operator(name) is not None))

    def type_needs(self) -> list[tuple[str, frozenset[str]]]:
        """(what, the JSON types it accepts) for the kind and each operator that restricts the value's type."""
        needs = [(f"kind {self.kind}", frozenset({"string"}))] if self.kind != "value" else []
        return needs + [(name, _NEEDS[name]) for name in self.operators() if name in _NEEDS]

    @model_validator(mode="after")
    def _coherent(self) -> ArgumentConstraint:
        given = self.operators()
        if not given:
            raise ValueError(f"a constraint needs at least one operator ({', '.join(_OPERATORS)})")
        for name in given:
            kind = _KIND_ONLY.get(name, "value" if name == "range" else self.kind)
            if kind != self.kind:
                raise ValueError(f"{name} applies to kind {kind} only, not to kind {self.kind}")
        needs = self.type_needs()
        for index, (what, types) in enumerate(needs):
            for other, other_types in needs[:index]:
                if not types & other_types:
                    raise ValueError(f"no value is both {describe_types(other_types)} ({other}) and "
                                     f"{describe_types(types)} ({what})")
        if self.range is not None:
            low, high = self.range
            if (low is None and high is None) or not all(math.isfinite(b) for b in self.range if b is not None):
                raise ValueError("range needs at least one bound, and bounds are finite numbers")
            if low is not None and high is not None and low > high:
                raise ValueError(f"range: the minimum {low} is above the maximum {high}")
        for name in ("matches", "not_matches"):
            for pattern in self.operator(name) or ():
                _regex(pattern, name)
        for pattern in self.within or ():
            segments = pattern.split("/")
            if not pattern.startswith("/") or (pattern != "/" and ("" in segments[1:] or {".", ".."} & {*segments})):
                raise ValueError(f"within: {pattern!r} is not a normalised absolute path (no //, ., .. or "
                                 "trailing /)")
        for host in self.hosts or ():
            _host_pattern(host)
        for scheme in self.schemes or ():
            if not re2.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
                raise ValueError(f"schemes: {scheme!r} is not a URL scheme")
        for name in ("equals", "in", "not_in"):
            if name in given and self.kind != "value":
                _normalised_values(self, name)
        return self


@dataclass(frozen=True, slots=True)
class Violation:
    """Why a call's arguments break a constraint: the argument's dotted path, the operator, a short reason."""

    argument: str
    rule: str
    why: str


@dataclass(frozen=True, slots=True)
class _Compiled:
    argument: str
    keys: tuple[str, ...]
    optional: bool
    accepts: frozenset[str]
    max_length: int | None
    normalise: tuple[str, Callable[[str], Any]] | None  # (rule, normaliser) for kind path and url
    tests: tuple[tuple[str, Test], ...]

    def check(self, value: Any) -> Violation | None:
        kind = _json_type(value)
        if kind not in self.accepts:
            got = _A.get(kind, type(value).__name__)
            return Violation(self.argument, "type", f"must be {describe_types(self.accepts)}, got {got}")
        if self.max_length is not None and len(value) > self.max_length:
            unit = "characters" if kind == "string" else "items"
            return Violation(self.argument, "max_length", f"{len(value)} {unit}, at most {self.max_length}")
        if self.normalise is not None:
            rule, normalise = self.normalise
            try:
                value = normalise(value)
            except InvalidUri as exc:
                return Violation(self.argument, rule, f"{_shown(value)}: {exc}")
        for rule, test in self.tests:
            why = test(value)
            if why is not None:
                return Violation(self.argument, rule, why)
        return None


@dataclass(frozen=True, slots=True)
class Constraints:
    """The compiled constraints of one tool's arguments."""

    rules: tuple[_Compiled, ...]

    def check(self, arguments: Mapping[str, Any] | None) -> Violation | None:
        """The first constraint (in policy order) that `arguments` break, or None when all hold."""
        for rule in self.rules:
            node: Any = arguments or {}
            for key in rule.keys:
                if not isinstance(node, Mapping) or key not in node:
                    if rule.optional:
                        break
                    return Violation(rule.argument, "missing", "the argument is missing")
                node = node[key]
            else:
                violation = rule.check(node)
                if violation is not None:
                    return violation
        return None


def compile_constraints(mapping: Mapping[str, ArgumentConstraint]) -> Constraints:
    """Compile a tool's constraints, keyed by argument path; ValueError for a malformed path."""
    return Constraints(tuple(_compile(_argument_path(path), c) for path, c in mapping.items()))


def _compile(argument: str, constraint: ArgumentConstraint) -> _Compiled:
    accepts = _JSON_TYPES.intersection(*(types for _, types in constraint.type_needs()))
    normalise: tuple[str, Callable[[str], Any]] | None = None
    text: Callable[[Any], Any] = _as_is  # what equals, in, not_in, matches and not_matches see
    tests: list[tuple[str, Test]] = []
    if constraint.kind == "path":
        normalise = ("path", normalize_path)
    elif constraint.kind == "url":
        normalise = ("url", parse_url)
        text = _canonical
    for name in constraint.operators():
        operand = constraint.operator(name)
        if name in ("equals", "in", "not_in"):
            values = _normalised_values(constraint, name) if constraint.kind != "value" else (
                (operand,) if name == "equals" else operand)
            tests.append((name, _membership(values, name == "not_in", text)))
        elif name == "range":
            tests.append((name, _range(*operand)))
        elif name in ("matches", "not_matches"):
            for pattern in operand:
                tests.append((name, _search(_regex(pattern, name), pattern, name == "matches", text)))
        elif name == "within":
            tests.append((name, _within(operand)))
        elif name in ("hosts", "schemes", "ports"):
            tests.append((name, _url_part(name, operand)))
    return _Compiled(argument, tuple(argument.split(".")), constraint.optional, accepts, constraint.max_length,
                     normalise, tuple(tests))


def _as_is(value: Any) -> Any:
    return value


def _canonical(url: Url) -> str:
    return url.canonical


def _membership(values: tuple[Any, ...], refuse: bool, text: Callable[[Any], Any]) -> Test:
    def test(value: Any) -> str | None:
        value = text(value)
        if any(_json_equal(expected, value) for expected in values) != refuse:
            return None
        return f"{_shown(value)} is a refused value" if refuse else f"{_shown(value)} is not an allowed value"
    return test


def _range(low: float | None, high: float | None) -> Test:
    def test(value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number"
        if low is not None and value < low:
            return f"{_shown(value)} is below the minimum {low}"
        if high is not None and value > high:
            return f"{_shown(value)} is above the maximum {high}"
        return None
    return test


def _search(regex: Any, pattern: str, wanted: bool, text: Callable[[Any], Any]) -> Test:
    def test(value: Any) -> str | None:
        value = text(value)
        try:
            if (regex.search(value) is not None) == wanted:
                return None
        except UnicodeEncodeError:
            return f"{_shown(value)} is not valid Unicode (a lone surrogate)"
        return f"{_shown(value)} {'does not match' if wanted else 'matches'} {_shown(pattern)}"
    return test


def _within(patterns: tuple[str, ...]) -> Test:
    # One RE2 alternation: linear in the path whatever the patterns (`/**/**/**/x` would backtrack in `re`).
    regex = re2.compile("(?s)" + "|".join(f"(?:{glob_regex(p)})" for p in patterns), _RE2_OPTIONS)

    def test(path: str) -> str | None:
        return None if regex.fullmatch(path) is not None else f"{_shown(path)} is not within the allowed paths"
    return test


def _url_part(name: str, allowed: tuple[Any, ...]) -> Test:
    hosts = [_host_pattern(p) for p in allowed] if name == "hosts" else []
    exact = {h for h in hosts if not h.startswith(".")}
    suffixes = tuple(h for h in hosts if h.startswith("."))  # an IP address never matches `*.domain`
    schemes = {str(s).lower() for s in allowed} if name == "schemes" else set()

    def test(url: Url) -> str | None:
        if name == "hosts" and not (url.host in exact or (not url.is_ip and url.host.endswith(suffixes))):
            return f"host {_shown(url.host)} is not allowed"
        if name == "schemes" and url.scheme not in schemes:
            return f"scheme {_shown(url.scheme)} is not allowed"
        if name == "ports" and url.port not in allowed:
            return f"port {url.port} is not allowed" if url.port is not None else \
                f"no port, and {url.scheme} has no default"
        return None
    return test


def _host_pattern(pattern: str) -> str:
    """An exact host in normalised form, or `*.domain` as the suffix `.domain`; ValueError otherwise."""
    wildcard = pattern.startswith("*.")
    text = pattern[2:] if wildcard else pattern
    try:
        host, is_ip = normalize_host(f"[{text}]" if ":" in text and not text.startswith("[") else text)
    except InvalidUri as exc:
        raise ValueError(f"hosts: {pattern!r}: {exc}") from None
    if wildcard and is_ip:
        raise ValueError(f"hosts: {pattern!r}: a wildcard applies to domain names, not to IP addresses")
    return f".{host}" if wildcard else host


def _normalised_values(constraint: ArgumentConstraint, name: str) -> tuple[str, ...]:
    """The policy's own `equals` / `in` / `not_in` values of a path or url constraint, normalised."""
    operand = constraint.operator(name)
    values = (operand,) if name == "equals" else operand
    out = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"{name}: a {constraint.kind} is a string, not {_shown(value)}")
        try:
            out.append(normalize_path(value) if constraint.kind == "path" else parse_url(value).canonical)
        except InvalidUri as exc:
            raise ValueError(f"{name}: {_shown(value)}: {exc}") from None
    return tuple(out)


def _regex(pattern: str, operator: str) -> Any:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"{operator}: {pattern!r} is not a valid RE2 expression: {reason}") from None


def _json_equal(expected: Any, actual: Any) -> bool:
    """Equality of JSON values; recursion is bounded by the depth of `expected`, the policy's value."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    if isinstance(expected, int | float):
        return isinstance(actual, int | float) and expected == actual
    if isinstance(expected, list | tuple):
        return isinstance(actual, list | tuple) and len(actual) == len(expected) and \
            all(map(_json_equal, expected, actual))
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and actual.keys() == expected.keys() and \
            all(_json_equal(item, actual[key]) for key, item in expected.items())
    return type(actual) is type(expected) and expected == actual


def _json_type(value: Any) -> str:
    kinds = (("null", type(None)), ("boolean", bool), ("number", int | float), ("string", str),
             ("array", list | tuple), ("object", Mapping))  # bool before number: True is an int to Python
    return next((name for name, python in kinds if isinstance(value, python)), "unknown")


def describe_types(types: frozenset[str]) -> str:
    """JSON type names as a reason words them: `a string or an array`."""
    return " or ".join(_A[t] for t in sorted(types))


def _shown(value: Any) -> str:
    """The caller's value as a reason may quote it: repr, control characters escaped, at most 60 characters."""
    try:
        shown = repr(value)
    except ValueError:  # an integer of more digits than Python will print
        return f"<a {type(value).__name__} too long to show>"
    return shown if len(shown) <= 60 else shown[:57] + "..."

