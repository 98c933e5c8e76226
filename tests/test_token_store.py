"""The token store: both homes keep and list values alike; the file is private or refused; the keyring is real."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import keyring
import keyring.backend
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import chainer, fail, null
from keyring.errors import PasswordSetError
from keyrings.alt.file import PlaintextKeyring

from gateway.oauth.store import (
    FileStore,
    KeyringStore,
    TokenStore,
    TokenStoreError,
    open_store,
    state_directory,
)

SECRET = "rt-7f3a9c-do-not-print"
VALUE = {"access_token": "at-1", "refresh_token": SECRET, "expires_at": 1770000000}


@pytest.fixture
def use_keyring() -> Iterator[Callable[[KeyringBackend], None]]:
    """Sets the process's keyring for the test (`keyring.set_keyring`), and restores the previous one after it."""
    previous = keyring.get_keyring()
    yield keyring.set_keyring
    keyring.set_keyring(previous)


@pytest.fixture
def plaintext(tmp_path: Path, use_keyring: Callable[[KeyringBackend], None]) -> PlaintextKeyring:
    """A real file-backed keyring under tmp_path, as the process's keyring for the test."""
    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring" / "keyring_pass.cfg")
    use_keyring(backend)
    return backend


@pytest.fixture(params=["file", "keyring"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], TokenStore]:
    """Opens a fresh store object on one and the same place, each time it is called."""
    if request.param == "file":
        return lambda: FileStore(tmp_path / "state" / "mcp-gateway")
    request.getfixturevalue("plaintext")
    return KeyringStore


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def stored_file(tmp_path: Path, content: bytes = b"", directory_mode: int = 0o700, file_mode: int = 0o600) -> Path:
    """A store directory holding tokens.json with `content` (VALUE under one key if empty), modes set as given."""
    directory = tmp_path / "store"
    directory.mkdir()
    path = directory / "tokens.json"
    path.write_bytes(content or json.dumps({"https://mcp.example/mcp": VALUE}).encode())
    path.chmod(file_mode)
    directory.chmod(directory_mode)
    return directory


# Every operation of the store, as a call that must be refused when the store's files are unsafe or unreadable.
OPERATIONS: dict[str, Callable[[TokenStore], object]] = {
    "get": lambda store: store.get("https://mcp.example/mcp"),
    "put": lambda store: store.put("https://other.example/mcp", {"access_token": "new"}),
    "delete": lambda store: store.delete("https://mcp.example/mcp"),
    "keys": lambda store: store.keys(),
}


def test_values_are_stored_listed_replaced_and_deleted_across_store_objects(opener: Callable[[], TokenStore]) -> None:
    store = opener()
    assert store.keys() == []
    assert store.get("https://a.example/mcp") is None
    store.put("https://b.example/mcp", VALUE)
    store.put("https://a.example/mcp", {"client_id": "c1", "nested": {"list": [1, 2.5, None, True]}})
    store.put("https://b.example/mcp", {**VALUE, "access_token": "at-2"})

    again = opener()
    assert again.keys() == ["https://a.example/mcp", "https://b.example/mcp"]
    assert again.get("https://a.example/mcp") == {"client_id": "c1", "nested": {"list": [1, 2.5, None, True]}}
    assert again.get("https://b.example/mcp") == {**VALUE, "access_token": "at-2"}

    assert again.delete("https://b.example/mcp") is True
    assert again.delete("https://b.example/mcp") is False
    assert again.delete("https://never.example/mcp") is False
    assert opener().keys() == ["https://a.example/mcp"]
    assert opener().get("https://b.example/mcp") is None


