"""The client-side commands of `mcp-gateway`: connect, logout, tokens list.

Owns their arguments and exit codes (0 success, 1 failure with one line on
stderr saying why). A client secret is read from the environment
(`MCP_GATEWAY_CLIENT_SECRET`), never from the command line, where any user of
the machine could read it; no token is ever printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import Any

import httpx

from gateway.oauth.client import OAuthHttp
from gateway.oauth.login import Authorization, ClientChoice, Grant, client_metadata_url
from gateway.oauth.metadata import OAuthClientError, canonical_url, trusted_url
from gateway.oauth.store import TokenStore, TokenStoreError, open_store

SECRET_VARIABLE = "MCP_GATEWAY_CLIENT_SECRET"


def register(commands: Any) -> None:
    """Add connect, logout and tokens to the `mcp-gateway` parser's subcommands."""
    connect = commands.add_parser(
        "connect", help="serve a remote MCP server (OAuth-protected or not) to a stdio-only MCP host",
        description="A stdio MCP server for the host that forwards every message to URL over Streamable HTTP, "
                    f"logging in with OAuth 2.1 + PKCE when the server asks. A client secret, if the client "
                    f"has one, is read from ${SECRET_VARIABLE}.")
    connect.add_argument("url", help="the MCP endpoint, e.g. https://gateway.example/mcp")
    connect.add_argument("--client-id", help="a client registered at the authorization server")
    connect.add_argument("--client-metadata-url", help="an https URL of a Client ID Metadata Document")
    connect.add_argument("--scope", action="append", default=[], help="a scope to ask for on login; repeatable")
    connect.add_argument("--no-browser", action="store_true", help="print the authorization URL instead")
    connect.add_argument("--login-timeout", type=float, default=300.0, help="seconds to wait for the browser")
    connect.set_defaults(func=_connect)

    logout = commands.add_parser("logout", help="revoke (RFC 7009) and forget the tokens kept for URL")
    logout.add_argument("url")
    logout.set_defaults(func=_logout)

    tokens = commands.add_parser("tokens", help="what `connect` keeps").add_subparsers(dest="action", required=True)
    listing = tokens.add_parser("list", help="servers with kept tokens: issuer, client, scope, expiry (no token)")
    listing.set_defaults(func=_tokens_list)
    for parser in (connect, logout, listing):
        parser.add_argument("--token-store", choices=["auto", "keyring", "file"], default="auto",
                            help="auto: the OS keyring when one is available, else a file only you can read")


def _connect(args: argparse.Namespace) -> int:
    from gateway.connect import Bridge, Host

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="mcp-gateway connect: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not trusted_url(args.url):
        print(f"mcp-gateway connect: {args.url} is not an https URL (plain http only to a loopback address)",
              file=sys.stderr)
        return 1
    try:
        store = open_store(args.token_store)
        store.get(canonical_url(args.url))  # a store that cannot be used says so now, not in the middle of a call
        choice = ClientChoice(
            client_id=args.client_id, client_secret=os.environ.get(SECRET_VARIABLE) if args.client_id else None,
            client_metadata_url=client_metadata_url(args.client_metadata_url) if args.client_metadata_url else None,
            scopes=frozenset(args.scope))
    except (TokenStoreError, OAuthClientError) as exc:
        print(f"mcp-gateway connect: {exc}", file=sys.stderr)
        return 1
    host = Host.take_stdio()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as http:
            auth = Authorization(OAuthHttp(http), store, args.url, choice, open_browser=not args.no_browser,
                                 announce=lambda line: print(line, file=sys.stderr, flush=True),
                                 login_timeout_s=args.login_timeout)
            await Bridge(args.url, http, host, auth).run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def _logout(args: argparse.Namespace) -> int:
    try:
        store = open_store(args.token_store)
        if store.get(canonical_url(args.url)) is None:
            print(f"no tokens are kept for {args.url} ({store.where})")
            return 0
    except TokenStoreError as exc:
        print(f"mcp-gateway logout: {exc}", file=sys.stderr)
        return 1

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as http:
            return await Authorization(OAuthHttp(http), store, args.url, ClientChoice()).logout()

    try:
        revoked = asyncio.run(run())
    except OAuthClientError as exc:  # logout() forgets the tokens whether or not the server took the revocation
        print(f"mcp-gateway logout: {exc}", file=sys.stderr)
        print(f"the tokens kept for {args.url} were deleted from this machine; revoking them at the server "
              "failed (see above)", file=sys.stderr)
        return 1
    except TokenStoreError as exc:
        print(f"mcp-gateway logout: {exc}", file=sys.stderr)
        return 1
    for line in revoked:
        print(line)
    print(f"forgot the tokens kept for {args.url} ({store.where})")
    return 0


def _tokens_list(args: argparse.Namespace) -> int:
    try:
        store = open_store(args.token_store)
        rows = [_row(store, key) for key in store.keys()]  # noqa: SIM118 (a store, not a dict)
    except TokenStoreError as exc:
        print(f"mcp-gateway tokens: {exc}", file=sys.stderr)
        return 1
    print(f"# {store.where}")
    for row in rows:
        print(row)
    return 0


def _row(store: TokenStore, key: str) -> str:
    stored = store.get(key)
    if stored is None:
        return f"{key}  (gone)"
    grant = Grant.from_json(stored)
    tokens = grant.tokens
    expiry = "no expiry" if tokens.expires_at is None else (
        f"expires in {int(tokens.expires_at - time.time())} s" if tokens.expires_at > time.time() else "expired")
    return (f"{grant.server_url}  issuer={grant.issuer}  client={grant.client.client_id}  "
            f"scope={' '.join(sorted(tokens.scope)) or '-'}  {expiry}  "
            f"refresh={'yes' if tokens.refresh_token else 'no'}")
