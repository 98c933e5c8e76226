"""The sockets `mcp-gateway serve` listens on when the operators' routes have a listener of their own.

Owns `serve(server_config, admin)`: the public socket (as uvicorn binds it) and the `admin_listen` socket,
served by one uvicorn server, or by each of its worker processes, which share both sockets. Which routes answer
on which socket is the middleware's rule (`MCPSecurityMiddleware._on_its_listener`): it reads the local port of
each connection.
"""

from __future__ import annotations

import logging
import socket
import sys
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
