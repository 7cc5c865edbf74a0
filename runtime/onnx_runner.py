"""ONNX Runtime backend for :func:`tadsr.runtime.runner.load_runner` (numpy in, numpy out)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.errors import BackendUnavailableError, InputError

__all__ = ["OnnxRunner"]

logger = logging.getLogger(__name__)


class OnnxRunner:
    """An ``onnxruntime.InferenceSession`` over the artifact's first file.

    Args:
        artifact_dir: artifact folder (files already verified by ``load_runner``).
        manifest: its manifest.
        providers: ORT execution providers (default ``["CPUExecutionProvider"]``).
        threads: intra-op threads (default: ORT's choice, all cores).
        low_memory: trade speed for peak memory: no CPU memory arena (buffers are freed after each run instead
            of being kept for reuse) and no weight pre-packing (MLAS otherwise keeps a second, re-laid-out copy
            of every conv / GEMM weight). For large models on phones / small machines (``tadsr upscale
            --low-memory``); ``benchmarks/runtime_bench.py`` measures both settings.
        backend: accepted for the loader contract ("onnx").
    """

    backend = "onnx"

    def __init__(
        self,
        artifact_dir: Path,
        manifest: dict[str, Any],
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        low_memory: bool = False,
        backend: str | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from e
        path = Path(artifact_dir) / manifest["files"][0]["name"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        if low_memory:
            opts.enable_cpu_mem_arena = False
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self.low_memory = bool(low_memory)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types; all mean "not loadable here"
            raise InputError(f"ONNX Runtime cannot load {path}: {e}") from e
        want = [d["name"] for d in manifest["graph"]["inputs"]]
        got = [i.name for i in self.session.get_inputs()]
        if got != want:
            raise InputError(f"{path} has inputs {got}, but its manifest says {want}; re-export the artifact")
        for d, i in zip(manifest["graph"]["inputs"], self.session.get_inputs(), strict=True):
            if len(i.shape) != len(d["shape"]) or any(
                isinstance(g, int) and g != int(w) for g, w in zip(i.shape, d["shape"], strict=False)
            ):
                raise InputError(f"{path} takes {d['name']!r} of shape {list(i.shape)}, but its manifest says "
                                 f"{list(d['shape'])}; re-export the artifact")  # fmt: skip
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session once; returns ``{output name: array}``."""
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))
