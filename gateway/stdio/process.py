"""One child process of a stdio upstream: started with only what it is configured with, spoken to in lines.

Owns the trust boundary around a program the gateway runs:

- its environment is the configured `env` plus a fixed minimum, `PATH` and
  `LANG` (the gateway's own, or `C.UTF-8`) and a private `HOME` and `TMPDIR`
  (a directory of its own, mode 0700, removed when it ends). Nothing else of
  the gateway's environment reaches it: not its secrets, not `AWS_*`;
- its resource limits (data size, CPU seconds, open files; set by `launch`
  before the server's own code runs) and, when the gateway runs as root, its
  user and group;
- its own session and process group, so that ending it ends everything it
  started: stdin closed, then SIGTERM to the group, then SIGKILL after a grace
  period. The launcher also asks the kernel to kill it if the gateway dies;
- stdin and stdout as newline-delimited JSON-RPC (the stdio transport), with a
  bounded line: a longer one is `LineTooLong`, never buffered without end;
- stderr into the gateway's log, one record per line, tagged with the upstream
  and the pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.exceptions import GatewayError

log = logging.getLogger("gateway.stdio")

_STDERR_LINE = 8192  # the longest stderr line logged whole; longer ones are cut


class LineTooLong(GatewayError):
    """The child wrote a line longer than the bound: the stream cannot be read on."""


class ChildGone(GatewayError):
    """The child's stdin is closed: it has exited, or is exiting."""


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """How to start one child of a stdio upstream."""

    upstream: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    memory_mb: int | None = None
    cpu_s: int | None = None
    open_files: int | None = None
    user: str | None = None
    group: str | None = None


def child_environment(spec: ProcessSpec, private_dir: Path,
                      gateway_env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The whole environment of a child: the fixed minimum, then the configured variables (which may replace
    any of it, PATH included)."""
    tmp = private_dir / "tmp"
    env = {
        "PATH": gateway_env.get("PATH", os.defpath),
        "LANG": gateway_env.get("LANG", "C.UTF-8"),
        "HOME": str(private_dir),
        "TMPDIR": str(tmp),
    }
    env.update(spec.env)
    return env


def launcher_argv(spec: ProcessSpec) -> list[str]:
    """The argv that sets the limits and then runs the configured command (never through a shell)."""
    # -I: isolated, so nothing in the child's working directory or environment can stand in for the launcher
    # (which may run as root until it drops to the configured user)
    argv = [sys.executable, "-I", "-m", "gateway.stdio.launch"]
    if spec.memory_mb is not None:
        argv += ["--data", str(spec.memory_mb * 1024 * 1024)]
    if spec.cpu_s is not None:
        argv += ["--cpu", str(spec.cpu_s)]
    if spec.open_files is not None:
        argv += ["--nofile", str(spec.open_files)]
    if spec.user is not None:
        argv += ["--user", spec.user]
    if spec.group is not None:
        argv += ["--group", spec.group]
    return [*argv, "--", *spec.command]


class ChildProcess:
    """A running child: write a line, read a line, stop it."""

    def __init__(self, spec: ProcessSpec, process: asyncio.subprocess.Process, private_dir: Path) -> None:
        self.spec = spec
        self._process = process
        self._private_dir = private_dir
        self.pid = process.pid
        self._stderr = asyncio.get_running_loop().create_task(self._log_stderr())

    @classmethod
    async def start(cls, spec: ProcessSpec, *, max_line_bytes: int) -> ChildProcess:
        """Start the child; raises OSError when the launcher itself cannot start."""
        private_dir = Path(tempfile.mkdtemp(prefix=f"mcp-gateway-{spec.upstream}-"))
        try:
            (private_dir / "tmp").mkdir(mode=0o700)
            process = await asyncio.create_subprocess_exec(
                *launcher_argv(spec),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=child_environment(spec, private_dir), cwd=spec.cwd, start_new_session=True,
                limit=max_line_bytes + 1, close_fds=True,
            )
        except BaseException:
            shutil.rmtree(private_dir, ignore_errors=True)
            raise
        return cls(spec, process, private_dir)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def send(self, line: bytes) -> None:
        """Write one message (a line without its newline)."""
        stdin = self._process.stdin
        assert stdin is not None
        if stdin.is_closing():
            raise ChildGone(f"{self.spec.upstream}[{self.pid}] stdin is closed")
        stdin.write(line + b"\n")
        try:
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChildGone(f"{self.spec.upstream}[{self.pid}] stdin is closed") from exc

    async def receive(self) -> bytes | None:
        """The next line the child wrote, without its newline; None when stdout has ended."""
        stdout = self._process.stdout
        assert stdout is not None
        try:
            line = await stdout.readuntil(b"\n")
        except asyncio.IncompleteReadError as partial:
            return partial.partial or None  # a last line without a newline still counts
        except asyncio.LimitOverrunError:
            raise LineTooLong(f"{self.spec.upstream}[{self.pid}] wrote a line over the limit") from None
        return line.rstrip(b"\r\n")

    async def wait(self) -> int:
        return await self._process.wait()

    async def stop(self, grace_s: float = 5.0) -> int | None:
        """End the child and everything it started: stdin closed, SIGTERM, then SIGKILL; its directory removed."""
        process = self._process
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            if process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), min(grace_s, 1.0))
            if process.returncode is None:
                self._signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), grace_s)
            self._signal(signal.SIGKILL)  # the group: whatever the child started and left behind
            await process.wait()
        finally:
            self._stderr.cancel()
            shutil.rmtree(self._private_dir, ignore_errors=True)
        return process.returncode

    def _signal(self, which: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, which)

    async def _log_stderr(self) -> None:
        stderr = self._process.stderr
        assert stderr is not None
        tag = {"upstream": self.spec.upstream, "pid": self.pid}
        while True:
            try:
                line = await stderr.readuntil(b"\n")
            except asyncio.IncompleteReadError as partial:
                line = partial.partial
                if line:
                    log.info("%s[%d]: %s", self.spec.upstream, self.pid, _text(line), extra=tag)
                return
            except asyncio.LimitOverrunError as over:
                line = await stderr.read(over.consumed)
            log.info("%s[%d]: %s", self.spec.upstream, self.pid, _text(line), extra=tag)


def _text(line: bytes) -> str:
    return line[:_STDERR_LINE].decode("utf-8", "replace").rstrip("\r\n")
