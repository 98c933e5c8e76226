"""Authentication: turn a request's credentials into a `Principal`, or refuse with a challenge.

The package hands its public names on from the modules that define them, each
imported on first use, so that importing one small module of it loads no more
than that module needs:

    authenticator   Authenticator (bearer tokens: the gateway's own, external JWTs,
                    introspected opaque tokens), AuthFailed, token sessions,
                    X-MCP-Identity tokens
    scopes          the scope hierarchy (a broader scope implies narrower ones)
    keys            the gateway's own signing key
    jwks            an external issuer's signing keys (JWKS), fetched and cached
    introspection   opaque tokens' claims (RFC 7662)
    server          the gateway as an OAuth authorization server for its machine clients
    secrets         client secrets at rest (scrypt hashes)

`Principal` and the claims it is made of live in `gateway.principal`, which
the policy reads without loading any of this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy import names_from

if TYPE_CHECKING:
    from gateway.auth.authenticator import IDENTITY_TTL_S, IDENTITY_TYPE, Authenticator, AuthFailed, token_session
    from gateway.auth.keys import SigningKey, load_or_create_signing_key
    from gateway.auth.scopes import expand_scopes, implied_scopes
    from gateway.principal import CLAIM_TYPES, ClaimTypeError, Principal, check_claim_types, principal_from_claims

__all__ = ["CLAIM_TYPES", "IDENTITY_TTL_S", "IDENTITY_TYPE", "AuthFailed", "Authenticator", "ClaimTypeError",
           "Principal", "SigningKey", "check_claim_types", "expand_scopes", "implied_scopes",
           "load_or_create_signing_key", "principal_from_claims", "token_session"]

_HOMES = {
    "gateway.auth.authenticator": ("IDENTITY_TTL_S", "IDENTITY_TYPE", "AuthFailed", "Authenticator", "token_session"),
    "gateway.auth.keys": ("SigningKey", "load_or_create_signing_key"),
    "gateway.auth.scopes": ("expand_scopes", "implied_scopes"),
    "gateway.principal": ("CLAIM_TYPES", "ClaimTypeError", "Principal", "check_claim_types", "principal_from_claims"),
}

if not TYPE_CHECKING:  # mypy reads the imports above; at run time each name's module is imported on first use
    __getattr__ = names_from(__name__, _HOMES)
