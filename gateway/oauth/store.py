"""Where `mcp-gateway connect` keeps what it obtained for each MCP server URL: the OS keyring, or a private file.

A value is a JSON object the store does not interpret (tokens, a refresh token, dynamically registered client
credentials), kept under a key (the server's URL). Two homes implement `TokenStore`:

    KeyringStore  the OS keyring through `keyring`: service "mcp-gateway", one entry per key holding its value as
                  JSON, and the entry "__index__" holding the list of keys (a keyring cannot enumerate entries)
    FileStore     `tokens.json` in a directory only its owner may enter: the directory 0700, the file 0600 and
                  replaced whole (write, fsync, rename); writers serialised by flock on `tokens.lock`

`open_store` picks between them. A directory or file that other users could read, that another user owns or that
is a symlink is refused, never used as it is nor silently repaired: the error names the path, its mode and the
command that fixes it. No error message carries a stored value.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import keyring
from keyring.backend import KeyringBackend
from keyring.backends import chainer, fail
from keyring.errors import KeyringError

from gateway.exceptions import GatewayError

SERVICE = "mcp-gateway"
INDEX = "__index__"
FILE_NAME = "tokens.json"
LOCK_NAME = "tokens.lock"


class TokenStoreError(GatewayError):
    """The token store cannot be used as it is; the message says what to fix, and never holds a stored value."""


class TokenStore(Protocol):
    """A map from an MCP server's URL to the JSON object `connect` keeps for it."""

    where: str
    """Where the values are kept, for a person: "file /home/u/.local/state/mcp-gateway/tokens.json"."""

    def get(self, key: str) -> dict[str, Any] | None:
        """The value stored under `key`, or None."""

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store `value` under `key`, replacing what was there."""

    def delete(self, key: str) -> bool:
        """Remove `key`; whether something was stored under it."""

    def keys(self) -> list[str]:
        """Every key, sorted."""


def state_directory(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/mcp-gateway`, else `$HOME/.local/state/mcp-gateway` (from `env`, default the process's)."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):  # the XDG spec: a relative path is invalid and is ignored
        return Path(state) / "mcp-gateway"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "state" / "mcp-gateway"


def open_store(kind: Literal["auto", "keyring", "file"] = "auto", directory: Path | None = None) -> TokenStore:
    """The store of `kind`; "auto" is the OS keyring when it has a usable backend, else the file in `directory`.

    `directory` (default `state_directory()`) is where a FileStore keeps its file. "auto" never takes a
    keyrings.alt backend (plaintext or file-encrypted files with none of FileStore's checks): only "keyring" does.
    """
    if kind != "file":
        backend = keyring.get_keyring()
        if _usable(backend) and (kind == "keyring" or not _file_backed(backend)):
            return KeyringStore(backend)
        if kind == "keyring":
            raise TokenStoreError(f"no keyring backend is available (keyring offers {backend}); install and unlock "
                                  "one (e.g. a Secret Service such as gnome-keyring), or use `--token-store file`")
    return FileStore(directory if directory is not None else state_directory())


def _usable(backend: KeyringBackend) -> bool:
    """Whether `backend` can keep secrets: not the failing or an empty chaining backend, and a positive priority."""
    if isinstance(backend, fail.Keyring):
        return False
    if isinstance(backend, chainer.ChainerBackend) and not backend.backends:
        return False
    try:
        return float(backend.priority) > 0
    except Exception:  # as keyring's own `viable` has it: a backend whose priority raises is not usable here
        return False


def _file_backed(backend: KeyringBackend) -> bool:
    """A keyrings.alt backend: a file of its own, not an OS keyring."""
    inner = backend.backends if isinstance(backend, chainer.ChainerBackend) else [backend]
    return all(type(b).__module__.startswith("keyrings.alt") for b in inner)


def _json_object(text: str | bytes) -> dict[str, Any] | None:
    """`text` parsed, if it is a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        return None
    return value if isinstance(value, dict) else None


class FileStore:
    """`tokens.json` in `directory`: one JSON object from key to value, which only its owner can read.

    The directory is created (0700) on the first write, not before: reading a missing directory or file finds an
    empty store. Reads take no lock, since the file is only ever replaced whole; each write reads, changes and
    replaces it under an exclusive flock on `tokens.lock`, so writers in other processes wait rather than lose
    each other's updates.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME
        self.where = f"file {self.path}"

    def get(self, key: str) -> dict[str, Any] | None:
        data = self._read()
        if key not in data:
            return None
        value = data[key]
        if not isinstance(value, dict):
            raise TokenStoreError(f"the entry {key!r} in {self.path} is not a JSON object; remove that entry from "
                                  "the file, or the file itself, and connect again")
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._writing():
            data = self._read()
            data[key] = value
            self._replace(data)

    def delete(self, key: str) -> bool:
        with self._writing():
            data = self._read()
            if key not in data:
                return False
            del data[key]
            self._replace(data)
            return True

    def keys(self) -> list[str]:
        return sorted(self._read())

    def _read(self) -> dict[str, Any]:
        with _os_errors(self.path):
            if not _private(self.directory, directory=True) or not _private(self.path, directory=False):
                return {}
            try:
                fd = _open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return {}
            with os.fdopen(fd, "rb") as file:
                raw = file.read()
        data = _json_object(raw)
        if data is None:
            raise TokenStoreError(f"{self.path} is not a JSON object (its content is not shown: it may hold tokens); "
                                  "move it away and connect again")
        return data

    def _replace(self, data: dict[str, Any]) -> None:
        """Write `data` to a new file beside the old one, then rename it over the old one."""
        text = json.dumps(data, indent=2, sort_keys=True).encode()
        temporary = self.directory / f".{FILE_NAME}.{secrets.token_hex(8)}"
        with _os_errors(self.path):
            fd = _open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(text)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)  # the rename itself survives a crash only once the directory is synced
            finally:
                os.close(directory)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the store's write lock, making its directory first if need be."""
        with _os_errors(self.directory):
            try:
                self.directory.mkdir(mode=0o700, parents=True)
            except FileExistsError:
                pass  # whoever made it, it is checked below like any other
            else:
                os.chmod(self.directory, 0o700)  # mkdir's mode passed through the umask
            _private(self.directory, directory=True)
            lock = _open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)  # which releases the lock


