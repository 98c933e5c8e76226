"""Reading the gateway's YAML files and wording what is wrong with them.

Owns the `FILE: key.path: why` form of every problem in the config file and
the policy file, so both read the same way to the person fixing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ProblemsError(Exception):
    """Something a person must fix in a file. `problems` holds one `FILE: key.path: why` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class YamlFileError(ProblemsError):
    """A YAML file cannot be read or parsed."""


class StrictModel(BaseModel):
    """Base of every model read from YAML: unknown keys are errors (a typo must not be ignored), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: Path) -> tuple[Any, bytes]:
    """The parsed document and the raw bytes; YamlFileError naming the file (and line) on failure."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise YamlFileError([f"{path}: (file): cannot read: {exc.strerror or exc}"]) from None
    try:
        return yaml.safe_load(data), data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark is not None else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlFileError([f"{path}: {at}: invalid YAML: {problem}"]) from None


def format_validation(file: str, exc: ValidationError) -> list[str]:
    """One `FILE: key.path: why` line per pydantic error, worded for a person editing YAML."""
    errors = exc.errors()
    located = [tuple(e["loc"]) for e in errors]
    lines = []
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and any(other[: len(loc)] == loc and other != loc for other in located):
            continue  # a list emptied by its own invalid items: those items' errors say what is wrong
        path = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "too_short":
            message = f"needs at least {error.get('ctx', {}).get('min_length', 1)} item(s)"
        lines.append(f"{file}: {path}: {message}")
    return lines
