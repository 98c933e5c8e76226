"""The gateway's own signing key: loaded once at start, generated (0600) if absent.

Owns the key file and the public JWK derived from it. Key material is read
and derived once per process, never per request. Only the gateway itself
creates the key: commands that sign for the running gateway (issue-token,
sessions) read its key or fail, since a key of their own would sign tokens
the gateway refuses.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.exceptions import GatewayError
from gateway.private_files import private_directory

ALGORITHM = "ES256"


class SigningKeyError(GatewayError, ValueError):
    """The key file is missing, unreadable or holds no usable EC private key; the message names the file."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An EC P-256 key with its key id (an RFC 7638 thumbprint of the public key)."""

    private: ec.EllipticCurvePrivateKey
    kid: str

    @property
    def public(self) -> ec.EllipticCurvePublicKey:
        return self.private.public_key()

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.public))
        jwk.update({"kid": self.kid, "use": "sig", "alg": ALGORITHM})
        return jwk


def _thumbprint(public: ec.EllipticCurvePublicKey) -> str:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(canonical.encode())
    return jwt.utils.base64url_encode(digest.finalize()).decode()


def load_signing_key(path: Path) -> SigningKey:
    """Read the PEM key at `path`, never creating one; SigningKeyError naming the file if that fails."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"no signing key at {path}: start the gateway once (mcp-gateway serve) "
                              "or point auth.clients.signing_key_file at its key") from None
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the signing key: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # not PEM, encrypted, or an unknown algorithm
        raise SigningKeyError(f"{path}: not a usable signing key: {exc}") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, ec.SECP256R1):
        raise SigningKeyError(f"{path}: not an EC P-256 private key (tokens are signed with {ALGORITHM})")
    return SigningKey(private, _thumbprint(private.public_key()))


def load_or_create_signing_key(path: Path) -> SigningKey:
    """Read the PEM key at `path`, or create one there readable by the owner only.

    A new key is written whole to a private file beside `path` and then linked into place, which fails if
    `path` exists: of replicas starting at once on a new config, exactly one key is kept and every one reads
    that one, never a file still being written (nor fails on the file another just created).
    """
    if path.exists():
        return load_signing_key(path)
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_directory(path.parent)
    draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(draft, path)
    except FileExistsError:
        return load_signing_key(path)  # another process's key is in place: it is the one everyone uses
    finally:
        draft.unlink(missing_ok=True)
    return SigningKey(private, _thumbprint(private.public_key()))