@pytest.mark.usefixtures("permissive_umask")
def test_the_store_creates_its_directory_0700_and_its_files_0600_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "mcp-gateway"
    store = FileStore(directory)
    assert store.where == f"file {directory / 'tokens.json'}"
    store.put("https://mcp.example/mcp", VALUE)
    store.put("https://other.example/mcp", VALUE)
    assert mode(directory) == 0o700
    assert mode(directory / "tokens.json") == 0o600
    assert mode(directory / "tokens.lock") == 0o600
    assert sorted(os.listdir(directory)) == ["tokens.json", "tokens.lock"]


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "absent")
    assert store.keys() == []
    assert store.get("https://mcp.example/mcp") is None
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize(("directory_mode", "file_mode", "unsafe", "fix"), [
    (0o755, 0o600, "store", "chmod 700"),
    (0o750, 0o600, "store", "chmod 700"),
    (0o700, 0o644, "store/tokens.json", "chmod 600"),
    (0o700, 0o640, "store/tokens.json", "chmod 600"),
    (0o700, 0o602, "store/tokens.json", "chmod 600"),
])
def test_a_store_others_could_read_is_refused_and_left_as_it_is(
        tmp_path: Path, operation: str, directory_mode: int, file_mode: int, unsafe: str, fix: str) -> None:
    directory = stored_file(tmp_path, directory_mode=directory_mode, file_mode=file_mode)
    before = (directory / "tokens.json").read_bytes()
    with pytest.raises(TokenStoreError) as refused:
        OPERATIONS[operation](FileStore(directory))
    message = str(refused.value)
    path = tmp_path / unsafe
    assert f"`{fix} {path}`" in message
    assert f"{mode(path):04o}" in message
    assert SECRET not in message
    assert (mode(directory), mode(directory / "tokens.json")) == (directory_mode, file_mode)
    assert (directory / "tokens.json").read_bytes() == before


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("linked", ["tokens.json", "directory"])
def test_a_symlinked_store_is_refused(tmp_path: Path, operation: str, linked: str) -> None:
    real = stored_file(tmp_path)
    if linked == "directory":
        directory = tmp_path / "link"
        directory.symlink_to(real)
        path = directory
    else:
        directory = tmp_path / "other"
        directory.mkdir(mode=0o700)
        path = directory / "tokens.json"
        path.symlink_to(real / "tokens.json")
    with pytest.raises(TokenStoreError, match="symlink") as refused:
        OPERATIONS[operation](FileStore(directory))
    assert str(path) in str(refused.value)
    assert SECRET not in str(refused.value)
    assert json.loads((real / "tokens.json").read_bytes()) == {"https://mcp.example/mcp": VALUE}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_store_another_user_owns_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    directory = stored_file(tmp_path)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(TokenStoreError, match=f"owned by uid {uid}, not by this user") as refused:
        OPERATIONS[operation](FileStore(directory))
    assert str(directory) in str(refused.value)


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("content", [
    json.dumps([SECRET]).encode(),
    json.dumps(SECRET).encode(),
    b"42",
    b'{"refresh_token": "' + SECRET.encode() + b'"',
    b"\xff\xfe" + SECRET.encode(),
])
def test_a_file_that_is_not_a_json_object_is_refused_without_its_content(
        tmp_path: Path, operation: str, content: bytes) -> None:
    directory = stored_file(tmp_path, content)
    with pytest.raises(TokenStoreError, match="is not a JSON object") as refused:
        OPERATIONS[operation](FileStore(directory))
    assert str(directory / "tokens.json") in str(refused.value)
    assert SECRET not in str(refused.value)
    assert (directory / "tokens.json").read_bytes() == content


def test_an_entry_that_is_not_a_json_object_is_refused_by_name(tmp_path: Path) -> None:
    directory = stored_file(tmp_path, json.dumps({"https://mcp.example/mcp": SECRET}).encode())
    with pytest.raises(TokenStoreError, match=r"'https://mcp\.example/mcp' .* is not a JSON object") as refused:
        FileStore(directory).get("https://mcp.example/mcp")
    assert SECRET not in str(refused.value)


