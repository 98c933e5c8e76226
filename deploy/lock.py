"""Write `requirements.lock`: the gateway's runtime dependencies and its build backend, pinned, with hashes.

The lock is what the container image installs from (`pip install --require-hashes -r requirements.lock`, then
the gateway with `--no-deps --no-build-isolation`, built by the build backend pinned here too), and what
`make install` installs before the development tools, so the suite runs against the versions the image ships.
The runtime part is the closure of the `mcp-security-gateway` distribution as installed here: every requirement
of it, and of those, recursively, with the extras asked for and whose marker holds on the image's platform,
at the version installed; the build part is the version pip picks for pyproject.toml's build-system requires.
Each pin carries the sha256 of each file pip fetches for it for CPython 3.11 on x86-64 Linux (the image's).

    .venv/bin/python deploy/lock.py            # rewrite requirements.lock
    .venv/bin/python deploy/lock.py --check    # exit 1 if the installed versions differ from the lock
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PLATFORM = ("--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
            "--implementation", "cp", "--only-binary=:all:")


# The image's interpreter and platform: markers are evaluated for it, whatever machine writes the lock.
IMAGE = {"python_version": "3.11", "python_full_version": platform.python_version(),  # what `make install` ran
         "sys_platform": "linux", "os_name": "posix",
         "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
         "platform_python_implementation": "CPython"}


def closure(root: str = "mcp-security-gateway") -> dict[str, str]:
    """{canonical name: installed version} of every runtime dependency of `root`, recursively, with the extras
    each requirement asks for (pyjwt[crypto] brings cryptography)."""
    found: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        for line in metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({**IMAGE, "extra": extra})  # type: ignore[arg-type]
                                              for extra in ("", *extras)):
                continue  # an extra nobody asked for, or not on the image's platform
            found.setdefault(canonicalize_name(requirement.name), metadata.version(requirement.name))
            pending.append((requirement.name, frozenset(requirement.extras)))
    return dict(sorted(found.items()))


def build_requirements() -> list[Requirement]:
    """What pyproject.toml's build-system requires: the image builds the gateway with it, without isolation, so
    that it too comes from the lock."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return [Requirement(line) for line in tomllib.load(handle)["build-system"]["requires"]]


def newest(requirement: Requirement) -> str:
    """The version pip picks for `requirement` (a pure-Python build tool)."""
    with tempfile.TemporaryDirectory() as directory:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", directory,
                        str(requirement)], check=True, capture_output=True, text=True)
        return next(Path(directory).iterdir()).name.split("-")[1]


def hashes(name: str, version: str) -> list[str]:
    """sha256 of the files pip downloads for name==version on the image's platform (a wheel, or the sdist)."""
    with tempfile.TemporaryDirectory() as directory:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", directory]
        done = subprocess.run([*command, *PLATFORM, f"{name}=={version}"], capture_output=True, text=True)
        if done.returncode != 0:  # pure-Python or sdist-only: any file of that version
            subprocess.run([*command, f"{name}=={version}"], check=True, capture_output=True, text=True)
        out = subprocess.run([sys.executable, "-m", "pip", "hash", *map(str, Path(directory).iterdir())],
                             check=True, capture_output=True, text=True).stdout
    return sorted(line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("--hash="))


def pinned(text: str) -> dict[str, str]:
    """{canonical name: version} of a lock's `name==version` lines."""
    out = {}
    for line in text.splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split(" ", 1)[0].split("==")
            out[canonicalize_name(name)] = version
    return out


def stale(text: str) -> list[str]:
    """Why the lock `text` is not what this environment runs and builds with ([] when it is)."""
    locked, why = pinned(text), []
    for requirement in build_requirements():
        version = locked.pop(canonicalize_name(requirement.name), None)
        if version is None or version not in requirement.specifier:
            why.append(f"the build requirement {requirement} is not pinned")
    installed = closure()
    if locked != installed:
        why.append(f"pins differ from the installed runtime dependencies: "
                   f"{sorted(set(locked.items()) ^ set(installed.items()))}")
    return why


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare the installed versions with the lock")
    args = parser.parse_args()
    if args.check:
        if why := stale(LOCK.read_text()):
            sys.exit("requirements.lock: " + "; ".join(why))
        print("requirements.lock: as installed")
        return
    installed, build = closure(), build_requirements()
    lines = ["# The gateway's runtime dependencies, pinned with their hashes: written by deploy/lock.py, installed",
             "# by the Dockerfile (--require-hashes) and by `make install`. Regenerate after changing pyproject.toml."]
    pins = {**installed, **{canonicalize_name(r.name): newest(r) for r in build}}
    for name, version in sorted(pins.items()):
        lines.append(f"{name}=={version} \\")
        lines += [f"    --hash={digest} \\" for digest in hashes(name, version)]
        lines[-1] = lines[-1].removesuffix(" \\")
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"wrote {LOCK} ({len(pins)} pins)")


if __name__ == "__main__":
    main()
