"""mcp-security-gateway: authenticate, classify, decide, audit and forward every MCP message.

Public API:
    MCPSecurityMiddleware(app, config)  ASGI middleware around an in-process MCP app
    create_app(config)                  the reverse proxy (the same middleware around a forwarding app)
    load_config(path)                   the validated config, or ConfigError with every problem

Each is imported on first use, so that importing one module of the package
(`gateway.policy.engine`, say) loads no HTTP server, client or framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy import names_from

if TYPE_CHECKING:
    from gateway.app import create_app
    from gateway.config import Config, ConfigError, load_config
    from gateway.middleware import MCPSecurityMiddleware

__all__ = ["Config", "ConfigError", "MCPSecurityMiddleware", "create_app", "load_config"]

_HOMES = {
    "gateway.app": ("create_app",),
    "gateway.config": ("Config", "ConfigError", "load_config"),
    "gateway.middleware": ("MCPSecurityMiddleware",),
}

if not TYPE_CHECKING:  # mypy reads the imports above; at run time each name's module is imported on first use
    __getattr__ = names_from(__name__, _HOMES)
