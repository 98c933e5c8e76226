"""Resource URI normalisation, done before any pattern is matched.

Owns the one canonical form a URI is decided in (RFC 3986 section 6.2.2):
scheme and host lower-cased, percent-encoded unreserved characters decoded,
remaining escapes upper-cased, dot segments removed. Whatever could make the
gateway and the upstream read two different resources is refused instead of
normalised: a `..` that climbs above the root, an empty segment in a `file:`
URI, or dot segments beside an empty segment in any URI (`a//../..`: RFC 3986
and a file system resolve it to different places), an encoded slash (`%2F`), a NUL
byte, a control character, a backslash (or `%5C`) in a `file:` URI, percent
escapes that are not UTF-8 (an overlong `%C0%AE` is a `.` to a lax decoder),
and any character that Unicode compatibility normalisation (NFKC, which many
file systems and frameworks apply) turns into ASCII: a fullwidth full stop or
solidus (U+FF0E, U+FF0F), a one-dot leader (U+2024), a fullwidth letter. The gateway would match a pattern
against one string and the upstream could open another. A refused URI raises
`InvalidUri` with the reason.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from gateway.exceptions import GatewayError

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_TEMPLATE_EXPRESSION = re.compile(r"\{[^}]*\}")


class InvalidUri(GatewayError, ValueError):
    """The URI is ambiguous or malformed; it is refused rather than guessed at."""


def normalize_uri(uri: str) -> str:
    """The canonical form of `uri`, or InvalidUri."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise InvalidUri("control character in URI")
    if re.search(r"%(?![0-9A-Fa-f]{2})", uri):
        raise InvalidUri("malformed percent escape")
    _refuse_ambiguous_characters(uri)
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # e.g. an authority Python's own parser finds ambiguous
        raise InvalidUri(str(exc)) from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise InvalidUri("URI has no scheme")
    if scheme == "file" and ("\\" in uri or re.search(r"%5[cC]", uri)):
        raise InvalidUri("backslash in file URI")
    authority = unquote(parts.netloc)
    if authority in (".", "..") or "/" in authority or "\\" in authority:
        raise InvalidUri("a dot segment or a slash in the authority: a reader dropping the scheme sees a path")
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo}@{hostport.lower()}"
    else:
        netloc = netloc.lower()
    path = _decode_unreserved(parts.path, in_path=True)
    if "//" in path and scheme == "file":
        # a file system reads `/srv/docs//secret` as /srv/docs/secret, which `file:///srv/docs/secret/**` names
        raise InvalidUri("an empty segment in a file URI: a file system collapses it, a pattern does not")
    if "//" in path and re.search(r"(^|/)\.\.?(/|$)", path):
        # RFC 3986 keeps an empty segment (`a//..` is `a/`); a file system collapses it first (`a/..` is ``):
        # `/srv/docs/a//../../etc` would be /srv/docs/etc here and /srv/etc to the server.
        raise InvalidUri("an empty segment with dot segments: readers disagree on where `..` leads")
    path = _remove_dot_segments(path)
    query = _decode_unreserved(parts.query, in_path=False)
    # Joined by hand: urlunsplit drops an empty authority ("file:////x" would come back as "file://x").
    authority = f"//{netloc}" if uri[len(parts.scheme) + 1:].startswith("//") else ""
    return f"{scheme}:{authority}{path}" + (f"?{query}" if query else "") + \
        (f"#{parts.fragment}" if parts.fragment else "")


def _refuse_ambiguous_characters(uri: str) -> None:
    """Refuse what another reader could decode or normalise into different ASCII than this one sees."""
    try:
        decoded = unquote_to_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidUri("percent escapes that are not UTF-8") from None
    if decoded.isascii():
        return
    for char in decoded:
        folded = unicodedata.normalize("NFKC", char)
        if not char.isascii() and any(c.isascii() for c in folded):
            raise InvalidUri(f"U+{ord(char):04X} is a compatibility form of ASCII {folded!r}")


def _decode_unreserved(text: str, *, in_path: bool) -> str:
    def replace(match: re.Match[str]) -> str:
        byte = int(match.group(1), 16)
        if byte == 0:
            raise InvalidUri("encoded NUL byte in URI")
        if in_path and byte == 0x2F:
            raise InvalidUri("encoded slash in URI path")
        char = chr(byte)
        return char if char in _UNRESERVED else f"%{byte:02X}"

    return _ESCAPE.sub(replace, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, except that a `..` above the root is refused instead of dropped."""
    if not path:
        return path
    absolute = path.startswith("/")
    segments = path.split("/")
    if absolute:
        segments = segments[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
            continue
        if segment == "..":
            if not out:
                raise InvalidUri("'..' climbs above the root")
            out.pop()
            if last:
                out.append("")
            continue
        out.append(segment)
    joined = "/".join(out)
    return f"/{joined}" if absolute else joined


def template_probe(uri_template: str) -> str:
    """A concrete URI standing for an RFC 6570 template: each expression replaced by one plain segment.

    A template is shown to a principal when this probe is readable by them; reading
    a concrete URI is always decided on that URI itself.
    """
    return _TEMPLATE_EXPRESSION.sub("x", uri_template)