def test_two_writers_at_once_lose_none_of_each_others_keys(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "mcp-gateway"
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def write(writer: str) -> None:
        store = FileStore(directory)
        start.wait()
        try:
            for n in range(50):
                store.put(f"https://{writer}.example/{n}", {"n": n})
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert FileStore(directory).keys() == sorted(f"https://{w}.example/{n}" for w in ("a", "b") for n in range(50))


def test_the_keyring_store_keeps_each_value_as_json_under_the_service_with_an_index(
        plaintext: PlaintextKeyring) -> None:
    store = KeyringStore()
    assert store.where == f"keyring ({PlaintextKeyring.name})"
    store.put("https://mcp.example/mcp", VALUE)
    store.put("https://other.example/mcp", {"client_id": "c1"})
    assert json.loads(plaintext.get_password("mcp-gateway", "https://mcp.example/mcp") or "") == VALUE
    assert json.loads(plaintext.get_password("mcp-gateway", "__index__") or "") == [
        "https://mcp.example/mcp", "https://other.example/mcp"]
    assert store.delete("https://mcp.example/mcp") is True
    assert plaintext.get_password("mcp-gateway", "https://mcp.example/mcp") is None
    assert KeyringStore().keys() == ["https://other.example/mcp"]
    with pytest.raises(TokenStoreError, match="index"):
        store.put("__index__", VALUE)


@pytest.mark.parametrize(("entry", "stored", "operation", "refusal"), [
    ("https://mcp.example/mcp", json.dumps([SECRET]), "get", "entry mcp-gateway/https://mcp.example/mcp is not a JSON"),
    ("__index__", json.dumps({"k": SECRET}), "keys", "entry mcp-gateway/__index__ is not a JSON list"),
    ("__index__", SECRET, "put", "entry mcp-gateway/__index__ is not a JSON list"),
])
def test_a_keyring_entry_of_the_wrong_shape_is_refused_without_its_content(
        plaintext: PlaintextKeyring, entry: str, stored: str, operation: str, refusal: str) -> None:
    plaintext.set_password("mcp-gateway", entry, stored)
    with pytest.raises(TokenStoreError, match=refusal) as refused:
        OPERATIONS[operation](KeyringStore())
    assert SECRET not in str(refused.value)


class EchoingKeyring(KeyringBackend):
    """A backend whose every write fails with an error that quotes the secret it was given."""

    priority = -1  # never chosen by keyring's own detection, should the test process run it

    def get_password(self, service: str, username: str) -> str | None:
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        raise PasswordSetError(f"cannot store {password}")

    def delete_password(self, service: str, username: str) -> None:
        raise AssertionError("nothing is stored")


def test_a_keyring_error_names_the_backend_and_never_the_value() -> None:
    with pytest.raises(TokenStoreError) as refused:
        KeyringStore(EchoingKeyring()).put("https://mcp.example/mcp", VALUE)
    message = str(refused.value)
    assert EchoingKeyring.name in message
    assert "PasswordSetError" in message
    assert SECRET not in message


class SystemKeyring(KeyringBackend):
    """Stands for an OS keyring (Secret Service, macOS Keychain): what "auto" looks for is not in keyrings.alt."""

    priority = 5

    def get_password(self, service: str, username: str) -> str | None:
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        raise AssertionError("open_store only chooses")

    def delete_password(self, service: str, username: str) -> None:
        raise AssertionError("open_store only chooses")


def test_auto_picks_an_os_keyring_when_one_is_usable(
        tmp_path: Path, use_keyring: Callable[[KeyringBackend], None]) -> None:
    system = SystemKeyring()
    use_keyring(system)
    store = open_store("auto", tmp_path)
    assert isinstance(store, KeyringStore)
    assert store.backend is system


def test_auto_never_takes_a_keyrings_alt_file_but_keyring_does(plaintext: PlaintextKeyring, tmp_path: Path) -> None:
    # a plaintext file with none of FileStore's permission checks is not what "auto" should quietly pick
    assert isinstance(open_store("auto", tmp_path), FileStore)
    store = open_store("keyring")
    assert isinstance(store, KeyringStore)
    assert store.backend is plaintext


def empty_chainer(monkeypatch: pytest.MonkeyPatch) -> KeyringBackend:
    """keyring's chaining backend with every backend it could chain excluded (its `keyring.backend._limit`)."""
    monkeypatch.setattr(keyring.backend, "_limit", lambda ring: False)
    return chainer.ChainerBackend()


UNUSABLE: dict[str, Callable[[pytest.MonkeyPatch], KeyringBackend]] = {
    "fail": lambda monkeypatch: fail.Keyring(),
    "null": lambda monkeypatch: null.Keyring(),
    "empty chainer": empty_chainer,
}


@pytest.mark.parametrize("backend", UNUSABLE)
def test_without_a_usable_keyring_auto_falls_back_to_the_file_and_keyring_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_keyring: Callable[[KeyringBackend], None],
        backend: str) -> None:
    use_keyring(UNUSABLE[backend](monkeypatch))
    store = open_store("auto", tmp_path)
    assert isinstance(store, FileStore)
    assert store.directory == tmp_path
    with pytest.raises(TokenStoreError, match=r"no keyring backend is available.*`--token-store file`"):
        open_store("keyring")


@pytest.mark.usefixtures("plaintext")
def test_file_is_the_file_whatever_the_keyring(tmp_path: Path) -> None:
    store = open_store("file", tmp_path)
    assert isinstance(store, FileStore)
    assert store.directory == tmp_path


ENVIRONMENTS: list[tuple[dict[str, str], str]] = [
    ({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}, "/x/state/mcp-gateway"),
    ({"HOME": "/home/u"}, "/home/u/.local/state/mcp-gateway"),
    ({"XDG_STATE_HOME": "", "HOME": "/home/u"}, "/home/u/.local/state/mcp-gateway"),
    ({"XDG_STATE_HOME": "relative/state", "HOME": "/home/u"}, "/home/u/.local/state/mcp-gateway"),
]


@pytest.mark.parametrize(("env", "expected"), ENVIRONMENTS)
def test_the_state_directory_follows_xdg_then_home(env: dict[str, str], expected: str) -> None:
    assert state_directory(env) == Path(expected)
