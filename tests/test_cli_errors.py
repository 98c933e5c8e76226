"""`mcp-gateway` when what it reads is not there or not allowed: every subcommand answers in a line or two and an
exit code, never a traceback; a command reads only what it needs (no upstream's secrets to read the audit trail);
ports and token lifetimes out of range are refused before anything runs.

Most cases run the command in this process (`cli.main`, as the console script runs it, minus the second an
interpreter takes to start); `serve`, and one command for each way the command ends, run as the real one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.audit.chainkey import load_or_create_chain_key
from gateway.audit.sinks import open_sink
from gateway.auth.keys import load_or_create_signing_key
from gateway.cli import build_parser, main
from gateway.config import AuditSink
from gateway.config_auth import MAX_TOKEN_TTL_S
from tests.conftest import DSN
from tests.harness import ROOT, free_port, wait_for_port, write_config

UPSTREAM_URL = "http://127.0.0.1:9/mcp"

Run = Callable[..., subprocess.CompletedProcess[str]]


def real_mcp_gateway(*argv: str, home: Path) -> subprocess.CompletedProcess[str]:
    """The real command, with no secrets of this test run in its environment and its own home (token store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPGW_TEST_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=30, env={**env, "HOME": str(home)})


@contextlib.contextmanager
def fresh_logging() -> Iterator[None]:
    """Logging as a new interpreter has it (no handler: a warning goes to stderr, as the real command writes it),
    and afterwards as it was: a handler a command gives the root logger would write to this test's captured
    stderr in every later test, a level it sets would hold there too."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = logging.Logger.manager.loggerDict
    levels = {name: logger.level for name, logger in loggers.items() if isinstance(logger, logging.Logger)}
    root.handlers[:] = []
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, logger in list(loggers.items()):
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture
def mcp_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`mcp-gateway ARGV` in this process, as `real_mcp_gateway` runs it: the same environment, home, working
    directory, empty stdin and logging (`fresh_logging`); its exit code (argparse's too), stdout and stderr."""
    for name in [k for k in os.environ if k.startswith("MCPGW_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps its usage to the terminal; the real command has none
    monkeypatch.chdir(ROOT)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO())
        capsys.readouterr()
        with fresh_logging():
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = 0 if exit_.code is None else int(exit_.code)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["mcp-gateway", *argv], code, out, err)

    return run


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command of the parser, e.g. (("audit", "query"), its parser): a new one is covered here."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
        return
    for name, child in groups[0].choices.items():
        yield from subcommands(child, (*path, name))


COMMANDS = dict(subcommands(build_parser()))
# Values for the arguments a command requires, by name; any other gets "x" (a command must refuse it in a line).
VALUES = {"subject": "alice", "role": "reader", "method": "tools/list"}


def argv_for(command: tuple[str, ...], config: Path) -> list[str]:
    argv = list(command)
    for action in COMMANDS[command]._actions:
        if "--config" in action.option_strings:
            argv += ["--config", str(config)]
        elif action.required and action.option_strings:
            argv += [action.option_strings[0], VALUES.get(action.dest, "x")]
        elif not action.option_strings and action.nargs != argparse.REMAINDER:
            argv.append(VALUES.get(action.dest, "x"))
    return argv


# Commands that may succeed against a config whose sinks are not there or not reachable, and why that is right.
SUCCEEDS = {
    "serve": "creates the sinks that are not there; one it cannot reach is retried (and requests refused meanwhile)",
    "check-config": "checks the config and the files it names; the sinks are the running gateway's to create",
    "issue-token": "signs with the gateway's key; reads no sink",
    "admin-login": "signs a one-time URL with the gateway's key; reads no sink",
    "policy explain": "reads the policy and the role assignments (created empty when they are a SQLite file)",
    "logout": "says that no tokens are kept for the URL",
    "tokens list": "lists the (empty) token store of `connect`",
}


def unreadable_config(tmp_path: Path, case: str) -> tuple[Path, int]:
    """A config whose sinks (and role assignments) are not there ("missing"), or on a closed port ("unreachable");
    and the port it listens on."""
    nowhere = tmp_path / "nowhere"
    closed = f"postgresql://127.0.0.1:{free_port()}/test"
    sinks: dict[str, list[dict[str, Any]]] = {
        "missing": [{"type": "sqlite", "path": str(nowhere / "audit.db")},
                    {"type": "jsonl", "path": str(nowhere / "audit.jsonl")}],
        "unreachable": [{"type": "postgres", "dsn": closed}],
    }
    assignments = {"missing": {"path": str(nowhere / "state.db")},
                   "unreachable": {"backend": "postgres", "dsn": closed}}
    port = free_port()
    path = write_config(tmp_path, UPSTREAM_URL, listen={"host": "127.0.0.1", "port": port},
                        audit={"sinks": sinks[case]}, role_assignments=assignments[case])
    load_or_create_signing_key(tmp_path / "key.pem")  # as a gateway that ran once left them
    load_or_create_chain_key(tmp_path / "audit-chain.key")
    return path, port


