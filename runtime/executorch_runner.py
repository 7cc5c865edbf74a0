"""ExecuTorch backend for :func:`tadsr.runtime.runner.load_runner`: a ``.pte`` program, numpy in and out.

Uses ``executorch.runtime.Runtime`` (the pybind runtime shipped with the ``executorch`` wheel, which has the
XNNPACK delegate and the portable kernels registered). Programs lowered to the Core ML delegate run only
where that delegate is registered (Apple platforms); loading one elsewhere raises BackendUnavailableError.

Process-wide state: the XNNPACK thread pool belongs to the process and is sized once by ExecuTorch. The runner
never resizes it (resizing after a program is loaded can corrupt memory, and it would change every other
runner in the process): ``runner.threads`` is the pool size actually used, and a different ``threads`` request
only warns. Set the size before the process starts instead (a bench or app decides it, not a runner).

Quantized kernels: an INT8 program keeps ``quantized_decomposed`` ops outside the delegate; their kernels are
registered by importing ``executorch.kernels.quantized``, which the runner does when it is built (it imports
torch, as ``executorch.runtime`` does), so a fresh process that never exported anything can run the program.
"""

from __future__ import annotations

import logging
import warnings
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


def _load_quantized_kernels() -> str | None:
    """Register the ``quantized_decomposed`` kernels INT8 programs run outside their delegate (idempotent).

    Returns None when they are registered, else why not (only INT8 programs need them: the caller reports it
    when such a program fails to load).
    """
    try:
        import executorch.kernels.quantized  # noqa: F401  (loads its library into torch.ops; never raises)
        import torch
    except ImportError as e:
        return f"executorch.kernels.quantized cannot be imported ({e})"
    if not any("quantized_ops" in Path(lib).name for lib in torch.ops.loaded_libraries):
        return "executorch.kernels.quantized did not load its kernels library (libquantized_ops_aot_lib)"
    return None


def pool_threads() -> int | None:
    """The size of ExecuTorch's process-wide XNNPACK thread pool (None if this ExecuTorch cannot tell)."""
    return _pool_threads(None)


def _pool_threads(requested: int | None) -> int | None:
    """The XNNPACK pool's size (None if this ExecuTorch cannot tell); warn if ``requested`` differs. Never resizes."""
    from executorch.extension.pybindings import portable_lib

    count = getattr(portable_lib, "_threadpool_get_thread_count", None)
    size = int(count()) if count is not None else None
    if requested is not None and int(requested) != size:
        warnings.warn(
            f"ExecuTorch runner: threads={requested} requested, but the XNNPACK thread pool is process-wide and is "
            f"not resized at run time; it keeps {size if size is not None else 'its default'} threads",
            RuntimeWarning,
            stacklevel=3,
        )
    return size


class ExecuTorchRunner:
    """Run one method (``forward``) of a ``.pte`` program.

    Args:
        path: the ``.pte`` file, or an artifact folder (then ``spec`` is its manifest).
        spec: the artifact manifest or a ``GraphSpec.to_dict()`` (input/output names, shapes, dtypes).
        threads: the XNNPACK thread pool size wanted. The pool is process-wide and never resized here: when
            it differs from the pool's size a RuntimeWarning says so and the pool's size is used
            (``runner.threads``).
        backend: accepted for the loader contract (``"executorch"``).

    Raises:
        BackendUnavailableError: the ExecuTorch runtime is not installed, or the program needs a delegate
            that is not registered here (e.g. Core ML on Linux), or INT8 ops whose kernels library is missing.
        InputError: unreadable program, or its input count differs from the spec.

    Attributes:
        threads: the XNNPACK thread pool size actually used (None if this ExecuTorch cannot report it).
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
        quantized_missing = _load_quantized_kernels()
        self.threads = _pool_threads(threads)
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
            if quantized_missing and b"quantized_decomposed" in self.path.read_bytes():
                raise BackendUnavailableError(
                    f"{self.path} runs quantized_decomposed ops outside its delegate, but {quantized_missing}; "
                    "reinstall the executorch wheel"
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
