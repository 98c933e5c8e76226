"""The authorization-code grant as OAuth 2.1 has it, and the tokens a token endpoint answers with.

Owns PKCE (S256 only: `plain` is never produced), the authorization request's
URL (RFC 8707 `resource` included), the checks on the redirect that comes
back (`state` compared in constant time, an error answer, RFC 9207 `iss` when
the server advertises it), and reading a token answer into `Tokens` (Bearer
only, `expires_in` a number, the refresh token kept or carried over when the
server did not rotate it). Pure: randomness from `secrets`, no I/O, the clock
passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from gateway.oauth.metadata import OAuthClientError, ServerMetadata


@dataclass(frozen=True, slots=True)
class Pkce:
    """One authorization's secret (the verifier, sent only to the token endpoint) and its S256 challenge."""

    verifier: str = field(repr=False)
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(64)  # 86 characters of the unreserved set (RFC 7636 4.1: 43..128)
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """What the client remembers between sending the user to the server and the redirect coming back."""

    url: str = field(repr=False)  # it carries the state
    state: str = field(repr=False)
    pkce: Pkce = field(repr=False)
    redirect_uri: str
    resource: str
    scopes: frozenset[str]


def authorization_request(server: ServerMetadata, client_id: str, redirect_uri: str, resource: str,
                          scopes: frozenset[str]) -> AuthorizationRequest:
    """A fresh authorization request: new state, new PKCE pair, S256, the resource named (RFC 8707)."""
    pkce = Pkce.new()
    state = secrets.token_urlsafe(32)
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": state,
             "code_challenge": pkce.challenge, "code_challenge_method": "S256", "resource": resource}
    if scopes:
        query["scope"] = " ".join(sorted(scopes))
    parts = urlsplit(server.authorization_endpoint)
    joined = "&".join(q for q in (parts.query, urlencode(query)) if q)
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, joined, ""))
    return AuthorizationRequest(url, state, pkce, redirect_uri, resource, scopes)


def code_from_redirect(request: AuthorizationRequest, server: ServerMetadata, params: Mapping[str, str]) -> str:
    """The authorization code of a redirect answering `request`, or OAuthClientError saying what was wrong."""
    state = params.get("state")
    if state is None or not hmac.compare_digest(state.encode(), request.state.encode()):
        raise OAuthClientError("the authorization redirect's state does not match the request: refused "
                               "(a forged or replayed redirect)")
    iss = params.get("iss")
    if server.iss_parameter and iss is None:
        raise OAuthClientError(f"the authorization redirect carries no iss, though {server.issuer} says it "
                               "sends one (RFC 9207): refused")
    if iss is not None and iss != server.issuer:
        raise OAuthClientError(f"the authorization redirect comes from issuer {iss!r}, not {server.issuer} "
                               "(RFC 9207, a mix-up attack): refused")
    if "error" in params:
        description = params.get("error_description")
        raise OAuthClientError(f"the authorization server refused: {params['error']}"
                               + (f" ({description})" if description else ""))
    code = params.get("code")
    if not code:
        raise OAuthClientError("the authorization redirect carries no code")
    return code


REFRESH_MARGIN_S = 60.0  # a token is renewed this long before it expires (a tenth of its life, if shorter)


@dataclass(frozen=True, slots=True)
class Tokens:
    """What a token endpoint granted, and when. `expires_at` is None when the server named no lifetime."""

    access_token: str = field(repr=False)
    issued_at: float
    expires_at: float | None
    refresh_token: str | None = field(default=None, repr=False)
    scope: frozenset[str] = frozenset()

    def expiring(self, now: float) -> bool:
        """Whether the access token is gone, or soon will be: within a minute, or a tenth of its lifetime."""
        if self.expires_at is None:
            return False
        margin = min(REFRESH_MARGIN_S, (self.expires_at - self.issued_at) / 10)
        return now >= self.expires_at - margin

    def as_json(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "issued_at": self.issued_at, "expires_at": self.expires_at,
                "refresh_token": self.refresh_token, "scope": " ".join(sorted(self.scope))}

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> Tokens:
        expires_at, issued_at = stored.get("expires_at"), stored.get("issued_at")
        refresh = stored.get("refresh_token")
        return cls(str(stored["access_token"]), float(issued_at) if isinstance(issued_at, int | float) else 0.0,
                   float(expires_at) if isinstance(expires_at, int | float) else None,
                   refresh if isinstance(refresh, str) else None, frozenset(str(stored.get("scope", "")).split()))


def read_token_answer(answer: Any, now: float, *, asked: frozenset[str] = frozenset(),
                      previous_refresh: str | None = None) -> Tokens:
    """A successful token answer (RFC 6749 5.1) as `Tokens`; refused if it is not a usable Bearer token.

    The granted scope is the answer's, or what was asked when it names none (5.1). A
    refresh answer without a refresh token keeps `previous_refresh` (the server did
    not rotate it); with one, the new one replaces it.
    """
    if not isinstance(answer, dict):
        raise OAuthClientError("the token endpoint's answer is not a JSON object")
    access = answer.get("access_token")
    kind = answer.get("token_type")
    if not isinstance(access, str) or not access:
        raise OAuthClientError("the token endpoint's answer holds no access_token")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise OAuthClientError(f"the token endpoint issued a {kind!r} token; only Bearer tokens are used")
    lifetime = answer.get("expires_in")
    if lifetime is not None and (not isinstance(lifetime, int | float) or isinstance(lifetime, bool)
                                 or lifetime <= 0):
        raise OAuthClientError("the token endpoint's expires_in is not a positive number")
    refresh = answer.get("refresh_token")
    scope = answer.get("scope")
    return Tokens(access, now, None if lifetime is None else now + float(lifetime),
                  refresh if isinstance(refresh, str) and refresh else previous_refresh,
                  frozenset(scope.split()) if isinstance(scope, str) else asked)


def token_error(answer: Any) -> str:
    """A token endpoint's error answer (RFC 6749 5.2) in words, without anything that could be a secret."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        description = answer.get("error_description")
        return str(answer["error"]) + (f" ({description})" if isinstance(description, str) else "")
    return "an answer that is not an OAuth error"
