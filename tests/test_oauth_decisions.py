"""The OAuth client's judgements, as tables: challenges, metadata it trusts, the redirect it accepts, tokens."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import httpx
import pytest

from gateway.oauth.client import ClientIdentity
from gateway.oauth.grants import Pkce, authorization_request, code_from_redirect, read_token_answer
from gateway.oauth.login import ClientChoice, Grant, client_identity, client_metadata_url
from gateway.oauth.loopback import RedirectReceiver
from gateway.oauth.metadata import (
    OAuthClientError,
    bearer_challenge,
    canonical_url,
    read_resource_metadata,
    read_server_metadata,
    resource_metadata_urls,
    server_metadata_urls,
    trusted_url,
)

CHALLENGES = [
    ('Bearer resource_metadata="https://gw/.well-known/oauth-protected-resource/mcp"',
     {"resource_metadata": "https://gw/.well-known/oauth-protected-resource/mcp"}),
    ('Bearer error="insufficient_scope", scope="mcp:tools mcp:admin"',
     {"error": "insufficient_scope", "scope": "mcp:tools mcp:admin"}),
    ('Basic realm="gw", Bearer error=invalid_token, scope="a"', {"error": "invalid_token", "scope": "a"}),
    ('Bearer realm="say \\"hi\\""', {"realm": 'say "hi"'}),
    ('Basic realm="only basic"', {}),
    ("", {}),
    ('Bearer error="a", error="b"', {"error": "a"}),  # a repeated parameter: the first, never a later copy
]


@pytest.mark.parametrize(("header", "expected"), CHALLENGES)
def test_the_bearer_challenge_is_read_from_www_authenticate(header: str, expected: dict[str, str]) -> None:
    assert bearer_challenge(header) == expected


@pytest.mark.parametrize(("url", "trusted"), [
    ("https://as.example/token", True),
    ("http://127.0.0.1:9000/token", True),
    ("http://localhost/token", True),
    ("http://as.example/token", False),
    ("https://user:pw@as.example/token", False),
    ("ftp://as.example/token", False),
    ("https://as.example/token#frag", False),
    ("https://[x/token", False),  # an authority that cannot be read
])
def test_only_https_or_loopback_endpoints_are_trusted(url: str, trusted: bool) -> None:
    assert trusted_url(url) is trusted


@pytest.mark.parametrize(("url", "canonical"), [
    ("HTTPS://GW.example:443/mcp/", "https://gw.example/mcp"),
    ("http://127.0.0.1:80/mcp", "http://127.0.0.1/mcp"),
    ("http://127.0.0.1:8080/mcp", "http://127.0.0.1:8080/mcp"),
    ("https://gw.example/mcp#frag", "https://gw.example/mcp"),
])
def test_a_server_url_has_one_canonical_form(url: str, canonical: str) -> None:
    assert canonical_url(url) == canonical


def test_well_known_urls_insert_the_path_then_fall_back() -> None:
    assert resource_metadata_urls("https://gw.example/tenant/mcp") == [
        "https://gw.example/.well-known/oauth-protected-resource/tenant/mcp",
        "https://gw.example/.well-known/oauth-protected-resource"]
    assert server_metadata_urls("https://as.example/realm") == [
        "https://as.example/.well-known/oauth-authorization-server/realm",
        "https://as.example/.well-known/openid-configuration/realm",
        "https://as.example/realm/.well-known/openid-configuration"]
    assert server_metadata_urls("https://as.example") == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration"]


@pytest.mark.parametrize(("resource", "accepted"), [
    ("https://gw.example/mcp", True),
    ("https://GW.example/mcp/", True),
    ("https://gw.example", True),  # the origin covers every path under it
    ("https://gw.example/other", False),
    ("https://gw.example/mc", False),  # a prefix of a segment is not a parent
    ("https://evil.example/mcp", False),
    ("http://gw.example/mcp", False),
])
def test_resource_metadata_must_name_the_server_being_reached(resource: str, accepted: bool) -> None:
    document = {"resource": resource, "authorization_servers": ["https://as.example"]}
    if accepted:
        assert read_resource_metadata(document, "https://gw.example/mcp").resource == resource
    else:
        with pytest.raises(OAuthClientError, match="RFC 9728"):
            read_resource_metadata(document, "https://gw.example/mcp")


GOOD_SERVER = {
    "issuer": "https://as.example", "authorization_endpoint": "https://as.example/auth",
    "token_endpoint": "https://as.example/token", "registration_endpoint": "https://as.example/reg",
    "code_challenge_methods_supported": ["S256"], "authorization_response_iss_parameter_supported": True,
}

BAD_SERVERS = [
    ({"issuer": "https://other.example"}, "names the issuer 'https://other.example'"),
    ({"code_challenge_methods_supported": ["plain"]}, "does not offer PKCE with S256"),
    ({"code_challenge_methods_supported": None}, "does not offer PKCE with S256"),
    ({"token_endpoint": "http://as.example/token"}, "token_endpoint .* is not an HTTPS URL"),
    ({"authorization_endpoint": None}, "authorization_endpoint None is not an HTTPS URL"),
    ({"registration_endpoint": "http://10.0.0.1/reg"}, "registration_endpoint"),
]


@pytest.mark.parametrize(("change", "refusal"), BAD_SERVERS)
def test_authorization_server_metadata_is_refused_unless_it_is_safe(change: dict[str, Any], refusal: str) -> None:
    with pytest.raises(OAuthClientError, match=refusal):
        read_server_metadata({**GOOD_SERVER, **change}, "https://as.example")


SERVER = read_server_metadata(GOOD_SERVER, "https://as.example")


def test_the_authorization_request_uses_s256_a_fresh_state_and_names_the_resource() -> None:
    first = authorization_request(SERVER, "cid", "http://127.0.0.1:5/callback", "https://gw/mcp",
                                  frozenset({"b", "a"}))
    second = authorization_request(SERVER, "cid", "http://127.0.0.1:5/callback", "https://gw/mcp", frozenset())
    query = dict(httpx.URL(first.url).params)
    assert query["code_challenge_method"] == "S256"
    assert query["resource"] == "https://gw/mcp"
    assert query["scope"] == "a b"
    digest = hashlib.sha256(first.pkce.verifier.encode()).digest()
    assert query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert first.pkce.verifier not in first.url
    assert first.state != second.state and first.pkce.verifier != second.pkce.verifier
    assert "scope" not in dict(httpx.URL(second.url).params)
    assert first.pkce.verifier not in repr(first) and first.state not in repr(first)


def test_a_pkce_verifier_is_within_rfc_7636_bounds() -> None:
    verifier = Pkce.new().verifier
    assert 43 <= len(verifier) <= 128


REQUEST = authorization_request(SERVER, "cid", "http://127.0.0.1:5/callback", "https://gw/mcp", frozenset())
REDIRECTS = [
    ({"code": "c", "state": REQUEST.state, "iss": "https://as.example"}, None),
    ({"code": "c", "state": "forged", "iss": "https://as.example"}, "state does not match"),
    ({"code": "c", "iss": "https://as.example"}, "state does not match"),
    ({"code": "c", "state": REQUEST.state, "iss": "https://evil.example"}, "mix-up"),
    ({"code": "c", "state": REQUEST.state}, "carries no iss"),
    ({"error": "access_denied", "state": REQUEST.state, "iss": "https://as.example"}, "refused: access_denied"),
    ({"state": REQUEST.state, "iss": "https://as.example"}, "carries no code"),
]


@pytest.mark.parametrize(("params", "refusal"), REDIRECTS)
def test_the_redirect_is_taken_only_with_its_state_and_issuer(params: dict[str, str], refusal: str | None) -> None:
    if refusal is None:
        assert code_from_redirect(REQUEST, SERVER, params) == "c"
    else:
        with pytest.raises(OAuthClientError, match=refusal):
            code_from_redirect(REQUEST, SERVER, params)


TOKEN_ANSWERS = [
    ({"access_token": "a", "token_type": "Bearer", "expires_in": 60, "refresh_token": "r2", "scope": "x"},
     (160.0, "r2", {"x"}), None),
    ({"access_token": "a", "token_type": "bearer"}, (None, "r1", {"asked"}), None),  # not rotated: kept
    ({"access_token": "a", "token_type": "DPoP"}, None, "only Bearer"),
    ({"token_type": "Bearer"}, None, "no access_token"),
    ({"access_token": "a", "token_type": "Bearer", "expires_in": "60"}, None, "expires_in"),
    ({"access_token": "a", "token_type": "Bearer", "expires_in": True}, None, "expires_in"),
    (["not", "an", "object"], None, "not a JSON object"),
]


@pytest.mark.parametrize(("answer", "expected", "refusal"), TOKEN_ANSWERS)
def test_token_answers_are_read_strictly(answer: Any, expected: tuple[Any, ...] | None, refusal: str | None) -> None:
    if refusal is not None:
        with pytest.raises(OAuthClientError, match=refusal):
            read_token_answer(answer, 100.0, asked=frozenset({"asked"}), previous_refresh="r1")
        return
    tokens = read_token_answer(answer, 100.0, asked=frozenset({"asked"}), previous_refresh="r1")
    assert (tokens.expires_at, tokens.refresh_token, set(tokens.scope)) == expected
    assert "'a'" not in repr(tokens) and "r1" not in repr(tokens) and "r2" not in repr(tokens)


def test_a_token_is_renewed_a_tenth_of_its_life_early_at_most_a_minute() -> None:
    short = read_token_answer({"access_token": "a", "token_type": "Bearer", "expires_in": 10}, 0.0)
    long = read_token_answer({"access_token": "a", "token_type": "Bearer", "expires_in": 3600}, 0.0)
    assert (short.expiring(8.9), short.expiring(9.0)) == (False, True)
    assert (long.expiring(3539.0), long.expiring(3540.0)) == (False, True)


async def test_the_loopback_receiver_takes_one_redirect_and_ignores_other_paths() -> None:
    async with RedirectReceiver() as receiver, httpx.AsyncClient() as http:
        assert receiver.redirect_uri.startswith("http://127.0.0.1:")
        base = receiver.redirect_uri.rsplit("/", 1)[0]
        assert (await http.get(f"{base}/favicon.ico")).status_code == 404
        page = await http.get(f"{receiver.redirect_uri}?code=abc&state=xyz")
        assert page.status_code == 200 and b"abc" not in page.content
        assert await receiver.wait(5) == {"code": "abc", "state": "xyz"}
        assert (await http.get(f"{receiver.redirect_uri}?code=again")).status_code == 404


async def test_a_redirect_that_repeats_a_parameter_is_refused() -> None:
    async with RedirectReceiver() as receiver, httpx.AsyncClient() as http:
        await http.get(f"{receiver.redirect_uri}?code=a&state=s&state=t")
        with pytest.raises(OAuthClientError, match="repeats a parameter"):
            await receiver.wait(5)


async def test_no_redirect_in_time_is_a_clear_error() -> None:
    async with RedirectReceiver() as receiver:
        with pytest.raises(OAuthClientError, match="no authorization arrived"):
            await receiver.wait(0.05)


CIMD = "https://app.example/client.json"
PREVIOUS = Grant("https://gw/mcp", "https://gw/mcp", "https://as.example", ClientIdentity("registered-before"),
                 read_token_answer({"access_token": "a", "token_type": "Bearer"}, 0.0))
IDENTITIES = [
    (ClientChoice(client_id="pre"), GOOD_SERVER, None, ClientIdentity("pre")),
    (ClientChoice(client_id="pre", client_secret="s"), GOOD_SERVER, None,
     ClientIdentity("pre", "s", "client_secret_basic")),
    (ClientChoice(client_id="pre", client_secret="s"),
     {**GOOD_SERVER, "token_endpoint_auth_methods_supported": ["client_secret_post"]}, None,
     ClientIdentity("pre", "s", "client_secret_post")),
    (ClientChoice(client_id="pre", client_metadata_url=CIMD), GOOD_SERVER, PREVIOUS, ClientIdentity("pre")),
    (ClientChoice(client_metadata_url=CIMD), {**GOOD_SERVER, "client_id_metadata_document_supported": True}, None,
     ClientIdentity(CIMD)),
    (ClientChoice(client_metadata_url=CIMD), GOOD_SERVER, None, "does not accept Client ID Metadata Documents"),
    (ClientChoice(), GOOD_SERVER, PREVIOUS, ClientIdentity("registered-before")),
    (ClientChoice(), {**GOOD_SERVER, "issuer": "https://other.example"}, PREVIOUS, None),  # another server
    (ClientChoice(), GOOD_SERVER, None, None),  # register
]


@pytest.mark.parametrize(("choice", "server", "previous", "expected"), IDENTITIES)
def test_the_client_is_identified_in_the_mcp_order(choice: ClientChoice, server: dict[str, Any],
                                                   previous: Grant | None, expected: Any) -> None:
    metadata = read_server_metadata(server, server["issuer"])
    if isinstance(expected, str):
        with pytest.raises(OAuthClientError, match=expected):
            client_identity(choice, metadata, previous)
    else:
        assert client_identity(choice, metadata, previous) == expected


@pytest.mark.parametrize("url", ["http://app.example/client.json", "https://app.example", "not a url"])
def test_a_client_metadata_document_url_must_be_https_with_a_path(url: str) -> None:
    with pytest.raises(OAuthClientError, match="--client-metadata-url"):
        client_metadata_url(url)
