"""The authenticator: turn a request's credentials into a `Principal`, or refuse with a challenge.

Owns: bearer token extraction (header only; a token in the query string is
refused), verification of tokens the gateway signed itself (signature, `iss`,
`aud` = the protected resource, `exp`/`nbf`/`iat`), the rules every source's
claims are held to (`_check_claims`: first the type of each claim the gateway
reads, `CLAIM_TYPES`, then their values), a cache of verified
tokens keyed by the token's hash until its expiry (the signature is checked
once per token, not once per request), the anonymous role for token-less
callers when configured, and the `WWW-Authenticate` challenge whose
`resource_metadata` URL is built from `public_url`, never from the request.
Also the token sessions it checks on every request (each gateway token's last
use, and every token's revocation, cached tokens included), and the short-lived
identity tokens an upstream may ask for in `X-MCP-Identity`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jwt
from cachetools import TTLCache

from gateway.auth.introspection import IntrospectionUnavailable, Introspector
from gateway.auth.jwks import JwksCache
from gateway.auth.keys import ALGORITHM, SigningKey
from gateway.auth.scopes import expand_scopes, implied_scopes
from gateway.errors import UNAUTHORIZED, GatewayRefusal
from gateway.principal import ClaimTypeError, Principal, check_claim_types, principal_from_claims
from gateway.sessions import TokenSession

if TYPE_CHECKING:
    from jwt.types import Options

    from gateway.config import Config
    from gateway.metrics import Metrics
    from gateway.sessions import SessionStore

_LEEWAY_S = 30
IDENTITY_TYPE = "mcp-identity+jwt"  # the `typ` of X-MCP-Identity tokens: never accepted as an access token
IDENTITY_TTL_S = 60
_TOUCH_EVERY_S = 10  # a token's last use is written at most this often
# PyJWT checks a JWT's signature and framing only. Its claims are then held to `_check_claims`, like an
# introspection answer's: their types first (CLAIM_TYPES), so that nothing reads a claim of the wrong type.
_SIGNATURE_ONLY: Options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                            "verify_iss": False, "verify_sub": False, "verify_jti": False}


class AuthFailed(GatewayRefusal):
    """A refusal with the `WWW-Authenticate` challenge that goes with it."""

    def __init__(self, detail: str, challenge: str, *, reason: str, error: str | None = None,
                 source: str = "gateway") -> None:
        super().__init__(UNAUTHORIZED, detail, reason=reason)
        self.challenge = challenge
        self.error = error
        self.source = source  # which kind of credential failed: gateway, jwt (for metrics)


class Authenticator:
    """Authenticates requests for every upstream of one gateway.

    Args:
        config: the gateway config (public_url, auth.*).
        signing_key: the gateway's own key; tokens it signed are accepted.
        cache_size: how many verified tokens to remember (each until it expires).
        metrics: where attempts and token-cache lookups are counted.
        sessions: where token sessions and revoked token ids live (looked up on every request, cached
            tokens included).
    """

    def __init__(self, config: Config, signing_key: SigningKey, *, cache_size: int = 10_000,
                 metrics: Metrics | None = None, sessions: SessionStore | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._sessions = sessions
        self._key = signing_key
        self._public = signing_key.public
        self._issuer = config.public_url
        role = config.auth.anonymous_role
        # One principal for every token-less caller: the same object each time, so per-principal caches hold one.
        self._anonymous = Principal(subject="anonymous", issuer="anonymous", roles=frozenset({role})) if role else None
        auth = config.auth
        self._jwks = JwksCache(auth.jwt, metrics) if auth.jwt is not None else None
        self._introspector = Introspector(auth.introspection, metrics) if auth.introspection is not None else None
        self._implied = implied_scopes(auth.scope_hierarchy)
        # token hash -> (principal, the audience it was verified for, source, valid until)
        self._verified: TTLCache[str, tuple[Principal, str | tuple[str, ...], str, float]] = TTLCache(
            maxsize=cache_size, ttl=max(auth.clients.token_ttl_s, 3600)
        )
        self._touched: TTLCache[str, bool] = TTLCache(maxsize=cache_size, ttl=_TOUCH_EVERY_S)
        self._identities: TTLCache[tuple[Any, ...], str] = TTLCache(maxsize=cache_size, ttl=IDENTITY_TTL_S / 2)

    async def close(self) -> None:
        if self._introspector is not None:
            await self._introspector.close()

    async def jwks_ready(self) -> bool | None:
        """Whether the external issuer's keys are at hand (fetching them if none are); None without an issuer."""
        return None if self._jwks is None else await self._jwks.ready()

    def metadata_url(self, upstream_path: str) -> str:
        """RFC 9728 metadata URL for a resource at `upstream_path` (path-suffixed form)."""
        config = self._config
        return f"{config.public_url}/.well-known/oauth-protected-resource{config.public_path_prefix}{upstream_path}"

    def challenge(
        self,
        upstream_path: str,
        error: str | None = None,
        *,
        description: str | None = None,
        scope: str | None = None,
        acr_values: str | None = None,
    ) -> str:
        """A `WWW-Authenticate: Bearer` value (RFC 6750; RFC 9728 resource_metadata; RFC 9470 acr_values)."""
        params = [("resource_metadata", self.metadata_url(upstream_path))]
        for name, value in (("error", error), ("error_description", description), ("scope", scope),
                            ("acr_values", acr_values)):
            if value:
                params.append((name, value))
        return "Bearer " + ", ".join(f'{name}="{_quoted(value)}"' for name, value in params)

    async def authenticate(
        self, headers: Mapping[str, list[str]], query_string: bytes, resource: str | tuple[str, ...],
        upstream_path: str,
    ) -> Principal:
        """The principal for this request, or raise AuthFailed (401 with a challenge).

        `resource` is the audience the token must name (any one of them, when several).
        """
        try:
            principal, source = await self._authenticate(headers, query_string, resource, upstream_path)
        except AuthFailed as failed:
            self._count(failed.source, failed.reason.split(":")[0])
            raise
        self._count(source, "ok")
        return principal

    def _count(self, source: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.auth_attempts, source, outcome).inc()

    async def _authenticate(
        self, headers: Mapping[str, list[str]], query_string: bytes, resource: str | tuple[str, ...],
        upstream_path: str,
    ) -> tuple[Principal, str]:
        if _token_in_query(query_string):
            raise AuthFailed(
                "access tokens are accepted only in the Authorization header",
                self.challenge(upstream_path, "invalid_request"),
                reason="token_in_query",
            )
        values = headers.get("authorization", [])
        if not values:
            if self._anonymous is not None:
                return self._anonymous, "anonymous"
            raise AuthFailed("a bearer token is required", self.challenge(upstream_path), reason="no_token")
        if len(values) > 1:
            raise AuthFailed("one Authorization header, please", self.challenge(upstream_path, "invalid_request"),
                             reason="malformed_header")
        token = bearer_token(values[0])
        if token is None:
            raise AuthFailed("expected 'Authorization: Bearer <token>'",
                             self.challenge(upstream_path, "invalid_request"), reason="malformed_header")
        return await self._verify(token, resource, upstream_path)

    async def _verify(self, token: str, resource: str | tuple[str, ...], upstream_path: str
                      ) -> tuple[Principal, str]:
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._verified.get(digest)
        if cached is not None:
            principal, cached_for, source, valid_until = cached
            if cached_for == resource and valid_until > time.time():
                if self._metrics is not None:
                    self._metrics.child(self._metrics.token_cache, "hit").inc()
                await self._check_token(principal, source, upstream_path)
                return principal, source
        if self._metrics is not None:
            self._metrics.token_cache.labels("miss").inc()
        audiences = (resource,) if isinstance(resource, str) else resource
        try:
            claims, source, valid_until = await self._claims(token, audiences)
        except AuthFailed as failed:
            failed.challenge = self.challenge(upstream_path, failed.error)
            raise
        except jwt.PyJWTError as exc:  # the signature, or the token's framing
            raise self._invalid(upstream_path, "invalid token", f"invalid_token:{type(exc).__name__}",
                                self._source_of(token)) from None
        if "sub" not in claims and "client_id" in claims:
            claims = {**claims, "sub": claims["client_id"]}  # a client-credentials token names its client
        if "sub" not in claims:
            raise self._invalid(upstream_path, "token names no subject", "missing_claim:sub", source)
        principal = principal_from_claims(claims)
        if self._implied:
            principal = dataclasses.replace(principal, scopes=expand_scopes(principal.scopes, self._implied))
        await self._check_token(principal, source, upstream_path)
        self._verified[digest] = (principal, resource, source, valid_until)
        return principal, source

    async def _check_token(self, principal: Principal, source: str, upstream_path: str) -> None:
        """Refuse a revoked token; note when a gateway token was last used (at most every few seconds)."""
        token_id = principal.token_id
        if token_id is None or self._sessions is None:
            return
        if source == "gateway" and token_id not in self._touched:
            self._touched[token_id] = True
            revoked = await self._sessions.token_used(token_session(principal))
        else:
            revoked = await self._sessions.revoked(token_id)
        if revoked:
            raise self._invalid(upstream_path, "token revoked", "revoked", source)

    async def _claims(self, token: str, audiences: tuple[str, ...]) -> tuple[dict[str, Any], str, float]:
        """Verified claims, which source vouched for them (`gateway`, `jwt`, `introspection`), and until when
        the verdict may be reused."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            header = None  # not a JWT: an opaque token
        if header is not None and header.get("kid") == self._key.kid and header.get("alg") == ALGORITHM:
            if header.get("typ") == IDENTITY_TYPE:
                raise AuthFailed("an identity token is not an access token", "", reason="identity_token",
                                 error="invalid_token")
            claims = jwt.decode(token, self._public, algorithms=[ALGORITHM], options=_SIGNATURE_ONLY)
            _check_claims(claims, "gateway", issuer=self._issuer, audiences=audiences, leeway=_LEEWAY_S,
                          required=("exp", "iat", "sub", "iss", "aud"))
            return claims, "gateway", float(claims["exp"]) + _LEEWAY_S
        external = self._config.auth.jwt
        if header is not None and external is not None:
            claims = await self._external_jwt(token, header, audiences)
            return claims, "jwt", float(claims["exp"]) + external.leeway_s
        if self._introspector is not None:
            return await self._introspected(token, audiences)
        if header is None:
            raise AuthFailed("the token is neither a JWT nor introspectable", "", reason="malformed_token",
                             error="invalid_token", source="jwt")
        raise AuthFailed("token from an unknown issuer", "", reason="unknown_key", error="invalid_token",
                         source="jwt")

    async def _external_jwt(self, token: str, header: dict[str, Any], audiences: tuple[str, ...]
                            ) -> dict[str, Any]:
        external = self._config.auth.jwt
        assert external is not None and self._jwks is not None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in external.algorithms:  # never "none", never HS* with a public key: only the allow-list
            raise AuthFailed(f"algorithm {alg} not accepted", "", reason=f"alg_not_allowed:{alg}",
                             error="invalid_token", source="jwt")
        key = await self._jwks.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise AuthFailed("token signed with an unknown key", "", reason="unknown_kid", error="invalid_token",
                             source="jwt")
        if key.algorithm_name and key.algorithm_name != alg:
            raise AuthFailed("token algorithm does not match its key", "", reason="alg_key_mismatch",
                             error="invalid_token", source="jwt")
        claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=[alg], options=_SIGNATURE_ONLY)
        _check_claims(claims, "jwt", issuer=external.issuer, audiences=audiences, leeway=external.leeway_s,
                      required=("exp", "iss", "aud"))
        return claims

    async def _introspected(self, token: str, audiences: tuple[str, ...]) -> tuple[dict[str, Any], str, float]:
        """RFC 7662: the authorization server's word on the token, held to the same rules as a JWT's claims."""
        config = self._config.auth.introspection
        assert config is not None and self._introspector is not None

        def refused(detail: str, reason: str) -> AuthFailed:
            return AuthFailed(detail, "", reason=reason, error="invalid_token", source="introspection")

        try:
            claims = await self._introspector.claims(token)
        except IntrospectionUnavailable as exc:
            raise refused(f"the token cannot be checked now ({exc})", "introspection_unavailable") from None
        if claims is None:
            raise refused("token is not active", "inactive")
        _check_claims(claims, "introspection", issuer=config.issuer, audiences=audiences, leeway=_LEEWAY_S)
        claims.setdefault("iss", config.issuer or config.url)
        until = time.time() + config.cache_s
        if "exp" in claims:
            until = min(until, float(claims["exp"]))
        return claims, "introspection", until

    def _source_of(self, token: str) -> str:
        try:
            return "gateway" if jwt.get_unverified_header(token).get("kid") == self._key.kid else "jwt"
        except jwt.PyJWTError:
            return "introspection" if self._introspector is not None else "jwt"

    def _invalid(self, upstream_path: str, detail: str, reason: str, source: str = "gateway") -> AuthFailed:
        return AuthFailed(detail, self.challenge(upstream_path, "invalid_token"), reason=reason, source=source)

    def issue_token(
        self,
        *,
        subject: str,
        audience: str,
        scopes: Iterable[str] = (),
        client_id: str | None = None,
        claims: Mapping[str, Any] | None = None,
        ttl_s: int | None = None,
    ) -> str:
        """A JWT signed with the gateway's key, for `audience` (a protected resource URL)."""
        now = int(time.time())
        body: dict[str, Any] = dict(claims or {})
        body.update({
            "iss": self._issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + (ttl_s or self._config.auth.clients.token_ttl_s),
            "jti": uuid.uuid4().hex,
        })
        if client_id:
            body["client_id"] = client_id
        scope_list = list(scopes)
        if scope_list:
            body["scope"] = " ".join(scope_list)
        return jwt.encode(body, self._key.private, algorithm=ALGORITHM, headers={"kid": self._key.kid})


    def identity_token(self, principal: Principal, roles: Iterable[str], audience: str) -> str:
        """A 60 s JWT telling the upstream at `audience` who is calling (`X-MCP-Identity`), reused for half
        its life so that signing is not paid on every request."""
        role_list = sorted(roles)
        key = (principal.identity, tuple(role_list), principal.scopes, audience)
        token = self._identities.get(key)
        if token is None:
            now = int(time.time())
            body: dict[str, Any] = {
                "iss": self._issuer, "sub": principal.subject, "aud": audience, "iat": now, "nbf": now,
                "exp": now + IDENTITY_TTL_S, "jti": uuid.uuid4().hex, "roles": role_list,
                "scope": " ".join(sorted(principal.scopes)), "authenticated_by": principal.issuer,
            }
            if principal.client_id:
                body["client_id"] = principal.client_id
            token = jwt.encode(body, self._key.private, algorithm=ALGORITHM,
                               headers={"kid": self._key.kid, "typ": IDENTITY_TYPE})
            self._identities[key] = token
        return token


