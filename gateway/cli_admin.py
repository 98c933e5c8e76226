"""The operator's side of `mcp-gateway`: sessions list|revoke, approvals list|approve|deny, roles
assign|revoke|list, and admin-login (the console's one-time sign-in URL).

Owns those commands' arguments, their output and exit codes (0 done, 1 refused
or unreachable, 2 bad configuration or arguments). Each is a client of the
running gateway's admin API (`gateway.admin`), with a one-minute token the
command signs itself with the gateway's key, as `issue-token` does: whoever can
read the key is an operator. `--as NAME` is who the token names: the approver
of an approval, the author of a role change, in the audit trail.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from gateway.audit.reading import BadQuery, parse_duration, utc_time
from gateway.config import Config, load_config


class _Refused(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def register(commands: Any) -> None:
    """Add sessions, approvals, roles and admin-login to the `mcp-gateway` parser's subcommands."""
    sessions = commands.add_parser("sessions", help="list and revoke token sessions (via the running gateway)")
    session_actions = sessions.add_subparsers(dest="action", required=True)
    listing = session_actions.add_parser("list", help="tokens that have not expired: who, issued, last seen")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    revoke = session_actions.add_parser("revoke", help="revoke a token: refused on its next request")
    revoke.add_argument("id", help="the token id (jti), as `sessions list` shows it")

    approvals = commands.add_parser("approvals", help="list and decide tool calls waiting for approval")
    approval_actions = approvals.add_subparsers(dest="action", required=True)
    pending = approval_actions.add_parser("list", help="approvals pending and recently decided")
    pending.add_argument("--format", choices=["table", "json"], default="table")
    deciding = [approval_actions.add_parser(verb, help=f"{verb} the call waiting under ID") for verb in
                ("approve", "deny")]
    for parser in deciding:
        parser.add_argument("id")
        parser.add_argument("--reason", default="", help="why, for the audit trail (and the caller, on deny)")

    roles = commands.add_parser("roles", help="assign and withdraw roles while the gateway runs")
    role_actions = roles.add_subparsers(dest="action", required=True)
    assign = role_actions.add_parser("assign", help="give SUBJECT a role (merged with the policy's bindings)")
    assign.add_argument("--subject", required=True)
    assign.add_argument("--client", help="only when the subject calls through this client id")
    assign.add_argument("--role", required=True)
    assign.add_argument("--expires", help="e.g. 30m, 2h, 1d (default: until revoked)")
    assign.add_argument("--reason", default="")
    unassign = role_actions.add_parser("revoke", help="withdraw an assignment: refused on the next request")
    unassign.add_argument("id", help="the assignment id, as `roles list` shows it")
    roles_listing = role_actions.add_parser("list", help="assignments in force")
    roles_listing.add_argument("--subject")
    roles_listing.add_argument("--format", choices=["table", "json"], default="table")

    for parser in (listing, revoke, pending, *deciding, assign, unassign, roles_listing):
        parser.add_argument("--config", required=True)
        parser.add_argument("--url", help="the gateway's address; default: http://listen.host:listen.port")
        parser.add_argument("--as", dest="operator", default=getpass.getuser(),
                            help="who you are, in the token and the audit trail (default: your user name)")
        parser.set_defaults(func=_run)

    login = commands.add_parser("admin-login", help="print a one-time URL that signs you in to the console")
    login.add_argument("--config", required=True)
    login.add_argument("--as", dest="operator", default=getpass.getuser(), help="who you are (default: user name)")
    login.set_defaults(func=_admin_login)


def _signer(config: Config) -> Any:
    from gateway.auth.authenticator import Authenticator
    from gateway.auth.keys import SigningKeyError, load_signing_key

    try:  # the running gateway's key: a key made here would sign a token the gateway refuses
        return Authenticator(config, load_signing_key(config.auth.clients.signing_key_file))
    except SigningKeyError as exc:
        raise _Refused(str(exc), 2) from None


