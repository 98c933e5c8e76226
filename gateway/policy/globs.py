"""Glob patterns compiled into an index whose lookup cost does not grow with the number of patterns.

Semantics: `**` matches any run of characters, `/` included; `*` matches any
run within one `/`-separated segment; every other character matches itself
exactly (no case folding, no Unicode normalisation).

Patterns without a wildcard go into a dict. Patterns with one are keyed by
their literal prefix (up to the first `*`, at most `_KEY` characters), so a
lookup checks the value's own prefixes against that dict and runs only the
few regexes whose prefix fits, however many patterns there are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_KEY = 24


def glob_regex(pattern: str) -> str:
    """Regex source for one glob (to be used with fullmatch)."""
    out = []
    for part in re.split(r"(\*\*|\*)", pattern):
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(part))
    return "".join(out)


class GlobIndex:
    """Finds which of a list of patterns match a value; ids are positions in `patterns`."""

    __slots__ = ("_exact", "_longest", "_prefixed", "patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._exact: dict[str, list[int]] = {}
        self._prefixed: dict[str, list[tuple[int, re.Pattern[str]]]] = {}
        for index, pattern in enumerate(self.patterns):
            star = pattern.find("*")
            if star < 0:
                self._exact.setdefault(pattern, []).append(index)
            else:
                key = pattern[: min(star, _KEY)]
                regex = re.compile(glob_regex(pattern), re.DOTALL)
                self._prefixed.setdefault(key, []).append((index, regex))
        self._longest = max((len(k) for k in self._prefixed), default=-1)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    @property
    def exact(self) -> frozenset[str]:
        """The patterns that are plain names (no wildcard)."""
        return frozenset(self._exact)

    def matching(self, value: str) -> list[int]:
        """Ids of every pattern that matches `value`."""
        found = list(self._exact.get(value, ()))
        prefixed = self._prefixed
        for length in range(min(len(value), self._longest) + 1):
            candidates = prefixed.get(value[:length])
            if candidates:
                found.extend(index for index, regex in candidates if regex.fullmatch(value))
        return found

    def matches(self, value: str) -> bool:
        if value in self._exact:
            return True
        prefixed = self._prefixed
        for length in range(min(len(value), self._longest) + 1):
            candidates = prefixed.get(value[:length])
            if candidates and any(regex.fullmatch(value) for _, regex in candidates):
                return True
        return False
