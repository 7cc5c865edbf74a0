"""Artifact folders: what a backend exporter returns, the manifest, and atomic writing.

An artifact is a folder ``<out>/<graph>-<format>-<precision>-t<tile>/`` holding the model file(s) and a
``manifest.json`` that describes them (see :func:`build_manifest`). It is built in a hidden temp folder
next to its final place and renamed into place only after parity passed (:func:`staged_artifact`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BackendResult", "FORMATS"]

FORMATS = ("onnx", "coreml", "executorch")


@dataclass
class BackendResult:
    """What ``export_<backend>(graph, spec, out_dir, ...)`` wrote into ``out_dir``.

    Attributes:
        files: model file names relative to ``out_dir`` (a folder such as an ``.mlpackage`` counts as one
            entry); the first one is the file a runner loads.
        format: ``"onnx"``, ``"coreml"`` or ``"executorch"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        info: backend facts for the manifest (opset, simplified or not and why, partitions, ops outside
            delegates, layers kept in fp32, ...); JSON-serialisable.
        warnings: human-readable warnings (also logged), e.g. "onnxsim changed outputs; kept the plain file".
    """

    files: list[str]
    format: str
    precision: str
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
