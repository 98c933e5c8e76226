"""Who is at the console: the one-time sign-in URL, the session cookie, and the proof that a form came from the
console (CSRF).

Owns:

- `login_url`: what `mcp-gateway admin-login` prints, a JWT for `{public_url}/admin` with
  `purpose: console-login`, good for `admin.login_ttl_s` and only once;
- `sign_in`: that token checked (purpose, `admin.scope`), claimed once in the state store (shared by
  replicas) and revoked, and exchanged for a session token (`purpose: console-session`, the same subject and
  scopes, `admin.console_session_ttl_s`) recorded as a token session, so the sessions page lists it and
  revoking it ends the console session at once;
- `operator`: the principal of a request's session cookie, verified by the authenticator on every request
  (an expired or revoked session is refused there);
- the cookie (`mcpgw_console`, `Path=/admin; HttpOnly; SameSite=Strict`, `Secure` under https);
- `ConsoleKey`: a MAC key derived once from the gateway's signing key (so replicas sharing that key agree),
  for the CSRF token of a session (HMAC-SHA256 over its token id) and for the flash messages a redirect
  carries (so a link from elsewhere cannot put words on a console page);
- `cross_site`: a POST whose `Origin` is not the console's, or whose `Sec-Fetch-Site` is not same-origin.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives import serialization

from gateway import errors, operators
from gateway.auth.authenticator import AuthFailed, token_session
from gateway.principal import principal_from_claims
from gateway.types import first_value

if TYPE_CHECKING:
    from gateway.auth.authenticator import Authenticator
    from gateway.auth.keys import SigningKey
    from gateway.config import Config
    from gateway.principal import Principal
    from gateway.runtime import Runtime

COOKIE = "mcpgw_console"
LOGIN_PURPOSE = "console-login"
SESSION_PURPOSE = "console-session"
LOGIN_PATH = "/admin/login"
_KEY_LABEL = b"mcp-gateway console key\n"  # keeps this key apart from any other use of the signing key
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_.-]{1,8192}")
_CLAIM_MARGIN_S = 60  # a claimed login outlives the token's own leeway


def console_scopes(config: Config) -> list[str]:
    """Every scope the console's pages need, the console's own first."""
    return list(dict.fromkeys((config.admin.scope, config.audit.read_scope, config.sessions.admin_scope,
                               config.admin.approvals_scope, config.admin.roles_scope, config.admin.tools_scope)))


def login_url(config: Config, authenticator: Authenticator, subject: str, scopes: list[str] | None = None) -> str:
    """The one-time URL that opens a console session as `subject` (with `scopes`, default every console scope)."""
    token = authenticator.issue_token(
        subject=subject, audience=config.admin_resource,
        scopes=console_scopes(config) if scopes is None else scopes,
        claims={"purpose": LOGIN_PURPOSE}, ttl_s=config.admin.login_ttl_s)
    return f"{config.public_url}{LOGIN_PATH}?{urlencode({'token': token})}"


async def _verified(runtime: Runtime, token: str) -> Principal:
    if not _TOKEN_SHAPE.fullmatch(token):
        raise AuthFailed("not a token", "", reason="malformed_token")
    return await runtime.authenticator.authenticate(
        {"authorization": [f"Bearer {token}"]}, b"", runtime.config.admin_resource, "/admin")


def _refused(detail: str, reason: str) -> errors.GatewayRefusal:
    return errors.GatewayRefusal(errors.FORBIDDEN, detail, reason=f"console:login:{reason}")


async def login_of(runtime: Runtime, login_token: str) -> Principal:
    """Who a one-time login token would sign in, checked but not spent; GatewayRefusal (403), with a reason a
    person can act on, when the token is not a usable login token or was used already."""
    config = runtime.config
    try:
        login = await _verified(runtime, login_token)
    except AuthFailed as failed:
        why = {"revoked": "it has been used already", "expired": "it has expired"}.get(
            failed.reason, f"it is not valid ({failed.detail})")
        raise _refused(f"this sign-in link cannot be used: {why}", failed.reason) from None
    if login.claims.get("purpose") != LOGIN_PURPOSE or login.token_id is None or login.issuer != config.public_url:
        raise _refused("this is not a console sign-in link", "not_a_login_token")
    if config.admin.scope not in login.scopes:
        raise _refused(f"this sign-in link does not carry the scope {config.admin.scope}", "no_scope")
    return login


async def sign_in(runtime: Runtime, login_token: str) -> tuple[str, Principal]:
    """The session token (and its principal) a one-time login token is exchanged for, spending it; refused as
    `login_of` refuses."""
    config = runtime.config
    operators.recordable(runtime)  # a sign-in that could not be recorded does not happen
    login = await login_of(runtime, login_token)
    assert login.token_id is not None  # login_of refuses a token without one
    expires = login.expires_at or time.time() + config.admin.login_ttl_s
    if not await runtime.sessions.claim_once(f"console-login:{login.token_id}",
                                             max(1.0, expires - time.time()) + _CLAIM_MARGIN_S):
        raise _refused("this sign-in link cannot be used: it has been used already", "reused")
    await runtime.sessions.revoke(login.token_id, expires + _CLAIM_MARGIN_S)
    scope = login.claims.get("scope")
    token = runtime.authenticator.issue_token(
        subject=login.subject, audience=config.admin_resource,
        scopes=scope.split() if isinstance(scope, str) else sorted(login.scopes),
        client_id=login.client_id, claims={"purpose": SESSION_PURPOSE}, ttl_s=config.admin.console_session_ttl_s)
    session = principal_from_claims(jwt.decode(token, options={"verify_signature": False}))
    await runtime.sessions.open_token(token_session(session))
    return token, session


async def operator(runtime: Runtime, headers: Mapping[str, list[str]]) -> Principal:
    """The principal of the request's console session; AuthFailed when there is none (or it ended)."""
    token = cookie_token(headers)
    if token is None:
        raise AuthFailed("no console session", "", reason="no_session")
    principal = await _verified(runtime, token)
    if principal.claims.get("purpose") != SESSION_PURPOSE or principal.token_id is None \
            or principal.issuer != runtime.config.public_url:  # only the gateway itself opens console sessions
        raise AuthFailed("not a console session", "", reason="not_a_session")
    return principal


