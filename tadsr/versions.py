"""The one list of tools whose versions the toolkit records (artifact manifests, benchmark reports).

Versions come from the installed distributions' metadata: nothing is imported, so asking costs no torch or
toolchain import. Core, torch-free.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib import metadata

__all__ = ["BENCH_TOOLS", "EXPORT_TOOLS", "TOOLS", "tool_versions", "version"]

TOOLS: dict[str, str] = {
    "tadsr": "tadsr-mobile",
    "torch": "torch",
    "numpy": "numpy",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxsim": "onnxsim",
    "onnxscript": "onnxscript",
    "coremltools": "coremltools",
    "executorch": "executorch",
    "pillow": "pillow",
    "matplotlib": "matplotlib",
}
"""Every tool the toolkit may record: key -> distribution name (read-only by convention)."""

EXPORT_TOOLS = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxscript", "coremltools", "executorch", "tadsr")
"""The export toolchain, recorded in each artifact manifest's ``tool_versions`` (plus ``python``)."""

BENCH_TOOLS = ("tadsr", "torch", "numpy", "onnxruntime", "onnx", "executorch", "coremltools", "pillow", "matplotlib")
"""The libraries a benchmark depends on, recorded in its report's ``versions``."""


def version(tool: str) -> str | None:
    """Installed version of ``tool`` (a key of :data:`TOOLS` or a distribution name); None when not installed."""
    try:
        return metadata.version(TOOLS.get(tool, tool))
    except metadata.PackageNotFoundError:
        return None


def tool_versions(tools: Sequence[str] = EXPORT_TOOLS, *, python: bool = True,
                  keys: dict[str, str] | None = None) -> dict[str, str | None]:  # fmt: skip
    """``{key: version or None}`` for ``tools`` (keys of :data:`TOOLS`), in that order, plus ``python``.

    Args:
        tools: which tools.
        python: add the interpreter's version under ``"python"``.
        keys: rename keys in the result (e.g. ``{"tadsr": "tadsr-mobile"}``, the benchmark report's key).
    """
    rename = keys or {}
    out = {rename.get(t, t): version(t) for t in tools}
    if python:
        out["python"] = platform.python_version()
    return out
