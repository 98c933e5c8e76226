"""A second factor on the gateway's own client credentials: one-time codes (TOTP, RFC 6238).

The algorithm against the RFC's own vectors; then a real gateway over HTTP: a client with `mfa` gets a token
only with a current code, each code once, every refusal audited and counted toward the slow-down, and the
token's `amr` lifts it to the level a policy's `authentication_levels` rule gives to `otp`.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway import ConfigError, load_config
from gateway.auth.secrets import hash_secret
from gateway.auth.totp import code_at, generate_secret, matching_step, otpauth_uri, secret_key
from gateway.config import Sessions
from gateway.sessions import open_sessions
from tests.harness import ROOT, Deployment, deploy, write_config

SECRET = "correct horse battery staple"
HASH = hash_secret(SECRET)
TOTP = generate_secret()

RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()  # RFC 6238 Appendix B, SHA1

# (time, the RFC's 8-digit TOTP): the gateway's 6-digit code is its last six digits.
RFC_6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("now", "eight_digits"), RFC_6238_SHA1)
def test_codes_are_the_rfc_6238_sha1_vectors_truncated_to_six_digits(now: int, eight_digits: str) -> None:
    assert code_at(RFC_SECRET, now // 30) == eight_digits[-6:]
    assert matching_step(RFC_SECRET, eight_digits[-6:], now) == now // 30


NOW = 1_700_000_015.0  # 5 s into step 56666667


@pytest.mark.parametrize(("offset", "accepted"), [(-2, False), (-1, True), (0, True), (1, True), (2, False)])
def test_a_code_matches_one_step_either_side_of_now_and_no_further(offset: int, accepted: bool) -> None:
    step = int(NOW // 30) + offset
    assert matching_step(RFC_SECRET, code_at(RFC_SECRET, step), NOW) == (step if accepted else None)


CURRENT = code_at(RFC_SECRET, int(NOW // 30))


def in_other_digits(code: str, zero: str) -> str:
    """`code` in another script's digits: `str.isdigit` and `int()` take them, a 6-ASCII-digit code is not them."""
    return "".join(chr(ord(zero) + int(digit)) for digit in code)


@pytest.mark.parametrize("code", [
    "", CURRENT[:5], CURRENT + "0", "0" + CURRENT, f" {CURRENT}", f"{CURRENT}\n", f"{CURRENT[:3]} {CURRENT[3:]}",
    in_other_digits(CURRENT, "\u0660"), in_other_digits(CURRENT, "\uff10"),  # Arabic-Indic, fullwidth
    f"+{CURRENT[1:]}", f"-{CURRENT[1:]}",
])
def test_a_malformed_code_matches_nothing(code: str) -> None:
    assert matching_step(RFC_SECRET, CURRENT, NOW) is not None  # the well-formed code it is made from does
    assert matching_step(RFC_SECRET, code, NOW) is None


@pytest.mark.parametrize(("secret", "bits"), [
    (RFC_SECRET, 160),
    (RFC_SECRET.lower(), 160),
    ("GEZDGNBVGY3TQOJQ", 80),  # the shortest allowed
    ("GEZDGNBVGY3TQOJQGE======", 88),  # padded
])
def test_a_base32_secret_of_at_least_80_bits_is_a_key(secret: str, bits: int) -> None:
    assert len(secret_key(secret)) * 8 == bits


@pytest.mark.parametrize(("secret", "why"), [
    ("GEZDGNBVGY3TQO", "base32"),  # 14 characters: no whole number of bytes
    ("GEZDGNBVGY3TQOJ", "at least 80 bits"),  # 72 bits
    ("", "at least 80 bits"),
    ("GEZDGNBVGY3TQOJQ1", "base32"),  # 1 is not in the alphabet
    ("correct horse battery staple", "base32"),
])
def test_anything_else_is_refused_without_repeating_it(secret: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as refused:
        secret_key(secret)
    assert not secret or secret not in str(refused.value)


def test_a_generated_secret_is_160_random_bits_in_unpadded_base32() -> None:
    first, second = generate_secret(), generate_secret()
    assert len(first) == 32 and "=" not in first and first != second
    assert len(secret_key(first)) == 20


def test_the_otpauth_uri_names_issuer_and_account_quoted_and_the_fixed_parameters() -> None:
    uri = urlsplit(otpauth_uri(RFC_SECRET, "bot@ci:1", "ACME Gateway"))
    assert (uri.scheme, uri.netloc, uri.path) == ("otpauth", "totp", "/ACME%20Gateway:bot%40ci%3A1")
    assert unquote(uri.path).split(":", 1) == ["/ACME Gateway", "bot@ci:1"]
    assert parse_qs(uri.query) == {"secret": [RFC_SECRET], "issuer": ["ACME Gateway"], "algorithm": ["SHA1"],
                                   "digits": ["6"], "period": ["30"]}


@pytest.mark.parametrize(("secret", "problem"), [
    ("not base32 at all!", "a TOTP secret must be base32"),
    ("GEZDGNBV", "a TOTP secret must hold at least 80 bits"),
])
def test_a_bad_totp_secret_is_a_config_problem(tmp_path: Path, secret: str, problem: str) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/mcp", auth={"clients": {"registered": [
        {"client_id": "bot", "secret_hash": HASH, "mfa": {"totp_secret": "${BOT_TOTP}"}}]}})
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={"BOT_TOTP": secret})
    [line] = raised.value.problems
    assert line.startswith(f"{path}: auth.clients.registered.0.mfa.totp_secret: {problem}") and secret not in line
    good = load_config(path, env={"BOT_TOTP": RFC_SECRET})
    mfa = good.auth.clients.registered[0].mfa
    assert mfa is not None and mfa.totp_secret == RFC_SECRET