def _call(args: argparse.Namespace, config: Config, method: str, path: str, scope: str,
          body: dict[str, Any] | None = None) -> dict[str, Any]:
    token = _signer(config).issue_token(subject=args.operator, audience=config.admin_resource,
                                        scopes=[scope], ttl_s=60)
    base = (args.url or f"http://{config.listen.host}:{config.listen.port}").rstrip("/")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method)
    request.add_header("authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as failed:
        try:
            message = json.loads(failed.read() or b"{}").get("error", {}).get("message", failed.reason)
        except ValueError:
            message = failed.reason
        raise _Refused(f"{failed.code}: {message}") from None
    except (urllib.error.URLError, OSError) as failed:
        raise _Refused(f"cannot reach the gateway at {base}: {failed}") from None


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, upstream_secrets=False)
    try:
        command = f"{args.command} {args.action}"
        if command == "sessions list":
            _print(args, _call(args, config, "GET", "/admin/sessions", config.sessions.admin_scope)["sessions"],
                   _SESSIONS)
        elif command == "sessions revoke":
            answer = _call(args, config, "DELETE", f"/admin/sessions/{_segment(args.id)}", config.sessions.admin_scope)
            print(f"revoked {answer['revoked']}")
        elif command == "approvals list":
            _print(args, _call(args, config, "GET", "/admin/approvals", config.admin.approvals_scope)["approvals"],
                   _APPROVALS)
        elif args.command == "approvals":
            answer = _call(args, config, "POST", f"/admin/approvals/{_segment(args.id)}/{args.action}",
                           config.admin.approvals_scope, {"reason": args.reason})
            approval = answer["approval"]
            print(f"{approval['status']} {approval['id']}: {approval['tool']} at {approval['upstream']} "
                  f"for {approval['caller'][1]}")
        elif command == "roles assign":
            body = {"subject": args.subject, "role": args.role, "client_id": args.client, "reason": args.reason,
                    "expires_in_s": _duration(args.expires)}
            assignment = _call(args, config, "POST", "/admin/roles", config.admin.roles_scope, body)["assignment"]
            print(f"assigned {assignment['role']} to {assignment['subject']} "
                  f"({_until(assignment['expires_at'])}): id {assignment['id']}")
        elif command == "roles revoke":
            path = f"/admin/roles/{_segment(args.id)}"
            removed = _call(args, config, "DELETE", path, config.admin.roles_scope)["revoked"]
            print(f"revoked {removed['role']} from {removed['subject']} (id {removed['id']})")
        else:
            path = "/admin/roles" + (f"?{urllib.parse.urlencode({'subject': args.subject})}" if args.subject else "")
            _print(args, _call(args, config, "GET", path, config.admin.roles_scope)["assignments"], _ROLES)
    except _Refused as refused:
        print(refused, file=sys.stderr)
        return refused.code
    return 0


def _segment(value: str) -> str:
    """An id as one path segment: whatever it holds, it names nothing else."""
    return urllib.parse.quote(value, safe="")


def _duration(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except BadQuery as exc:
        raise _Refused(f"--expires: {exc}", 2) from None


def _until(expires_at: float | None) -> str:
    return "until revoked" if expires_at is None else f"until {utc_time(expires_at)}"


Column = tuple[str, int, Callable[[dict[str, Any]], str]]  # heading, width (0: the rest of the line), value

_SESSIONS: list[Column] = [
    ("TOKEN ID", 34, lambda i: i["token_id"]), ("CLIENT", 16, lambda i: i["client_id"] or "-"),
    ("SUBJECT", 16, lambda i: i["subject"]), ("ISSUED", 20, lambda i: utc_time(i["issued_at"])),
    ("LAST SEEN", 20, lambda i: utc_time(i["last_seen"]) if i["last_seen"] else "-"),
    ("EXPIRES", 20, lambda i: utc_time(i["expires_at"])),
    ("STATE", 0, lambda i: "revoked" if i["revoked"] else "active"),
]
_APPROVALS: list[Column] = [
    ("ID", 32, lambda i: i["id"]), ("STATUS", 9, lambda i: i["status"]), ("CALLER", 16, lambda i: i["caller"][1]),
    ("UPSTREAM", 12, lambda i: i["upstream"]), ("TOOL", 16, lambda i: i["tool"]),
    ("EXPIRES", 20, lambda i: utc_time(i["expires_at"])), ("ARGUMENTS", 0, lambda i: i["arguments"] or "-"),
]
_ROLES: list[Column] = [
    ("ID", 16, lambda i: i["id"]), ("SUBJECT", 20, lambda i: i["subject"]),
    ("CLIENT", 16, lambda i: i["client_id"] or "*"), ("ROLE", 20, lambda i: i["role"]),
    ("BY", 12, lambda i: i["assigned_by"]),
    ("EXPIRES", 20, lambda i: utc_time(i["expires_at"]) if i["expires_at"] else "never"),
    ("REASON", 0, lambda i: i["reason"]),
]


def _print(args: argparse.Namespace, items: list[dict[str, Any]], columns: list[Column]) -> None:
    """`items` as JSON (--format json) or as a table of `columns`."""
    if args.format == "json":
        print(json.dumps(items, indent=2))
        return
    print(" ".join(f"{heading:{width}}" if width else heading for heading, width, _ in columns))
    for item in items:
        print(" ".join(f"{value(item):{width}}" if width else value(item) for _, width, value in columns))


def _admin_login(args: argparse.Namespace) -> int:
    from gateway.console import login_url

    config = load_config(args.config, upstream_secrets=False)
    try:
        authenticator = _signer(config)
    except _Refused as refused:
        print(refused, file=sys.stderr)
        return refused.code
    print(login_url(config, authenticator, args.operator))
    print(f"(good once, for {config.admin.login_ttl_s} s; it signs you in as {args.operator})", file=sys.stderr)
    return 0
