"""The executor: :class:`SimProgram` runs a program's ops in order with the numpy kernels (see the package doc)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.errors import ConfigError, InputSpecError
from tadsr.runtime.coreml_sim.errors import PRECISIONS, CoreMLSimError, Precision, UnsupportedOpError
from tadsr.runtime.coreml_sim.kernels import KERNELS, Args
from tadsr.runtime.coreml_sim.kernels.base import as_dtype
from tadsr.runtime.coreml_sim.reader import Const, Op, Var, read_mlpackage
from tadsr.runtime.coreml_sim.report import OpReport, fp16_report
from tadsr.runtime.coreml_sim.trace import OpTrace

__all__ = ["SimProgram", "load_mlpackage"]

logger = logging.getLogger(__name__)


def _store(value: Any, var: Var, precision: str, op: Op) -> np.ndarray:
    """Round a kernel result to the op's declared output type (float16 stays float32 in ``"fp32"`` mode)."""
    arr = np.asarray(value)
    if var.dtype is not np.str_:
        arr = as_dtype(arr, np.float32 if precision == "fp32" and var.dtype is np.float16 else var.dtype)
    if var.shape is not None and arr.shape != var.shape:
        raise CoreMLSimError(
            f"{op.type} '{var.name}': computed shape {arr.shape} but the program declares {var.shape} "
            "(simulator bug or unsupported op variant)"
        )
    return arr


