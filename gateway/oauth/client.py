"""The HTTP half of the OAuth client: every request it makes to a resource or an authorization server.

Owns discovery (the challenge's `resource_metadata`, else the well-known URLs;
then the authorization server's metadata, judged by `oauth.metadata`), dynamic
client registration (RFC 7591), the token endpoint (authorization code with
the PKCE verifier, refresh, client credentials, RFC 8693 token exchange; every
one naming the RFC 8707 resource), and revocation (RFC 7009). Every answer is
read bounded, redirects are never followed, and nothing secret goes into an
exception or a log line: errors name the endpoint and the OAuth error code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson

from gateway.oauth.grants import AuthorizationRequest, Tokens, read_token_answer, token_error
from gateway.oauth.metadata import (
    OAuthClientError,
    ResourceMetadata,
    ServerMetadata,
    read_resource_metadata,
    read_server_metadata,
    resource_metadata_urls,
    server_metadata_urls,
    trusted_url,
)

_MAX_ANSWER = 256 * 1024
_TIMEOUT = httpx.Timeout(30)  # every OAuth request, whatever the client's own (connect streams without a limit)
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"

AuthMethod = Literal["none", "client_secret_basic", "client_secret_post"]


class TokenRefused(OAuthClientError):
    """The token endpoint answered with an OAuth error (`error` holds its code, e.g. invalid_grant)."""

    def __init__(self, endpoint: str, error: str, detail: str) -> None:
        super().__init__(f"the token endpoint {endpoint} refused: {detail}")
        self.error = error


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who the client is to one authorization server: pre-registered, a metadata document URL, or registered."""

    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    auth_method: AuthMethod = "none"

    def as_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "client_secret": self.client_secret, "auth_method": self.auth_method}

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> ClientIdentity:
        secret = stored.get("client_secret")
        return cls(str(stored["client_id"]), secret if isinstance(secret, str) and secret else None,
                   _auth_method(stored.get("auth_method"), secret))


