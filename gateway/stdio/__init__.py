"""stdio MCP servers behind the gateway: child processes with only their configured credentials.

    upstream    StdioUpstream: the forwarding hop (an ASGI app) for a stdio upstream, Streamable HTTP to stdio
    pool        the processes of one upstream by isolation key: bounds, idle stop, restart backoff
    channel     one child's JSON-RPC conversation: the handshake, ids of the gateway's own, who a message is for
    modern      2026-07-28 callers in front of a handshake-era child (discover, input_required, retries)
    process     one child: environment, limits, process group, line framing, stopping it
    launch      the child's first program: set its limits, then exec the server
    quickstart  `mcp-gateway serve --stdio -- COMMAND`
"""
