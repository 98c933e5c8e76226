"""Authorization policy: roles with permission sets, bindings that grant roles, and `decide()`.

Owns: the policy file's schema (`load_policy`, with `FILE: key.path: why`
errors), its compilation into matchers (once per load), and the pure decision
`decide(principal, operation, policy) -> Decision` (no I/O, no clock, no globals).

Glob semantics for tool, prompt and resource patterns: `*` matches any run of
characters within one `/`-separated segment, `**` matches across segments,
every other character matches itself exactly (no case folding, no Unicode
normalisation: two different names never match the same way by accident).
"""

from gateway.policy.engine import Decision, decide
from gateway.policy.model import Policy, PolicyError, Role, load_policy

__all__ = ["Decision", "Policy", "PolicyError", "Role", "decide", "load_policy"]