def _private(path: Path, *, directory: bool) -> bool:
    """Whether `path` exists; refuses it unless it is a real directory (or regular file) only this user can read."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    kind, fix = ("directory", "chmod 700") if directory else ("file", "chmod 600")
    if stat.S_ISLNK(status.st_mode):
        raise _symlink(path)
    if not (stat.S_ISDIR(status.st_mode) if directory else stat.S_ISREG(status.st_mode)):
        raise TokenStoreError(f"{path} is not a {kind}; move it away so that the token store can be made there")
    if status.st_uid != os.geteuid():
        raise TokenStoreError(f"the token {kind} {path} is owned by uid {status.st_uid}, not by this user (uid "
                              f"{os.geteuid()}); move it away, or use a directory of your own")
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise TokenStoreError(f"the token {kind} {path} has mode {mode:04o}, which lets other users at the tokens; "
                              f"refusing to use it until only its owner can: `{fix} {path}`")
    return True


def _open(path: Path, flags: int) -> int:
    """`os.open` of `path`, never through a symlink; a file it creates has mode 0600."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink(path) from None
        raise


def _symlink(path: Path) -> TokenStoreError:
    return TokenStoreError(f"{path} is a symlink, which the token store does not follow; replace it with the "
                           "directory or file itself")


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """An OSError (a missing permission, a full or read-only disk) as a TokenStoreError naming `path`."""
    try:
        yield
    except OSError as exc:
        raise TokenStoreError(f"the token store at {path} cannot be used: {exc.strerror} "
                              f"({exc.filename or path})") from exc


class KeyringStore:
    """The OS keyring, through `keyring`: service "mcp-gateway", each key an entry holding its value as JSON.

    `backend` defaults to `keyring.get_keyring()`. A keyring cannot list its entries, so the entry "__index__"
    holds the JSON list of keys (and is no key of the store's). A value is stored before its key joins the index,
    and leaves it after its entry is gone. The index is read, changed and written without a lock (keyrings offer
    none): two processes adding different keys at the same instant can leave one out of `keys()`, though `get`
    still finds it.
    """

    def __init__(self, backend: KeyringBackend | None = None) -> None:
        self.backend = keyring.get_keyring() if backend is None else backend
        self.where = f"keyring ({self.backend.name})"

    def get(self, key: str) -> dict[str, Any] | None:
        text = self._get(key)
        if text is None:
            return None
        value = _json_object(text)
        if value is None:
            raise TokenStoreError(f"the {self.where} entry {SERVICE}/{key} is not a JSON object; remove it "
                                  f"(`keyring del {SERVICE} {key}`) and connect again")
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value)
        with self._failures(f"store {key!r}", secret=text):
            self.backend.set_password(SERVICE, self._checked(key), text)
        keys = self.keys()
        if key not in keys:
            self._write_index([*keys, key])

    def delete(self, key: str) -> bool:
        stored = self._get(key) is not None
        if stored:
            with self._failures(f"delete {key!r}"):
                self.backend.delete_password(SERVICE, key)
        keys = self.keys()
        if key in keys:
            self._write_index([k for k in keys if k != key])
        return stored or key in keys

    def keys(self) -> list[str]:
        with self._failures("read its index of keys"):
            text = self.backend.get_password(SERVICE, INDEX)
        if text is None:
            return []
        try:
            keys = json.loads(text)
        except ValueError:
            keys = None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise TokenStoreError(f"the {self.where} entry {SERVICE}/{INDEX} is not a JSON list of keys; remove it "
                                  f"(`keyring del {SERVICE} {INDEX}`): the stored values stay, but are listed only "
                                  "once stored again")
        return sorted(keys)

    def _get(self, key: str) -> str | None:
        with self._failures(f"read {key!r}"):
            return self.backend.get_password(SERVICE, self._checked(key))

    def _write_index(self, keys: list[str]) -> None:
        with self._failures("update its index of keys"):
            self.backend.set_password(SERVICE, INDEX, json.dumps(sorted(keys)))

    def _checked(self, key: str) -> str:
        if key == INDEX:
            raise TokenStoreError(f"{INDEX!r} names the keyring store's index of keys, and cannot be a key of it")
        return key

    @contextlib.contextmanager
    def _failures(self, action: str, secret: str = "") -> Iterator[None]:
        """A keyring error as a TokenStoreError naming the backend; its message is left out if it quotes `secret`."""
        try:
            yield
        except KeyringError as exc:
            detail = str(exc)
            if not detail or (secret and secret in detail):
                detail = type(exc).__name__
            raise TokenStoreError(f"the {self.where} could not {action}: {detail}") from None
