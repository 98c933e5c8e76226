"""The `mcp-gateway` command: serve, check-config, issue-token, policy explain, policy test.

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


def _policy_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.policy import PolicyError, load_policy
    from gateway.policy.explain import explain, operation_for, principal_from

    try:
        policy = load_policy(Path(args.policy))
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    claims: dict[str, object] = {}
    if args.claims:
        try:
            loaded = json.loads(Path(args.claims).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{args.claims}: cannot read claims: {exc}", file=sys.stderr)
            return 2
        if not isinstance(loaded, dict):
            print(f"{args.claims}: claims must be a JSON object", file=sys.stderr)
            return 2
        claims = loaded
    try:
        operation = operation_for(args.method, args.name, args.uri)
    except ValueError as exc:
        print(f"--method {args.method}: {exc}", file=sys.stderr)
        return 2
    for line in explain(policy, principal_from(claims), operation).lines():
        print(line)
    return 0


def _policy_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.policy import PolicyError
    from gateway.policy.explain import run_cases

    try:
        policy, results = run_cases(Path(args.file))
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    for result in results:
        outcome = "PASS" if result.passed else "FAIL"
        print(f"{outcome}  {result.name}" + ("" if result.passed else f"  (got {result.got})"))
    failed = sum(not r.passed for r in results)
    print(f"policy {policy.source} version {policy.version}: {len(results) - failed} of {len(results)} cases pass")
    return 1 if failed else 0


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

    policy = commands.add_parser("policy", help="explain and test policies").add_subparsers(dest="action",
                                                                                           required=True)
    explain = policy.add_parser("explain", help="why a principal may or may not do something, and what changes it")
    explain.add_argument("--policy", required=True)
    explain.add_argument("--claims", help="a JSON file of token claims (sub, scope, client_id, groups, amr, acr, ...)")
    explain.add_argument("--method", required=True, help="e.g. tools/call, resources/read, sampling/createMessage")
    explain.add_argument("--name", help="tool or prompt name")
    explain.add_argument("--uri", help="resource URI")
    explain.set_defaults(func=_policy_explain)
    test = policy.add_parser("test", help="run the policy test cases in NAME.tests.yaml beside a policy")
    test.add_argument("file", help="the policy file or its .tests.yaml file")
    test.set_defaults(func=_policy_test)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SystemExit as exc:
        return int(exc.code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
