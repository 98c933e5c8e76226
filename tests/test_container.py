"""The container image, as its Dockerfile builds and runs it (issue 17).

There is no Docker daemon here, so the Dockerfile's steps run as a plain install: its instructions are read,
the files it COPYs to the configuration directory are laid out where it puts them (under a temporary root),
its data directory is made as its RUN makes it, its ENV is the environment, its CMD runs with the interpreter
that `make install` installed from the same lock, in a working directory nothing may be written to (a read-only
root filesystem), and its HEALTHCHECK is run against it. A client then uses the gateway as a user of the image
would: a token from `mcp-gateway issue-token` (as `docker exec` would run it), the official SDK client, an audit
query. What the gateway created is in the data directory alone, owner-only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from deploy.lock import LOCK, stale
from tests.harness import ROOT, free_port, wait_for_port

CONFIG_DIR, DATA_DIR = "/etc/mcp-gateway", "/var/lib/mcp-gateway"
MCP_GATEWAY = str(Path(sys.executable).with_name("mcp-gateway"))


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def arguments(instruction: str) -> list[list[str]]:
    return [_words(rest) for word, rest in instructions() if word == instruction]


def _words(rest: str) -> list[str]:
    if rest.startswith("["):  # exec form
        return list(json.loads(rest))
    return shlex.split(rest)


def environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for words in arguments("ENV"):
        env.update(word.split("=", 1) for word in words)  # type: ignore[arg-type]
    return env


def test_the_image_runs_as_a_numeric_unprivileged_user_with_its_data_on_a_volume_and_a_health_check() -> None:
    user = arguments("USER")[-1][0]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "USER must be a numeric non-root uid"
    assert arguments("VOLUME") == [[DATA_DIR]] and environment()["MCP_GATEWAY_DATA_DIR"] == DATA_DIR
    runs = " ".join(" ".join(words) for words in arguments("RUN"))
    assert f"install -d -o {user.split(':')[0]}" in runs and f"-m 0700 {DATA_DIR}" in runs
    assert "--require-hashes -r requirements.lock" in runs and "--no-deps --no-build-isolation ." in runs
    healthcheck = next(rest for word, rest in instructions() if word == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    entrypoint, cmd = arguments("ENTRYPOINT")[-1], arguments("CMD")[-1]
    assert entrypoint == ["mcp-gateway"] and cmd[:3] == ["serve", "--config", f"{CONFIG_DIR}/gateway.yaml"]
    ignored = (ROOT / ".dockerignore").read_text()
    assert "!requirements.lock" in ignored and ".venv" not in ignored.replace("*\n", "")  # all but what is copied


def test_the_lock_pins_every_runtime_dependency_with_its_hash_at_the_version_the_suite_runs() -> None:
    text = LOCK.read_text()
    assert stale(text) == [], "requirements.lock is stale: run `.venv/bin/python deploy/lock.py`"
    blocks = text.split("==")[1:]
    assert all("--hash=sha256:" in block for block in blocks), "a pin without a hash"


def lay_out(root: Path) -> tuple[Path, Path]:
    """The image's filesystem, as far as the gateway sees it: each COPY into the configuration directory, and
    the data directory its RUN makes (0700)."""
    for words in arguments("COPY"):
        source, target = words[-2], words[-1]
        if target.startswith(CONFIG_DIR):
            placed = root / target.lstrip("/")
            placed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / source, placed)
    data = root / DATA_DIR.lstrip("/")
    data.mkdir(parents=True, mode=0o700)
    return root / CONFIG_DIR.lstrip("/"), data


def listing(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*")}


async def test_the_images_steps_as_a_plain_install_serve_from_a_config_directory_and_a_data_volume(
        tmp_path: Path, demo_upstream: str) -> None:
    config_dir, data = lay_out(tmp_path / "root")
    workdir = tmp_path / "root" / "app"
    workdir.mkdir()
    for path in (config_dir, *config_dir.iterdir(), workdir):
        path.chmod(0o555 if path.is_dir() else 0o444)  # read only, as a ConfigMap and the root filesystem are
    before = listing(config_dir)
    port = free_port()
    env = {**os.environ, **environment(), "MCP_GATEWAY_DATA_DIR": str(data), "MCP_UPSTREAM_URL": demo_upstream,
           "MCP_GATEWAY_PUBLIC_URL": f"http://127.0.0.1:{port}", "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    cmd = [a.replace(CONFIG_DIR, str(config_dir)).replace("0.0.0.0", "127.0.0.1").replace("8080", str(port))
           for a in arguments("CMD")[-1]]
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen([MCP_GATEWAY, *cmd], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        healthcheck = next(rest for word, rest in instructions() if word == "HEALTHCHECK")
        probe = [w.replace("8080", str(port)) for w in _words(healthcheck.split(" CMD ", 1)[1])]
        deadline = time.monotonic() + 20
        while subprocess.run([sys.executable if w == "python" else w for w in probe], env=env).returncode != 0:
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.2)

        config = str(config_dir / "gateway.yaml")
        token = subprocess.run([MCP_GATEWAY, "issue-token", "--config", config, "--subject", "alice", "--scope",
                                "mcp:tools"], env=env, cwd=workdir, capture_output=True, text=True, check=True)
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token.stdout.strip()}"})
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as session:
            called = await session.call_tool("echo", {"text": "from the image"})
            assert called.content[0].text == "from the image"  # type: ignore[union-attr]
        query = subprocess.run([MCP_GATEWAY, "audit", "query", "--config", config, "--format", "json"], env=env,
                               cwd=workdir, capture_output=True, text=True)
        assert query.returncode == 0, query.stderr
        assert '"tool_executed": "echo"' in query.stdout or '"tool_executed":"echo"' in query.stdout
    finally:
        process.terminate()
        stopped = process.wait(30)
        log.close()
    assert stopped in (0, -15), (tmp_path / "gateway.log").read_text()  # uvicorn ends by the signal it handled
    assert listing(config_dir) == before, "the gateway wrote into its configuration directory"
    assert list(workdir.iterdir()) == [], "the gateway wrote into its working directory"
    created = listing(data)
    assert {"gateway-signing-key.pem", "audit-chain.key", "audit.db"} <= set(created)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert all(mode & 0o077 == 0 for mode in created.values()), f"open to others: {created}"
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()
