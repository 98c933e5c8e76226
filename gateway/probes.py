"""Probes: whether what a config names can be reached and used now, each reached once and nothing changed.

Owns `probe(config)`, what `mcp-gateway check-config --probe` runs: one `FILE: key.path: why` line (worded as
`load_config` words its problems) for each dependency that would fail the running gateway at start-up or at its
first request. Nothing is created, written or sent beyond what reaching it takes:

    upstreams[].url                  TCP connect to its host and port, and for https the TLS handshake; no request
    upstreams[].command, .cwd        the program found (on the PATH it will run with) and executable; cwd a directory
    audit.sinks[].path               appendable if the file is there, else creatable (its nearest existing parent a
    role_assignments.path            writable directory); SQLite's and a rotated log's directory writable as well
    audit.sinks[].dsn                PostgreSQL: connect; the table insertable and readable if it is there, else
                                     creatable in the current schema
    sessions.url                     Redis: PING
    role_assignments.url, .dsn       Redis: PING (unless it is the sessions' Redis); PostgreSQL: connect
    auth.clients.signing_key_file    loaded if the file is there (with the loaders the gateway uses, which create
    audit.chain_key_file             nothing here), else creatable
    auth.jwt.jwks_uri (or .issuer)   the JWKS fetched (discovered from the issuer when no jwks_uri is given) and
                                     holding a key that verifies signatures
    auth.introspection.url           as an upstream's url

A URL or DSN is shown as `url_redaction.redact_url` shows it: never a password, query or fragment.

`Reachability` is the upstream probe for `/readyz`: made at most once per few seconds, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jwt

from gateway.audit.chainkey import ChainKeyError, read_chain_key
from gateway.auth.jwks import FETCH_ERRORS, JwksCache
from gateway.auth.keys import SigningKeyError, load_signing_key
from gateway.config import Config, Upstream
from gateway.config_auth import ExternalJwt
from gateway.upstream_http import tls_context
from gateway.url_redaction import redact_url


@dataclass(frozen=True, slots=True)
class _Probe:
    key: str  # the config key a problem is named by
    what: str  # what is reached, for a person
    check: Callable[[], Awaitable[str | None]]  # why it cannot be used, or None


async def probe(config: Config, timeout_s: float = 3.0) -> list[str]:
    """One `FILE: key.path: why` line for each dependency of `config` that cannot be reached or used, in the
    order of the config. All are probed at once, each within `timeout_s`."""
    probes = _probes(config, timeout_s)
    whys = await asyncio.gather(*(p.check() for p in probes))
    return [f"{config.source}: {p.key}: {why}" for p, why in zip(probes, whys, strict=True) if why is not None]


def probed(config: Config) -> list[str]:
    """What `probe(config)` reaches, for a person: `upstream demo`, `audit sink 0 (sqlite)`, ..."""
    return list(dict.fromkeys(p.what for p in _probes(config, timeout_s=0)))  # made to be named, never run


def _probes(config: Config, timeout_s: float) -> list[_Probe]:
    def local(function: Callable[..., str | None], *args: object) -> Callable[[], Awaitable[str | None]]:
        async def check() -> str | None:  # a look at the file system: quick, nothing to wait for
            return function(*args)
        return check

    probes = []
    for i, upstream in enumerate(config.upstreams):  # one with neither url nor command: reverse_proxy_problems
        what = f"upstream {upstream.name}"
        if upstream.url is not None:
            probes.append(_Probe(f"upstreams.{i}.url", what, partial(_connects, upstream.url, timeout_s,
                                                                     _upstream_tls(upstream))))
        if upstream.command is not None:
            probes.append(_Probe(f"upstreams.{i}.command", what, local(_program, upstream)))
        if upstream.cwd is not None:
            probes.append(_Probe(f"upstreams.{i}.cwd", what, local(_directory, upstream.cwd)))
    auth = config.auth
    probes.append(_Probe("auth.clients.signing_key_file", "signing key",
                         local(_key_file, auth.clients.signing_key_file, _signing_key)))
    if auth.jwt is not None:
        probes.append(_Probe("auth.jwt.jwks_uri" if auth.jwt.jwks_uri else "auth.jwt.issuer", "JWKS",
                             partial(_jwks, auth.jwt, timeout_s)))
    if auth.introspection is not None:
        probes.append(_Probe("auth.introspection.url", "introspection endpoint",
                             partial(_connects, auth.introspection.url, timeout_s)))
    for i, sink in enumerate(config.audit.sinks):
        what = f"audit sink {i} ({sink.type})"
        if sink.type == "postgres" and sink.dsn is not None:
            probes.append(_Probe(f"audit.sinks.{i}.dsn", what, partial(_postgres, sink.dsn, sink.table, timeout_s)))
        elif sink.path is not None:
            beside = sink.type == "sqlite" or sink.rotate_mb is not None
            probes.append(_Probe(f"audit.sinks.{i}.path", what, local(_writable, sink.path, beside)))
    probes.append(_Probe("audit.chain_key_file", "chain key",
                         local(_key_file, config.audit.chain_key_file, _chain_key)))
    sessions, roles = config.sessions, config.role_assignments
    if sessions.backend == "redis" and sessions.url is not None:
        probes.append(_Probe("sessions.url", "sessions' Redis", partial(_redis, sessions.url, timeout_s)))
    shared = sessions.backend == "redis" and roles.url == sessions.url  # one Redis, probed (and named) once
    if roles.backend == "redis" and roles.url is not None and not shared:
        probes.append(_Probe("role_assignments.url", "role assignments' Redis", partial(_redis, roles.url, timeout_s)))
    elif roles.backend == "postgres" and roles.dsn is not None:
        probes.append(_Probe("role_assignments.dsn", "role assignments' PostgreSQL",
                             partial(_postgres, roles.dsn, None, timeout_s)))
    elif roles.backend == "sqlite":
        probes.append(_Probe("role_assignments.path", "role assignments' file", local(_writable, roles.path, True)))
    return probes


async def reach(url: str, timeout_s: float, tls: ssl.SSLContext | None = None) -> str | None:
    """Why the server of the http(s) `url` cannot be reached, or None: a TCP connection to its host and port,
    and for https a TLS handshake (with `tls`, default: the system's trust), within `timeout_s`. Nothing is sent."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # urlsplit reads the port only when asked
        return "its port is not a number from 1 to 65535"
    if not parts.hostname:
        return "it names no host"
    if parts.scheme == "https" and tls is None:
        tls = ssl.create_default_context()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(asyncio.Protocol, parts.hostname, port, ssl=tls)
    except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors
        return _reason(exc, timeout_s)
    transport.close()
    return None


READINESS_TTL_S = 5.0  # how long /readyz reuses an upstream's reachability


class Reachability:
    """Whether an HTTP upstream accepts connections, as `/readyz` reports it: the probe of `reach`, made at most
    once per `ttl_s` and one at a time, so that a load balancer polling /readyz opens no connection per poll.

    Args:
        upstream: an HTTP upstream (its url, and its tls settings).
        ttl_s: how long an answer is reused (a returning upstream is ready again at most this long after);
            default READINESS_TTL_S.
        timeout_s: how long a probe waits for the connection and handshake: under a readiness probe's timeout.
    """

    def __init__(self, upstream: Upstream, *, ttl_s: float | None = None, timeout_s: float = 2.0) -> None:
        assert upstream.url is not None
        self._url = upstream.url
        self._tls = _upstream_tls(upstream)  # made once
        self._ttl_s = READINESS_TTL_S if ttl_s is None else ttl_s
        self._timeout_s = timeout_s
        self._why: str | None = None
        self._probed_at = float("-inf")
        self._lock = asyncio.Lock()

    async def why_not(self) -> str | None:
        """None if the upstream could be reached when last probed (now, if that was over `ttl_s` ago); else why."""
        async with self._lock:  # callers arriving during a probe take its answer
            if time.monotonic() - self._probed_at >= self._ttl_s:
                self._why = await reach(self._url, self._timeout_s, self._tls)
                self._probed_at = time.monotonic()
            return self._why


def _upstream_tls(upstream: Upstream) -> ssl.SSLContext | None:
    """The TLS context the gateway reaches `upstream` with (its `tls` settings), or None for http."""
    return tls_context(upstream.tls) if (upstream.url or "").startswith("https://") else None


async def _connects(url: str, timeout_s: float, tls: ssl.SSLContext | None = None) -> str | None:
    why = await reach(url, timeout_s, tls)
    return None if why is None else f"cannot connect to {redact_url(url)}: {why}"


def _program(upstream: Upstream) -> str | None:
    """Why a stdio upstream's program cannot be run: the launcher `exec`s it with the PATH of the child's
    environment (its `env`, else the gateway's), in its `cwd`."""
    assert upstream.command is not None
    program = upstream.command[0]
    if "/" not in program:
        search = upstream.env.get("PATH", os.environ.get("PATH", os.defpath))
        return None if shutil.which(program, path=search) else f"{program}: not found on the PATH ({search})"
    path = Path(program) if upstream.cwd is None else upstream.cwd / program
    if not path.is_file():
        return f"{path}: no such file"
    return None if os.access(path, os.X_OK) else f"{path}: not executable"


def _directory(path: Path) -> str | None:
    return None if path.is_dir() else f"{path}: no such directory"


def _writable(path: Path, beside: bool) -> str | None:
    """Why the gateway could not append to the file at `path`: if it is there, it cannot be opened for appending
    (nothing is written); if not, it cannot be created. `beside`: files are made beside it too (SQLite's WAL, a
    rotated log), so its directory must take them."""
    if not os.path.lexists(path):
        return _creatable(path)
    if path.is_dir():
        return f"{path}: a directory, not a file"
    try:  # O_NONBLOCK: a FIFO without a reader is an error, not a wait
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
    except OSError as exc:
        return f"{path}: cannot be written ({exc.strerror})"
    if beside and not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{path}: its directory is not writable (files are made beside it)"
    return None


def _creatable(path: Path) -> str | None:
    """Why `path`, not there, could not be created: the nearest existing parent is no writable directory (the
    gateway makes every missing one)."""
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{path}: cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: cannot be created: {parent} is not writable"
    return None


def _key_file(path: Path, load: Callable[[Path], str | None]) -> str | None:
    """Why a key file the gateway reads, or creates when it is not there, cannot be used."""
    return load(path) if os.path.lexists(path) else _creatable(path)


def _signing_key(path: Path) -> str | None:
    try:
        load_signing_key(path)
    except SigningKeyError as exc:  # its message names the file
        return str(exc)
    return None


def _chain_key(path: Path) -> str | None:
    try:
        read_chain_key(path)
    except ChainKeyError as exc:
        return f"{exc.path}: {exc.why}"
    return None


async def _jwks(config: ExternalJwt, timeout_s: float) -> str | None:
    keys = JwksCache(config)
    try:
        await keys.fetch(timeout_s)
    except FETCH_ERRORS as exc:
        if isinstance(exc, httpx.HTTPStatusError):
            why = f"answered {exc.response.status_code}"
        elif isinstance(exc, httpx.TimeoutException):
            why = f"no answer within {timeout_s:g} s"
        elif isinstance(exc, jwt.PyJWKSetError):
            why = "holds no key that verifies signatures"
        elif isinstance(exc, json.JSONDecodeError):
            why = "not JSON"
        else:
            why = _reason(exc, timeout_s)
        return f"no signing keys from {redact_url(keys.jwks_uri or config.issuer)}: {why}"
    return None


async def _postgres(dsn: str, table: str | None, timeout_s: float) -> str | None:
    """Why PostgreSQL at `dsn` cannot be used: no connection; or `table` (when given) neither insertable and
    readable (what an audit sink does to it) nor, when it is not there, creatable."""
    import asyncpg  # type: ignore[import-untyped]  # no stubs published

    server = redact_url(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
    except ValueError:  # its message quotes the part of the DSN it could not read: a password's, maybe
        return (f"cannot connect to {server}: not a DSN (percent-encode any / ? # or @ in the user name or "
                "password)")
    except asyncpg.PostgresError as exc:  # the server's own words (no such database, a password refused)
        return f"cannot connect to {server}: {exc}"
    except (OSError, asyncpg.InterfaceError) as exc:
        return f"cannot connect to {server}: {_reason(exc, timeout_s)}"
    try:
        if table is None:
            return None
        async with asyncio.timeout(timeout_s):
            # regclass resolves the name as the sink's statements do (search_path, unquoted case folding)
            me, schema, there = await conn.fetchrow(
                "SELECT current_user, current_schema(), to_regclass($1) IS NOT NULL", table)
            if there:
                insert, select = await conn.fetchrow(
                    "SELECT has_table_privilege($1, 'INSERT'), has_table_privilege($1, 'SELECT')", table)
                missing = [what for what, held in (("insert into", insert), ("read", select)) if not held]
                return f"{server}: {me} may not {' or '.join(missing)} table {table}" if missing else None
            if schema is None:
                return f"{server}: no table {table}, and no schema on the search_path to create it in"
            if not await conn.fetchval("SELECT has_schema_privilege(current_schema(), 'CREATE')"):
                return f"{server}: no table {table}, and {me} may not create it in schema {schema}"
            return None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{server}: cannot be asked about table {table}: {_reason(exc, timeout_s)}"
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await conn.close(timeout=timeout_s)


async def _redis(url: str, timeout_s: float) -> str | None:
    import redis.asyncio
    from redis.exceptions import RedisError

    try:
        client = redis.asyncio.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError:  # its message may quote the URL
        return f"{redact_url(url)}: not a Redis URL"
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return f"cannot reach {redact_url(url)}: {_reason(exc, timeout_s)}"
    finally:
        await client.aclose()
    return None


def _reason(exc: BaseException, timeout_s: float) -> str:
    """Why something could not be reached, in a few words: from the OSError behind `exc` when there is one."""
    cause: OSError | None = None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            cause = seen
            if type(seen) is not OSError or seen.errno is not None:  # not only "all connection attempts failed"
                break
        seen = seen.__cause__ or seen.__context__
    if cause is None:
        return str(exc) or type(exc).__name__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {cause.reason or cause}"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(cause, socket.gaierror):
        return f"host name not resolved ({cause.strerror})"
    return cause.strerror or str(cause)
