"""The `auth:` section of the config: how callers prove who they are.

Owns the models, defaults and validation of the external issuer (`jwt`), token
introspection, the gateway's own registered clients, and the scope and
security-level settings around them; and of `upstreams[].oauth`, the gateway's
own credentials for an upstream that requires a token. `gateway.config` reads it as part of the
one config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.auth.totp import secret_key
from gateway.oauth.metadata import trusted_url
from gateway.principal import check_claim_types
from gateway.yamlfile import StrictModel

# A token the gateway signs can be taken back only by revoking it, which the session store must remember until
# the token expires (in memory: lost on a restart; and `sessions revoke` finds it among at most
# sessions.max_sessions token sessions). A day bounds that exposure, for `issue-token --ttl` and
# `auth.clients.token_ttl_s` alike; a machine that needs access for longer is a registered client
# (auth.clients.registered), which gets a fresh token whenever it needs one.
MAX_TOKEN_TTL_S = 86400


def http_url(value: str) -> str:
    """`value` if it is an http(s) URL with a host and no credentials in it."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    try:
        port = parts.port
    except ValueError:  # out of range, or not a number
        port = 0
    if port == 0:
        raise ValueError("its port is not a number from 1 to 65535")
    # The upstream client would send user:password@ in its Host header, and URLs are logged as written.
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); put them in upstreams[].headers "
                         "(e.g. Authorization: Basic ...), or auth.introspection.client_id and client_secret")
    return value


class ClientMfa(StrictModel):
    """A registered client's second factor: a one-time code (TOTP) with each token request, as form field `otp`."""

    totp_secret: str  # write ${VAR}: the value comes from the environment (`mcp-gateway hash-secret --totp`)

    @field_validator("totp_secret")
    @classmethod
    def _base32(cls, value: str) -> str:
        secret_key(value)
        return value


class RegisteredClient(StrictModel):
    """A machine client that may get tokens from POST /oauth/token (client_credentials)."""

    client_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    secret_hash: str = Field(pattern=r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")
    scopes: tuple[str, ...] = ()
    claims: dict[str, Any] = Field(default_factory=dict)
    security_level: Literal["low", "standard", "high", "critical"] = "standard"  # the most this client reaches
    mfa: ClientMfa | None = None  # its tokens then carry amr ["pwd", "otp"]

    @field_validator("claims")
    @classmethod
    def _claims_of_their_types(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_claim_types(value)  # a token the gateway signs with them would be refused by the gateway itself
        if "amr" in value:  # a configured amr would reach the levels that a second factor is meant to reach
            raise ValueError("amr is not configured: the gateway sets it from what the client proves (mfa)")
        return value


class GatewayClients(StrictModel):
    """Tokens the gateway signs itself: for registered clients (POST /oauth/token) and `mcp-gateway issue-token`."""

    signing_key_file: Path = Path("gateway-signing-key.pem")
    token_ttl_s: int = Field(900, gt=0, le=MAX_TOKEN_TTL_S)
    registered: tuple[RegisteredClient, ...] = ()
    max_failures: int = Field(5, gt=0)  # failed secrets per client or source before answers slow down


_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class ExternalJwt(StrictModel):
    """Bearer JWTs from an external authorization server, verified with its JWKS."""

    issuer: str
    jwks_uri: str | None = None  # default: discovered from the issuer's RFC 8414 / OIDC metadata
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: int = Field(30, ge=0, le=300)
    jwks_cache_s: float = Field(3600, gt=0)  # how long fetched keys are trusted before a routine refresh
    # JWKS fetches on demand (unknown kid, stale or no keys): a burst of `refresh_burst`, then one per interval;
    # a kid a fetch did not contain is refused without another fetch for one interval. 0: no limit.
    min_refresh_interval_s: float = Field(30, ge=0)
    refresh_burst: int = Field(3, ge=1, le=100)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [alg for alg in value if alg not in _ASYMMETRIC]
        if bad:
            raise ValueError(f"{', '.join(bad)} not allowed: only asymmetric algorithms ({', '.join(_ASYMMETRIC)})")
        if not value:
            raise ValueError("at least one algorithm")
        return value


class Introspection(StrictModel):
    """RFC 7662 token introspection, for opaque tokens (and JWTs no configured key can verify)."""

    url: str
    client_id: str
    client_secret: str  # write ${INTROSPECTION_SECRET}: the value comes from the environment
    issuer: str | None = None  # when set, an answer naming another `iss` is refused
    cache_s: float = Field(60, ge=0)  # an answer is reused for at most this long (and never past the token's exp)
    timeout_s: float = Field(5, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value)


class Auth(StrictModel):
    anonymous_role: str | None = None
    # The protected resource's URL, which tokens' `aud` must name. Default: public_url + the upstream's path.
    # Only with one upstream: each upstream is its own resource.
    resource: str | None = None
    clients: GatewayClients = GatewayClients()
    jwt: ExternalJwt | None = None
    introspection: Introspection | None = None
    # Authorization servers advertised in the RFC 9728 metadata; default: jwt.issuer, and the gateway itself.
    authorization_servers: tuple[str, ...] | None = None
    # Scopes advertised in the RFC 9728 metadata; default: every scope the policy binds.
    scopes_supported: tuple[str, ...] | None = None
    # A broader scope implies narrower ones (transitively): {mcp:admin: [mcp:tools, mcp:read]}.
    scope_hierarchy: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("resource")
    @classmethod
    def _resource_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an absolute http:// or https:// URL without query or fragment")
        return value.rstrip("/")


class UpstreamOAuth(StrictModel):
    """`upstreams[].oauth`: the gateway is the OAuth client of an upstream that requires its own token.

    `client_credentials`: one token for the gateway itself. `token_exchange` (RFC 8693): the caller's
    validated token exchanged for one whose audience is the upstream, per caller. Either way the token is
    cached to its expiry, renewed ahead of it, and sent only to the upstream; the caller's token never is.
    """

    grant: Literal["client_credentials", "token_exchange"]
    token_url: str | None = None  # default: discovered from the upstream's RFC 9728 metadata and its issuer's
    issuer: str | None = None  # when discovering: the only authorization server the upstream may name
    client_id: str
    client_secret: str  # write ${VAR}: the value comes from the environment
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    scopes: tuple[str, ...] = ()
    resource: str | None = None  # RFC 8707 resource asked for; default: the upstream's url
    audience: str | None = None  # token_exchange: an RFC 8693 audience, when the server wants one
    timeout_s: float = Field(10, gt=0)

    @field_validator("token_url", "issuer")
    @classmethod
    def _trusted(cls, value: str | None) -> str | None:
        if value is not None and not trusted_url(value):
            raise ValueError("must be an https:// URL (plain http only on a loopback address), without "
                             "credentials or fragment: the client secret is sent there")
        return value

    @model_validator(mode="after")
    def _pinned_for_exchange(self) -> UpstreamOAuth:
        if self.grant == "token_exchange" and self.token_url is None and self.issuer is None:
            raise ValueError("token_exchange needs token_url or issuer: callers' tokens are sent to the token "
                             "endpoint, which the upstream must not be the one to choose")
        return self