def run_serve(argv: list[str], port: int, home: Path) -> tuple[int | None, str]:
    """`serve` until it listens (then SIGTERM) or exits: its exit code (None: it served) and its stderr."""
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HOME": str(home)})
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            try:
                wait_for_port(port, timeout=0.2)
                break
            except TimeoutError:
                continue
        served = process.poll() is None
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # still flushing to a sink it cannot reach: what it said so far is enough
            process.kill()
            _, stderr = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
    return (None if served else process.returncode), stderr


@pytest.mark.parametrize("case", ["missing", "unreachable"])
@pytest.mark.parametrize("command", list(COMMANDS), ids=[" ".join(c) for c in COMMANDS])
def test_every_subcommand_says_what_is_missing_in_a_line_never_a_traceback(
        tmp_path: Path, mcp_gateway: Run, command: tuple[str, ...], case: str) -> None:
    config, port = unreadable_config(tmp_path, case)
    argv = argv_for(command, config)
    name = " ".join(command)
    if command == ("serve",):
        code, stderr = run_serve(argv, port, tmp_path)
        assert "Traceback" not in stderr, stderr
        if case == "unreachable":  # it serves, and says which sink it cannot write
            assert "postgres:audit_events" in stderr, stderr
        assert code is None or code != 0, stderr
        return
    done = mcp_gateway(*argv)
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0:
        assert name in SUCCEEDS, f"{name} succeeded against a config whose sinks are {case}: {done.stdout}"
        return
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, done.stderr
    if command[0] == "audit":  # the sink, and what is wrong with it
        sink = {"missing": f"audit sink sqlite:{tmp_path / 'nowhere' / 'audit.db'}: no such file",
                "unreachable": "audit sink postgres:audit_events: cannot connect to postgresql://127.0.0.1:"}[case]
        assert lines[0].startswith(f"mcp-gateway: {sink}"), done.stderr


# One command for each way `mcp-gateway` ends: (what ends it, its argv given a directory, its exit code).
ENDINGS: list[tuple[str, Callable[[Path], list[str]], int]] = [
    ("argparse refuses an argument", lambda d: [
        "serve", "--config", str(write_config(d, UPSTREAM_URL)), "--port", "http"], 2),
    ("a problem of the config", lambda d: [
        "check-config", "--config", str(write_config(d, UPSTREAM_URL, listen={"host": "127.0.0.1", "port": 0}))], 2),
    ("an error of the gateway's own", lambda d: [
        "audit", "query", "--config",
        str(write_config(d, UPSTREAM_URL, audit={"sinks": [{"type": "sqlite", "path": str(d / "none" / "a.db")}]}))],
     1),
    ("done", lambda d: ["check-config", "--config", str(write_config(d, UPSTREAM_URL))], 0),
]


@pytest.mark.parametrize(("argv", "code"), [(a, c) for _, a, c in ENDINGS], ids=[i for i, _, _ in ENDINGS])
def test_run_in_this_process_the_command_ends_as_the_real_one_does(
        tmp_path: Path, mcp_gateway: Run, argv: Callable[[Path], list[str]], code: int) -> None:
    real = real_mcp_gateway(*argv(tmp_path), home=tmp_path)
    assert (real.returncode, "Traceback" in real.stderr) == (code, False), real.stderr
    here = mcp_gateway(*argv(tmp_path))
    assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)


def test_a_command_run_in_this_process_leaves_logging_as_it_found_it(mcp_gateway: Run) -> None:
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    before = (root.handlers[:], root.level, httpx_logger.level)
    assert mcp_gateway("connect", "http://example.com").returncode == 1  # sets up its logging, then refuses
    assert (root.handlers, root.level, httpx_logger.level) == before


def write_sink(spec: AuditSink) -> None:
    """Create the sink as a gateway's writer does (its table, its file), with nothing in it."""
    async def create() -> None:
        sink = open_sink(spec)
        await sink.open()
        await sink.close()

    asyncio.run(create())


