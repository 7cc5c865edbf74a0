"""Core ML backend for :func:`tadsr.runtime.runner.load_runner`: an ``.mlpackage``, numpy in and out.

On macOS the package runs in Core ML through ``coremltools`` (``MLModel.predict``). Elsewhere Core ML does not
exist; the runner then uses the numpy reference executor :mod:`tadsr.runtime.coreml_sim` (``"coreml-sim"``), which
reads the same file and models fp16 storage, so parity can be checked on Linux. It is a model of Core ML, not
Core ML: latency measured through it means nothing.

==============  ==========================================================================================
backend         behaviour
==============  ==========================================================================================
``"auto"``      Core ML on macOS, else ``coreml-sim`` (BackendUnavailableError if neither is available)
``"coreml"``    Core ML only (BackendUnavailableError off macOS)
``"coreml-sim"``  the numpy executor everywhere
==============  ==========================================================================================
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.errors import BackendUnavailableError, ConfigError, InputError, RunnerError
from tadsr.runtime.executorch_runner import _model_path, spec_from_mapping
from tadsr.runtime.runner import check_inputs

__all__ = ["CoreMLRunner", "COMPUTE_UNITS"]

logger = logging.getLogger(__name__)

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
_BACKENDS = ("auto", "coreml", "coreml-sim")


def _is_macos() -> bool:
    return platform.system() == "Darwin"


class CoreMLRunner:
    """Run an ML program package through Core ML (macOS) or the numpy simulator.

    Args:
        path: the ``.mlpackage`` folder, or an artifact folder (then ``spec`` is its manifest).
        spec: the artifact manifest or a ``GraphSpec.to_dict()``.
        backend: ``"auto"`` (default), ``"coreml"`` or ``"coreml-sim"``.
        compute_units: Core ML compute units (``"ALL"``, ``"CPU_ONLY"``, ``"CPU_AND_GPU"``, ``"CPU_AND_NE"``).
        sim_precision: simulator numerics, ``"as_written"`` (fp16 ops in fp16 storage) or ``"fp32"``.

    Raises:
        BackendUnavailableError: Core ML asked for off macOS, or no backend at all is available.
        ConfigError: unknown backend or compute units.
        InputError: the package does not exist or does not load.
    """

    def __init__(
        self,
        path: Path | str,
        spec: Mapping[str, Any],
        backend: str | None = "auto",
        *,
        compute_units: str = "ALL",
        sim_precision: str = "as_written",
    ) -> None:
        backend = backend or "auto"
        if backend not in _BACKENDS:
            raise ConfigError(f"Core ML backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
        if compute_units not in COMPUTE_UNITS:
            raise ConfigError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
        self.spec = spec_from_mapping(spec, "coreml")
        self.path = _model_path(Path(path), spec, ".mlpackage")
        self.sim_precision = sim_precision
        if backend == "coreml" or (backend == "auto" and _is_macos()):
            self._load_coreml(compute_units)
        else:
            self._load_sim()

    def _load_coreml(self, compute_units: str) -> None:
        if not _is_macos():
            raise BackendUnavailableError(
                f"Core ML runs only on macOS (this is {platform.system()}); use backend='coreml-sim' for the "
                "numpy reference executor, or run on a Mac"
            )
        try:
            import coremltools as ct
        except ImportError as e:
            raise BackendUnavailableError("coremltools is not installed: pip install coremltools") from e
        try:
            self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, compute_units))
        except Exception as e:  # Core ML compile/load errors have no common base
            raise InputError(f"Core ML cannot load {self.path}: {e}") from e
        self.backend = "coreml"
        self._predict = lambda feeds: self.model.predict(feeds)

    def _load_sim(self) -> None:
        try:
            from tadsr.runtime import coreml_sim
        except ImportError as e:
            raise BackendUnavailableError(
                f"Core ML runs only on macOS and the numpy simulator (tadsr.runtime.coreml_sim) is unavailable: {e}"
            ) from e
        self.program = coreml_sim.load_mlpackage(self.path)
        self.backend = "coreml-sim"
        self._predict = lambda feeds: self.program.predict(feeds, precision=self.sim_precision)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs`` (names, shapes, dtypes), predict once, return ``{output name: array}`` in spec dtypes."""
        feeds = check_inputs(self.spec, inputs)
        outs = self._predict(feeds)
        missing = [t.name for t in self.spec.outputs if t.name not in outs]
        if missing:
            raise RunnerError(f"{self.path} returned {sorted(outs)}, missing outputs {missing}")
        return {t.name: np.asarray(outs[t.name]).astype(t.dtype, copy=False) for t in self.spec.outputs}
