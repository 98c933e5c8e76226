"""The scope hierarchy (`auth.scope_hierarchy`): a broader scope implies narrower ones.

Pure: the authenticator expands a verified token's scopes once, before the policy sees them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def implied_scopes(hierarchy: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """Every scope each broader scope implies, followed transitively (cycles end where they started)."""
    closure: dict[str, frozenset[str]] = {}
    for top in hierarchy:
        seen: set[str] = set()
        stack = list(hierarchy[top])
        while stack:
            scope = stack.pop()
            if scope not in seen:
                seen.add(scope)
                stack.extend(hierarchy.get(scope, ()))
        closure[top] = frozenset(seen - {top})
    return closure


def expand_scopes(scopes: frozenset[str], implied: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """`scopes` and every scope they imply (`implied` as `implied_scopes` returns it)."""
    return scopes.union(*(implied[s] for s in scopes if s in implied))
