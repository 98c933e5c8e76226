"""How a URL from the config is shown to a person (the start-up log line; an audit sink's error messages, which
reach the admin API, the CLI and the log; the console's upstreams page): without the credentials or keys it may
carry.

Owns `redact_url`. Its user info is everything between `://` and the last `@`, not what a URL parser calls it:
a password holding a `/`, `?`, `#` or `@` that is not percent-encoded ends the authority early for a parser,
which takes the rest of the password for a path, query or fragment. An `@` further on (in a query, say) hides
more than it needs to, never less.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def redact_url(url: str) -> str:
    """`url` as scheme, host, port and path; any user info as `***@`; no query or fragment (either may carry a
    key). What is not a URL (a DSN of key=value pairs, say) is not shown at all: `***`."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return "***"
    _, at, location = rest.rpartition("@")
    try:
        parts = urlsplit(f"//{location}")
    except ValueError:  # an unclosed [IPv6 literal
        return "***"
    return f"{scheme}://{'***@' if at else ''}{parts.netloc}{parts.path}"
