"""The audit chain key (`audit.chain_key_file`): the secret that seals every event.

Owns the key file: read once when the audit log is built, created if absent
(`load_or_create_chain_key`); only read, never created, by `audit verify`
(`read_chain_key`), since a new key would vouch for nothing.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from gateway.audit.event import KEY_BYTES, ChainKey
from gateway.private_files import private_directory
from gateway.yamlfile import ProblemsError


class ChainKeyError(ProblemsError):
    """The chain key file is missing or unusable; the one problem names the file and what to do."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__([f"{path}: audit.chain_key_file: {why}"])
        self.path = path
        self.why = why


def read_chain_key(path: Path) -> ChainKey:
    """The chain key in the file at `path` (its raw bytes, at least KEY_BYTES of them). Never creates one."""
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise ChainKeyError(path, "no such file; the chain can only be checked with the key that sealed it "
                            "(the gateway creates the key when it first starts)") from None
    except OSError as exc:
        raise ChainKeyError(path, f"cannot be read ({exc.strerror})") from None
    if len(secret) < KEY_BYTES:
        raise ChainKeyError(path, f"holds {len(secret)} bytes; a chain key is at least {KEY_BYTES} random bytes")
    return ChainKey(secret)


def load_or_create_chain_key(path: Path) -> ChainKey:
    """The chain key at `path`, created there first (KEY_BYTES random bytes, owner-only) if there is none.

    The new key is written whole to a private file beside `path` and then linked into place, which fails if
    `path` exists: of workers starting at once, exactly one key is kept and every worker reads that one,
    never a file still being written.
    """
    if not path.exists():
        try:
            private_directory(path.parent)
            draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(os.urandom(KEY_BYTES))
                    handle.flush()
                    os.fsync(handle.fileno())
                os.link(draft, path)
            except FileExistsError:
                pass  # another worker's key is in place: it is the one every worker uses
            finally:
                draft.unlink(missing_ok=True)
        except OSError as exc:
            raise ChainKeyError(path, f"cannot be created ({exc.strerror})") from None
    return read_chain_key(path)
