"""README.md's "First five minutes", followed literally (issue 17).

Terminal 1 is `make demo`'s command (the Makefile's `demo` recipe, run as it is); terminal 2 is the section's
second shell block, run by bash in the repository with nothing of the virtualenv on PATH, as a new shell has.
Then the SDK client example of "A session through the gateway", run with that shell's token. Each line's
promise (the comment after it) is checked against what it printed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def demo_command() -> list[str]:
    """The Makefile's `demo` recipe, with $(BIN) the interpreter's directory."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo: .*\n\t(.+)$", makefile, re.M)
    assert recipe is not None, "no demo target in the Makefile"
    return recipe.group(1).replace("$(BIN)/python", sys.executable).split()


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def demo() -> Iterator[subprocess.Popen[str]]:
    if listening(8080) or listening(9000):
        pytest.fail("127.0.0.1:8080 or :9000 is taken: the demo needs both")
    process = subprocess.Popen(demo_command(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (listening(8080) and listening(9000)):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the demo never listened on 8080 and 9000"
            time.sleep(0.1)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as the demo says
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_the_first_five_minutes_work_as_written(demo: subprocess.Popen[str]) -> None:
    first_five = section("First five minutes")
    terminal_1, terminal_2, _inspector = blocks(first_five, "sh")
    assert terminal_1.split("#")[0].strip() == "make demo"
    sdk_example = blocks(section("A session through the gateway"), "python")[0]
    script = terminal_2 + '\necho "TOKEN=$TOKEN"\n'
    path = ":".join(p for p in os.environ["PATH"].split(":") if not p.startswith(str(ROOT)))
    shell = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PATH": path})
    out = shell.stdout
    assert shell.returncode == 0, shell.stdout + shell.stderr
    allowed, refused, *table = out.splitlines()
    assert '"text":"hello"' in allowed and '"result"' in allowed
    assert '"error"' in refused and '"code":-32602' in refused and "delete_file" in refused
    assert any("tools/call" in line and "allowed" in line for line in table)
    assert any("tools/call" in line and "denied" in line for line in table)
    token = out.rsplit("TOKEN=", 1)[1].strip()
    sdk = subprocess.run([sys.executable, "-c", sdk_example], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TOKEN": token})
    assert sdk.returncode == 0, sdk.stderr
    names, called, refusal = sdk.stdout.splitlines()[:3]
    assert "echo" in names and "delete_file" not in names
    assert "hi" in called and refusal.startswith("refused:")
    assert Path(ROOT / "examples" / "demo.py").exists()


def test_every_relative_link_and_path_in_the_readme_is_in_the_repository() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    relative = [link for link in links if "://" not in link]
    assert relative, "no relative link found: the pattern is wrong"
    missing = [link for link in relative if not (ROOT / link).resolve().is_relative_to(ROOT)
               or not (ROOT / link).exists()]
    assert missing == []
