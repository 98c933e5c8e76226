"""stdio MCP servers behind the gateway: child processes with only their configured credentials.

    process     one child: environment, limits, process group, line framing, stopping it
    launch      the child's first program: set its limits, then exec the server
"""
