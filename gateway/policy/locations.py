"""The paths and URLs that tool arguments carry, in the one form an argument constraint judges them in.

Owns `normalize_path` (a filesystem path or a `file:` URI -> the absolute path it names) and `parse_url`
(a URL -> lower-case scheme, normalised host, effective port, canonical text). Both raise `InvalidUri`
for what two readers could take for two different things, rather than guess which one the tool will be:

- a path: not absolute; a NUL, control character or backslash, plain or percent-encoded; an encoded
  slash; a `..` that climbs above the root; a character that NFKC turns into ASCII (U+FF0F, U+FF0E); a percent
  escape in a plain path (a tool may or may not decode it: send a `file:` URI, whose escapes are decoded);
  a `file:` URI naming a host other than `localhost`, or carrying a query or a fragment. Repeated slashes
  are collapsed before dot segments are removed, as a file system reads them (`/a/b//../c` is `/a/c`; the
  RFC 3986 algorithm alone would say `/a/b/c`). The result has no trailing slash (except `/`). It is
  lexical: a symbolic link inside an allowed directory can still point out of it.
- either: a lone surrogate (not Unicode, and no UTF-8 encoder will pass it on).
- a URL: no scheme or no `//host`; credentials (`https://example.com@evil.test/` goes to evil.test); a
  backslash anywhere, or a percent escape in the authority (parsers disagree about both); whitespace or
  a control character; a host that IDNA (UTS 46, as browsers and curl map it) cannot encode; a path,
  query or fragment that `normalize_uri` refuses (a `..` above the root, NFKC forms of ASCII). An IPv4
  address in any form a browser or curl reads (`2130706433`, `0x7f.1`, `0177.0.0.1`) is normalised to
  dotted decimal, an IPv6 literal to its compressed form; a host that ends in a number but is no valid
  address is refused, as browsers refuse it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from gateway.policy.uri import InvalidUri, normalize_uri

try:
    from idna import encode as _idna_encode

    def _to_ascii(name: str) -> str:
        return _idna_encode(name, uts46=True).decode("ascii")
except ImportError:  # pragma: no cover - the standard library's IDNA 2003 codec

    def _to_ascii(name: str) -> str:
        return name.encode("idna").decode("ascii")


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_SLASHES = re.compile(r"//+")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_IPV4_PART = re.compile(r"[0-9]+|0x[0-9a-f]*")


@dataclass(frozen=True, slots=True)
class Url:
    """A URL as an argument constraint judges it."""

    scheme: str  # lower-case
    host: str  # a lower-case A-label name without a trailing dot, or an IP address's canonical text
    is_ip: bool
    port: int | None  # the explicit port, else the scheme's default; None when there is neither
    canonical: str  # scheme://host[:port]path?query#fragment: the port only when not the default


def normalize_path(value: str) -> str:
    """The absolute path that `value` (an absolute path or a `file:` URI) names; InvalidUri if ambiguous."""
    _refuse_unreadable(value)
    if "\\" in value:
        raise InvalidUri("a backslash in a path (a separator to some readers, a character to others)")
    if value[:5].lower() == "file:":
        uri = _file_uri(value)
    elif value.startswith("/"):
        if _ESCAPE.search(value):
            raise InvalidUri("a percent escape in a plain path: a tool may or may not decode it")
        # Quoted, so that `?`, `#` and `%` stay characters of the path rather than URI delimiters.
        uri = "file://" + quote(_SLASHES.sub("/", value), safe="/")
    else:
        raise InvalidUri("not an absolute path or a file: URI")
    path = unquote(normalize_uri(uri)[len("file://"):])
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise InvalidUri("an encoded control character in a path")
    return path.rstrip("/") or "/"


def _file_uri(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise InvalidUri(str(exc)) from None
    if parts.netloc.lower() not in ("", "localhost"):
        raise InvalidUri("a file: URI naming another host")
    if "?" in value or "#" in value:
        raise InvalidUri("a query or a fragment in a file: URI")
    if not parts.path.startswith("/"):
        raise InvalidUri("a file: URI with a relative path")
    return "file://" + _SLASHES.sub("/", parts.path)


def parse_url(value: str) -> Url:
    """`value` parsed strictly and normalised; InvalidUri for what is malformed or ambiguous."""
    _refuse_unreadable(value)
    if any(c <= " " for c in value):
        raise InvalidUri("whitespace in a URL")
    if "\\" in value:
        raise InvalidUri("a backslash in a URL (parsers disagree on whether it ends the host)")
    match = _URL.fullmatch(value)
    if match is None:
        raise InvalidUri("not a URL of the form scheme://host/...")
    scheme, authority, rest = match.group(1).lower(), match.group(2), match.group(3)
    if "@" in authority:
        raise InvalidUri("credentials in a URL (a reader may take the user name for the host)")
    if "%" in authority:
        raise InvalidUri("a percent escape in a URL's host or port")
    host_text, port_text = _split_port(authority)
    host, is_ip = normalize_host(host_text)
    explicit = int(port_text) if port_text else None
    default = DEFAULT_PORTS.get(scheme)
    shown = f"[{host}]" if ":" in host else host
    if explicit is not None and explicit != default:
        shown = f"{shown}:{explicit}"
    # The path, query and fragment normalised as resource URIs are, behind a stand-in host.
    tail = normalize_uri(f"{scheme}://h{rest}")[len(scheme) + 4:]
    return Url(scheme, host, is_ip, default if explicit is None else explicit, f"{scheme}://{shown}{tail}")


def _split_port(authority: str) -> tuple[str, str]:
    if authority.startswith("["):
        end = authority.find("]") + 1
        host, after = authority[:end], authority[end:]
        if not end or (after and not after.startswith(":")):
            raise InvalidUri("a malformed IPv6 literal")
        port = after[1:]
    else:
        host, _, port = authority.partition(":")
    if port and not (_PORT.fullmatch(port) and int(port) <= 65535):
        raise InvalidUri("an invalid port")
    return host, port


def normalize_host(text: str) -> tuple[str, bool]:
    """(host, is_ip): a lower-case A-label name without a trailing dot, or an IP address's canonical text.

    `text` is a URL's host: an IPv6 literal in brackets, an IPv4 address in any form browsers read, or a
    name (Unicode names IDNA-encoded). InvalidUri if it is none of these.
    """
    if text.startswith("["):
        try:
            if text.endswith("]") and "%" not in text:
                return str(ipaddress.IPv6Address(text[1:-1])), True
        except ValueError:
            pass
        raise InvalidUri("a malformed IPv6 literal")
    try:
        name = text.lower() if text.isascii() else _to_ascii(text).lower()
    except UnicodeError:
        raise InvalidUri("a host name that IDNA cannot encode") from None
    address = _ipv4(name) if name else None
    if address is not None:
        return str(address), True
    name = name.removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise InvalidUri("not a valid host name")
    return name, False


def _ipv4(name: str) -> ipaddress.IPv4Address | None:
    """The address a browser reads in `name` (1 to 4 parts, decimal, 0x hex or 0 octal), None for a name."""
    parts = name.split(".")
    if len(parts) > 1 and not parts[-1]:
        parts.pop()
    if not _IPV4_PART.fullmatch(parts[-1]):
        return None
    if len(parts) > 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        raise InvalidUri("a host ending in a number that is not an IPv4 address")
    try:
        numbers = [int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8 if len(p) > 1 and p[0] == "0" else 10)
                   for p in parts]
    except ValueError:  # an octal part with an 8 or a 9
        raise InvalidUri("a host ending in a number that is not an IPv4 address") from None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise InvalidUri("an IPv4 address out of range")
    return ipaddress.IPv4Address(sum(n << 8 * (3 - i) for i, n in enumerate(head)) + last)


def _refuse_unreadable(value: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidUri("a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidUri("a lone surrogate (not valid Unicode)") from None
