"""mcp-security-gateway: authenticate, classify, decide, audit and forward every MCP message.

Public API:
    MCPSecurityMiddleware(app, config)  ASGI middleware around an in-process MCP app
    create_app(config)                  the reverse proxy (the same middleware around a forwarding app)
    load_config(path)                   the validated config, or ConfigError with every problem
"""

from gateway.app import create_app
from gateway.config import Config, ConfigError, load_config
from gateway.middleware import MCPSecurityMiddleware

__all__ = ["Config", "ConfigError", "MCPSecurityMiddleware", "create_app", "load_config"]
