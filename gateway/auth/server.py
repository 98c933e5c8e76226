"""The gateway as a minimal OAuth 2.1 authorization server for its own machine clients.

Owns four endpoints, served in both deployment modes:

    GET  /.well-known/oauth-authorization-server   RFC 8414 metadata
    GET  /.well-known/jwks.json                    the gateway's public signing key
    POST /oauth/token                              client_credentials (RFC 6749 4.4), client_secret_basic or _post
    POST /oauth/revoke                             RFC 7009
    GET  /oauth/authorize                          there for clients that require the field; every
                                                   request is answered unsupported_response_type

Secrets are checked against scrypt hashes in constant time. A client with
`mfa` must also send a one-time code (TOTP, `gateway.auth.totp`) as the form
field `otp`, checked only once the secret is right; each code is good once
(its time step is claimed in the state store, shared by replicas), and a
missing, wrong or reused code is `invalid_grant`. Past `MAX_OTP_FAILURES` wrong
codes of a client within `OTP_WINDOW_S`, no code of it is checked until the
window ends (the count is kept in the state store, shared by replicas). Failed attempts (secrets
and codes alike) are counted per client and per source address; past
`max_failures` every answer to that client or address is delayed, doubling up
to 10 s. The token is a short-lived JWT for one protected resource (RFC 8707
`resource`), named by `jti` so it can be revoked, with `amr` ["pwd", "otp"]
when a code was checked (policies' `authentication_levels` rules read it; the
client's `security_level` still caps the level). Every issue and refusal is
an audit event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import jwt
import orjson
from cachetools import TTLCache

from gateway.audit.event import AuditEvent
from gateway.audit.writer import AuditUnavailable
from gateway.auth.authenticator import token_session
from gateway.auth.keys import ALGORITHM
from gateway.auth.secrets import secret_matches
from gateway.auth.totp import DRIFT_STEPS, STEP_S, matching_step
from gateway.errors import PAYLOAD_TOO_LARGE, GatewayRefusal
from gateway.exceptions import GatewayError
from gateway.exchange import read_body
from gateway.principal import principal_from_claims
from gateway.types import ASGIReceive, ASGIScope, ASGISend, header_values, send_json

if TYPE_CHECKING:
    from gateway.config_auth import RegisteredClient
    from gateway.runtime import Runtime

PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/jwks.json", "/oauth/token", "/oauth/revoke",
         "/oauth/authorize")
_MAX_FORM = 64 * 1024
_OTP_CLAIM_S = (2 * DRIFT_STEPS + 1) * STEP_S  # as long as any one code matches: 90 s
# Past this many wrong codes of one client in the window, none is checked until the window ends: with three
# codes of a million valid at once, a holder of the stolen secret needs about a year on average.
MAX_OTP_FAILURES = 10
OTP_WINDOW_S = 900


class _OAuthError(GatewayError):
    """A refusal, and how it is audited: `result` and `reason` oauth:ERROR[:CAUSE]."""

    def __init__(self, status: int, error: str, description: str, *, basic_challenge: bool = False,
                 result: str = "invalid_request", cause: str = "") -> None:
        super().__init__(description)
        self.status, self.error, self.description, self.basic_challenge = status, error, description, basic_challenge
        self.result, self.reason = result, f"oauth:{error}:{cause}" if cause else f"oauth:{error}"


class AuthorizationServer:
    """The four endpoints, for one gateway runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        config = runtime.config
        self._issuer = config.public_url
        self._clients = {c.client_id: c for c in config.auth.clients.registered}
        self._failures: TTLCache[str, int] = TTLCache(maxsize=100_000, ttl=600)
        self._max_failures = config.auth.clients.max_failures

    def metadata(self) -> dict[str, Any]:
        config = self._runtime.config
        scopes = sorted({s for c in self._clients.values() for s in c.scopes} | set(self._runtime.policy.scopes))
        return {
            "issuer": self._issuer,
            "authorization_endpoint": f"{self._issuer}/oauth/authorize",
            "token_endpoint": f"{self._issuer}/oauth/token",
            "revocation_endpoint": f"{self._issuer}/oauth/revoke",
            "jwks_uri": f"{self._issuer}/.well-known/jwks.json",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "response_types_supported": [],  # no interactive grants: client_credentials only
            "scopes_supported": scopes,
            "resource_indicators_supported": True,
            "protected_resources": [config.resource_url(u) for u in config.upstreams],
        }

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/.well-known/oauth-authorization-server" and method == "GET":
            await _json(send, 200, self.metadata())
        elif path == "/.well-known/jwks.json" and method == "GET":
            await _json(send, 200, {"keys": [self._runtime.signing_key.public_jwk()]})
        elif path in ("/oauth/token", "/oauth/revoke") and method == "POST":
            await self._endpoint(path, scope, receive, send)
        elif path == "/oauth/authorize":
            await _json(send, 400, {"error": "unsupported_response_type",
                                    "error_description": "this server issues tokens by client_credentials only"})
        else:
            await _json(send, 405, {"error": "invalid_request", "error_description": f"{method} not allowed"})

    async def _endpoint(self, path: str, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        source = (scope.get("client") or ["?"])[0]
        event = AuditEvent(result="allowed", reason="", operation=path.lstrip("/"), http_method="POST",
                           source_ip=source)
        started = time.perf_counter()
        try:
            form = await _form(scope, receive, self._runtime.config.limits.client_body_timeout_s)
            client = await self._client(scope, form, source)
            event.client_id = event.user_id = client.client_id
            if path == "/oauth/token":
                status, body = 200, await self._issue(client, form, source)
                event.reason = f"token_issued:{body['scope'] or '-'}"
            else:
                status, body = 200, {}
                event.reason = await self._revoke(client, form)
        except _OAuthError as failure:
            status = failure.status
            body = {"error": failure.error, "error_description": failure.description}
            event.result, event.reason = failure.result, failure.reason
            extra = [(b"www-authenticate", b'Basic realm="mcp-gateway"')] if failure.basic_challenge else []
        except GatewayRefusal as refusal:  # the state store cannot be reached: nothing is issued unchecked
            status, extra = refusal.refusal.http_status, []
            body = {"error": "temporarily_unavailable", "error_description": refusal.refusal.message}
            event.result, event.reason = refusal.refusal.audit_result, refusal.reason
        else:
            extra = []
        event.status = status
        event.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        try:
            self._runtime.audit.record(event)
            await self._runtime.audit.written()  # a token handed out is on record first
        except AuditUnavailable:
            await _json(send, 503, {"error": "temporarily_unavailable", "error_description": "audit unavailable"})
            return
        await _json(send, status, body, extra)

    async def _client(self, scope: ASGIScope, form: dict[str, str], source: str) -> RegisteredClient:
        client_id, secret, basic = _credentials(header_values(scope), form)
        keys = [f"ip:{source}"] + ([f"client:{client_id}"] if client_id else [])
        over = max(self._failures.get(k, 0) for k in keys) - self._max_failures
        if over >= 0:
            await asyncio.sleep(min(10.0, 0.25 * 2**over))  # slow down whoever keeps guessing
        client = self._clients.get(client_id or "")
        # A missing client costs the same scrypt as a wrong secret, so answers do not tell them apart.
        stored = client.secret_hash if client is not None else _DUMMY_HASH
        if client is None or secret is None or not await asyncio.to_thread(secret_matches, secret, stored):
            self._failed(keys)
            raise _OAuthError(401, "invalid_client", "client authentication failed", basic_challenge=basic,
                              result="auth_failed")
        return client

    def _failed(self, keys: list[str]) -> None:
        for key in keys:
            self._failures[key] = self._failures.get(key, 0) + 1

    async def _second_factor(self, client: RegisteredClient, form: dict[str, str], source: str) -> None:
        """Refuse unless `form` carries a current one-time code of `client`'s that was never used before."""
        assert client.mfa is not None
        sessions, attempts = self._runtime.sessions, f"otp-attempts:{client.client_id}"
        code = form.get("otp")
        if code is None:
            cause, description = "otp_missing", "a one-time code (otp) is required"
        elif await sessions.tally(attempts, OTP_WINDOW_S) > MAX_OTP_FAILURES:  # counted before it is checked:
            # concurrent guesses cannot all slip in under the limit; replicas share the count
            cause, description = "otp_locked", (f"more than {MAX_OTP_FAILURES} wrong one-time codes in "
                                                f"{OTP_WINDOW_S // 60} minutes: try again later")
        else:
            step = matching_step(client.mfa.totp_secret, code, time.time())
            if step is None:
                cause, description = "otp_invalid", "the one-time code is wrong or expired"
            elif not await sessions.claim_once(f"otp:{client.client_id}:{step}", _OTP_CLAIM_S):
                cause, description = "otp_reused", "this one-time code was already used"
            else:
                await sessions.tally(attempts, OTP_WINDOW_S, add=-1)  # a right code is not a failure
                return
        self._failed([f"ip:{source}", f"client:{client.client_id}"])
        raise _OAuthError(400, "invalid_grant", description, result="auth_failed", cause=cause)

    async def _issue(self, client: RegisteredClient, form: dict[str, str], source: str) -> dict[str, Any]:
        if form.get("grant_type") != "client_credentials":
            raise _OAuthError(400, "unsupported_grant_type", "only client_credentials is supported")
        requested = form.get("scope", "").split()
        granted = [s for s in requested if s in client.scopes] if requested else list(client.scopes)
        if requested and len(granted) != len(requested):
            raise _OAuthError(400, "invalid_scope", f"{client.client_id} may not have {set(requested) - set(granted)}")
        config = self._runtime.config
        resources = [config.resource_url(u) for u in config.upstreams]
        resource = form.get("resource")
        if resource is None:
            if len(resources) != 1:
                raise _OAuthError(400, "invalid_target", "name the protected resource (RFC 8707 resource)")
            resource = resources[0]
        if resource.rstrip("/") not in resources:
            raise _OAuthError(400, "invalid_target", f"{resource} is not a resource of this gateway")
        claims = {**client.claims, "gateway_level": client.security_level}
        if client.mfa is not None:  # last: a request refused before spends no code
            await self._second_factor(client, form, source)
            claims["amr"] = ["pwd", "otp"]  # RFC 8176
        ttl = config.auth.clients.token_ttl_s
        token = self._runtime.authenticator.issue_token(
            subject=client.client_id, audience=resource.rstrip("/"), scopes=granted, client_id=client.client_id,
            claims=claims, ttl_s=ttl)
        issued = principal_from_claims(jwt.decode(token, options={"verify_signature": False}))
        await self._runtime.sessions.open_token(token_session(issued))
        return {"access_token": token, "token_type": "Bearer", "expires_in": ttl, "scope": " ".join(granted)}

    async def _revoke(self, client: RegisteredClient, form: dict[str, str]) -> str:
        token = form.get("token")
        if not token:
            raise _OAuthError(400, "invalid_request", "token is required")
        try:
            claims = jwt.decode(token, self._runtime.signing_key.public, algorithms=[ALGORITHM], issuer=self._issuer,
                                options={"verify_exp": False, "verify_aud": False})
        except jwt.PyJWTError:
            return "revoke:not_ours"  # RFC 7009 2.2: an invalid token is answered 200 all the same
        if claims.get("client_id") != client.client_id:
            raise _OAuthError(400, "unauthorized_client", "the token was not issued to this client")
        if isinstance(claims.get("jti"), str):
            await self._runtime.sessions.revoke(claims["jti"], float(claims.get("exp", time.time() + 86400)))
            self._runtime.metrics.revocations.inc()
        return f"revoked:{claims.get('jti')}"


_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _credentials(headers: dict[str, list[str]], form: dict[str, str]) -> tuple[str | None, str | None, bool]:
    """(client_id, secret, came by Basic auth) from client_secret_basic or client_secret_post."""
    authorization = (headers.get("authorization") or [""])[0]
    if authorization.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, None, True
        client_id, _, secret = decoded.partition(":")
        return unquote(client_id), unquote(secret), True
    return form.get("client_id"), form.get("client_secret"), False


async def _form(scope: ASGIScope, receive: ASGIReceive, timeout_s: float) -> dict[str, str]:
    content_type = (header_values(scope).get("content-type") or [""])[0].split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise _OAuthError(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
    try:
        body = await read_body(receive, limit=_MAX_FORM, timeout_s=timeout_s)
    except GatewayRefusal as refusal:
        too_large = refusal.refusal is PAYLOAD_TOO_LARGE
        raise _OAuthError(400, "invalid_request", "body too large" if too_large else refusal.refusal.message) from None
    parsed = parse_qs(body.decode("latin-1"), keep_blank_values=False)
    repeated = [k for k, v in parsed.items() if len(v) > 1]
    if repeated:
        raise _OAuthError(400, "invalid_request", f"parameter repeated: {', '.join(repeated)}")
    return {k: v[0] for k, v in parsed.items()}


async def _json(send: ASGISend, status: int, body: dict[str, Any],
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_json(send, status, orjson.dumps(body), [(b"cache-control", b"no-store"), *(extra or [])])
