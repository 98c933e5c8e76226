"""When a service the replicas share fails (issue 16, part 3): `mcp-gateway serve` replicas, each a process of its
own, fail closed while it is down and recover by themselves, with no restart, once it is back.

- The session store (a redis-server of the test's own, keeping its data on disk as a production Redis does,
  stopped and started again on the same port): a session or a token's revocation that cannot be checked is
  refused (503, -32054, saying why), audited, and /readyz says so, on every replica; rate limits follow
  `rate_limits_on_store_failure` (closed: refused the same way; open: let through, uncounted); once Redis is
  back every replica serves again, the session goes on and the revoked token stays revoked.
- The audit trail's PostgreSQL (behind a link the test cuts: the server gone, as its clients see it) under two
  replicas sharing one table: `fail_closed` refuses (503, -32053) on every replica while it is down; `buffer`
  keeps serving; either way every request is exactly one row once it is back, and the chains verify. And the
  connection lost just as a batch commits (the server has it, the gateway never hears so): written once, and
  the sink recovers.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.auth.secrets import hash_secret
from tests.harness import Recorder, ServerThread, build_server, free_port, write_config
from tests.test_faults import CuttableLink
from tests.test_replicas import (
    BOT_SECRET,
    DSN,
    Clients,
    Replica,
    audit_rows,
    audit_verify,
    chain_pid,
    drop_tables,
    forget_pins,
    open_session,
    poll,
    queue_depth,
    sse_result,
    subject,
    wait_listening,
)

UPSTREAM = f"demo-{uuid.uuid4().hex[:8]}"
STATE_UNAVAILABLE = {"code": -32054, "message": "Service unavailable: shared state unreachable"}


class PrivateRedis:
    """A redis-server of the test's own on a free 127.0.0.1 port, stopped and started again on that same port. It
    keeps its data on disk (append-only file, fsync on every write), as a production Redis does: what the gateway
    stored before it stopped (session bindings, revocations, rate-limit buckets) is there when it is back."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.process, log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def upstream() -> Iterator[tuple[ServerThread, Recorder]]:
    recorder = Recorder(build_server().streamable_http_app())
    server = ServerThread(recorder).start()
    yield server, recorder
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _forget_pins() -> Iterator[None]:
    yield
    forget_pins(UPSTREAM)  # those written through the shared Redis (the private ones go with their server)


@pytest.fixture
def tables() -> Iterator[dict[str, str]]:
    """This test's own PostgreSQL tables: the audit trail's and the role assignments'."""
    run = uuid.uuid4().hex[:8]
    names = {"audit": f"audit_f{run}", "roles": f"roles_f{run}"}
    yield names
    drop_tables(names["audit"], names["roles"], f"{names['roles']}_generation")


def replica_configs(directory: Path, upstream_url: str, variants: Mapping[str, Mapping[str, Any]],
                    **settings: Any) -> dict[str, Path]:
    """One config per replica in one directory (one signing key, one chain key, one policy): `settings` for all,
    and each replica's own `variants[name]` on top."""
    base = write_config(directory, upstream_url, public_url="http://127.0.0.1:8080",
                        upstream_options={"name": UPSTREAM},  # keys of this run's own for its tool pins
                        listen={"host": "127.0.0.1", "port": 8080}, policy_reload_interval_s=0, **settings)
    data = yaml.safe_load(base.read_text())
    configs = {}
    for name, variant in variants.items():
        configs[name] = directory / f"gateway-{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**data, **variant}))
    return configs


def start(configs: Mapping[str, Path]) -> list[Replica]:
    replicas = [Replica(name, config).start() for name, config in configs.items()]
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        stop(replicas)
        raise
    return replicas


