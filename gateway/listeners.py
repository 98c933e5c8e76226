"""The sockets `mcp-gateway serve` listens on, and the TLS they speak.

Owns `serve(server_config, admin)`: the public socket (as uvicorn binds it) and the `admin_listen` socket,
served by one uvicorn server, or by each of its worker processes, which share both sockets. Which routes answer
on which socket is the middleware's rule (`MCPSecurityMiddleware._on_its_listener`): it reads the local port of
each connection. And `TlsReloader`, uvicorn's `ssl_context_factory` for `tls:` on the listeners: the context
uvicorn builds from the certificate and key files, loaded again in place whenever either file changes, so a
renewed certificate is served to new connections without a restart and without dropping one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.supervisors import Multiprocess

if TYPE_CHECKING:
    from gateway.config import Listen

log = logging.getLogger("gateway")


def serve(server_config: uvicorn.Config, admin: Listen) -> None:
    """Serve `server_config`'s app on its host and port and on `admin`'s, until stopped (SIGINT, SIGTERM)."""
    sockets = [server_config.bind_socket(), _bound(admin.host, admin.port)]
    log.info("admin listener (/metrics, /admin, the console) on %s:%d", admin.host, admin.port)
    if server_config.workers > 1:
        Multiprocess(server_config, sockets=sockets).run()
        return
    server = uvicorn.Server(server_config)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(3)  # as uvicorn.run ends when its server could not start


def _bound(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds its own (asyncio listens on it; workers inherit it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"mcp-gateway: admin_listen {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class TlsReloader:
    """uvicorn's `ssl_context_factory` (picklable: each worker builds its own context and watches its files)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s

    def __call__(self, config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        context = default()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a process that builds the context but serves nothing with it
            return context
        assert config.ssl_certfile is not None
        files = (Path(config.ssl_certfile), Path(config.ssl_keyfile or config.ssl_certfile))
        task = loop.create_task(_watch(context, files, self.interval_s), name="tls-reload")
        _WATCHERS.add(task)
        task.add_done_callback(_WATCHERS.discard)
        return context


_WATCHERS: set[asyncio.Task[None]] = set()


def _stamps(files: tuple[Path, Path]) -> tuple[tuple[int, int, int] | None, ...]:
    stamps: list[tuple[int, int, int] | None] = []
    for path in files:
        try:
            info = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(stamps)


async def _watch(context: ssl.SSLContext, files: tuple[Path, Path], interval_s: float) -> None:
    seen = _stamps(files)
    while True:
        await asyncio.sleep(interval_s)
        now = _stamps(files)
        if now == seen:
            continue
        try:
            context.load_cert_chain(files[0], files[1])
        except (OSError, ssl.SSLError) as exc:  # half written, or a key that does not match: the old one stays
            log.warning("TLS certificate %s not reloaded (%s): still serving the previous one", files[0], exc)
            continue
        seen = now
        log.info("TLS certificate reloaded from %s", files[0])
