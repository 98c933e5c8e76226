"""Upstreams that break HTTP/1.1: each break is a 502 for that request only, never an answer given to another.

The gateway runs as the reverse proxy in front of a scripted TCP upstream that answers the n-th request it reads
with the n-th reply. Alice's request meets the hostile reply; Bob's, sent next, must get his own answer whole.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import deploy, free_port
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_upstream_failures import _audit, _proxy_to

Reply = tuple[list[bytes], bool]  # the parts written (a pause between them), and whether the connection then closes


class SequencedUpstream:
    """A TCP upstream on 127.0.0.1 that answers the n-th request it reads, on any connection, with `replies[n]`."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.received: list[bytes] = []
        self.port = free_port()
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buffer = b""
        with conn:
            while True:
                try:
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    while len(buffer) < length:
                        buffer += conn.recv(65536)
                    body, buffer = buffer[:length], buffer[length:]
                    with self._lock:
                        self.received.append(head + b"\r\n\r\n" + body)
                        parts, close = self.replies.pop(0)
                    for index, part in enumerate(parts):
                        if index:
                            time.sleep(0.05)
                        conn.sendall(part)
                    if close:
                        return
                except OSError:
                    return

    def close(self) -> None:
        self._sock.close()


def answer(marker: str, request_id: int = 7) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id,
                       "result": {"tools": [{"name": "echo", "description": marker}]}}).encode()


def ok(marker: str, extra_head: bytes = b"") -> bytes:
    body = answer(marker)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra_head
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