def stop(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.stop()


def ready(replica: Replica) -> httpx.Response:
    return httpx.get(f"{replica.url}/readyz", timeout=5)


def rows_by_replica(table: str, replicas: list[Replica]) -> dict[str, list[dict[str, Any]]]:
    by_pid = {r.pid: r.name for r in replicas}
    found: dict[str, list[dict[str, Any]]] = {r.name: [] for r in replicas}
    for row in audit_rows(table):
        found[by_pid[chain_pid(row["chain"])]].append(row)
    return found


def one_row_per_request(table: str, replicas: list[Replica], clients: Mapping[str, Clients],
                        not_requests: tuple[str, ...] = ("tools/new",)) -> dict[str, list[dict[str, Any]]]:
    """Once every replica is ready and has written everything it held: each replica's chain holds exactly one row
    per request made to it (events of something else, `not_requests`, aside), each JSON-RPC request once under its
    own id. The rows, by replica."""
    poll(lambda: all(queue_depth(r) == 0 and ready(r).status_code == 200 for r in replicas), 15,
         "a replica never wrote what it held")
    rows = rows_by_replica(table, replicas)
    for replica in replicas:
        ledger = clients[replica.name].ledger
        mine = [r for r in rows[replica.name] if r["operation"] not in not_requests]
        assert len(mine) == ledger.requests, (replica.name, Counter((r["operation"], r["result"]) for r in mine))
        ids = Counter(r["request_id"] for r in mine if r["request_id"] is not None)
        assert set(ids) <= set(ledger.answered) and set(ids.values()) <= {1}, replica.name
        # (a request refused before its body was read, as a token is checked, is recorded without its id)
        assert {i for i, status in ledger.answered.items() if status == 200} <= set(ids), replica.name
    return rows


# ---- the session store -------------------------------------------------------------------------------------------

def test_redis_down_fails_session_and_revocation_checks_closed_on_every_replica_and_they_recover_by_themselves(
        tmp_path: Path, redis_server: PrivateRedis, upstream: tuple[ServerThread, Recorder],
        tables: dict[str, str]) -> None:
    server, recorder = upstream
    configs = replica_configs(
        tmp_path, f"{server.url}/mcp", {"a": {}, "b": {}},
        sessions={"backend": "redis", "url": redis_server.url},
        role_assignments={"backend": "postgres", "dsn": DSN, "table": tables["roles"]},  # the failure: the sessions'
        audit={"sinks": [{"type": "postgres", "dsn": DSN, "table": tables["audit"]}]},
        auth={"clients": {"signing_key_file": str(tmp_path / "key.pem"), "registered": [
            {"client_id": "ci-bot", "secret_hash": hash_secret(BOT_SECRET), "scopes": ["mcp:tools"]}]}})
    replicas = start(configs)
    a, b = replicas
    clients = {name: Clients.of(config) for name, config in configs.items()}
    try:
        ca, cb = clients["a"], clients["b"]
        alice = ca.token(subject("alice"))
        session = open_session(ca, a.mcp, alice)
        bot = [ca.request("POST", f"{a.url}/oauth/token", data={"grant_type": "client_credentials"},
                          auth=("ci-bot", BOT_SECRET)).json()["access_token"] for _ in range(2)]
        good, revoked = bot
        assert cb.request("POST", f"{b.url}/oauth/revoke", data={"token": revoked},
                          auth=("ci-bot", BOT_SECRET)).status_code == 200
        for replica in replicas:
            c = clients[replica.name]
            assert c.legacy(replica.mcp, alice, "tools/list", session=session).status_code == 200
            assert c.call(replica.mcp, good).status_code == 200
            assert c.call(replica.mcp, revoked).status_code == 401
        forwarded = len(recorder.requests)

        redis_server.stop()
        for replica in replicas:
            c = clients[replica.name]
            in_session = c.legacy(replica.mcp, alice, "tools/list", session=session)
            unchecked = c.call(replica.mcp, good)
            still_revoked = c.call(replica.mcp, revoked)  # not let through because its revocation cannot be read
            for refused in (in_session, unchecked, still_revoked):
                assert refused.status_code == 503, (replica.name, refused.text)
                assert refused.json()["error"] == STATE_UNAVAILABLE
            revoking = c.request("POST", f"{replica.url}/oauth/revoke", data={"token": good},
                                 auth=("ci-bot", BOT_SECRET))
            assert (revoking.status_code, revoking.json()["error"]) == (503, "temporarily_unavailable")
            readiness = ready(replica)
            assert readiness.status_code == 503 and readiness.json()["checks"]["session_store"] is False
        assert len(recorder.requests) == forwarded, "a request reached the upstream unchecked"

        redis_server.start()  # the same port, the same data; no replica is restarted
        for replica in replicas:
            poll(lambda r=replica: ready(r).status_code == 200, 15, f"replica {replica.name} never recovered")
        for replica in replicas:
            c = clients[replica.name]
            listed = c.legacy(replica.mcp, alice, "tools/list", session=session)  # the session goes on
            assert listed.status_code == 200 and sse_result(listed)["result"]["tools"]
            assert c.call(replica.mcp, good).status_code == 200
            assert c.call(replica.mcp, revoked).status_code == 401  # and the revoked token stays revoked
        assert all(r.process is not None and r.process.poll() is None for r in replicas)  # the same processes

        rows = one_row_per_request(tables["audit"], replicas, clients)
        for replica in replicas:
            outage = [r for r in rows[replica.name] if r["status"] == 503]
            assert len(outage) == 4, outage
            assert all(r["result"] == "error" and r["reason"].startswith("state_unavailable:") for r in outage)
        done = audit_verify(configs["a"])
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        stop(replicas)


def test_rate_limits_with_redis_down_follow_rate_limits_on_store_failure_and_count_again_once_it_is_back(
        tmp_path: Path, redis_server: PrivateRedis, upstream: tuple[ServerThread, Recorder],
        tables: dict[str, str]) -> None:
    """Two replicas, one `closed` (the default) and one `open`, sharing the Redis and one bucket. Their callers are
    anonymous (`auth.anonymous_role`): no token whose revocation must be read, so the rate limit is the one thing
    that needs Redis."""
    server, _ = upstream
    limit = 5
    configs = replica_configs(
        tmp_path, f"{server.url}/mcp", {"closed": {}, "open": {"rate_limits_on_store_failure": "open"}},
        sessions={"backend": "redis", "url": redis_server.url},
        role_assignments={"backend": "postgres", "dsn": DSN, "table": tables["roles"]},
        audit={"sinks": [{"type": "postgres", "dsn": DSN, "table": tables["audit"]}]},
        auth={"anonymous_role": "reader", "clients": {"signing_key_file": str(tmp_path / "key.pem")}},
        rate_limits=[{"id": "everyone", "match": {"any": True}, "per": "principal", "limit": f"{limit}/hour"}])
    replicas = start(configs)
    closed, opened = replicas
    clients = {name: Clients.of(config) for name, config in configs.items()}
    try:
        assert clients["closed"].call(closed.mcp, None).status_code == 200  # one token each from the one bucket
        assert clients["open"].call(opened.mcp, None).status_code == 200

        redis_server.stop()
        refused = clients["closed"].call(closed.mcp, None)
        assert refused.status_code == 503
        assert refused.json()["error"] == {**STATE_UNAVAILABLE, "message": f"{STATE_UNAVAILABLE['message']}: "
                                           "the rate limits cannot be counted"}
        let_through = [clients["open"].call(opened.mcp, None) for _ in range(limit + 2)]  # more than the limit
        assert [r.status_code for r in let_through] == [200] * (limit + 2)
        failures = {r.name: metric(r, "mcp_gateway_rate_limit_store_failures_total") for r in replicas}
        assert failures == {"closed": {'policy="closed"': 1.0}, "open": {'policy="open"': limit + 2.0}}

        redis_server.start()
        recovering: list[int] = []

        def counted_again() -> bool:
            recovering.append(clients["closed"].call(closed.mcp, None).status_code)
            return recovering[-1] == 200

        poll(counted_again, 15, "the closed replica never counted again")
        assert set(recovering[:-1]) <= {503}
        # counted again, in the one bucket: 2 taken before, 1 just now, and none while it was down
        after = [clients[r.name].call(r.mcp, None).status_code for r in (opened, closed, opened, closed)]
        assert after == [200, 200, 429, 429]

        rows = one_row_per_request(tables["audit"], replicas, clients)
        reasons = Counter((name, row["result"], row["reason"]) for name, mine in rows.items() for row in mine
                          if row["operation"] == "tools/call")
        assert reasons[("closed", "error", "rate_limit:store_unavailable")] == len(recovering)
        assert reasons[("open", "allowed", "role:reader:tool")] == 1 + limit + 2 + 1
        assert reasons[("open", "rate_limited", "rate_limit:everyone")] == 1
    finally:
        stop(replicas)


def metric(replica: Replica, name: str) -> dict[str, float]:
    """The samples of one counter family at `replica`: {labels: value}."""
    found = {}
    for line in httpx.get(f"{replica.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            found[labels] = float(value)
    return found


# ---- the audit trail's PostgreSQL --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fail_closed", "buffer"])
def test_postgres_down_under_two_replicas_sharing_the_table_holds_the_audit_mode_and_loses_nothing(
        tmp_path: Path, upstream: tuple[ServerThread, Recorder], tables: dict[str, str], mode: str) -> None:
    server, _ = upstream
    link = CuttableLink(("127.0.0.1", 5432))
    configs = replica_configs(
        tmp_path, f"{server.url}/mcp", {"a": {}, "b": {}},
        sessions={"backend": "redis", "url": "redis://127.0.0.1:6379/0"},
        role_assignments={"backend": "postgres", "dsn": DSN, "table": tables["roles"]},  # not behind the link
        audit={"sinks": [{"type": "postgres", "dsn": f"postgresql://127.0.0.1:{link.port}/test",
                          "table": tables["audit"]}], "on_sink_failure": mode, "write_timeout_s": 1})
    replicas = start(configs)
    clients = {name: Clients.of(config) for name, config in configs.items()}
    token = clients["a"].token(subject("alice"))  # one principal: the limit below is per principal
    try:
        for replica in replicas:
            assert clients[replica.name].call(replica.mcp, token).status_code == 200
        poll(lambda: all(queue_depth(r) == 0 for r in replicas), 10, "the first events were never written")

        link.cut()
        during: dict[str, list[int]] = {}
        for replica in replicas:
            c = clients[replica.name]
            if mode == "fail_closed":
                # A replica learns the sink is down from its next write: the answer waiting for it is withheld (503
                # after write_timeout_s), and from then on it refuses.
                statuses: list[int] = []

                def refusing(c: Clients = c, replica: Replica = replica, statuses: list[int] = statuses) -> bool:
                    answer = c.call(replica.mcp, token)
                    statuses.append(answer.status_code)
                    return answer.status_code == 503

                poll(refusing, 15, f"replica {replica.name} served while its audit trail could not record")
                refusals = [c.call(replica.mcp, token) for _ in range(3)]
                assert {r.status_code for r in refusals} == {503}
                assert refusals[0].json()["error"] == {"code": -32053,
                                                       "message": "Service unavailable: audit trail unavailable"}
                during[replica.name] = statuses + [r.status_code for r in refusals]
            else:
                during[replica.name] = [c.call(replica.mcp, token).status_code for _ in range(10)]
                assert during[replica.name] == [200] * 10, "buffer mode refused while the sink was down"
            poll(lambda r=replica: ready(r).json()["failing_sinks"] == [f"postgres:{tables['audit']}"], 10,
                 f"replica {replica.name} never reported its failing sink")
            readiness = ready(replica)
            # not ready in either mode (its sink is not writable), though under buffer it still takes requests
            assert readiness.status_code == 503
            assert readiness.json()["checks"]["audit_accepting"] is (mode == "buffer")

        link.mend()
        for replica in replicas:
            poll(lambda r=replica: clients[r.name].call(r.mcp, token).status_code == 200, 20,
                 f"replica {replica.name} never served again")
        rows = one_row_per_request(tables["audit"], replicas, clients)
        for replica in replicas:
            refused = [r for r in rows[replica.name] if r["reason"] == "audit_unavailable"]
            answered = clients[replica.name].ledger.answered  # id -> status, the recovery's probes included
            # on record as the upstream answered it; the client got 503 instead
            withheld = [r for r in rows[replica.name] if r["status"] == 200 and answered[r["request_id"]] == 503]
            assert len(withheld) == (mode == "fail_closed")
            assert len(refused) + len(withheld) == list(answered.values()).count(503) >= (4 if mode == "fail_closed"
                                                                                           else 0)
            assert all(r["status"] == 503 for r in refused)
        done = audit_verify(configs["a"])
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        stop(replicas)
        link.close()



class CommitAnswerLosingLink:
    """A TCP link to the PostgreSQL on 127.0.0.1:5432 that, once `armed`, passes the next COMMIT to the server,
    waits for the server's answer, and cuts the connection instead of passing that answer on: the transaction is
    committed, and the client cannot know it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.armed = False
        self.lost = threading.Event()  # an answer to COMMIT was lost
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", 5432))
            answered = threading.Event()
            eating = threading.Event()
            threading.Thread(target=self._up, args=(client, server, eating, answered), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, eating, answered), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, eating: threading.Event,
            answered: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    eating.set()
                    server.sendall(data)
                    answered.wait(10)  # the server has committed (and said so, to nobody)
                    self.lost.set()
                    break
                server.sendall(data)
        _close(client, server)

    @staticmethod
    def _down(server: socket.socket, client: socket.socket, eating: threading.Event,
              answered: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if eating.is_set():
                    answered.set()
                    continue
                client.sendall(data)
        _close(client, server)

    def close(self) -> None:
        self._listener.close()


def _close(*ends: socket.socket) -> None:
    for end in ends:
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


def test_a_batch_committed_as_the_connection_to_postgres_is_lost_is_written_once_and_the_sink_recovers(
        tmp_path: Path, upstream: tuple[ServerThread, Recorder], tables: dict[str, str]) -> None:
    """The writer tries a batch again until a write succeeds; a batch whose COMMIT went through while its answer
    was lost is already in the table, and a second COPY of it failed on its ids at every retry: the sink never
    recovered (fail_closed: every request refused from then on, until a restart that lost what was queued)."""
    server, _ = upstream
    link = CommitAnswerLosingLink()
    configs = replica_configs(
        tmp_path, f"{server.url}/mcp", {"a": {}},
        sessions={"backend": "redis", "url": "redis://127.0.0.1:6379/0"},
        role_assignments={"backend": "postgres", "dsn": DSN, "table": tables["roles"]},
        audit={"sinks": [{"type": "postgres", "dsn": f"postgresql://127.0.0.1:{link.port}/test",
                          "table": tables["audit"]}], "on_sink_failure": "fail_closed"})
    (replica,) = replicas = start(configs)
    clients = {"a": Clients.of(configs["a"])}
    token = clients["a"].token(subject("alice"))
    try:
        assert clients["a"].call(replica.mcp, token).status_code == 200
        poll(lambda: queue_depth(replica) == 0, 10, "the first event was never written")
        link.armed = True
        assert clients["a"].call(replica.mcp, token).status_code == 200  # its event's COMMIT answer is lost
        assert link.lost.wait(10), "no COMMIT went through the link"
        poll(lambda: clients["a"].call(replica.mcp, token).status_code == 200 and ready(replica).status_code == 200,
             10, "the sink never recovered from a commit whose answer was lost")
        one_row_per_request(tables["audit"], replicas, clients)
        done = audit_verify(configs["a"])
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        stop(replicas)
        link.close()
