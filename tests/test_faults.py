"""Faults in what the gateway depends on: each fails closed with a clear answer, and recovers without a restart.

- Redis (the shared session store) stopped and started: sessions, tasks and revocations cannot be checked, so
  requests are refused 503 (JSON-RPC -32054), audited, and /readyz says so; served again once it is back.
- PostgreSQL (an audit sink) stopped and started, behind a link the test cuts: the audit modes hold
  (fail_closed refuses while it is down, buffer keeps serving) and no event is lost.
- A slowloris client: a head or a body trickled in is cut at its deadline, and others are served meanwhile.
- An upstream closing keep-alive connections at random: no request is lost.
- The IdP's JWKS or introspection endpoint slow, failing (500) or answering nonsense: a token that needs it is a
  401 within the fetch timeout (fail closed), the last good keys keep serving, and all is well once it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from gateway import create_app
from tests.harness import ServerThread, audit_events, deploy, free_port, wait_for_port, write_config
from tests.test_audit import DSN, call, read_all, verify
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_hostile_upstream import SequencedUpstream, _tools_list, ok
from tests.test_upstream_failures import _proxy_to


class RedisServer:
    """A redis-server of the test's own on a free loopback port, stopped and started at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_redis_stopped_is_a_503_for_every_request_and_started_again_serves_without_a_restart(
        tmp_path: Path, redis_server: RedisServer) -> None:
    deployment = deploy("proxy", tmp_path, sessions={"backend": "redis",
                                                     "url": f"redis://127.0.0.1:{redis_server.port}/0"})
    token = deployment.token()
    try:
        assert call(deployment.url, token).status_code == 200
        assert httpx.get(f"{deployment.gateway.url}/readyz").status_code == 200
        seen = len(deployment.recorder.requests)
        redis_server.stop()
        refused = [call(deployment.url, token) for _ in range(3)]
        assert {r.status_code for r in refused} == {503}
        assert refused[0].json()["error"] == {"code": -32054,
                                              "message": "Service unavailable: shared state unreachable"}
        assert len(deployment.recorder.requests) == seen  # nothing reached the upstream unchecked
        ready = httpx.get(f"{deployment.gateway.url}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["session_store"] is False
        assert ready.json()["checks"]["role_assignments"] is False  # the sessions' Redis holds them too

        redis_server.start()
        assert call(deployment.url, token).status_code == 200
        assert httpx.get(f"{deployment.gateway.url}/readyz").status_code == 200
        events = deployment.audit_events()
        assert [(e["result"], e["status"]) for e in events] == [
            ("allowed", 200), *[("error", 503)] * 3, ("allowed", 200)]
        assert all(e["reason"].startswith("state_unavailable:") for e in events[1:4])
    finally:
        deployment.stop()


def test_with_redis_stopped_the_token_endpoint_issues_nothing_and_says_why(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """A token the gateway cannot record as a token session (nor a one-time code it cannot claim) is not issued:
    503 temporarily_unavailable, audited, never a traceback."""
    from gateway.auth.secrets import hash_secret

    secret = "a-client-secret-long-enough"
    deployment = deploy("proxy", tmp_path, sessions={"backend": "redis",
                                                     "url": f"redis://127.0.0.1:{redis_server.port}/0"},
                        auth={"clients": {"signing_key_file": str(tmp_path / "key.pem"), "registered": [
                            {"client_id": "ci-bot", "secret_hash": hash_secret(secret), "scopes": ["mcp:tools"]}]}})
    url = f"{deployment.gateway.url}/oauth/token"
    form = {"grant_type": "client_credentials"}
    try:
        assert httpx.post(url, data=form, auth=("ci-bot", secret)).status_code == 200
        redis_server.stop()
        refused = httpx.post(url, data=form, auth=("ci-bot", secret))
        assert (refused.status_code, refused.json()["error"]) == (503, "temporarily_unavailable")
        redis_server.start()
        assert httpx.post(url, data=form, auth=("ci-bot", secret)).status_code == 200
        issued = [(e["result"], e["status"], e["reason"].split(":")[0]) for e in deployment.audit_events()
                  if e["operation"] == "oauth/token"]
        assert issued == [("allowed", 200, "token_issued"), ("error", 503, "state_unavailable"),
                          ("allowed", 200, "token_issued")]
    finally:
        deployment.stop()


class CuttableLink:
    """A TCP link on a free loopback port to `target`; `cut()` drops every connection and refuses new ones (the
    server stopped, as its clients see it), `mend()` lets them through again (started)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.down = False
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self._lock:
                self._pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.down = True
        with self._lock:
            for pair in self._pairs:
                for end in pair:
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)
            self._pairs.clear()

    def mend(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


@pytest.mark.parametrize("mode", ["fail_closed", "buffer"])
def test_postgres_stopped_and_started_loses_no_event(tmp_path: Path, mode: str) -> None:
    table = f"audit_{uuid.uuid4().hex[:10]}"
    link = CuttableLink(("127.0.0.1", 5432))
    deployment = deploy("proxy", tmp_path, audit={
        "sinks": [{"type": "sqlite", "path": str(tmp_path / "audit.db")},
                  {"type": "postgres", "dsn": f"postgresql://127.0.0.1:{link.port}/test", "table": table}],
        "on_sink_failure": mode, "write_timeout_s": 1})
    token = deployment.token()
    try:
        assert call(deployment.url, token).status_code == 200
        deployment.gateway.call(deployment.runtime.audit.flush())
        link.cut()
        statuses = []
        for _ in range(15):
            statuses.append(call(deployment.url, token).status_code)
            time.sleep(0.05)
        if mode == "fail_closed":
            assert 503 in statuses, "requests were served while the audit trail could not record them"
        else:
            assert set(statuses) == {200}
        link.mend()
        deadline = time.monotonic() + 20
        while call(deployment.url, token).status_code != 200 or deployment.runtime.audit.failing:
            assert time.monotonic() < deadline, "never recovered"
            time.sleep(0.1)
        sqlite_events, pg_events = read_all(deployment, 0), read_all(deployment, 1)
        assert sqlite_events == pg_events and len(pg_events) >= 1 + len(statuses) + 1
        assert all(line.endswith("chain intact") for line in verify(deployment))
    finally:
        deployment.stop()
        link.close()

        async def drop() -> None:
            conn = await asyncpg.connect(DSN)
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
            finally:
                await conn.close()

        asyncio.run(drop())


def test_a_slowloris_is_cut_at_its_deadlines_and_others_are_served_meanwhile(tmp_path: Path) -> None:
    from gateway.http_server import HeadDeadlineProtocol

    quick = type("QuickHeadDeadline", (HeadDeadlineProtocol,), {"head_timeout_s": 1.0})
    port = free_port()
    app = create_app(write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp",
                                  public_url=f"http://127.0.0.1:{port}",
                                  limits={"client_body_timeout_s": 1.0, "max_body_bytes": 65536,
                                          "max_json_depth": 32}))
    server = ServerThread(app, port, http=quick).start()
    config = app.runtime.config
    token = app.runtime.authenticator.issue_token(subject="alice", scopes=["mcp:tools"],
                                                  audience=config.resource_url(config.upstreams[0]))
    slow_heads = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    slow_body = socket.create_connection(("127.0.0.1", port))
    try:
        started = time.monotonic()
        for sock in slow_heads:
            sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
        slow_body.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
        cut_at: dict[int, float] = {}
        while len(cut_at) < len(slow_heads) and time.monotonic() - started < 8:
            for index, sock in enumerate(slow_heads):  # a byte every 0.2 s: uvicorn's keep-alive timer never fires
                if index not in cut_at and _closed_by_peer(sock):
                    cut_at[index] = time.monotonic() - started
            assert httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200  # others are served
            time.sleep(0.2)
        assert len(cut_at) == len(slow_heads), "a slow head kept its connection past the deadline"
        assert all(at >= 0.9 for at in cut_at.values()), cut_at  # not before the 1 s deadline (cut after it)
        slow_body.settimeout(3)
        answer = slow_body.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and b"-32600" in answer
        events = audit_events(server, app.runtime)
        assert [(e["result"], e["reason"], e["status"]) for e in events] == [
            ("invalid_request", "body_timeout", 408)]
    finally:
        for sock in [*slow_heads, slow_body]:
            sock.close()
        server.stop()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Send one more header byte; True once the gateway has closed the connection."""
    try:
        if sock.recv(1024) == b"":
            return True
    except BlockingIOError:
        pass
    except OSError:
        return True
    try:
        sock.send(b"X")
    except OSError:
        return True
    return False


def test_an_upstream_closing_keep_alive_connections_at_random_loses_no_request(tmp_path: Path) -> None:
    chance = random.Random(20261202)
    upstream = SequencedUpstream([([ok(str(i))], chance.random() < 0.5) for i in range(100)])
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp")
    try:
        answers = [_tools_list(server.url, app, "alice") for _ in range(100)]
        assert [a.status_code for a in answers] == [200] * 100
        assert [json.loads(a.content)["result"]["tools"][0]["description"] for a in answers] == \
            [str(i) for i in range(100)]
        assert len(upstream.received) == 100
    finally:
        server.stop()
        upstream.close()


class FlakyAuthServer:
    """An authorization server on 127.0.0.1 that can turn slow, failing or nonsensical: RFC 8414 metadata, a JWKS
    with one ES256 key, and RFC 7662 introspection answering every token `t-…` as active for `resource`."""

    def __init__(self, resource: str = "") -> None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        self.key = ec.generate_private_key(ec.SECP256R1())
        self.resource = resource
        self.mode = "sound"  # sound | slow | 500 | nonsense
        self.fetches = 0

        async def serve(request: Any) -> Response:
            self.fetches += 1
            if self.mode == "slow":
                await asyncio.sleep(8)  # past the gateway's 5 s JWKS timeout and the introspection timeout_s
            if self.mode == "500":
                return Response("upstream trouble", status_code=500)
            if self.mode == "nonsense":
                return Response(b"<html>maintenance</html>", media_type="application/json")
            path = request.url.path
            if path == "/.well-known/oauth-authorization-server":
                return JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})
            if path == "/jwks":
                import jwt as pyjwt

                jwk = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
                return JSONResponse({"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]})
            now = int(time.time())
            return JSONResponse({"active": True, "sub": "alice", "aud": self.resource, "scope": "mcp:tools",
                                 "iss": self.url, "exp": now + 600, "iat": now})

        self.server = ServerThread(Starlette(routes=[Route("/{path:path}", serve, methods=["GET", "POST"])])).start()
        self.url = self.server.url

    def jwt(self, audience: str, kid: str = "k1") -> str:
        import jwt as pyjwt

        now = int(time.time())
        return pyjwt.encode({"iss": self.url, "sub": "agent", "aud": audience, "exp": now + 600, "iat": now,
                             "scope": "mcp:tools"}, self.key, algorithm="ES256", headers={"kid": kid})


def _patient_call(url: str, token: str) -> httpx.Response:
    """A call whose client waits longer than the gateway's own timeouts, so the gateway's answer is what is seen."""
    headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "x"}})
    return httpx.post(url, json=body, timeout=15,
                      headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"})


@pytest.fixture
def flaky_idp() -> Iterator[FlakyAuthServer]:
    idp = FlakyAuthServer()
    yield idp
    idp.server.stop()


@pytest.mark.parametrize("fault", ["slow", "500", "nonsense"])
def test_a_jwks_endpoint_gone_slow_failing_or_nonsensical_keeps_the_last_keys_and_refuses_new_kids(
        tmp_path: Path, flaky_idp: FlakyAuthServer, fault: str) -> None:
    deployment = deploy("proxy", tmp_path, auth={"jwt": {"issuer": flaky_idp.url, "algorithms": ["ES256"],
                                                         "min_refresh_interval_s": 0},
                                                 "clients": {"signing_key_file": str(tmp_path / "key.pem")}})
    try:
        token = flaky_idp.jwt(deployment.url)
        assert call(deployment.url, token).status_code == 200  # the keys are fetched and cached
        flaky_idp.mode = fault
        started = time.monotonic()
        refused = _patient_call(deployment.url, flaky_idp.jwt(deployment.url, kid="rotated"))
        assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
        assert time.monotonic() - started < 7, "a slow IdP held the request past the 5 s fetch timeout"
        assert call(deployment.url, token).status_code == 200  # the last good keys stay in use
        assert deployment.audit_events()[-2]["result"] == "auth_failed"
        flaky_idp.mode = "sound"
        assert call(deployment.url, token).status_code == 200
    finally:
        deployment.stop()


@pytest.mark.parametrize("fault", ["slow", "500", "nonsense"])
def test_an_introspection_endpoint_gone_slow_failing_or_nonsensical_fails_closed_and_recovers(
        tmp_path: Path, flaky_idp: FlakyAuthServer, fault: str) -> None:
    deployment = deploy("proxy", tmp_path, auth={
        "clients": {"signing_key_file": str(tmp_path / "key.pem")},
        "introspection": {"url": f"{flaky_idp.url}/introspect", "client_id": "gateway", "client_secret": "s",
                          "cache_s": 0, "timeout_s": 1}})
    flaky_idp.resource = deployment.url
    try:
        assert call(deployment.url, "t-1").status_code == 200
        flaky_idp.mode = fault
        started = time.monotonic()
        refused = _patient_call(deployment.url, "t-2")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == -32001
        assert time.monotonic() - started < 4, "a slow introspection endpoint held the request past timeout_s"
        event = deployment.audit_events()[-1]
        assert (event["result"], event["reason"]) == ("auth_failed", "introspection_unavailable")
        flaky_idp.mode = "sound"
        assert call(deployment.url, "t-3").status_code == 200
    finally:
        deployment.stop()