ALICE = answer("ALICE")
HOSTILE: list[tuple[str, Reply, bool]] = [  # (case, Alice's reply, whether Alice gets her answer)
    ("100 Continue, then the answer", ([b"HTTP/1.1 100 Continue\r\n\r\n", ok("ALICE")], False), True),
    ("two 103 Early Hints, then the answer",
     ([b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n" + ok("ALICE")], False), True),
    ("101 Switching Protocols", ([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
                                  + ok("ALICE")], False), False),
    ("nine 1xx answers", ([b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + ok("ALICE")], False), False),
    ("a 1xx, then the connection closes", ([b"HTTP/1.1 100 Continue\r\n\r\n"], True), False),
    ("a 1xx with framing headers (found by the fuzzer)",
     ([b"HTTP/1.1 100 Continue\r\nTransfer-Encoding: 0\r\n\r\n" + ok("ALICE")], False), False),
    ("a chunked answer with trailer fields", ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n"
                                                % len(ALICE) + ALICE + b"\r\n0\r\nX-Trailer: t\r\n\r\n"], False),
     True),
    ("duplicate Content-Length", ([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n"
                                   % (len(ALICE), len(ALICE)) + ALICE], False), False),
    ("Content-Length and Transfer-Encoding", ([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: "
                                               b"chunked\r\n\r\n" % len(ALICE) + ALICE], False), False),
    ("a transfer coding other than chunked", ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + ALICE],
                                              True), False),
    ("obs-fold", ([ok("ALICE", b"X-Folded: a\r\n b\r\n")], False), False),
    ("bare LF line ends", ([ok("ALICE").replace(b"\r\n", b"\n")], False), False),
    ("a head over 16 KiB", ([ok("ALICE", b"X-Big: " + b"a" * 20000 + b"\r\n")], False), False),
    ("200,001 headers", ([ok("ALICE", b"X-A: b\r\n" * 200_001)], False), False),
    ("a body longer than declared", ([ok("ALICE") + b"FORGED"], False), False),
    ("a second answer nobody asked for", ([ok("ALICE") + ok("FORGED")], False), False),
    ("closed inside the body", ([ok("ALICE")[:-10]], True), False),
    ("a chunked body cut before its last chunk",
     ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(ALICE) + ALICE + b"\r\n"], True), False),
    ("garbage", ([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], False), False),
    ("a Content-Length that is not a number", ([b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n" + ALICE], False),
     False),
    ("a NUL in a header value", ([ok("ALICE", b"X-A: a\x00b\r\n")], False), False),
    ("a space before the colon", ([ok("ALICE", b"X-A : b\r\n")], False), False),
]


def _tools_list(url: str, app: Any, subject: str) -> httpx.Response:
    config = app.runtime.config
    token = app.runtime.authenticator.issue_token(subject=subject, audience=config.resource_url(config.upstreams[0]),
                                                  scopes=["mcp:tools"])
    headers, body = modern("tools/list")
    return httpx.post(f"{url}/mcp", headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"},
                      json=body, timeout=30)


@pytest.mark.parametrize(("case", "reply", "delivered"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_broken_answer_fails_only_its_own_request(tmp_path: Path, case: str, reply: Reply, delivered: bool) -> None:
    upstream = SequencedUpstream([reply, ([ok("BOB")], False)])
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp")
    try:
        alice = _tools_list(server.url, app, "alice")
        bob = _tools_list(server.url, app, "bob")
        if delivered:
            assert alice.status_code == 200 and alice.json()["result"]["tools"][0]["description"] == "ALICE"
        else:
            assert alice.status_code == 502, alice.text
            assert alice.json()["error"]["code"] == -32050 and b"ALICE" not in alice.content
        assert bob.status_code == 200
        assert bob.json()["result"]["tools"][0]["description"] == "BOB"
        assert b"ALICE" not in bob.content and b"FORGED" not in bob.content
        results = _audit(server, app)
        assert results[0].startswith("allowed:" if delivered else "upstream_error:upstream:") and \
            results[1].startswith("allowed:"), results
        assert len(upstream.received) == 2  # neither request was sent twice
    finally:
        server.stop()
        upstream.close()


def test_a_client_expecting_100_continue_gets_its_own_answer_and_the_upstream_never_sees_expect(
        tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, stateless=True, json_response=True)
    try:
        answers = {}
        for subject in ("alice", "bob", "alice", "bob"):
            headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": subject}})
            sent = {**BASE_HEADERS, **headers, "Authorization": f"Bearer {deployment.token(subject)}"}
            if subject == "alice":
                sent["Expect"] = "100-continue"
            response = httpx.post(deployment.url, headers=sent, json=body, timeout=30)
            assert response.status_code == 200
            answers.setdefault(subject, []).append(response.json()["result"]["content"][0]["text"])
        assert answers == {"alice": ["alice", "alice"], "bob": ["bob", "bob"]}
        assert not [r for r in deployment.recorder.requests if "expect" in r.headers]
    finally:
        deployment.stop()


@pytest.fixture
def many_headers_upstream() -> Iterator[SequencedUpstream]:
    reply = ok("ALICE", b"Connection: keep-alive, X-Hop\r\nX-Hop: secret-hop\r\nX-Kept: yes\r\n")
    upstream = SequencedUpstream([([reply], False)])
    yield upstream
    upstream.close()


def test_headers_the_connection_header_names_end_at_each_hop(tmp_path: Path,
                                                               many_headers_upstream: SequencedUpstream) -> None:
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{many_headers_upstream.port}/mcp")
    try:
        config = app.runtime.config
        token = app.runtime.authenticator.issue_token(subject="alice", scopes=["mcp:tools"],
                                                      audience=config.resource_url(config.upstreams[0]))
        headers, body = modern("tools/list")
        response = httpx.post(f"{server.url}/mcp", json=body, headers={
            **BASE_HEADERS, **headers, "Authorization": f"Bearer {token}", "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "for the gateway only", "X_Session": "underscored", "X-Client-Kept": "yes"})
        assert response.status_code == 200
        assert response.headers.get("x-kept") == "yes" and "x-hop" not in response.headers
        forwarded = many_headers_upstream.received[0].lower()
        assert b"x-client-kept: yes" in forwarded
        assert b"x-client-hop" not in forwarded and b"x_session" not in forwarded
    finally:
        server.stop()


def test_the_upstream_pool_is_capped_and_a_request_waits_then_fails_clearly(tmp_path: Path) -> None:
    release = threading.Event()
    holding = threading.Semaphore(0)

    class Held(SequencedUpstream):
        def _serve(self, conn: socket.socket) -> None:
            holding.release()  # a connection is open, its request unanswered
            release.wait(10)
            super()._serve(conn)

    upstream = Held([([ok("A")], False), ([ok("B")], False), ([ok("C")], False)])
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp",
                            limits={"upstream_max_connections": 2, "upstream_connect_timeout_s": 0.5,
                                    "max_body_bytes": 65536, "max_json_depth": 32})
    try:
        results: dict[str, httpx.Response] = {}
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, _tools_list(server.url, app, s)))
                   for s in ("a", "b")]
        for thread in threads:
            thread.start()
        assert holding.acquire(timeout=10) and holding.acquire(timeout=10)  # both hold a connection
        third = _tools_list(server.url, app, "c")
        assert third.status_code == 502 and third.json()["error"] == {
            "code": -32050, "message": "Upstream unavailable: busy"}
        release.set()
        for thread in threads:
            thread.join(10)
        assert {r.status_code for r in results.values()} == {200}
        assert "upstream_error:upstream:busy" in _audit(server, app)
    finally:
        release.set()
        server.stop()
        upstream.close()


def test_an_upstream_that_closes_right_after_answering_still_gets_the_next_request(tmp_path: Path) -> None:
    # Answers without "connection: close" and closes at once: a request written to the pooled connection as the
    # close arrives was never read, and goes out again on a fresh connection rather than being lost.
    upstream = SequencedUpstream([([ok(str(i))], True) for i in range(30)])
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp")
    try:
        for i in range(30):
            response = _tools_list(server.url, app, "alice")
            assert response.status_code == 200 and response.json()["result"]["tools"][0]["description"] == str(i)
    finally:
        server.stop()
        upstream.close()