SINK_PROBLEMS = [
    ("sqlite file", lambda d, t: {"type": "sqlite", "path": str(d / "none" / "audit.db")},
     lambda d, t: f"audit sink sqlite:{d / 'none' / 'audit.db'}: no such file (nothing recorded yet?)"),
    ("jsonl file", lambda d, t: {"type": "jsonl", "path": str(d / "audit.jsonl")},
     lambda d, t: f"audit sink jsonl:{d / 'audit.jsonl'}: no such file (nothing recorded yet?)"),
    ("postgres table", lambda d, t: {"type": "postgres", "dsn": DSN, "table": t},
     lambda d, t: f"audit sink postgres:{t}: no table {t} in postgresql://127.0.0.1/test (nothing recorded yet?)"),
    ("postgres server", lambda d, t: {"type": "postgres", "dsn": "postgresql://me:pw@127.0.0.1:1/test", "table": t},
     lambda d, t: f"audit sink postgres:{t}: cannot connect to postgresql://***@127.0.0.1:1/test: connection refused"),
    # A / ? or # in a password that is not percent-encoded: neither the DSN shown nor why it failed holds a piece.
    *[(f"postgres password with {c}",
       lambda d, t, c=c: {"type": "postgres", "dsn": f"postgresql://me:S3{c}CR3T@127.0.0.1:1/test", "table": t},
       lambda d, t: f"audit sink postgres:{t}: cannot connect to postgresql://***@127.0.0.1:1/test: not a DSN "
                    "(percent-encode any / ? # or @ in the user name or password)")
      for c in "/?#"],
]


@pytest.mark.parametrize(("sink", "problem"), [(s, p) for _, s, p in SINK_PROBLEMS],
                         ids=[i for i, _, _ in SINK_PROBLEMS])
@pytest.mark.parametrize("action", ["query", "verify"])
def test_audit_commands_name_the_sink_and_what_is_wrong_with_it(
        tmp_path: Path, mcp_gateway: Run, pg_table: str, action: str, sink: Any, problem: Any) -> None:
    config = write_config(tmp_path, UPSTREAM_URL, audit={"sinks": [sink(tmp_path, pg_table)]})
    load_or_create_chain_key(tmp_path / "audit-chain.key")
    done = mcp_gateway("audit", action, "--config", str(config))
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"mcp-gateway: {problem(tmp_path, pg_table)}\n")


def test_an_empty_sink_is_no_problem(tmp_path: Path, mcp_gateway: Run) -> None:
    spec = {"type": "sqlite", "path": str(tmp_path / "audit.db")}
    config = write_config(tmp_path, UPSTREAM_URL, audit={"sinks": [spec]})
    write_sink(AuditSink.model_validate(spec))
    done = mcp_gateway("audit", "query", "--config", str(config))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == f"0 event(s) from sqlite:{tmp_path / 'audit.db'}"


# Upstream credentials from the environment: the test run's environment never has these.
SECRET_UPSTREAMS = [
    {"name": "remote", "path": "/mcp", "url": UPSTREAM_URL, "headers": {"X-Api-Key": "${MCPGW_TEST_KEY}"},
     "oauth": {"grant": "client_credentials", "token_url": "http://127.0.0.1:9/token", "client_id": "gateway",
               "client_secret": "${MCPGW_TEST_OAUTH_SECRET}"}},
    {"name": "local", "path": "/local", "command": [sys.executable, "-c", "pass"],
     "env": {"TOKEN": "${MCPGW_TEST_STDIO_TOKEN}"}},
]


def unset(config: Path) -> str:
    return (f"{config}: upstreams.0.headers.X-Api-Key: environment variable MCPGW_TEST_KEY is not set\n"
            f"{config}: upstreams.0.oauth.client_secret: environment variable MCPGW_TEST_OAUTH_SECRET is not set\n"
            f"{config}: upstreams.1.env.TOKEN: environment variable MCPGW_TEST_STDIO_TOKEN is not set\n")


# (command, reads the upstreams' credentials): those that do refuse, naming every variable; the others never ask.
NEEDS_SECRETS = [
    (["audit", "query"], False),
    (["audit", "verify"], False),
    (["issue-token", "--subject", "alice"], False),
    (["policy", "explain", "--method", "tools/list"], False),
    (["admin-login"], False),
    (["tools", "list", "--url", "http://127.0.0.1:1"], False),  # asks the gateway: unreachable, but not refused
    (["check-config"], True),
    (["serve"], True),
    (["tools", "list", "--live"], True),
    (["policy", "lint"], True),
]


@pytest.mark.parametrize(("command", "needs"), NEEDS_SECRETS, ids=[" ".join(c) for c, _ in NEEDS_SECRETS])
def test_only_what_talks_to_an_upstream_needs_its_secrets(
        tmp_path: Path, mcp_gateway: Run, command: list[str], needs: bool) -> None:
    config = ready_config(tmp_path, SECRET_UPSTREAMS)
    done = mcp_gateway(*command, "--config", str(config))
    if needs:
        assert (done.returncode, done.stderr) == (2, unset(config))
    else:
        assert "MCPGW_TEST" not in done.stderr, done.stderr
        assert done.returncode == (1 if command[0] == "tools" else 0), done.stderr
        assert "Traceback" not in done.stderr


