"""The first program a stdio upstream's child runs: set its resource limits, then become the server.

`python -m gateway.stdio.launch --data BYTES --cpu SECONDS --nofile N [--user U] [--group G] -- argv...`
sets RLIMIT_DATA, RLIMIT_CPU and RLIMIT_NOFILE on itself, drops to the user and
group when given (the gateway runs as root then), and `exec`s argv (found on the
PATH of the environment it was given). Limits are set here, in the child,
rather than with a `preexec_fn` in the gateway, which is unsafe in a process
with threads (the audit writer is one); `exec` keeps them, and the pid.
On Linux it also asks the kernel to kill it when the gateway dies, so that not
even a SIGKILL of the gateway leaves a server running without it.
RLIMIT_DATA rather than RLIMIT_AS bounds memory: JavaScript engines reserve
far more address space than they use, and would not start under an address
space limit of a few hundred megabytes.
"""

from __future__ import annotations

import argparse
import ctypes
import grp
import os
import pwd
import resource
import signal
import sys

_PR_SET_PDEATHSIG = 1
_LIMITS = {"data": resource.RLIMIT_DATA, "cpu": resource.RLIMIT_CPU, "nofile": resource.RLIMIT_NOFILE}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="gateway.stdio.launch")
    for name in _LIMITS:
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--user")
    parser.add_argument("--group")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    _die_with_parent()
    for name, which in _LIMITS.items():
        value = getattr(args, name)
        if value is not None:
            _, hard = resource.getrlimit(which)
            limit = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (limit, limit))
    _become(args.user, args.group)
    try:
        os.execvp(args.command[0], args.command)
    except OSError as exc:
        print(f"cannot start {args.command[0]}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(127) from None


def _become(user: str | None, group: str | None) -> None:
    """Drop root for the configured user and group (the group first, while it is still allowed)."""
    if group is not None or user is not None:
        gid = grp.getgrnam(group).gr_gid if group is not None else pwd.getpwnam(str(user)).pw_gid
        os.setgroups([])
        os.setgid(gid)
    if user is not None:
        os.setuid(pwd.getpwnam(user).pw_uid)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the gateway died before the request took effect
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
