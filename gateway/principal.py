"""Who is asking, as the policy and the audit log see them: the `Principal`, and the claims it is made of.

Owns the value, `CLAIM_TYPES` (each claim the gateway reads from a token, whoever vouched for it, and the JSON
type it must have), the check of a claim set against it, and `principal_from_claims`. Pure: no I/O, no clock.
Which issuer, audience and times are acceptable, and producing a principal for a request, is the
authenticator's business (`gateway.auth.authenticator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.exceptions import GatewayError


@dataclass(frozen=True, slots=True)
class Principal:
    """One authenticated caller, for one request.

    `roles` are granted directly by the authenticator (the anonymous role);
    the policy's bindings add more from scopes, claims and client id.
    """

    subject: str
    issuer: str
    client_id: str | None = None
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    roles: frozenset[str] = frozenset()
    token_id: str | None = None
    expires_at: float | None = None
    acr: str | None = None  # authentication context class (RFC 9470)
    amr: frozenset[str] = frozenset()  # authentication methods used (RFC 8176): pwd, mfa, hwk, ...
    auth_time: float | None = None
    max_level: str | None = None  # a registered client's ceiling (security_level), whatever else it proves

    @property
    def identity(self) -> tuple[str, str, str]:
        """What a legacy session is bound to: issuer, subject and client."""
        return (self.issuer, self.subject, self.client_id or "")


def _is_string(value: object) -> bool:
    return isinstance(value, str)


def _is_number(value: object) -> bool:
    # JSON true and false are ints to Python; NaN and Infinity parse too. Neither is a time.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_string_or_strings(value: object) -> bool:
    return isinstance(value, str) or _is_strings(value)


# Every claim the gateway reads, whichever source vouched for it (its own JWTs, external JWTs, introspection
# answers), and the JSON type it must have. A claim present with another type, null included, refuses the
# token: read as it came, an object's keys would pass for scopes, and a number would crash the request.
CLAIM_TYPES: Mapping[str, tuple[str, Callable[[object], bool]]] = {
    "iss": ("a string", _is_string),
    "sub": ("a string", _is_string),
    "aud": ("a string or a list of strings", _is_string_or_strings),
    "exp": ("a number", _is_number),
    "nbf": ("a number", _is_number),
    "iat": ("a number", _is_number),
    "jti": ("a string", _is_string),
    "client_id": ("a string", _is_string),
    "azp": ("a string", _is_string),
    "scope": ("a space-separated string", _is_string),  # RFC 9068 section 2.2.3
    "scp": ("a list of strings or a string", _is_string_or_strings),  # Entra ID, Okta
    "acr": ("a string", _is_string),
    "amr": ("a list of strings", _is_strings),  # RFC 8176
    "auth_time": ("a number", _is_number),
    "gateway_level": ("a string", _is_string),
}


class ClaimTypeError(GatewayError, ValueError):
    """A claim the gateway reads has another JSON type than `CLAIM_TYPES` says.

    A ValueError too: the config's pydantic validators and `policy explain` take it as a bad value.
    """

    def __init__(self, claim: str, expected: str) -> None:
        super().__init__(f"claim {claim} must be {expected}")
        self.claim = claim


def check_claim_types(claims: Mapping[str, Any]) -> None:
    """Raise ClaimTypeError for the first claim of `CLAIM_TYPES` present with another type."""
    for claim, (expected, accepts) in CLAIM_TYPES.items():
        if claim in claims and not accepts(claims[claim]):
            raise ClaimTypeError(claim, expected)


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """A Principal from verified claims (`scope` a space-separated string, or `scp` a list or a string).

    Raises ClaimTypeError when a claim it reads has another type than `CLAIM_TYPES` says (the authenticator has
    refused such a token already; other callers pass claims from elsewhere).
    """
    check_claim_types(claims)
    raw_scope = claims.get("scope", claims.get("scp", ""))
    exp = claims.get("exp")
    auth_time = claims.get("auth_time")
    return Principal(
        subject=claims["sub"],
        issuer=claims["iss"],
        client_id=claims.get("client_id") or claims.get("azp") or None,
        scopes=frozenset(raw_scope.split() if isinstance(raw_scope, str) else raw_scope),
        claims=dict(claims),
        token_id=claims.get("jti"),
        expires_at=float(exp) if exp is not None else None,
        acr=claims.get("acr"),
        amr=frozenset(claims.get("amr", ())),
        auth_time=float(auth_time) if auth_time is not None else None,
        max_level=claims.get("gateway_level"),
    )
