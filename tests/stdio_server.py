"""The tests' own stdio MCP server, for what the real peers cannot show: its own environment, state per
process, a crash, a flood, non-JSON output, a hang. Newline-delimited JSON-RPC on stdin/stdout, as the stdio
transport says; it speaks 2025-11-25 only (the gateway serves 2026-07-28 clients in front of it).

Tools: `env` (its environment, whole), `count` (a counter in this process), `pid`, `spawn` (starts a
`sleep` of its own and says its pid), `crash` (exits at once), `hang` (never answers) and `cancelled` (which
hung calls were cancelled), `progress` (reports progress under the caller's token),
`flood` (one line of N bytes), `garbage` (a line that is not JSON), `ask` (asks the
client to sample, then answers with what came back), `echo`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

TOOLS = ["env", "count", "pid", "spawn", "crash", "flood", "garbage", "hang", "cancelled", "progress", "ask", "echo"]
counter = 0
hung: list[Any] = []  # the ids of `hang` calls, as this process saw them
cancelled: list[Any] = []  # the request ids notifications/cancelled named, as this process saw them
waiting: dict[Any, Any] = {}  # our request id -> the client's request id it serves


def write(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def result(request_id: Any, value: dict[str, Any]) -> None:
    write({"jsonrpc": "2.0", "id": request_id, "result": value})


def text(request_id: Any, body: str) -> None:
    result(request_id, {"content": [{"type": "text", "text": body}], "isError": False})


def call(request_id: Any, name: str, arguments: dict[str, Any], meta: dict[str, Any]) -> None:
    global counter
    if name == "env":
        text(request_id, json.dumps(dict(os.environ)))
    elif name == "count":
        counter += 1
        text(request_id, str(counter))
    elif name == "pid":
        text(request_id, str(os.getpid()))
    elif name == "spawn":  # a process of its own, left running: ending the child must end it too
        sleeper = subprocess.Popen(["sleep", "300"])
        text(request_id, str(sleeper.pid))
    elif name == "crash":
        os._exit(3)
    elif name == "flood":
        sys.stdout.write("x" * int(arguments.get("bytes", 1 << 20)) + "\n")
        sys.stdout.flush()
    elif name == "garbage":
        sys.stdout.write("this is not json\n")
        sys.stdout.flush()
    elif name == "hang":
        hung.append(request_id)
    elif name == "cancelled":
        text(request_id, json.dumps({"hung": hung, "cancelled": cancelled}))
    elif name == "progress":  # two progress notifications under the caller's token, then the answer
        for done in (1, 2):
            write({"jsonrpc": "2.0", "method": "notifications/progress",
                   "params": {"progressToken": meta.get("progressToken"), "progress": done, "total": 2}})
        text(request_id, str(meta.get("progressToken")))
    elif name == "ask":
        asked = f"ask-{request_id}"
        waiting[asked] = request_id
        write({"jsonrpc": "2.0", "id": asked, "method": "sampling/createMessage",
               "params": {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}],
                          "maxTokens": 5}})
    else:
        text(request_id, json.dumps(arguments))


def main() -> None:
    for line in sys.stdin:
        message = json.loads(line)
        method, request_id = message.get("method"), message.get("id")
        if method is None and request_id in waiting:  # the client's answer to our sampling request
            answer = message.get("result") or message.get("error")
            text(waiting.pop(request_id), json.dumps(answer))
        elif method == "initialize":
            result(request_id, {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                                "serverInfo": {"name": "tests-stdio", "version": "1"}})
        elif method == "tools/list":
            result(request_id, {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in TOOLS]})
        elif method == "tools/call":
            params = message.get("params") or {}
            call(request_id, params.get("name", ""), params.get("arguments") or {}, params.get("_meta") or {})
        elif method == "notifications/cancelled":
            cancelled.append((message.get("params") or {}).get("requestId"))
        elif method == "ping":
            result(request_id, {})
        elif request_id is not None and method is not None:
            write({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}})


if __name__ == "__main__":
    main()
