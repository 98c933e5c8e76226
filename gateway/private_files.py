"""The files the gateway creates for itself: owner-only.

Owns one rule: a directory the gateway makes for its own files (the data directory, an audit sink's, a key's)
is created 0700, each missing parent included, and a file it creates is 0600 from its first byte (created
with that mode, never chmod-ed after: another user could open it in between). A directory or file that
exists keeps its mode; replicas or workers creating the same directory at once all succeed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def private_directory(directory: Path) -> None:
    """`directory`, and each missing parent, created owner-only (0700); one that exists is left as it is."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:  # there already, or another worker or replica made it meanwhile
        return
    except FileNotFoundError:  # its parent is missing too
        private_directory(directory.parent)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)


def owner_only(path: str, flags: int) -> int:
    """`open(..., opener=owner_only)`: a file created 0600 (a file that exists keeps its mode)."""
    return os.open(path, flags, 0o600)