class SimProgram:
    """A Core ML ML program loaded for numpy execution; build it with :func:`load_mlpackage`."""

    def __init__(
        self,
        path: Path,
        inputs: list[Var],
        outputs: list[str],
        ops: list[Op],
        consts: dict,
        *,
        trace: OpTrace | None = None,
    ) -> None:
        """Check every op has a kernel and decompress the constexpr (compressed weight) ops once.

        ``trace`` (caller-owned, optional) records every op type this program executes, at load and per run.
        """
        self.path = path
        self.trace = trace
        self._inputs = inputs
        self._outputs = outputs
        self._consts = consts
        unknown = [op for op in ops if op.type not in KERNELS]
        if unknown:
            first = unknown[0]
            others = sorted({op.type for op in unknown} - {first.type})
            raise UnsupportedOpError(
                first.type, first.outputs[0].name, f"not in SUPPORTED_OPS{'; also ' + str(others) if others else ''}"
            )
        self._ops: list[Op] = []
        for op in ops:  # compile-time ops: decompress once, keep the declared (stored) dtype
            if op.type.startswith("constexpr_") and all(
                isinstance(b, Const) or b in consts for bs in op.inputs.values() for b in bs
            ):
                args = Args(op, self._lookup_const, round_fp16=False)
                self._consts[op.outputs[0].name] = _store(KERNELS[op.type](args), op.outputs[0], "as_written", op)
                self._record(op.type)
            else:
                self._ops.append(op)
        # after which op each variable is read for the last time (program outputs: never dropped)
        last: dict[str, int] = {}
        for i, op in enumerate(self._ops):
            for bs in op.inputs.values():
                last.update((b, i) for b in bs if isinstance(b, str))
        outputs = set(outputs)
        self._drop_after: list[list[str]] = [[] for _ in self._ops]
        for name, i in last.items():
            if name not in outputs and name not in consts:
                self._drop_after[i].append(name)

    def _record(self, op_type: str) -> None:
        if self.trace is not None:
            self.trace.record(op_type)

    def _lookup_const(self, binding: Any) -> Any:
        return binding.value if isinstance(binding, Const) else self._consts[binding]

    def constant(self, name: str) -> np.ndarray:
        """A constant of the program as stored (decompressed for constexpr ops), e.g. to inspect weights."""
        if name not in self._consts:
            raise KeyError(f"'{name}' is not a constant of {self.path.name}")
        return self._consts[name]

    @property
    def input_specs(self) -> dict[str, tuple[tuple[int, ...] | None, str]]:
        """Input name -> (shape, numpy dtype name)."""
        return {v.name: (v.shape, np.dtype(v.dtype).name) for v in self._inputs}

    @property
    def output_names(self) -> list[str]:
        """Names of the program outputs, in declaration order."""
        return list(self._outputs)

    @property
    def op_types(self) -> dict[str, int]:
        """Count of each executed op type (consts and decompressed constexpr ops excluded)."""
        counts: dict[str, int] = {}
        for op in self._ops:
            counts[op.type] = counts.get(op.type, 0) + 1
        return counts

    def _feeds(self, inputs: Mapping[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        expected = {v.name for v in self._inputs}
        if set(inputs) != expected:
            raise InputSpecError(
                f"{self.path.name}: inputs {sorted(inputs)} given, the program takes {sorted(expected)}"
            )
        feeds = {}
        for var in self._inputs:
            arr = np.asarray(inputs[var.name])
            if var.shape is not None and arr.shape != var.shape:
                raise InputSpecError(f"input '{var.name}': shape {arr.shape}, the program takes {var.shape}")
            arr = arr.astype(var.dtype)  # the model interface: fp16 inputs are rounded to fp16 in both modes
            feeds[var.name] = arr.astype(np.float32) if precision == "fp32" and arr.dtype == np.float16 else arr
        return feeds

    def execute(
        self,
        inputs: Mapping[str, np.ndarray],
        precision: str,
        observe: Callable[[Op, Args, tuple[Any, ...], list[np.ndarray], Callable[[Any], Any]], None] | None = None,
        *,
        keep_all: bool = True,
        keep: Callable[[str], bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run every op in order at ``precision``; return all variables (inputs and op outputs) by name.

        ``observe(op, args, raw results, stored results, lookup)`` is called after each op (fp16 report).
        ``keep_all=False`` drops each variable after the last op that reads it and returns the program outputs
        (and the variables no op reads): the memory of the live activations, not of every one (at official size
        every activation of a tile held at once is many GB); ``keep`` then also keeps the variables whose name
        it accepts.
        """
        env = self._feeds(inputs, precision)

        def lookup(binding: Any) -> Any:
            if isinstance(binding, Const):
                return binding.value
            if binding in env:
                return env[binding]
            if binding in self._consts:
                return self._consts[binding]
            raise CoreMLSimError(f"variable '{binding}' is used before it is defined")

        with np.errstate(all="ignore"):
            for i, op in enumerate(self._ops):
                round16 = (
                    precision == "as_written" and op.type != "cast" and any(v.dtype is np.float16 for v in op.outputs)
                )
                args = Args(op, lookup, round16)
                raw = KERNELS[op.type](args)
                self._record(op.type)
                raws = raw if isinstance(raw, tuple) else (raw,)
                if len(raws) != len(op.outputs):
                    raise CoreMLSimError(
                        f"{op.type} '{op.outputs[0].name}': {len(raws)} results, expected {len(op.outputs)}"
                    )
                stored = [_store(r, v, precision, op) for r, v in zip(raws, op.outputs, strict=True)]
                env.update((v.name, s) for v, s in zip(op.outputs, stored, strict=True))
                if observe is not None:
                    observe(op, args, raws, stored, lookup)
                if not keep_all:
                    del args, raw, raws, stored
                    for name in self._drop_after[i]:
                        if keep is None or not keep(name):
                            env.pop(name, None)
        return env

    @property
    def variable_names(self) -> list[str]:
        """Names of every variable the program computes (op outputs, in execution order)."""
        return [v.name for op in self._ops for v in op.outputs]

    def predict(
        self, inputs: Mapping[str, np.ndarray], *, precision: Precision = "as_written",
        intermediates: bool | Callable[[str], bool] = False,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Run the program.

        Args:
            inputs: input name -> array with the declared shape (cast to the declared dtype).
            precision: "as_written" (fp16 ops in fp16, see module docstring) or "fp32" (everything float32).
            intermediates: also return every op output (keyed by variable name), not just the program outputs;
                a function of the name: the op outputs it accepts (the others are dropped once read: memory).

        Returns:
            Output name -> array (float16 outputs stay float16 in "as_written", become float32 in "fp32").
        """
        if callable(intermediates):
            env = self.execute(inputs, precision, keep_all=False, keep=intermediates)
            return {k: v for k, v in env.items() if k in self._outputs or intermediates(k)}
        env = self.execute(inputs, precision, keep_all=intermediates)
        if intermediates:
            return env
        return {name: env[name] for name in self._outputs}

    def fp16_report(self, inputs: Mapping[str, np.ndarray]) -> list[OpReport]:
        """Per-op fp16 overflow and precision report, most severe first (see :func:`fp16_report`)."""
        return fp16_report(self, inputs)


def load_mlpackage(path: str | Path, *, function: str = "main", trace: OpTrace | None = None) -> SimProgram:
    """Load an ML program ``.mlpackage`` (spec + weight blobs) for numpy execution.

    Args:
        path: the ``.mlpackage`` directory written by ``MLModel.save``.
        function: the program function to run (multifunction packages have several).
        trace: optional caller-owned :class:`OpTrace` that records the op types the program executes.

    Raises:
        CoreMLSimError: the package is unreadable or not an ML program.
        UnsupportedOpError: the program contains an op this simulator does not implement.
    """
    path = Path(path)
    inputs, outputs, ops, consts = read_mlpackage(path, function)
    program = SimProgram(path, inputs, outputs, ops, consts, trace=trace)
    logger.info("coreml_sim: loaded %s (%d ops, %d constants)", path.name, sum(program.op_types.values()), len(consts))
    return program
