"""One-time codes (TOTP, RFC 6238): the second factor of a registered client that has `mfa`.

Owns the algorithm and its fixed parameters (HMAC-SHA1, 6 digits, 30 s steps, one step of drift either
way), what a valid secret is, new secrets, and the `otpauth://` URI that authenticator apps read. Pure: no
I/O, and the clock is an argument. That a matched code is used only once is the token endpoint's business
(`gateway.auth.server`), since it needs the shared state store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from urllib.parse import quote, urlencode

DIGITS = 6
STEP_S = 30
DRIFT_STEPS = 1  # the step before and after the current one also match: clocks drift, typing takes time
MIN_SECRET_BITS = 80  # RFC 4226 section 4, R6 (160 recommended, and generated)


def secret_key(secret: str) -> bytes:
    """The HMAC key in base32 `secret` (either case, padding optional).

    Raises ValueError when `secret` is not base32 or holds fewer than `MIN_SECRET_BITS`; the message never
    repeats the secret.
    """
    unpadded = secret.strip().upper().rstrip("=")
    try:
        key = base64.b32decode(unpadded + "=" * (-len(unpadded) % 8))
    except (binascii.Error, ValueError):
        raise ValueError("a TOTP secret must be base32 (A-Z and 2-7), as `mcp-gateway hash-secret --totp` "
                         "prints it") from None
    if len(key) * 8 < MIN_SECRET_BITS:
        raise ValueError(f"a TOTP secret must hold at least {MIN_SECRET_BITS} bits ({MIN_SECRET_BITS // 5} "
                         "base32 characters); `mcp-gateway hash-secret --totp` makes one of 160")
    return key


def generate_secret() -> str:
    """A new random secret of 160 bits, in base32 without padding (32 characters)."""
    return base64.b32encode(secrets.token_bytes(20)).decode()


def otpauth_uri(secret: str, account: str, issuer: str) -> str:
    """The Key URI that authenticator apps read (often as a QR code), for `account` at `issuer`."""
    label = f"{quote(issuer, safe='')}:{quote(account, safe='')}"
    query = urlencode({"secret": secret, "issuer": issuer, "algorithm": "SHA1", "digits": DIGITS,
                       "period": STEP_S}, quote_via=quote)
    return f"otpauth://totp/{label}?{query}"


def code_at(secret: str, counter: int) -> str:
    """The code of time step `counter` (RFC 4226 HOTP of the counter, dynamically truncated)."""
    digest = hmac.new(secret_key(secret), counter.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = int.from_bytes(digest[offset:offset + 4], "big") & 0x7FFF_FFFF
    return str(value % 10**DIGITS).zfill(DIGITS)


def matching_step(secret: str, code: str, now: float) -> int | None:
    """The time step, within `DRIFT_STEPS` of the one `now` falls in, whose code is `code`; None if none is
    (or `code` is not exactly `DIGITS` ASCII digits). Every candidate is compared, each in constant time."""
    if len(code) != DIGITS or not (code.isascii() and code.isdigit()):
        return None
    current = int(now // STEP_S)
    matched = None
    for step in range(max(0, current - DRIFT_STEPS), current + DRIFT_STEPS + 1):
        if hmac.compare_digest(code_at(secret, step), code) and matched is None:
            matched = step
    return matched
