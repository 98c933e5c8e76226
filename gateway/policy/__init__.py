"""Authorization policy: roles with permission sets, bindings that grant roles, and `decide()`.

Owns: the policy file's schema (`load_policy`, with `FILE: key.path: why`
errors), its compilation into matchers (once per load), and the pure decision
`decide(principal, operation, policy) -> Decision` (no I/O, no clock, no globals).

Glob semantics for tool, prompt and resource patterns: `*` matches any run of
characters within one `/`-separated segment, `**` matches across segments,
every other character matches itself exactly (no case folding, no Unicode
normalisation: two different names never match the same way by accident).
Resource URIs are normalised (`policy.uri`) before they are matched.

A policy may be written in Cedar instead (`cedar`: the engine; `cedar_source`: reading the file;
`cedar_schema`: the entity model; `cedar_index`: which policies a request needs); the config's `policy:` key
says which (`source`).
"""

from gateway.policy.engine import Decision, DecisionCache, authentication_level, decide, roles_for
from gateway.policy.model import LEVELS, Policy, PolicyError, Role, load_policy, parse_policy
from gateway.policy.uri import InvalidUri, normalize_uri

__all__ = [
    "LEVELS", "Decision", "DecisionCache", "InvalidUri", "Policy", "PolicyError", "Role", "authentication_level",
    "decide", "load_policy", "normalize_uri", "parse_policy", "roles_for",
]
