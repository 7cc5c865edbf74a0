"""ExecuTorch backend for :func:`tadsr.runtime.runner.load_runner`: a ``.pte`` program, numpy in and out.

Uses ``executorch.runtime.Runtime`` (the pybind runtime shipped with the ``executorch`` wheel, which has the
XNNPACK delegate and the portable kernels registered). Programs lowered to the Core ML delegate run only
where that delegate is registered (Apple platforms); loading one elsewhere raises BackendUnavailableError.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.errors import BackendUnavailableError, InputError, RunnerError
from tadsr.runtime.runner import RunnerSpec, check_inputs

__all__ = ["ExecuTorchRunner", "spec_from_mapping"]

logger = logging.getLogger(__name__)


def spec_from_mapping(spec: Mapping[str, Any], fmt: str, precision: str | None = None) -> RunnerSpec:
    """A :class:`RunnerSpec` from a manifest (``{"graph": ..., "format": ...}``) or a ``GraphSpec.to_dict()``."""
    if "graph" in spec and isinstance(spec["graph"], Mapping):
        return RunnerSpec.from_manifest(spec)
    if "inputs" not in spec or "outputs" not in spec:
        raise InputError("spec must be an artifact manifest or a GraphSpec dict with 'inputs' and 'outputs'")
    return RunnerSpec.from_manifest({"graph": dict(spec), "format": fmt, "precision": precision or "fp32"})


def _model_path(path: Path, spec: Mapping[str, Any], suffix: str) -> Path:
    """The model file: ``path`` itself, or (for an artifact folder) the manifest's first file."""
    path = Path(path)
    if path.is_dir() and path.suffix != suffix:
        files = spec.get("files") if isinstance(spec, Mapping) else None
        if not files:
            raise InputError(f"{path} is a folder; pass the {suffix} file or the artifact manifest")
        path = path / files[0]["name"]
    if not path.exists():
        raise InputError(f"model file {path} does not exist")
    return path


class ExecuTorchRunner:
    """Run one method (``forward``) of a ``.pte`` program.

    Args:
        path: the ``.pte`` file, or an artifact folder (then ``spec`` is its manifest).
        spec: the artifact manifest or a ``GraphSpec.to_dict()`` (input/output names, shapes, dtypes).
        threads: size of the XNNPACK thread pool (process-wide; default: ExecuTorch's choice).
        backend: accepted for the loader contract (``"executorch"``).

    Raises:
        BackendUnavailableError: the ExecuTorch runtime is not installed, or the program needs a delegate
            that is not registered here (e.g. Core ML on Linux).
        InputError: unreadable program, or its input count differs from the spec.
    """

    backend = "executorch"

    def __init__(
        self, path: Path | str, spec: Mapping[str, Any], *, threads: int | None = None, backend: str | None = None
    ) -> None:
        try:
            from executorch.runtime import Runtime
        except ImportError as e:
            raise BackendUnavailableError("the ExecuTorch runtime is not installed: pip install executorch") from e
        self.spec = spec_from_mapping(spec, "executorch")
        self.path = _model_path(Path(path), spec, ".pte")
        if threads is not None:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))
        runtime = Runtime.get()
        try:
            program = runtime.load_program(self.path)
            self.method = program.load_method("forward")
        except RuntimeError as e:
            registered = set(runtime.backend_registry.registered_backend_names)
            if "CoreMLBackend" not in registered and b"CoreMLBackend" in self.path.read_bytes():
                raise BackendUnavailableError(
                    f"{self.path} uses the Core ML delegate, which this ExecuTorch runtime lacks (Apple only); "
                    "export with backend='xnnpack' to run it here"
                ) from e
            raise InputError(f"ExecuTorch cannot load {self.path}: {e}") from e
        n_in = self.method.metadata.num_inputs()
        if n_in != len(self.spec.inputs):
            raise InputError(f"{self.path} takes {n_in} inputs, its spec lists {self.spec.input_names}; re-export")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs`` (names, shapes, dtypes), execute once, return ``{output name: array}``."""
        import torch

        feeds = check_inputs(self.spec, inputs)
        outs = self.method.execute([torch.from_numpy(feeds[n]) for n in self.spec.input_names])
        if len(outs) != len(self.spec.outputs):
            raise RunnerError(f"{self.path} returned {len(outs)} outputs, expected {self.spec.output_names}; re-export it")
        return {t.name: np.array(o.numpy(), copy=True) for t, o in zip(self.spec.outputs, outs, strict=True)}