class OAuthHttp:
    """The OAuth client's requests, over one `httpx.AsyncClient` (which the caller owns and closes).

    Args:
        http: the HTTP client; redirects are never followed, whatever it is set to.
        clock: seconds since the epoch, for token expiry.
    """

    def __init__(self, http: httpx.AsyncClient, clock: Callable[[], float] = time.time) -> None:
        self._http = http
        self._clock = clock

    async def discover(self, server_url: str, challenge: Mapping[str, str]
                       ) -> tuple[ResourceMetadata, ServerMetadata]:
        """The resource's metadata (RFC 9728) and its first authorization server's (RFC 8414 / OIDC)."""
        named = challenge.get("resource_metadata")
        if named is not None and not trusted_url(named):
            raise OAuthClientError(f"the server's challenge names resource metadata at {named!r}, which is not "
                                   "HTTPS: refused")
        candidates = [named] if named else resource_metadata_urls(server_url)
        document = await self._first_json(candidates, "protected-resource metadata")
        resource = read_resource_metadata(document, server_url)
        issuer = resource.authorization_servers[0]
        if not trusted_url(issuer):
            raise OAuthClientError(f"the authorization server {issuer!r} is not an HTTPS URL: refused")
        return resource, await self.server_metadata(issuer)

    async def server_metadata(self, issuer: str) -> ServerMetadata:
        """One authorization server's metadata, checked."""
        return read_server_metadata(await self._first_json(server_metadata_urls(issuer),
                                                           "authorization server metadata"), issuer)

    async def register(self, server: ServerMetadata, redirect_uri: str, client_name: str) -> ClientIdentity:
        """RFC 7591: register a public native client with this loopback redirect.

        No `scope` is registered: the client is reused for later logins, and a step-up may need a scope the
        first login did not; what the client may ask for is the server's to decide.
        """
        if server.registration_endpoint is None:
            raise OAuthClientError(f"authorization server {server.issuer} offers no dynamic client registration; "
                                   "give --client-id (a client registered there) or --client-metadata-url")
        request = {"client_name": client_name, "redirect_uris": [redirect_uri], "application_type": "native",
                   "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
                   "token_endpoint_auth_method": "none"}
        response = await self._post(server.registration_endpoint, content=orjson.dumps(request),
                                    headers={"content-type": "application/json"})
        answer = _json(response)
        if response.status not in (200, 201) or not isinstance(answer, dict) \
                or not isinstance(answer.get("client_id"), str):
            raise OAuthClientError(f"dynamic client registration at {server.registration_endpoint} failed: "
                                   f"HTTP {response.status} {token_error(answer)}")
        secret = answer.get("client_secret")
        return ClientIdentity(answer["client_id"], secret if isinstance(secret, str) and secret else None,
                              _auth_method(answer.get("token_endpoint_auth_method"), secret))

    async def exchange_code(self, server: ServerMetadata, client: ClientIdentity, request: AuthorizationRequest,
                            code: str) -> Tokens:
        """The authorization code, with its PKCE verifier and the resource, for tokens."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": request.redirect_uri,
                "code_verifier": request.pkce.verifier, "resource": request.resource}
        return await self._token(server.token_endpoint, client, form, asked=request.scopes)

    async def refresh(self, server: ServerMetadata, client: ClientIdentity, tokens: Tokens, resource: str
                      ) -> Tokens:
        """A refresh (the rotated refresh token kept when the server issues one)."""
        if tokens.refresh_token is None:
            raise OAuthClientError("no refresh token is held")
        form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token, "resource": resource}
        return await self._token(server.token_endpoint, client, form, asked=tokens.scope,
                                 previous_refresh=tokens.refresh_token)

    async def client_credentials(self, token_url: str, client: ClientIdentity, scopes: frozenset[str],
                                 resource: str | None) -> Tokens:
        """A token for the client itself (RFC 6749 4.4)."""
        form = {"grant_type": "client_credentials"}
        if scopes:
            form["scope"] = " ".join(sorted(scopes))
        if resource:
            form["resource"] = resource
        return await self._token(token_url, client, form, asked=scopes)

    async def token_exchange(self, token_url: str, client: ClientIdentity, subject_token: str,
                             scopes: frozenset[str], resource: str | None, audience: str | None) -> Tokens:
        """RFC 8693: the caller's access token exchanged for one meant for `resource` (the upstream)."""
        form = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject_token,
                "subject_token_type": ACCESS_TOKEN_TYPE, "requested_token_type": ACCESS_TOKEN_TYPE}
        if scopes:
            form["scope"] = " ".join(sorted(scopes))
        if resource:
            form["resource"] = resource
        if audience:
            form["audience"] = audience
        return await self._token(token_url, client, form, asked=scopes)

    async def revoke(self, server: ServerMetadata, client: ClientIdentity, token: str, hint: str) -> bool:
        """RFC 7009; False when the server offers no revocation endpoint. A refused revocation raises."""
        if server.revocation_endpoint is None:
            return False
        form = {"token": token, "token_type_hint": hint}
        response = await self._post(server.revocation_endpoint, **_authenticated(client, form))
        if response.status != 200:
            raise OAuthClientError(f"revocation at {server.revocation_endpoint} failed: HTTP "
                                   f"{response.status} {token_error(_json(response))}")
        return True

    async def _token(self, endpoint: str, client: ClientIdentity, form: dict[str, str], *,
                     asked: frozenset[str], previous_refresh: str | None = None) -> Tokens:
        response = await self._post(endpoint, **_authenticated(client, form))
        answer = _json(response)
        if response.status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise TokenRefused(endpoint, error if isinstance(error, str) else "",
                               f"HTTP {response.status} {token_error(answer)}")
        return read_token_answer(answer, self._clock(), asked=asked, previous_refresh=previous_refresh)

    async def _post(self, url: str, **kwargs: Any) -> _Answer:
        return await self._bounded("POST", url, **kwargs)

    async def _first_json(self, urls: list[str], what: str) -> Any:
        tried = []
        for url in urls:
            response = await self._bounded("GET", url, headers={"accept": "application/json"})
            if response.status == 200:
                return _json(response)
            tried.append(f"{url} (HTTP {response.status})")
        raise OAuthClientError(f"no {what} found: tried {', '.join(tried)}")

    async def _bounded(self, method: str, url: str, **kwargs: Any) -> _Answer:
        """One request, no redirect followed, its answer read to at most 256 KiB."""
        try:
            async with self._http.stream(method, url, follow_redirects=False, timeout=_TIMEOUT,
                                         **kwargs) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_ANSWER:
                        raise OAuthClientError(f"{url} answered with more than {_MAX_ANSWER} bytes")
                return _Answer(response.status_code, bytes(body))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise OAuthClientError(f"cannot reach {url}: {type(exc).__name__}") from None


def _auth_method(named: Any, secret: Any) -> AuthMethod:
    """How a client authenticates: as registered; with a secret and no method named, RFC 7591's default."""
    if named in ("client_secret_basic", "client_secret_post", "none"):
        return named  # type: ignore[no-any-return]
    return "client_secret_basic" if isinstance(secret, str) and secret else "none"


def _authenticated(client: ClientIdentity, form: dict[str, str]) -> dict[str, Any]:
    """The form, with the client authenticated the way it was registered (RFC 6749 2.3.1)."""
    if client.auth_method == "client_secret_basic" and client.client_secret is not None:
        credentials = httpx.BasicAuth(quote(client.client_id, safe=""), quote(client.client_secret, safe=""))
        return {"data": form, "auth": credentials}
    if client.auth_method == "client_secret_post" and client.client_secret is not None:
        return {"data": {**form, "client_id": client.client_id, "client_secret": client.client_secret}}
    return {"data": {**form, "client_id": client.client_id}}


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes = field(repr=False)


def _json(response: _Answer) -> Any:
    try:
        return orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return None
