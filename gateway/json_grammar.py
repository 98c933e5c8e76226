"""RFC 8259's pieces as compiled bytes patterns, for `json_scan`: what lets it jump over strings, whitespace,
numbers and whole shallow values at C speed instead of a byte at a time.

Owns the grammar as patterns and nothing else (pure, no state). Possessive quantifiers (`*+`, `++`) never give
back what they matched, so no pattern backtracks however hostile its input.
"""

from __future__ import annotations

import functools
import re

_WS = rb"[ \t\n\r]*+"
_STRING_CHARS = rb'[ !#-\[\]-\xff]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[ !#-\[\]-\xff]*+)*+'
_STRING = rb'"' + _STRING_CHARS + rb'"'
# a number only when what follows shows it is whole: one at the end of a chunk may go on in the next
_WHOLE_NUMBER = rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?[0-9]++)?+(?=[ \t\n\r,\]}])"

WS_RUN = re.compile(rb"[ \t\n\r]++")
STRING_BODY = re.compile(_STRING_CHARS)
ESCAPE_BEGUN = re.compile(rb"\\(?:u[0-9a-fA-F]{0,3})?")
NUMBER_RUN = re.compile(rb"[0-9.eE+-]*+")
NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
NUMBER_BEGUN = re.compile(rb"-|-?(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?")

SHALLOW_LEVELS = 3  # how deep the values jumped over whole may nest


def _shallow_value(levels: int) -> bytes:
    """A pattern for one whole JSON value whose containers nest at most `levels` deep."""
    scalar = rb"(?:" + _STRING + rb"|" + _WHOLE_NUMBER + rb"|true|false|null)"
    value = scalar
    for _ in range(levels):
        # after a comma another item must come: `(?!\])` refuses a trailing comma
        array = rb"\[" + _WS + rb"(?:" + value + _WS + rb"(?:," + _WS + rb"(?!\])|(?=\])))*+\]"
        members = (rb"\{" + _WS + rb"(?:" + _STRING + _WS + rb":" + _WS + value + _WS
                   + rb"(?:," + _WS + rb"(?!\})|(?=\})))*+\}")
        value = rb"(?:" + scalar + rb"|" + array + rb"|" + members + rb")"
    return value


@functools.cache
def runs(levels: int) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """Patterns for a run of whole items of an array, and of members of an object, nesting `levels` deeper.

    Compiled when the first scanner is made, not on import (all levels take some 30 ms).
    """
    value = _shallow_value(levels)
    member = _STRING + _WS + rb":" + _WS + value
    return (re.compile(value + rb"(?:" + _WS + rb"," + _WS + value + rb")*+"),
            re.compile(member + rb"(?:" + _WS + rb"," + _WS + member + rb")*+"))


# A string with no quote in its next LONG_STRING bytes is skipped by a translated copy of the chunk in which every
# byte that can stop a string body (a backslash, a control character) reads as a quote: one `find` (memchr) goes
# to where the pattern must take over, about three times as fast as the pattern over plain text.
LONG_STRING = 4096
STOPS_AS_QUOTES = bytes(0x22 if b < 0x20 or b == 0x5C else b for b in range(256))
