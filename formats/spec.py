"""``FormatSpec``: what export, quantize, parity, bench and the CLI need to know about one phone format.

Each slice (``formats/<name>/__init__.py``) defines one ``SPEC``; :mod:`tadsr.formats.registry` lists them.
Hooks are ``"module:function"`` references, imported on first use (:meth:`FormatSpec.hook`), so reading the
registry imports no toolchain (coremltools, executorch, onnx).

Hook signatures:

* ``export``: ``(graph, spec, folder, *, precision, progress, **backend_options) -> BackendResult``.
* ``quantize``: ``(job: QuantizeJob) -> list[Path]``, the format's INT8 driver (``None``: no INT8 for it).
* ``localize``: ``(request: LocalizeRequest) -> LocalizeOutcome`` (:mod:`tadsr.formats.localize`).
* ``output_scale``: ``(model_file, output_name) -> (scale or None, where it was read)``, for INT8 files whose
  output quantization scale can be read from the file itself (``None``: the manifest must record it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tadsr.errors import ConfigError, ExportError

__all__ = ["FormatSpec", "QuantizeJob", "RunnerOptions"]

# (runner keyword options, the thread setting to record in a report) for a requested thread count
RunnerOptions = Callable[[int | None], tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class FormatSpec:
    """One phone format.

    Attributes:
        name: the format's name in manifests, artifact folder names and ``--format``.
        title: its name in prose (``"Core ML"``).
        suffix: the model file's suffix (``".onnx"``, ``".pte"``, ``".mlpackage"``; a package is a folder).
        export: ``"module:function"`` of the exporter.
        quantize: ``"module:function"`` of the INT8 driver, or None.
        localize: ``"module:function"`` of the per-layer diagnosis.
        output_scale: ``"module:function"`` reading an INT8 output's quantization scale from the file, or None.
        quantized_precisions: precisions the INT8 driver writes (``"int8"``, and ``"w8"`` for Core ML).
        threads: its runner takes a ``threads`` option (ONNX Runtime intra-op; not ExecuTorch, whose XNNPACK pool
            is process-wide and never resized at run time).
        runner_options: ``threads -> (runner options, thread setting to record)`` (bench).
        needs_macos: the real runtime runs only on macOS (elsewhere: the simulator, if any).
        simulator: the runner backend that stands in off macOS (``"coreml-sim"``), or None.
        exposes_latent: the runtime can read intermediate tensors of a file (the VQ latent / codes of a fused
            graph), so parity can judge VQ code flips inside it.
        job_graphs, job_precisions: what ``tadsr all`` exports for this format.
    """

    name: str
    title: str
    suffix: str
    export: str
    quantize: str | None
    localize: str
    runner_options: RunnerOptions
    output_scale: str | None = None
    quantized_precisions: tuple[str, ...] = ("int8",)
    threads: bool = True
    needs_macos: bool = False
    simulator: str | None = None
    exposes_latent: bool = False
    job_graphs: tuple[str, ...] = ("pipeline", "components")
    job_precisions: tuple[str, ...] = ("fp32",)

    def runner_kwargs(self, threads: int | None) -> dict[str, Any]:
        """The keyword options its runner takes for ``threads`` (none when unset or not settable)."""
        return {"threads": threads} if threads is not None and self.threads else {}

    def hook(self, which: str) -> Callable[..., Any]:
        """The function behind hook ``which`` (``"export"``, ``"quantize"``, ``"localize"``, ``"output_scale"``),
        imported now.

        Raises:
            ConfigError: the format has no such hook.
            ExportError: its module is not part of this installation, needs a package that is not installed,
                or lacks the function.
        """
        ref = getattr(self, which, None) if which in _HOOKS else None
        if not ref:
            raise ConfigError(f"the {self.name} format has no {which} step")
        module_name, fn_name = ref.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                raise ExportError(f"the {self.name} {which} step ({module_name}) is not part of this "
                                  "installation; use another format") from e  # fmt: skip
            raise ExportError(f"the {self.name} {which} step needs the package {e.name!r}, which is not installed "
                              f"(pip install {e.name})") from e  # fmt: skip
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ExportError(f"{module_name} does not define {fn_name}()")
        return fn


_HOOKS = ("export", "quantize", "localize", "output_scale")


class QuantizeJob(Protocol):
    """What a slice's INT8 driver (``FormatSpec.quantize``) gets from :func:`tadsr.quantize.api.quantize_artifact`:
    one fp32 artifact's graph, captures and settings, and the steps the orchestration owns (recipe search,
    writing and gating an artifact)."""

    graph: Any  # the export-ready torch graph
    spec: Any  # its GraphSpec
    calib: Any  # CalibrationSet (feeds per graph, info)
    hold: Any  # held-out CalibrationSet
    method: str
    target: float
    threads: int | None
    progress: bool
    work: Path  # scratch folder, removed after the job
    parent_outputs: list[dict[str, Any]]
    weight_only: bool  # also the weight-only variant, where the format has one (Core ML W8)
    hr_budget: float | None  # PSNR-Y vs HR the INT8 image may lose against fp32 (None: the PSNR floor alone)

    @property
    def name(self) -> str: ...

    @property
    def parent_file(self) -> Path: ...

    @property
    def ranges(self) -> dict[str, tuple[float, float] | None]: ...

    def entry(self, backend: str) -> Any: ...

    def hr(self) -> Any: ...  # the HRBudget of this graph, or None

    def meets(self, psnr: float, outputs: Sequence[Mapping[str, Any]]) -> tuple[bool, Any]: ...  # (ok, HRLoss | None)

    def entry_units(self, entry: Any, known: Mapping[str, Any], pinned: Mapping[str, str]) -> list[str]: ...

    def shipped_search(self, backend_key: str, units: Mapping[str, tuple[int, int]],
                       pinned: Mapping[str, str]) -> Any: ...  # (SearchResult, ranking) shipped for these conditions

    def search(self, run: Callable, units: Mapping[str, tuple[int, int]], pinned: Mapping[str, str],
               fp32_run: Callable[[Sequence[Mapping[str, Any]]], list], share: Sequence[str] | None = None,
               ) -> tuple[Any, list]: ...  # fmt: skip

    # a search another format of the run stored with the same ``share`` (None: search here)
    def shared_search(self, units: Mapping[str, tuple[int, int]], pinned: Mapping[str, str],
                      share: Sequence[str]) -> tuple[Any, list] | None: ...  # fmt: skip

    # the calibration range table (RangeTable.to_saved) another format's call recorded on the same ``share`` graph
    # and calibration patches (None: record it here), and storing it for the others
    def shared_ranges(self, share: Sequence[str], method: str) -> dict[str, Any] | None: ...

    def save_ranges(self, share: Sequence[str], method: str, ranges: dict[str, Any]) -> None: ...

    # ONNX Runtime calibration ranges shipped with the model for this exact key (None: calibrate here)
    def shipped_ranges(self, key: str) -> dict[str, Any] | None: ...

    # ``tap(onnx model) -> tensor names`` of its VQ lookup that a search run should also fetch, so that the written
    # file's flip-aware view needs no second run (None: nothing to tap, no VQ judge for this graph)
    def vq_taps(self) -> Callable[[Any], Sequence[str]] | None: ...

    def write(self, backend_key: str, precision: str, entry: Any, build: Callable[[Path], Any],
              fake_quant: Callable[[Sequence[Mapping[str, Any]]], list] | None) -> Path: ...  # fmt: skip