async def sign_out(runtime: Runtime, session: Principal) -> None:
    """End the session: its token is refused from now on, here and on every replica."""
    assert session.token_id is not None
    await runtime.sessions.revoke(session.token_id, session.expires_at or time.time() + 86400)


def cookie_token(headers: Mapping[str, list[str]]) -> str | None:
    """The value of the one console cookie; None when absent, or sent more than once (nobody's to choose)."""
    found = [value.strip() for header in headers.get("cookie", []) for name, _, value in
             (part.strip().partition("=") for part in header.split(";")) if name == COOKIE]
    return found[0] if len(found) == 1 and found[0] else None


def session_cookie(token: str, max_age_s: int, secure: bool) -> str:
    """The Set-Cookie value of a session."""
    return f"{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={max_age_s}" + (
        "; Secure" if secure else "")


def cleared_cookie(secure: bool) -> str:
    return session_cookie("", 0, secure)


class ConsoleKey:
    """The console's MAC key: SHA-256 over a fixed label and the signing key's private bytes, derived once."""

    __slots__ = ("_key",)

    def __init__(self, signing_key: SigningKey) -> None:
        private = signing_key.private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())
        self._key = hashlib.sha256(_KEY_LABEL + private).digest()

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}\n{value}".encode(), hashlib.sha256).hexdigest()

    def csrf_token(self, session_id: str) -> str:
        """The token every form of the session `session_id` (its token's jti) carries."""
        return self._mac("csrf", session_id)

    def csrf_ok(self, session_id: str, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(self.csrf_token(session_id).encode(),
                                                           offered.encode("utf-8", "replace"))

    def flash_seal(self, kind: str, text: str) -> str:
        return self._mac("flash", f"{kind}\n{text}")[:32]

    def flash_ok(self, kind: str, text: str, seal: str) -> bool:
        return hmac.compare_digest(self.flash_seal(kind, text).encode(), seal.encode("utf-8", "replace"))


def cross_site(headers: Mapping[str, list[str]], public_origin: str) -> str | None:
    """Why a POST did not come from the console's own pages, by what the browser says of it; None if it did.

    `Origin` must be the console's, except `null` with `Sec-Fetch-Site: same-origin`: under the console's
    `Referrer-Policy: no-referrer` a browser sends `Origin: null` with every POST (Fetch, "serializing a request
    origin"), and says where the form really came from in `Sec-Fetch-Site`, a header no page can set. Any
    `Sec-Fetch-Site` but same-origin is refused. (The CSRF token is checked as well: a client that sends
    neither header still needs it.)"""
    origins = headers.get("origin", [])
    site = first_value(headers, "sec-fetch-site")
    if site is not None and site != "same-origin":
        return f"the form was sent from a {site} page"
    if len(origins) > 1:
        return "the form came with more than one Origin"
    origin = origins[0].rstrip("/").lower() if origins else public_origin
    if origin != public_origin and not (origin == "null" and site == "same-origin"):
        return f"the form was sent from {origins[0]}, not from {public_origin}"
    return None