def token_session(principal: Principal) -> TokenSession:
    """The token session a verified principal's token stands for."""
    iat = principal.claims.get("iat")
    return TokenSession(
        token_id=principal.token_id or "", subject=principal.subject, client_id=principal.client_id,
        issuer=principal.issuer, scopes=tuple(sorted(principal.scopes)),
        issued_at=float(iat) if isinstance(iat, int | float) else time.time(),
        expires_at=principal.expires_at or time.time() + 3600,
    )


def _check_claims(claims: Mapping[str, Any], source: str, *, issuer: str | None, audiences: tuple[str, ...],
                  leeway: float, required: tuple[str, ...] = ()) -> None:
    """Hold verified claims to the rules, the same for every source: each claim the gateway reads of its type
    (`CLAIM_TYPES`), the `required` ones present, `iss` the issuer (when one is expected), `aud` naming one of
    `audiences` (trailing slashes aside, as everywhere resource URLs are compared), `exp`, `nbf` and `iat` within
    `leeway` seconds of now. Raises AuthFailed (invalid_token) naming the first rule broken."""

    def refused(detail: str, reason: str) -> AuthFailed:
        return AuthFailed(detail, "", reason=reason, error="invalid_token", source=source)

    try:
        check_claim_types(claims)
    except ClaimTypeError as exc:
        raise refused(f"invalid token: {exc}", f"claim_type:{exc.claim}") from None
    for claim in required:
        if claim not in claims:
            raise refused(f"token has no {claim}", f"missing_claim:{claim}")
    if issuer is not None and claims.get("iss") != issuer:
        raise refused("token from an unknown issuer", "wrong_issuer")
    aud = claims.get("aud", [])
    wanted = {audience.rstrip("/") for audience in audiences}
    if not any(named.rstrip("/") in wanted for named in ([aud] if isinstance(aud, str) else aud)):
        raise refused("token is not for this resource", "wrong_audience")
    now = time.time()
    if "exp" in claims and claims["exp"] <= now - leeway:
        raise refused("token expired", "expired")
    if any(claims[claim] > now + leeway for claim in ("nbf", "iat") if claim in claims):
        raise refused("token not valid yet", "not_yet_valid")


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for any other form."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and " " not in token else None


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _token_in_query(query_string: bytes) -> bool:
    if b"access_token" not in query_string:
        return False
    return any(part.split(b"=", 1)[0] == b"access_token" for part in query_string.split(b"&"))
