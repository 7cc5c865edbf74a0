"""Lazy public names for a package ``__init__``: ``__getattr__, __dir__ = lazy_names(__name__, {name: module})``.

Importing the package then costs nothing; a name's module is imported on first use (PEP 562). Used by the packages
whose public names live in heavy modules (torch, toolchains): ``tadsr``, ``tadsr.parity``, ``tadsr.bench``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` resolving each ``name`` of ``table`` from ``table[name]``."""

    def __getattr__(name: str) -> Any:
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(mod), name)
        setattr(sys.modules[package], name, value)  # resolved once; later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
