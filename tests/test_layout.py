"""The package's layout, as its users and its readers rely on it.

Importing the policy loads no HTTP server, client or framework, and nothing of `gateway.auth`; a package
`__init__` hands its names on without importing them; every exception the package defines derives from
`GatewayError`, where the tree in `gateway.exceptions` draws it.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from types import ModuleType

import pytest

import gateway
from gateway import exceptions
from gateway.exceptions import GatewayError

SERVER_LIBRARIES = {"starlette", "httpx", "httptools", "uvicorn", "prometheus_client", "jwt", "redis"}


def imported_by(statement: str) -> set[str]:
    """Every module a fresh interpreter imports to run `statement`, as `-X importtime` reports them."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                         check=True)
    return {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}


def test_importing_the_policy_engine_loads_no_http_or_server_library() -> None:
    modules = imported_by("import gateway.policy.engine")
    assert "gateway.policy.engine" in modules
    assert {name.split(".")[0] for name in modules} & SERVER_LIBRARIES == set()


def test_the_policy_imports_nothing_from_auth() -> None:
    package = importlib.import_module("gateway.policy")
    policy = [f"gateway.policy.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    modules = imported_by("; ".join(f"import {name}" for name in policy))
    assert set(policy) <= modules
    assert {name for name in modules if name == "gateway.auth" or name.startswith("gateway.auth.")} == set()


@pytest.mark.parametrize("package", ["gateway", "gateway.auth", "gateway.audit"])
def test_a_package_hands_on_every_public_name_and_only_those(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError):
        _ = module.NoSuchName


def _defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class a module of the package defines, by name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        module: ModuleType = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[value.__name__] = value
    return found


def _tree() -> list[tuple[str, str | None, type[BaseException]]]:
    """(name, parent's name, class) for each line of the tree in `gateway.exceptions`' docstring."""
    drawn = []
    parents: list[str] = []
    for line in (exceptions.__doc__ or "").splitlines():
        match = re.match(r"^(?P<indent>[ |]*)[*+] (?P<name>\w+)(?: \.+ (?P<module>[\w.]+):)?", line)
        if match is None:
            continue
        depth = len(match["indent"]) // 2
        parents[depth:] = [match["name"]]
        home = f"gateway.{match['module']}" if match["module"] else "gateway.exceptions"
        drawn.append((match["name"], parents[depth - 1] if depth else None, getattr(
            importlib.import_module(home), match["name"])))
    return drawn


def test_every_exception_the_package_defines_is_drawn_in_the_tree_under_its_parent() -> None:
    tree = _tree()
    assert tree[0] == ("GatewayError", None, GatewayError)
    classes = {name: cls for name, _, cls in tree}
    for name, parent, cls in tree[1:]:
        assert parent is not None and classes[parent] in cls.__bases__, f"{name} is not drawn under its base"
    public = {name for name in _defined_exceptions() if not name.startswith("_")}
    assert public <= set(classes), f"not in the tree: {sorted(public - set(classes))}"
