"""How a package `__init__` hands names on without importing what defines them until they are used.

`__getattr__ = names_from(__name__, {module: (name, ...)})` (PEP 562): importing a
small module of the package then loads no more than that module needs. Imports
nothing from the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def names_from(package: str, homes: Mapping[str, tuple[str, ...]]) -> Callable[[str], object]:
    """A module `__getattr__` that imports each name's defining module on first use."""
    home_of = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name: str) -> object:
        module = home_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