REDIS = {"backend": "redis", "url": "redis://127.0.0.1:6379/0"}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_claim_once_is_true_once_per_key_even_when_raced(backend: str) -> None:
    store = open_sessions(Sessions(**(REDIS if backend == "redis" else {})))
    key, other = f"test:{uuid.uuid4().hex}", f"test:{uuid.uuid4().hex}"
    try:
        raced = await asyncio.gather(*(store.claim_once(key, 90) for _ in range(20)))
        assert sorted(raced) == [False] * 19 + [True]
        assert await store.claim_once(key, 90) is False
        assert await store.claim_once(other, 90) is True
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_tally_counts_within_its_window_for_every_replica_sharing_the_store(backend: str) -> None:
    config = Sessions(**(REDIS if backend == "redis" else {}))
    one = open_sessions(config)
    two = open_sessions(config) if backend == "redis" else one
    key = f"test:{uuid.uuid4().hex}"
    try:
        counts = await asyncio.gather(*(store.tally(key, 60) for store in (one, two, one)))
        assert sorted(counts) == [1, 2, 3]
        assert await two.tally(key, 60, add=-1) == 2
        assert await one.tally(key, 60, add=0) == 2
    finally:
        await one.close()
        if two is not one:
            await two.close()


async def test_a_memory_claim_lapses_after_its_ttl() -> None:
    store = open_sessions(Sessions())
    assert await store.claim_once("k", 0.2) is True
    assert await store.claim_once("k", 0.2) is False
    await asyncio.sleep(0.3)  # a TTL lapsing, not a time step
    assert await store.claim_once("k", 0.2) is True


async def test_replicas_sharing_redis_share_claims_which_expire_with_the_ttl() -> None:
    import redis.asyncio

    one, two = open_sessions(Sessions(**REDIS)), open_sessions(Sessions(**REDIS))
    raw = redis.asyncio.from_url(REDIS["url"])
    key = f"test:{uuid.uuid4().hex}"
    try:
        assert await one.claim_once(key, 90) is True
        assert await two.claim_once(key, 90) is False
        assert 85 <= await raw.ttl(f"mcpgw:once:{key}") <= 90
    finally:
        await raw.delete(f"mcpgw:once:{key}")
        await raw.aclose()
        await one.close()
        await two.close()


POLICY = {
    "roles": {"bot": {"security_level": "high", "permissions": {"can_execute_tools": ["echo", "delete_file"]}}},
    "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["bot"]}],
    "tools": {"delete_file": {"security_level": "high"}},
    "authentication_levels": {"rules": [{"when": {"amr": "otp"}, "level": "high"}], "default": "standard"},
}


