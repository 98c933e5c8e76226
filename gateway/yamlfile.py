"""Reading the gateway's YAML files and wording what is wrong with them.

Owns the `FILE: key.path: why` form of every problem in the config file and
the policy file, so both read the same way to the person fixing them; and the
loader they are all read with (YAML's safe subset, a key given twice refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.exceptions import GatewayError


class ProblemsError(GatewayError):
    """Something a person must fix in a file. `problems` holds one `FILE: key.path: why` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class YamlFileError(ProblemsError):
    """A YAML file cannot be read or parsed."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping: PyYAML would keep the last one silently,
    so a second `bindings:` would replace the first without a word. Merge keys (`<<`) still work, and a key
    written beside a merge still overrides the merged one: only the keys a mapping writes itself must differ."""

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self._checked: set[yaml.MappingNode] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Every mapping comes here before its keys are constructed, and a merged mapping before its keys are
        # folded into another's: the first visit is the only one that sees the keys as written.
        if node not in self._checked:
            self._checked.add(node)
            self._refuse_repeated_keys(node)
        super().flatten_mapping(node)

    def _refuse_repeated_keys(self, node: yaml.MappingNode) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a collection as a key is refused as unhashable when the mapping is built
            key = self.construct_object(key_node)
            if key in first_line:  # read_yaml names the file and this key's line
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1


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
        loader = _UniqueKeyLoader(data)
        try:
            return loader.get_single_data(), data
        finally:
            loader.dispose()
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
