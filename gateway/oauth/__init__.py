"""The gateway as an OAuth 2.1 client: of a remote MCP server (`mcp-gateway connect`) and of an upstream.

    metadata   what a server says about itself: WWW-Authenticate challenges, RFC 9728 resource metadata,
               RFC 8414 / OIDC authorization-server metadata, and which of it is trusted (pure)
    grants     PKCE S256, the authorization request, the redirect's checks (state, RFC 9207 iss), token
               answers read into `Tokens` (pure)
    client     the HTTP half: discovery, registration (RFC 7591), code exchange, refresh, revocation (RFC
               7009), client credentials and token exchange (RFC 8693)
    loopback   the redirect receiver: one request on 127.0.0.1, a random port
    login      an interactive authorization for one MCP server: who the client is, the browser, the code
    store      where `connect` keeps what it obtained: the OS keyring, or a file only its user can read
    upstream   tokens the gateway obtains itself for an upstream that requires its own (cached, refreshed)
"""
