"""What an MCP server and its authorization server say about themselves, and which of it the client trusts.

Owns reading a `WWW-Authenticate: Bearer` challenge (RFC 6750, RFC 9728's
`resource_metadata`), the well-known URLs to try (RFC 9728 for the resource,
RFC 8414 then OpenID Connect Discovery for the authorization server, each with
path insertion), and the checks a document must pass before anything in it is
used: the resource metadata names the server being reached, the authorization
server's `issuer` is exactly the one it was looked up as, every endpoint is
HTTPS (plain HTTP only on a loopback address), and PKCE S256 is offered.
Pure: the client (`oauth.client`) fetches, this module judges.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.exceptions import GatewayError

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class OAuthClientError(GatewayError):
    """The OAuth flow cannot go on; the message says why in words a person can act on (never a secret)."""


# An auth-param (RFC 9110 11.2): token "=" ( token / quoted-string ). A scheme is a token not followed by "=".
_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[!#$%&\'*+.^_`|~0-9A-Za-z/=-]+)\s*,?')
_SCHEME = re.compile(r"\s*,?\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?=\s|,|$)")


def bearer_challenge(header: str | None) -> dict[str, str]:
    """The parameters of the Bearer challenge in a `WWW-Authenticate` value (lowercase names); {} if none."""
    if not header:
        return {}
    found: dict[str, dict[str, str]] = {}
    scheme: str | None = None
    position = 0
    while position < len(header):
        param = _PARAM.match(header, position)
        if param is not None and scheme is not None:
            value = param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            found[scheme].setdefault(param.group(1).lower(), value)
            position = param.end()
            continue
        new_scheme = _SCHEME.match(header, position)
        if new_scheme is None:
            break
        scheme = new_scheme.group(1).lower()
        found.setdefault(scheme, {})
        position = new_scheme.end()
    return found.get("bearer", {})


def scopes(value: str | None) -> frozenset[str]:
    """A space-separated scope string as a set."""
    return frozenset((value or "").split())


def trusted_url(url: str) -> bool:
    """An endpoint the client may send a credential to: HTTPS, or plain HTTP on a loopback address only."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # an unreadable authority ("https://[x/"): not a URL to trust
        return False
    if parts.username is not None or parts.password is not None or not hostname or parts.fragment:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and hostname in _LOOPBACK_HOSTS)


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def canonical_url(url: str) -> str:
    """A server URL as a resource identifier (RFC 8707): lowercase scheme and host, no default port, no
    fragment, no trailing /."""
    parts = urlsplit(url)
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None:
        netloc = netloc.removesuffix(default)
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


def _with_well_known(url: str, name: str) -> str:
    """RFC 8414 / RFC 9728 path insertion: `/.well-known/{name}` between the authority and the path."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"/.well-known/{name}{path}", "", ""))


def resource_metadata_urls(server_url: str) -> list[str]:
    """Where RFC 9728 metadata may be when no challenge named it: for the server's path, then the root."""
    urls = [_with_well_known(server_url, "oauth-protected-resource")]
    root = _with_well_known(urlunsplit((*urlsplit(server_url)[:2], "", "", "")), "oauth-protected-resource")
    return urls if root in urls else [*urls, root]


def server_metadata_urls(issuer: str) -> list[str]:
    """Where an authorization server's metadata may be: RFC 8414, then OIDC Discovery (inserted, then appended)."""
    urls = [_with_well_known(issuer, "oauth-authorization-server"), _with_well_known(issuer, "openid-configuration")]
    appended = f"{issuer.rstrip('/')}/.well-known/openid-configuration"
    return urls if appended in urls else [*urls, appended]


@dataclass(frozen=True, slots=True)
class ResourceMetadata:
    """RFC 9728: the protected resource's identifier, its authorization servers, the scopes it knows."""

    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...] = ()


def read_resource_metadata(document: Any, server_url: str) -> ResourceMetadata:
    """Resource metadata that names `server_url` (itself, or a path above it on the same origin)."""
    if not isinstance(document, dict):
        raise OAuthClientError("the server's protected-resource metadata is not a JSON object")
    resource = document.get("resource")
    if not isinstance(resource, str) or not _covers(resource, server_url):
        raise OAuthClientError(f"the server's protected-resource metadata names the resource {resource!r}, "
                               f"not {server_url}: refused (RFC 9728 3.3)")
    servers = document.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not all(isinstance(s, str) for s in servers):
        raise OAuthClientError(f"the protected-resource metadata of {server_url} names no authorization server")
    return ResourceMetadata(resource=resource, authorization_servers=tuple(servers),
                            scopes_supported=_strings(document, "scopes_supported"))


def _covers(resource: str, server_url: str) -> bool:
    mine, theirs = urlsplit(canonical_url(resource)), urlsplit(canonical_url(server_url))
    if (mine.scheme, mine.netloc) != (theirs.scheme, theirs.netloc) or mine.query:
        return False
    return theirs.path == mine.path or theirs.path.startswith(mine.path + "/")


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """RFC 8414: what the client uses of an authorization server's metadata, every endpoint already checked."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None = None
    revocation_endpoint: str | None = None
    scopes_supported: tuple[str, ...] = ()
    auth_methods: tuple[str, ...] = ("client_secret_basic",)
    iss_parameter: bool = False  # RFC 9207: the redirect carries `iss`, and the client must check it
    client_id_metadata_documents: bool = False  # a URL may be the client_id (Client ID Metadata Document)


def read_server_metadata(document: Any, issuer: str) -> ServerMetadata:
    """Authorization-server metadata, refused unless it is the server asked for and safe to use."""
    if not isinstance(document, dict):
        raise OAuthClientError(f"the metadata of authorization server {issuer} is not a JSON object")
    if document.get("issuer") != issuer:
        raise OAuthClientError(f"authorization server metadata fetched for {issuer} names the issuer "
                               f"{document.get('issuer')!r}: refused (RFC 8414 3.3)")
    endpoints: dict[str, str | None] = {}
    for name in ("authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint"):
        value = document.get(name)
        required = name in ("authorization_endpoint", "token_endpoint")
        if value is None and not required:
            endpoints[name] = None
            continue
        if not isinstance(value, str) or not trusted_url(value):
            raise OAuthClientError(f"authorization server {issuer}: {name} {value!r} is not an HTTPS URL "
                                   "(plain HTTP is accepted only on a loopback address)")
        endpoints[name] = value
    if "S256" not in _strings(document, "code_challenge_methods_supported"):
        raise OAuthClientError(f"authorization server {issuer} does not offer PKCE with S256 "
                               "(code_challenge_methods_supported): refused, as OAuth 2.1 and MCP require")
    return ServerMetadata(
        issuer=issuer,
        authorization_endpoint=str(endpoints["authorization_endpoint"]),
        token_endpoint=str(endpoints["token_endpoint"]),
        registration_endpoint=endpoints["registration_endpoint"],
        revocation_endpoint=endpoints["revocation_endpoint"],
        scopes_supported=_strings(document, "scopes_supported"),
        auth_methods=_strings(document, "token_endpoint_auth_methods_supported") or ("client_secret_basic",),
        iss_parameter=document.get("authorization_response_iss_parameter_supported") is True,
        client_id_metadata_documents=document.get("client_id_metadata_document_supported") is True,
    )


def _strings(document: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = document.get(name)
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str))
