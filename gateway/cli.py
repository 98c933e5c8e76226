"""The `mcp-gateway` command: serve, check-config, issue-token, hash-secret, policy explain|test (`cli_policy`:
lint|cedar-schema); `cli_audit`: audit query|verify; the operator's commands (`cli_admin`): sessions, approvals,
roles, admin-login, and (`cli_tools`) tools; and the client side (`cli_connect`): connect, logout, tokens list.

Owns argument parsing and exit codes: 0 success, 2 invalid configuration
(each problem printed as `FILE: key.path: why`), 1 anything else (one line,
`mcp-gateway: ...`, never a traceback for an error of the gateway's own).
Only `serve`, `check-config` and the commands that ask an upstream itself
(`policy lint|cedar-schema`, `tools list --live`) need the upstreams'
credentials in their environment: the others load the config without them
(`load_config(upstream_secrets=False)`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import cli_admin, cli_audit, cli_connect, cli_policy, cli_tools
from gateway.config import check_port, load_config
from gateway.config_auth import MAX_TOKEN_TTL_S
from gateway.exceptions import GatewayError
from gateway.yamlfile import ProblemsError


def _serve(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import uvicorn

    from gateway import http_server, listeners, logs
    from gateway.app import CONFIG_ENV, LISTEN_ENV, create_app, settle_garbage_collector
    from gateway.auth.keys import load_or_create_signing_key
    from gateway.startup_summary import listen_address

    quickstart = None
    if args.stdio:
        from gateway.stdio.quickstart import prepare

        quickstart, args.command, args.config = prepare(args.command, args.config, args.host, args.port)
    elif args.config is None or args.command:
        raise ProblemsError(["serve: give --config FILE, or --stdio -- COMMAND [ARGS...]"])
    config = load_config(args.config)
    if args.workers > 1 and any(u.command is not None for u in config.upstreams):
        raise ProblemsError([f"{config.source}: upstreams: a stdio upstream's processes and sessions live in one "
                             f"process; serve --workers {args.workers} would split them (run one worker, or "
                             "several gateways each with its own stdio upstreams)"])
    if args.workers > 1 and config.sessions.backend == "memory":
        # Each worker would hold its own bindings: a session bound by one is a 404 on the others.
        raise ProblemsError([f"{config.source}: sessions.backend: memory keeps session bindings, task owners "
                             f"and token revocations in one process; serve --workers {args.workers} needs "
                             "sessions.backend: redis"])
    app = create_app(config)  # every check a worker would make, made once here with a clear message
    logs.configure(config.log_level, config.log_format)
    http_server.HeadDeadlineProtocol.head_timeout_s = config.limits.client_header_timeout_s
    host, port = args.host or config.listen.host, args.port if args.port is not None else config.listen.port
    app.runtime.listen = listen = listen_address(host, port)
    common = {
        "http": http_server.HeadDeadlineProtocol,
        "host": host,
        "port": port,
        "lifespan": "on",
        "access_log": False,
        "log_level": config.log_level.lower(),
        "log_config": None,  # keep the gateway's JSON handler for uvicorn's own lines
        "timeout_graceful_shutdown": 10,
        # X-Forwarded-For names the caller only on a connection from a trusted proxy (none by default)
        "proxy_headers": bool(config.trusted_proxies),
        "forwarded_allow_ips": list(config.trusted_proxies) or None,
    }
    if config.tls is not None:
        common |= {"ssl_certfile": str(config.tls.cert_file), "ssl_keyfile": str(config.tls.key_file),
                   "ssl_context_factory": listeners.TlsReloader(config.tls.reload_interval_s)}
    if quickstart is not None:
        from gateway.stdio.quickstart import SUBJECT, TOKEN_TTL_S, banner

        token = app.runtime.authenticator.issue_token(subject=SUBJECT, audience=config.resource_url(
            config.upstreams[0]), ttl_s=TOKEN_TTL_S)
        print(banner(config.resource_url(config.upstreams[0]), token, quickstart, args.command), flush=True)
    if config.admin_listen is not None and port == config.admin_listen.port:
        raise ProblemsError([f"serve --port {port}: that is admin_listen's port"])
    if args.workers <= 1:
        settle_garbage_collector()
        if config.admin_listen is None:
            uvicorn.run(app, **common)  # type: ignore[arg-type]
        else:
            listeners.serve(uvicorn.Config(app, **common), config.admin_listen)  # type: ignore[arg-type]
        return 0
    # Several workers: each loads the config itself; /metrics adds up every worker's values.
    load_or_create_signing_key(config.auth.clients.signing_key_file)  # created once, before the workers race
    os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
    os.environ[LISTEN_ENV] = listen
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="mcp-gateway-metrics-"))
    target = "gateway.app:app_from_environment"
    if config.admin_listen is None:
        uvicorn.run(target, factory=True, workers=args.workers, **common)  # type: ignore[arg-type]
    else:
        listeners.serve(uvicorn.Config(target, factory=True, workers=args.workers, **common),  # type: ignore[arg-type]
                        config.admin_listen)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from gateway.app import reverse_proxy_problems

    config = load_config(args.config)
    problems = reverse_proxy_problems(config)  # what `serve` would refuse, in its words
    reached = ""
    if args.probe:
        import asyncio

        from gateway.probes import probe, probed

        problems += asyncio.run(probe(config))
        reached = f"; reached {', '.join(probed(config))}"
    if problems:
        raise ProblemsError(problems)
    names = ", ".join(f"{u.name} at {u.path}" for u in config.upstreams)
    print(f"{args.config}: OK ({len(config.upstreams)} upstream(s): {names}; "
          f"policy {config.policy.source} version {config.policy.version}{reached})")
    return 0


def _issue_token(args: argparse.Namespace) -> int:
    from gateway.auth.authenticator import Authenticator
    from gateway.auth.keys import SigningKeyError, load_signing_key

    config = load_config(args.config, upstream_secrets=False)
    try:  # the running gateway's key: a key made here would sign tokens the gateway refuses
        signing_key = load_signing_key(config.auth.clients.signing_key_file)
    except SigningKeyError as exc:
        print(exc, file=sys.stderr)
        return 2
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
    authenticator = Authenticator(config, signing_key)
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
    import asyncio
    from pathlib import Path

    from gateway.assignments import Assignment, open_assignments
    from gateway.errors import StateUnavailable
    from gateway.policy import load_policy
    from gateway.policy.explain import explain, operation_for, principal_from
    from gateway.ratelimit.rules import Limits

    config = load_config(args.config, upstream_secrets=False) if args.config else None
    if args.policy is not None:
        policy = load_policy(Path(args.policy))
    elif config is not None:
        policy = config.policy
    else:
        print("policy explain: give --policy FILE or --config FILE", file=sys.stderr)
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
        operation = operation_for(args.method, args.name, args.uri, args.max_tokens)
    except ValueError as exc:
        print(f"--method {args.method}: {exc}", file=sys.stderr)
        return 2
    try:
        principal = principal_from(claims)
    except ValueError as exc:
        print(f"--claims {args.claims}: {exc}", file=sys.stderr)
        return 2
    assigned: list[Assignment] = []
    if config is not None:
        store = open_assignments(config.role_assignments)

        async def read() -> list[Assignment]:
            try:
                return await store.of(principal.subject, principal.client_id)
            finally:
                await store.close()

        try:
            assigned = asyncio.run(read())
        except StateUnavailable as exc:
            print(f"{config.source}: role_assignments: the {config.role_assignments.backend} store cannot be "
                  f"read ({exc.reason})", file=sys.stderr)
            return 1
    names = [u.name for u in config.upstreams] if config is not None else []
    if config is not None and args.upstream is not None and args.upstream not in names:  # else: any name will do
        print(f"--upstream {args.upstream}: not an upstream of {config.source} (have: {', '.join(names)})",
              file=sys.stderr)
        return 2
    explained = explain(policy, principal, operation, assigned, era=args.era or "", upstream=args.upstream or "")
    for line in explained.lines():
        print(line)
    if config is not None and config.rate_limits and not explained.decision.allowed:
        print("rate limits: none counts it (a refused call takes no token)")
    elif config is not None and config.rate_limits:
        limits = Limits(config.rate_limits).describe(principal, explained.decision.roles, operation,
                                                     args.upstream or config.upstreams[0].name)
        print("rate limits:" + "".join(f"\n  {line}" for line in limits) if limits else "rate limits: none counts it")
    return 0


def _policy_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.policy.explain import run_cases

    policy, results = run_cases(Path(args.file), Path(args.policy) if args.policy else None)
    for result in results:
        outcome = "PASS" if result.passed else "FAIL"
        print(f"{outcome}  {result.name}" + ("" if result.passed else f"  (got {result.got})"))
    failed = sum(not r.passed for r in results)
    print(f"policy {policy.source} version {policy.version}: {len(results) - failed} of {len(results)} cases pass")
    return 1 if failed else 0


def _hash_secret(args: argparse.Namespace) -> int:
    import getpass

    from gateway.auth.secrets import hash_secret
    from gateway.auth.totp import generate_secret, otpauth_uri

    if args.totp:
        totp_secret = generate_secret()
        print(f"totp secret: {totp_secret}")
        print(f"otpauth uri: {otpauth_uri(totp_secret, args.account or 'client', args.issuer or 'mcp-gateway')}")
        print("Put the secret in the gateway's environment (CLIENT_TOTP, say) and write, in the client's entry "
              "under auth.clients.registered: mfa: {totp_secret: ${CLIENT_TOTP}}. Give the URI (as a QR code) or "
              "the secret to whatever makes the client's codes.")
        return 0
    if args.account or args.issuer:
        print("--account and --issuer go with --totp", file=sys.stderr)
        return 2
    secret = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("client secret: ")
    if len(secret) < 16:
        print("a client secret must be at least 16 characters", file=sys.stderr)
        return 2
    print(hash_secret(secret))
    return 0


def _port(value: str) -> int:
    try:
        return check_port(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1 to 65535)") from None


def _ttl(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) <= MAX_TOKEN_TTL_S:
        raise argparse.ArgumentTypeError(f"{value}: a token lives from 1 to {MAX_TOKEN_TTL_S} seconds (a day)")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="A security gateway for MCP servers.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway as a reverse proxy",
                                usage="mcp-gateway serve --config FILE [options] | serve --stdio -- COMMAND...")
    serve.add_argument("--config")
    serve.add_argument("--stdio", action="store_true",
                       help="quick start: serve the stdio MCP server COMMAND, with a generated config and token")
    serve.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (metrics are summed across them)")
    serve.set_defaults(func=_serve)

    check = commands.add_parser("check-config", help="validate the config and every file it names")
    check.add_argument("--config", required=True)
    check.add_argument("--probe", action="store_true",
                       help="also reach what it names, once each, changing nothing: upstreams, audit sinks, Redis, "
                       "PostgreSQL, keys, the issuer's JWKS")
    check.set_defaults(func=_check_config)

    token = commands.add_parser("issue-token", help="print a token signed by the gateway's own key")
    token.add_argument("--config", required=True)
    token.add_argument("--subject", required=True)
    token.add_argument("--scope", action="append", default=[], help="repeatable")
    token.add_argument("--claim", action="append", default=[], help="KEY=VALUE, repeatable; VALUE may be JSON")
    token.add_argument("--client-id")
    token.add_argument("--upstream", help="the upstream (resource) the token is for; default: the first")
    token.add_argument("--ttl", type=_ttl, help=f"seconds, at most {MAX_TOKEN_TTL_S}; default "
                       "auth.clients.token_ttl_s")
    token.set_defaults(func=_issue_token)

    hashing = commands.add_parser("hash-secret", help="print the scrypt hash of a client secret read from stdin")
    hashing.add_argument("--totp", action="store_true",
                         help="instead: print a new TOTP secret for a client's mfa, and its otpauth:// URI")
    hashing.add_argument("--account", help="with --totp: the account the URI names, usually the client_id")
    hashing.add_argument("--issuer", help="with --totp: the issuer the URI names (default: mcp-gateway)")
    hashing.set_defaults(func=_hash_secret)

    policy = commands.add_parser("policy", help="explain and test policies").add_subparsers(dest="action",
                                                                                           required=True)
    explain = policy.add_parser("explain", help="why a principal may or may not do something, and what changes it")
    explain.add_argument("--policy", help="the policy file; default: the one --config names")
    explain.add_argument("--config", help="the gateway's config: add the roles its role_assignments store "
                         "assigns to the principal")
    explain.add_argument("--claims", help="a JSON file of token claims (sub, scope, client_id, groups, amr, acr, ...)")
    explain.add_argument("--method", required=True, help="e.g. tools/call, resources/read, sampling/createMessage")
    explain.add_argument("--name", help="tool or prompt name")
    explain.add_argument("--uri", help="resource URI")
    explain.add_argument("--max-tokens", type=int, help="sampling/createMessage: the maxTokens asked for")
    explain.add_argument("--era", choices=["legacy", "modern"], help="the protocol era the request came in")
    explain.add_argument("--upstream", help="decide as the policy holds on this upstream (its upstreams: section)")
    explain.set_defaults(func=_policy_explain)
    test = policy.add_parser("test", help="run the policy test cases in NAME.tests.yaml beside a policy")
    test.add_argument("file", help="the policy file or its .tests.yaml file")
    test.add_argument("--policy", help="run the cases against this policy file instead (e.g. a .cedar file)")
    test.set_defaults(func=_policy_test)
    cli_policy.register(policy)

    cli_audit.register(commands)
    cli_admin.register(commands)
    cli_tools.register(commands)
    cli_connect.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ProblemsError as exc:  # a bad config, policy or test-case file: every problem, then exit 2
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except GatewayError as exc:  # worded for a person (a sink not there, a store unreachable): not a traceback
        print(f"mcp-gateway: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
