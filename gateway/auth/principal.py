"""The `Principal`: who is asking, as the policy and the audit log see them.

Owns the value only. Producing one is the authenticators' job (`gateway.auth`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