def ready_config(directory: Path, upstreams: list[dict[str, Any]]) -> Path:
    """A config with `upstreams`, whose audit sink, signing key and chain key are there, as a gateway left them."""
    spec = {"type": "sqlite", "path": str(directory / "audit.db")}
    config = write_config(directory, UPSTREAM_URL, upstreams=upstreams, audit={"sinks": [spec]},
                          listen={"host": "127.0.0.1", "port": free_port()})
    write_sink(AuditSink.model_validate(spec))
    load_or_create_signing_key(directory / "key.pem")
    load_or_create_chain_key(directory / "audit-chain.key")
    return config


# An upstream's settings that are not credentials, from the environment: where it gets its token, who it is.
PLAIN_OAUTH_UPSTREAMS = [
    {"name": "remote", "path": "/mcp", "url": UPSTREAM_URL,
     "oauth": {"grant": "client_credentials", "token_url": "${MCPGW_TEST_TOKEN_URL}",
               "client_id": "${MCPGW_TEST_CLIENT_ID}", "client_secret": "s3cret"}},
]


@pytest.mark.parametrize("command", [c for c, _ in NEEDS_SECRETS], ids=[" ".join(c) for c, _ in NEEDS_SECRETS])
def test_a_variable_unset_outside_an_upstreams_credentials_is_a_config_problem_for_every_command(
        tmp_path: Path, mcp_gateway: Run, command: list[str]) -> None:
    config = ready_config(tmp_path, PLAIN_OAUTH_UPSTREAMS)
    done = mcp_gateway(*command, "--config", str(config))
    assert (done.returncode, done.stderr) == (2, (
        f"{config}: upstreams.0.oauth.client_id: environment variable MCPGW_TEST_CLIENT_ID is not set\n"
        f"{config}: upstreams.0.oauth.token_url: environment variable MCPGW_TEST_TOKEN_URL is not set\n"))


def test_a_config_loaded_without_upstream_secrets_refuses_to_reach_an_upstream(tmp_path: Path) -> None:
    from gateway.app import create_app
    from gateway.config import ConfigError, load_config

    config = write_config(tmp_path, UPSTREAM_URL, upstreams=SECRET_UPSTREAMS)
    loaded = load_config(config, env={}, upstream_secrets=False)
    assert loaded.upstreams[0].headers == {"X-Api-Key": ""}  # never the text of the reference
    with pytest.raises(ConfigError) as refused:
        create_app(loaded)
    assert "\n".join(refused.value.problems) + "\n" == unset(config)
    with pytest.raises(ConfigError):
        load_config(config, env={})


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1", "http"])
def test_serve_refuses_a_port_that_is_not_one(tmp_path: Path, mcp_gateway: Run, port: str) -> None:
    config = write_config(tmp_path, UPSTREAM_URL)
    done = mcp_gateway("serve", "--config", str(config), "--port", port)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"mcp-gateway serve: error: argument --port: {port} is not a port number (1 to 65535)")


@pytest.mark.parametrize("port", [99999, 0])
def test_the_config_refuses_a_listen_port_that_is_not_one(tmp_path: Path, mcp_gateway: Run, port: int) -> None:
    config = write_config(tmp_path, UPSTREAM_URL, listen={"host": "127.0.0.1", "port": port})
    done = mcp_gateway("check-config", "--config", str(config))
    assert (done.returncode, done.stderr) == (2, f"{config}: listen.port: {port} is not a port number (1 to 65535)\n")


@pytest.mark.parametrize("ttl", ["-5", "0", str(MAX_TOKEN_TTL_S + 1), "1h"])
def test_issue_token_refuses_a_lifetime_out_of_range(tmp_path: Path, mcp_gateway: Run, ttl: str) -> None:
    config = write_config(tmp_path, UPSTREAM_URL)
    load_or_create_signing_key(tmp_path / "key.pem")
    done = mcp_gateway("issue-token", "--config", str(config), "--subject", "alice", "--ttl", ttl)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == (
        f"mcp-gateway issue-token: error: argument --ttl: {ttl}: a token lives from 1 to {MAX_TOKEN_TTL_S} seconds "
        "(a day)")


@pytest.mark.parametrize("ttl", [1, 60, MAX_TOKEN_TTL_S])
def test_issue_token_signs_for_the_lifetime_asked(tmp_path: Path, mcp_gateway: Run, ttl: int) -> None:
    config = write_config(tmp_path, UPSTREAM_URL)
    key = load_or_create_signing_key(tmp_path / "key.pem")
    done = mcp_gateway("issue-token", "--config", str(config), "--subject", "alice", "--ttl", str(ttl))
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), key.public, algorithms=["ES256"], options={"verify_aud": False,
                                                                                       "verify_exp": False})
    assert claims["exp"] - claims["iat"] == ttl
