"""Lazy package exports: a package lists its public names and the submodule defining each; a name's module
is imported on first access. So `import rectiflow` (or `rectiflow.data`, ...) imports no torch and has no
side effects, and importing one submodule does not import its siblings.

    __getattr__, __all__ = lazy_exports(__name__, {"Pipeline": ".pipeline", ...})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """(module __getattr__, __all__) for `package`; `exports` maps each public name to its module, relative
    to the package (".pipeline", ".convert.transformer")."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
