"""The `mcp-gateway` command: serve, check-config, issue-token.

Owns argument parsing and exit codes: 0 success, 2 invalid configuration
(each problem printed as `FILE: key.path: why`), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from gateway.config import Config, ConfigError, load_config


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    config = _load(args.config)
    try:
        app = create_app(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        app,
        host=args.host or config.listen.host,
        port=args.port if args.port is not None else config.listen.port,
        loop="auto",
        http="auto",
        lifespan="on",
        access_log=False,
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    names = ", ".join(f"{u.name} at {u.path}" for u in config.upstreams)
    print(f"{args.config}: OK ({len(config.upstreams)} upstream(s): {names}; "
          f"policy {config.policy.source} version {config.policy.version})")
    return 0


def _issue_token(args: argparse.Namespace) -> int:
    from gateway.auth import Authenticator, load_or_create_signing_key

    config = _load(args.config)
    upstreams = {u.name: u for u in config.upstreams}
    upstream = upstreams.get(args.upstream) if args.upstream else config.upstreams[0]
    if upstream is None:
        print(f"no upstream named {args.upstream!r} (have: {', '.join(upstreams)})", file=sys.stderr)
        return 2
    claims = {}
    for item in args.claim:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--claim {item!r}: expected KEY=VALUE (VALUE may be JSON)", file=sys.stderr)
            return 2
        try:
            claims[key] = json.loads(value)
        except json.JSONDecodeError:
            claims[key] = value
    authenticator = Authenticator(config, load_or_create_signing_key(config.auth.clients.signing_key_file))
    print(authenticator.issue_token(
        subject=args.subject,
        audience=config.resource_url(upstream),
        scopes=args.scope,
        client_id=args.client_id,
        claims=claims,
        ttl_s=args.ttl,
    ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="A security gateway for MCP servers.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway as a reverse proxy")
    serve.add_argument("--config", required=True)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)

    check = commands.add_parser("check-config", help="validate the config and every file it names")
    check.add_argument("--config", required=True)
    check.set_defaults(func=_check_config)

    token = commands.add_parser("issue-token", help="print a token signed by the gateway's own key")
    token.add_argument("--config", required=True)
    token.add_argument("--subject", required=True)
    token.add_argument("--scope", action="append", default=[], help="repeatable")
    token.add_argument("--claim", action="append", default=[], help="KEY=VALUE, repeatable; VALUE may be JSON")
    token.add_argument("--client-id")
    token.add_argument("--upstream", help="the upstream (resource) the token is for; default: the first")
    token.add_argument("--ttl", type=int, help="seconds; default auth.clients.token_ttl_s")
    token.set_defaults(func=_issue_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SystemExit as exc:
        return int(exc.code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