@pytest.fixture(params=["proxy", "middleware"])
def gateway_as(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> Iterator[Deployment]:
    monkeypatch.setenv("MFA_BOT_TOTP", TOTP)
    # Both may reach `high`: only the second factor tells them apart.
    clients = [{"client_id": "mfa-bot", "secret_hash": HASH, "scopes": ["mcp:tools"], "security_level": "high",
                "mfa": {"totp_secret": "${MFA_BOT_TOTP}"}},
               {"client_id": "plain-bot", "secret_hash": HASH, "scopes": ["mcp:tools"], "security_level": "high"}]
    deployment = deploy(request.param, tmp_path, policy=POLICY, auth={"clients": {
        "signing_key_file": str(tmp_path / "key.pem"), "max_failures": 2, "registered": clients}})
    yield deployment
    deployment.stop()


def current_code() -> str:
    return code_at(TOTP, int(time.time()) // 30)


def wrong_code() -> str:
    """A code no step near now has (whichever step the gateway's clock is in by the time it checks)."""
    near = {code_at(TOTP, int(time.time()) // 30 + offset) for offset in range(-2, 3)}
    return next(code for code in ("000000", "111111", "222222", "333333", "444444", "555555") if code not in near)


def token_request(deployment: Deployment, client: str = "mfa-bot", secret: str = SECRET, **form: str
                  ) -> httpx.Response:
    return httpx.post(f"{deployment.gateway.url}/oauth/token", data={"grant_type": "client_credentials", **form},
                      auth=(client, secret), timeout=30)


def token_events(deployment: Deployment) -> list[tuple[str, str, str | None, int]]:
    return [(e["result"], e["reason"], e["user_id"], e["status"]) for e in deployment.audit_events()
            if e["operation"] == "oauth/token"]


def test_a_current_code_gets_a_token_with_amr_pwd_otp_and_works_only_once(gateway_as: Deployment) -> None:
    code = current_code()
    issued = token_request(gateway_as, otp=code)
    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["amr"], claims["gateway_level"]) == ("mfa-bot", ["pwd", "otp"], "high")

    again = token_request(gateway_as, otp=code)
    assert (again.status_code, again.json()) == (400, {
        "error": "invalid_grant", "error_description": "this one-time code was already used"})
    assert token_events(gateway_as) == [("allowed", "token_issued:mcp:tools", "mfa-bot", 200),
                                        ("auth_failed", "oauth:invalid_grant:otp_reused", "mfa-bot", 400)]


def test_a_missing_or_wrong_code_is_refused_audited_and_spends_nothing(gateway_as: Deployment) -> None:
    missing = token_request(gateway_as)
    wrong = token_request(gateway_as, otp=wrong_code())
    malformed = token_request(gateway_as, otp=current_code()[:5])
    assert (missing.status_code, missing.json()) == (400, {
        "error": "invalid_grant", "error_description": "a one-time code (otp) is required"})
    assert [(r.status_code, r.json()["error"]) for r in (wrong, malformed)] == [(400, "invalid_grant")] * 2
    assert token_request(gateway_as, otp=current_code()).status_code == 200  # no guess claimed the code
    assert token_events(gateway_as) == [("auth_failed", "oauth:invalid_grant:otp_missing", "mfa-bot", 400),
                                        ("auth_failed", "oauth:invalid_grant:otp_invalid", "mfa-bot", 400),
                                        ("auth_failed", "oauth:invalid_grant:otp_invalid", "mfa-bot", 400),
                                        ("allowed", "token_issued:mcp:tools", "mfa-bot", 200)]


def test_a_wrong_secret_is_invalid_client_and_never_reaches_the_code(gateway_as: Deployment) -> None:
    code = current_code()
    refused = token_request(gateway_as, secret="not the secret at all", otp=code)
    assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client")
    assert token_request(gateway_as, otp=code).status_code == 200  # the code was neither checked nor spent
    assert token_events(gateway_as) == [("auth_failed", "oauth:invalid_client", None, 401),
                                        ("allowed", "token_issued:mcp:tools", "mfa-bot", 200)]


def test_code_failures_slow_down_the_client_and_the_address_like_wrong_secrets(gateway_as: Deployment) -> None:
    def timed(client: str = "mfa-bot", source: str = "127.0.0.1", **form: str) -> tuple[float, httpx.Response]:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as http:
            started = time.monotonic()
            response = http.post(f"{gateway_as.gateway.url}/oauth/token", auth=(client, SECRET),
                                 data={"grant_type": "client_credentials", **form})
            return time.monotonic() - started, response

    # max_failures is 2: past it, answers wait 0.25 s, doubling with each further failure.
    unhurried, _ = timed()  # failure 1
    timed(otp=wrong_code())  # failure 2
    timed(otp=wrong_code())  # failure 3, answered after 0.25 s
    timed(otp=current_code()[:5])  # failure 4, after 0.5 s
    # Four failures of this client from this address, two over the limit: both wait 1 s.
    same_client_elsewhere, mfa = timed(source="127.0.0.2", otp=current_code())
    other_client_same_address, plain = timed(client="plain-bot")
    assert unhurried < 1.0 <= min(same_client_elsewhere, other_client_same_address)
    assert (mfa.status_code, plain.status_code) == (200, 200)  # slowed, not locked out
    assert [(reason, user) for _, reason, user, _ in token_events(gateway_as)] == [
        ("oauth:invalid_grant:otp_missing", "mfa-bot"), ("oauth:invalid_grant:otp_invalid", "mfa-bot"),
        ("oauth:invalid_grant:otp_invalid", "mfa-bot"), ("oauth:invalid_grant:otp_invalid", "mfa-bot"),
        ("token_issued:mcp:tools", "mfa-bot"), ("token_issued:mcp:tools", "plain-bot")]


def test_a_client_without_mfa_is_unchanged(gateway_as: Deployment) -> None:
    issued = token_request(gateway_as, client="plain-bot")
    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert "amr" not in claims and (claims["sub"], claims["gateway_level"]) == ("plain-bot", "high")
    assert token_events(gateway_as) == [("allowed", "token_issued:mcp:tools", "plain-bot", 200)]


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_the_otp_token_reaches_a_high_tool_and_a_token_without_otp_is_asked_to_step_up(
        gateway_as: Deployment, era: str) -> None:
    strong = token_request(gateway_as, otp=current_code()).json()["access_token"]
    weak = token_request(gateway_as, client="plain-bot").json()["access_token"]

    def sdk(token: str) -> Client:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
        return Client(streamable_http_client(gateway_as.url, http_client=http), mode=era)

    async with sdk(strong) as session:
        done = await session.call_tool("delete_file", {"path": "/srv/x"})
    assert done.content[0].text == "deleted /srv/x"  # type: ignore[union-attr]
    async with sdk(weak) as session:
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_file", {"path": "/srv/y"})
        assert refused.value.error.code == -32012  # insufficient authentication: step up
        after = await session.call_tool("echo", {"text": "still fine"})
        assert after.content[0].text == "still fine"  # type: ignore[union-attr]
    assert b"/srv/y" not in b"".join(r.body for r in gateway_as.recorder.requests)
    calls = [(e["user_id"], e["result"], e["reason"]) for e in gateway_as.audit_events()
             if e["tool_executed"] == "delete_file" and e["operation"] == "tools/call"]
    assert calls == [("mfa-bot", "allowed", "role:bot:tool"), ("plain-bot", "denied", "level:authentication<high")]


def test_hash_secret_totp_prints_a_working_secret_and_its_uri_without_reading_stdin() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "hash-secret", "--totp", "--account", "ci-bot",
                           "--issuer", "ACME Gateway"], input="short\n",  # refused as a client secret: unread
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("totp secret: ") and lines[1].startswith("otpauth uri: ")
    secret, uri = lines[0].removeprefix("totp secret: "), urlsplit(lines[1].removeprefix("otpauth uri: "))
    now = time.time()
    assert matching_step(secret, code_at(secret, int(now // 30)), now) == int(now // 30)
    assert (uri.scheme, uri.netloc, unquote(uri.path)) == ("otpauth", "totp", "/ACME Gateway:ci-bot")
    assert parse_qs(uri.query)["secret"] == [secret] and parse_qs(uri.query)["issuer"] == ["ACME Gateway"]
    assert "mfa: {totp_secret: ${" in done.stdout

    stray = subprocess.run([sys.executable, "-m", "gateway.cli", "hash-secret", "--account", "ci-bot"],
                           input=SECRET + "\n", capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert stray.returncode == 2 and "--totp" in stray.stderr


async def test_past_the_failure_limit_no_code_is_checked_however_many_guesses_race(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.auth.server import MAX_OTP_FAILURES

    monkeypatch.setenv("MFA_BOT_TOTP", TOTP)
    clients = [{"client_id": "mfa-bot", "secret_hash": HASH, "scopes": ["mcp:tools"], "security_level": "high",
                "mfa": {"totp_secret": "${MFA_BOT_TOTP}"}}]
    deployment = deploy("proxy", tmp_path, policy=POLICY, auth={"clients": {  # no slow-down: only the limit
        "signing_key_file": str(tmp_path / "key.pem"), "max_failures": 10_000, "registered": clients}})
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            guesses = await asyncio.gather(*(http.post(
                f"{deployment.gateway.url}/oauth/token", auth=("mfa-bot", SECRET),
                data={"grant_type": "client_credentials", "otp": wrong_code()}) for _ in range(3 * MAX_OTP_FAILURES)))
        assert {g.status_code for g in guesses} == {400}
        right = token_request(deployment, otp=current_code())
        assert (right.status_code, right.json()["error"]) == (400, "invalid_grant")
        assert "try again later" in right.json()["error_description"]
        reasons = [reason for _, reason, _, _ in token_events(deployment)]
        assert reasons.count("oauth:invalid_grant:otp_invalid") == MAX_OTP_FAILURES  # only these were checked
        assert reasons.count("oauth:invalid_grant:otp_locked") == 2 * MAX_OTP_FAILURES + 1
    finally:
        deployment.stop()
