"""Reference executor for Core ML ML programs (.mlpackage), in numpy, so Core ML files can be checked on Linux.

Core ML itself only runs on Apple platforms. This module reads the program that ``coremltools`` wrote (the
``Model`` protobuf plus the MIL blob file ``weights/weight.bin``) and runs its operations in order with numpy.

Numerics model (``precision``):

* ``"as_written"``: an op whose declared output type is fp16 reads its float inputs rounded to fp16, computes in
  float32 and rounds its result to fp16 (values above 65504 become inf). So matmul / conv / reductions /
  normalizations accumulate in float32, the accumulation Apple describes for fp16 on the GPU and Neural Engine.
  fp32 ops compute in float32.
* ``"fp32"``: every op computes and stores float32. Weights keep the values stored in the file, so the difference
  between the two modes is the cost of fp16 *activations*, and the difference between ``"fp32"`` and the torch
  reference is the cost of the conversion itself.

This is a model, not the device: Core ML may fuse ops, keep fp16 intermediates inside an op or pick other
summation orders. Compound ops here never overflow inside (see ``OpReport.max_intermediate`` for the risk).

Only numpy and coremltools' generated protobuf modules are used (coremltools' package ``__init__`` is not run, so
neither torch nor the converters are imported).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from tadsr.errors import BackendUnavailableError, ConfigError, InputSpecError, TadsrError

__all__ = [
    "SUPPORTED_OPS",
    "CoreMLSimError",
    "UnsupportedOpError",
    "OpReport",
    "SimProgram",
    "load_mlpackage",
    "fp16_report",
]

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
Precision = Literal["as_written", "fp32"]
_PRECISIONS = ("as_written", "fp32")


class CoreMLSimError(TadsrError):
    """A .mlpackage the simulator cannot read or run."""


class UnsupportedOpError(CoreMLSimError, NotImplementedError):
    """An operation (or an op feature) the simulator does not implement."""

    def __init__(self, op_type: str, output: str, detail: str = "") -> None:
        """Name the op type and its (first) output variable, plus what exactly is missing."""
        msg = f"coreml_sim does not implement op '{op_type}' (output '{output}')"
        msg += f": {detail}" if detail else "; add a kernel to runtime/coreml_sim.py (see SUPPORTED_OPS)"
        super().__init__(msg)
        self.op_type = op_type
        self.output = output


# --------------------------------------------------------------------------------------------- reading the file


def _proto_modules() -> tuple[ModuleType, ModuleType]:
    """Return coremltools' ``Model_pb2`` and ``MIL_pb2`` without running ``coremltools/__init__`` (imports torch)."""
    if "coremltools.proto.Model_pb2" in sys.modules:
        return sys.modules["coremltools.proto.Model_pb2"], sys.modules["coremltools.proto.MIL_pb2"]
    alias = "_tadsr_coremltools_proto"
    if alias not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or spec.origin is None:
            raise BackendUnavailableError("coremltools is not installed; `pip install coremltools==9.0`")
        proto_dir = Path(spec.origin).parent / "proto"
        pkg_spec = importlib.util.spec_from_file_location(
            alias, proto_dir / "__init__.py", submodule_search_locations=[str(proto_dir)]
        )
        assert pkg_spec is not None and pkg_spec.loader is not None
        module = importlib.util.module_from_spec(pkg_spec)
        sys.modules[alias] = module
        pkg_spec.loader.exec_module(module)
    pkg = sys.modules[alias]
    return pkg.Model_pb2, pkg.MIL_pb2


# MIL DataType enum value -> (numpy storage dtype, bits if sub-byte else 0, signed); see MIL.proto.
_MIL_DTYPES: dict[int, tuple[Any, int, bool]] = {
    1: (np.bool_, 0, False), 2: (np.str_, 0, False), 10: (np.float16, 0, True), 11: (np.float32, 0, True),
    12: (np.float64, 0, True), 21: (np.int8, 0, True), 22: (np.int16, 0, True), 23: (np.int32, 0, True),
    24: (np.int64, 0, True), 31: (np.uint8, 0, False), 32: (np.uint16, 0, False), 33: (np.uint32, 0, False),
    34: (np.uint64, 0, False), 25: (np.int8, 4, True), 35: (np.uint8, 4, False), 36: (np.uint8, 2, False),
    37: (np.uint8, 1, False), 38: (np.uint8, 6, False), 39: (np.uint8, 3, False),
}  # fmt: skip
# MILBlob BlobDataType (mlmodel/src/MILBlob/Blob/BlobDataType.hpp) -> MIL DataType enum value.
_BLOB_TO_MIL = {1: 10, 2: 11, 3: 31, 4: 21, 6: 22, 7: 32, 8: 25, 9: 37, 10: 36, 11: 35, 12: 39, 13: 38, 14: 23, 15: 33}
# MILBlob storage_header / blob_metadata (StorageFormat.hpp): both 64 bytes, little endian.
_HEADER = np.dtype([("count", "<u4"), ("version", "<u4"), ("reserved", "<u8", (7,))])
_META = np.dtype(
    [("sentinel", "<u4"), ("dtype", "<u4"), ("size", "<u8"), ("offset", "<u8"), ("padding_bits", "<u8"),
     ("reserved", "<u8", (4,))]
)  # fmt: skip
_SENTINEL = 0xDEADBEEF


def _unpack_bits(raw: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    """Sub-byte values packed LSB first (MILBlob SubByteTypes / coremltools pack_elements_into_bits)."""
    bits = np.unpackbits(np.ascontiguousarray(raw, dtype=np.uint8), bitorder="little")
    if bits.size < nbits * count:
        raise CoreMLSimError(f"packed data holds {bits.size} bits, {nbits * count} needed")
    vals = (bits[: nbits * count].reshape(count, nbits).astype(np.int16) << np.arange(nbits)).sum(1)
    if signed:
        vals = np.where(vals >= 1 << (nbits - 1), vals - (1 << nbits), vals)
    return vals.astype(np.int8 if signed else np.uint8)


class _BlobFile:
    """Reader for the MIL blob storage file (``weight.bin``), memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        header = self._mm[: _HEADER.itemsize].view(_HEADER)[0]
        if int(header["version"]) != 2:
            raise CoreMLSimError(f"{path}: blob storage version {int(header['version'])}, only version 2 is known")

    def read(self, offset: int, mil_dtype: int, count: int) -> np.ndarray:
        meta = self._mm[offset : offset + _META.itemsize].view(_META)[0]
        if int(meta["sentinel"]) != _SENTINEL:
            raise CoreMLSimError(f"{self.path}: no blob metadata at offset {offset} (bad sentinel)")
        blob_dtype = _BLOB_TO_MIL.get(int(meta["dtype"]))
        if blob_dtype != mil_dtype:
            raise CoreMLSimError(
                f"{self.path}@{offset}: blob dtype code {int(meta['dtype'])} does not match the declared MIL type "
                f"{mil_dtype}"
            )
        start, size = int(meta["offset"]), int(meta["size"])
        raw = self._mm[start : start + size]
        np_dtype, nbits, signed = _MIL_DTYPES[mil_dtype]
        if nbits:
            return _unpack_bits(raw, nbits, count, signed)
        out = np.asarray(raw).view(np_dtype)  # a read-only view into the memory map
        if out.size != count:
            raise CoreMLSimError(f"{self.path}@{offset}: blob holds {out.size} values, {count} expected")
        return out


@dataclass(frozen=True)
class _Var:
    name: str
    dtype: Any  # numpy scalar type; np.str_ for strings
    shape: tuple[int, ...] | None  # None when a dimension is not static
    mil_dtype: int


@dataclass
class _Op:
    type: str
    outputs: tuple[_Var, ...]
    inputs: dict[str, tuple[Any, ...]]  # each binding: a variable name (str) or a decoded constant (_Const)
    index: int


@dataclass(frozen=True)
class _Const:
    value: Any


def _tensor_type(vt: Any, where: str) -> tuple[Any, tuple[int, ...] | None, int]:
    kind = vt.WhichOneof("type")
    if kind != "tensorType":
        raise CoreMLSimError(f"{where}: value type '{kind}' (lists, dicts, states) is not supported")
    tt = vt.tensorType
    if tt.dataType not in _MIL_DTYPES:
        raise CoreMLSimError(f"{where}: MIL data type {tt.dataType} (e.g. bf16/fp8) is not supported")
    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions]
    shape = None if None in dims else tuple(int(d) for d in dims if d is not None)
    return _MIL_DTYPES[tt.dataType][0], shape, tt.dataType


class _Decoder:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.blobs: dict[str, _BlobFile] = {}

    def value(self, v: Any, where: str) -> Any:
        np_dtype, shape, mil = _tensor_type(v.type, where)
        if shape is None:
            raise CoreMLSimError(f"{where}: constant with a non-static shape")
        count = math.prod(shape)
        if v.WhichOneof("value") == "blobFileValue":
            fname = v.blobFileValue.fileName.replace("@model_path", str(self.model_dir))
            blob = self.blobs.get(fname)
            if blob is None:
                blob = self.blobs[fname] = _BlobFile(Path(fname))
            return blob.read(v.blobFileValue.offset, mil, count).reshape(shape)
        tv = v.immediateValue
        if tv.WhichOneof("value") != "tensor":
            raise CoreMLSimError(f"{where}: immediate value '{tv.WhichOneof('value')}' is not supported")
        t = tv.tensor
        which = t.WhichOneof("value")
        _, nbits, signed = _MIL_DTYPES[mil]
        if which == "bytes":
            raw = np.frombuffer(t.bytes.values, dtype=np.uint8)
            arr = _unpack_bits(raw, nbits, count, signed) if nbits else raw.view(np_dtype)
        elif which == "strings":
            vals = list(t.strings.values)
            return vals[0] if shape == () else np.array(vals, dtype=object).reshape(shape)
        else:
            arr = np.array(list(getattr(t, which).values)).astype(np_dtype)
        return arr.reshape(shape)


def _parse_program(model_file: Path, function: str) -> tuple[list[_Var], list[str], list[_Op], dict[str, Any]]:
    model_pb2, _ = _proto_modules()
    spec = model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    if spec.WhichOneof("Type") != "mlProgram":
        raise CoreMLSimError(f"{model_file}: not an ML program (type '{spec.WhichOneof('Type')}')")
    prog = spec.mlProgram
    if function not in prog.functions:
        raise CoreMLSimError(f"{model_file}: no function '{function}' (has {sorted(prog.functions)})")
    fn = prog.functions[function]
    block = fn.block_specializations[fn.opset]
    decoder = _Decoder(model_file.parent)
    inputs = [_Var(i.name, *_tensor_type(i.type, f"input '{i.name}'")) for i in fn.inputs]
    consts: dict[str, Any] = {}
    ops: list[_Op] = []
    for op_pb in block.operations:
        outs = tuple(_Var(o.name, *_tensor_type(o.type, f"{op_pb.type} '{o.name}'")) for o in op_pb.outputs)
        where = f"{op_pb.type} '{outs[0].name if outs else '?'}'"
        if op_pb.blocks:
            raise UnsupportedOpError(op_pb.type, outs[0].name, "control flow (nested blocks) is not supported")
        if op_pb.type == "const":
            consts[outs[0].name] = decoder.value(op_pb.attributes["val"], where)
            continue
        bindings: dict[str, tuple[Any, ...]] = {}
        for key, arg in op_pb.inputs.items():
            bindings[key] = tuple(
                b.name if b.WhichOneof("binding") == "name" else _Const(decoder.value(b.value, f"{where}.{key}"))
                for b in arg.arguments
            )
        for key, val in op_pb.attributes.items():  # constexpr ops keep their parameters as attributes
            if key != "name":
                bindings.setdefault(key, (_Const(decoder.value(val, f"{where}.{key}")),))
        ops.append(_Op(op_pb.type, outs, bindings, len(ops)))
    return inputs, list(block.outputs), ops, consts


# ------------------------------------------------------------------------------------------------ op arguments


class _Args:
    """Inputs of one op as the kernels see them: float tensors as float32 (rounded to fp16 first if asked)."""

    def __init__(self, op: _Op, lookup: Callable[[Any], Any], round_fp16: bool) -> None:
        self.op = op
        self._lookup = lookup
        self._round = round_fp16
        self.intermediate: float | None = None  # largest |partial sum| a naive fp16 kernel would hold

    def _prep(self, v: Any) -> Any:
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            if self._round and v.dtype != np.float16:
                v = v.astype(np.float16)
            return v.astype(np.float32)
        return v

    def has(self, key: str) -> bool:
        return key in self.op.inputs

    def __getitem__(self, key: str) -> Any:
        if key not in self.op.inputs:
            raise CoreMLSimError(f"{self.op.type} '{self.op.outputs[0].name}': required input '{key}' missing")
        return self._prep(self._lookup(self.op.inputs[key][0]))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.op.inputs else default

    def many(self, key: str) -> list[Any]:
        return [self._prep(self._lookup(b)) for b in self.op.inputs[key]]

    def py(self, key: str, default: Any = None) -> Any:
        """A (const) parameter as a python scalar, list or string, with its declared precision (never rounded)."""
        v = self._lookup(self.op.inputs[key][0]) if key in self.op.inputs else default
        return v.tolist() if isinstance(v, np.ndarray | np.generic) else v

    def note(self, magnitude: Any) -> None:
        m = float(np.max(np.abs(magnitude), initial=0.0))
        self.intermediate = m if self.intermediate is None else max(self.intermediate, m)

    def unsupported(self, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.op.type, self.op.outputs[0].name, detail)


_KERNELS: dict[str, Callable[[_Args], Any]] = {}
EXECUTED_OPS: set[str] = set()
"""Op types this process has executed (constexpr ops included): the tests check it covers ``SUPPORTED_OPS``."""


def _kernel(*names: str) -> Callable[[Callable[[_Args], Any]], Callable[[_Args], Any]]:
    def register(fn: Callable[[_Args], Any]) -> Callable[[_Args], Any]:
        for name in names:
            _KERNELS[name] = fn
        return fn

    return register


def _axes(a: _Args, rank: int, key: str = "axes") -> tuple[int, ...] | None:
    ax = a.py(key)
    if ax is None:
        return None
    ax = [ax] if isinstance(ax, int) else ax
    return tuple(sorted(int(i) % rank for i in ax))


def _per_axis(v: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """Broadcast a scalar / per-axis vector (quantization scale, zero point) against a rank-``rank`` tensor."""
    v = np.asarray(v)
    if v.ndim == 0 or v.ndim == rank:
        return v
    shape = [1] * rank
    shape[(axis if axis is not None else 0) % rank] = v.size
    return v.reshape(shape)


# ------------------------------------------------------------------------------------------------ elementwise

_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh, "ceil": np.ceil,
    "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2, "floor": np.floor, "round": np.round,
    "sign": np.sign, "sin": np.sin, "sinh": np.sinh, "sqrt": np.sqrt, "square": np.square, "tan": np.tan,
    "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
    "softplus": lambda x: np.logaddexp(0, x), "softsign": lambda x: x / (1 + np.abs(x)),
    "logical_not": np.logical_not, "identity": lambda x: x, "erf": lambda x: _erf(x),
}  # fmt: skip
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod, "equal": np.equal,
    "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal, "greater": np.greater,
    "greater_equal": np.greater_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}  # fmt: skip

_erf_f64 = np.frompyfunc(math.erf, 1, 1)


def _erf(x: np.ndarray) -> np.ndarray:
    """Error function in float64 (numpy has none; math.erf is exact to double precision)."""
    x = np.asarray(x)
    return np.asarray(_erf_f64(x.astype(np.float64)), dtype=np.float64).astype(x.dtype)


@_kernel(*_UNARY)
def _k_unary(a: _Args) -> np.ndarray:
    return _UNARY[a.op.type](a["x"])


@_kernel(*_BINARY)
def _k_binary(a: _Args) -> np.ndarray:
    return _BINARY[a.op.type](a["x"], a["y"])


@_kernel("rsqrt", "inverse", "log")
def _k_with_eps(a: _Args) -> np.ndarray:
    default = {"rsqrt": 1e-12, "inverse": 1e-4, "log": 1e-45}[a.op.type]
    x = a["x"] + np.float32(a.py("epsilon", default))
    return {"rsqrt": lambda: 1 / np.sqrt(x), "inverse": lambda: 1 / x, "log": lambda: np.log(x)}[a.op.type]()


@_kernel("gelu")
def _k_gelu(a: _Args) -> np.ndarray:
    x, mode = a["x"], a.py("mode", "EXACT")
    if mode == "EXACT":
        return (0.5 * x * (1 + _erf(x.astype(np.float64) / math.sqrt(2)))).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(np.float32(-1.702) * x))
    raise a.unsupported(f"gelu mode '{mode}'")


@_kernel("leaky_relu", "elu", "thresholded_relu", "prelu")
def _k_alpha(a: _Args) -> np.ndarray:
    x, alpha, t = a["x"], a["alpha"], a.op.type
    if t == "prelu":
        alpha = alpha.reshape([1, -1] + [1] * (x.ndim - 2))
    if t in ("leaky_relu", "prelu"):
        return np.where(x >= 0, x, alpha * x)
    if t == "elu":
        return np.where(x > 0, x, alpha * np.expm1(x))
    return np.where(x >= alpha, x, 0)  # thresholded_relu: x if x >= alpha (MIL docs)


@_kernel("clamped_relu", "scaled_tanh", "sigmoid_hard", "linear_activation", "softplus_parametric")
def _k_alpha_beta(a: _Args) -> np.ndarray:
    x, al, be, t = a["x"], a["alpha"], a["beta"], a.op.type
    if t == "clamped_relu":
        return np.minimum(np.where(x >= 0, x, al * x), be)
    if t == "scaled_tanh":
        return al * np.tanh(be * x)
    if t == "sigmoid_hard":
        return np.clip(al * x + be, 0, 1)
    if t == "linear_activation":
        return al * x + be
    shape = [1, -1] + [1] * (x.ndim - 2)
    return al.reshape(shape) * np.logaddexp(0, be.reshape(shape) * x)


@_kernel("clip")
def _k_clip(a: _Args) -> np.ndarray:
    return np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])


@_kernel("threshold")
def _k_threshold(a: _Args) -> np.ndarray:
    return np.maximum(a["x"], a["alpha"])


@_kernel("select")
def _k_select(a: _Args) -> np.ndarray:
    return np.where(a["cond"], a["a"], a["b"])


@_kernel("cast")
def _k_cast(a: _Args) -> np.ndarray:
    return a["x"]  # the executor converts to the declared output dtype (float -> int truncates, as numpy)


# ------------------------------------------------------------------------------- linear algebra, conv, pooling


@_kernel("linear")
def _k_linear(a: _Args) -> np.ndarray:
    y = np.matmul(a["x"], a["weight"].T)
    return y + a["bias"] if a.has("bias") else y


@_kernel("matmul")
def _k_matmul(a: _Args) -> np.ndarray:
    x, y = a["x"], a["y"]
    if a.py("transpose_x", False):
        x = np.swapaxes(x, -1, -2) if x.ndim > 1 else x
    if a.py("transpose_y", False):
        y = np.swapaxes(y, -1, -2) if y.ndim > 1 else y
    return np.matmul(x, y)


@_kernel("einsum")
def _k_einsum(a: _Args) -> np.ndarray:
    return np.einsum(a.py("equation"), *a.many("values"))


def _spatial_pads(a: _Args, in_sizes: list[int], eff_kernel: list[int], strides: list[int]) -> list[tuple[int, int]]:
    pad_type = a.py("pad_type", "valid")
    if pad_type == "valid":
        return [(0, 0)] * len(in_sizes)
    if pad_type == "custom":
        p = a.py("pad", [0] * (2 * len(in_sizes)))
        return [(int(p[2 * i]), int(p[2 * i + 1])) for i in range(len(in_sizes))]
    if pad_type in ("same", "same_lower"):
        pads = []
        for i, k, s in zip(in_sizes, eff_kernel, strides, strict=True):
            total = max(0, (math.ceil(i / s) - 1) * s + k - i)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise a.unsupported(f"pad_type '{pad_type}'")


@_kernel("conv")
def _k_conv(a: _Args) -> np.ndarray:
    x, w = a["x"], a["weight"]
    nsp = x.ndim - 2
    strides = a.py("strides", [1] * nsp)
    dil = a.py("dilations", [1] * nsp)
    groups = int(a.py("groups", 1))
    ksz = list(w.shape[2:])
    eff = [(k - 1) * d + 1 for k, d in zip(ksz, dil, strict=True)]
    pads = _spatial_pads(a, list(x.shape[2:]), eff, strides)
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    out_sz = [(p - e) // s + 1 for p, e, s in zip(xp.shape[2:], eff, strides, strict=True)]
    n, cout, cig = x.shape[0], w.shape[0], w.shape[1]
    xg = xp.reshape(n, groups, cig, *xp.shape[2:])
    wg = w.reshape(groups, cout // groups, cig, *ksz)
    out = np.zeros((n, groups, cout // groups, math.prod(out_sz)), dtype=np.float32)
    for pos in itertools.product(*[range(k) for k in ksz]):
        sl = tuple(
            slice(p * d, p * d + s * (o - 1) + 1, s) for p, d, s, o in zip(pos, dil, strides, out_sz, strict=True)
        )
        xs = xg[(slice(None),) * 3 + sl].reshape(n, groups, cig, -1)
        wk = wg[(slice(None),) * 3 + pos]
        out += wk[None] * xs if cig == 1 else np.matmul(wk, xs)
    out = out.reshape(n, cout, *out_sz)
    if a.has("bias"):
        out += a["bias"].reshape([1, -1] + [1] * nsp)
    return out


@_kernel("conv_transpose")
def _k_conv_transpose(a: _Args) -> np.ndarray:
    x, w = a["x"], a["weight"]  # weight: [C_in, C_out / groups, *K]
    nsp = x.ndim - 2
    strides, dil = a.py("strides", [1] * nsp), a.py("dilations", [1] * nsp)
    groups, ksz = int(a.py("groups", 1)), list(w.shape[2:])
    if a.py("pad_type", "valid") not in ("valid", "custom"):
        raise a.unsupported("conv_transpose with pad_type 'same' / 'same_lower'")
    pads = _spatial_pads(a, list(x.shape[2:]), ksz, strides)
    n, cin, cog = x.shape[0], x.shape[1], w.shape[1]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, ksz, dil, strict=True)]
    out = np.zeros((n, groups, cog, *full), dtype=np.float32)
    xg = x.reshape(n, groups, cin // groups, -1)
    wg = w.reshape(groups, cin // groups, cog, *ksz)
    for pos in itertools.product(*[range(k) for k in ksz]):
        contrib = np.matmul(np.swapaxes(wg[(slice(None),) * 3 + pos], 1, 2), xg).reshape(n, groups, cog, *x.shape[2:])
        sl = tuple(
            slice(p * d, p * d + s * (i - 1) + 1, s) for p, d, s, i in zip(pos, dil, strides, x.shape[2:], strict=True)
        )
        out[(slice(None),) * 3 + sl] += contrib
    out = out.reshape(n, groups * cog, *full)
    out = out[(slice(None),) * 2 + tuple(slice(b, f - e) for (b, e), f in zip(pads, full, strict=True))]
    target = a.op.outputs[0].shape
    if target is not None and tuple(out.shape) != target:  # output_shape asks for extra rows at the end
        grow = [(0, t - o) for o, t in zip(out.shape, target, strict=True)]
        out = np.pad(out, grow)
    if a.has("bias"):
        out = out + a["bias"].reshape([1, -1] + [1] * nsp)
    return out


@_kernel("avg_pool", "max_pool", "l2_pool")
def _k_pool(a: _Args) -> np.ndarray:
    x, ksz = a["x"], a.py("kernel_sizes")
    nsp = len(ksz)
    strides = a.py("strides", [1] * nsp)
    pads = _spatial_pads(a, list(x.shape[-nsp:]), ksz, strides)
    if a.py("ceil_mode", False):
        raise a.unsupported("ceil_mode=True")
    kind = a.op.type
    fill = -np.inf if kind == "max_pool" else 0.0
    lead = [(0, 0)] * (x.ndim - nsp)
    xp = np.pad(x if kind != "l2_pool" else x * x, lead + pads, constant_values=fill)
    ones = np.pad(np.ones(x.shape[-nsp:], np.float32), pads)
    out_sz = [(p - k) // s + 1 for p, k, s in zip(xp.shape[-nsp:], ksz, strides, strict=True)]
    acc = np.full(x.shape[:-nsp] + tuple(out_sz), fill, dtype=np.float32)
    count = np.zeros(out_sz, dtype=np.float32)
    for pos in itertools.product(*[range(k) for k in ksz]):
        sl = tuple(slice(p, p + s * (o - 1) + 1, s) for p, s, o in zip(pos, strides, out_sz, strict=True))
        win = xp[(Ellipsis,) + sl]
        acc = np.maximum(acc, win) if kind == "max_pool" else acc + win
        count += ones[sl]
    if kind == "max_pool":
        return acc
    if kind == "l2_pool":
        return np.sqrt(acc)
    return acc / (count if a.py("exclude_padding_from_average", False) else float(math.prod(ksz)))


# ------------------------------------------------------------------------------ normalization and reductions


def _normalize(a: _Args, x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    sq_sum = np.square(centered).sum(axis=axes, keepdims=True)
    a.note(x.sum(axis=axes))
    a.note(sq_sum)
    n = math.prod(x.shape[i] for i in axes)
    return centered / np.sqrt(sq_sum / n + np.float32(eps))


@_kernel("layer_norm")
def _k_layer_norm(a: _Args) -> np.ndarray:
    x = a["x"]
    axes = _axes(a, x.ndim) or tuple(range(x.ndim))
    y = _normalize(a, x, axes, a.py("epsilon", 1e-5))
    pshape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if a.has("gamma"):
        y = y * a["gamma"].reshape(pshape)
    return y + a["beta"].reshape(pshape) if a.has("beta") else y


@_kernel("instance_norm")
def _k_instance_norm(a: _Args) -> np.ndarray:
    x = a["x"]
    y = _normalize(a, x, tuple(range(2, x.ndim)), a.py("epsilon", 1e-5))
    cshape = [1, -1] + [1] * (x.ndim - 2)
    y = y * a["gamma"].reshape(cshape) if a.has("gamma") else y
    return y + a["beta"].reshape(cshape) if a.has("beta") else y


@_kernel("batch_norm")
def _k_batch_norm(a: _Args) -> np.ndarray:
    x = a["x"]
    cshape = [1, -1] + [1] * (x.ndim - 2)
    y = (x - a["mean"].reshape(cshape)) / np.sqrt(a["variance"].reshape(cshape) + np.float32(a.py("epsilon", 1e-5)))
    y = y * a["gamma"].reshape(cshape) if a.has("gamma") else y
    return y + a["beta"].reshape(cshape) if a.has("beta") else y


@_kernel("l2_norm")
def _k_l2_norm(a: _Args) -> np.ndarray:
    x = a["x"]
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))
    sq = np.square(x).sum(axis=axes, keepdims=True)
    a.note(sq)
    return x / np.sqrt(sq + np.float32(a.py("epsilon", 1e-6)))


@_kernel("softmax")
def _k_softmax(a: _Args) -> np.ndarray:
    x, axis = a["x"], int(a.py("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


_REDUCE: dict[str, Callable[..., np.ndarray]] = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, **k: np.sum(np.abs(x), **k),
    "reduce_l2_norm": lambda x, **k: np.sqrt(np.sum(np.square(x), **k)),
    "reduce_sum_square": lambda x, **k: np.sum(np.square(x), **k),
    "reduce_log_sum": lambda x, **k: np.log(np.sum(x, **k)),
    "reduce_log_sum_exp": lambda x, **k: _log_sum_exp(x, **k),
}  # fmt: skip


def _log_sum_exp(x: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


@_kernel(*_REDUCE)
def _k_reduce(a: _Args) -> np.ndarray:
    x = a["x"]
    axes = _axes(a, x.ndim)
    keep = bool(a.py("keep_dims", False))
    if a.op.type in ("reduce_sum", "reduce_mean", "reduce_l2_norm", "reduce_sum_square", "reduce_l1_norm"):
        a.note(np.sum(x if a.op.type in ("reduce_sum", "reduce_mean") else np.abs(x) ** 2, axis=axes))
    return np.asarray(_REDUCE[a.op.type](x, axis=axes, keepdims=keep))


@_kernel("reduce_argmax", "reduce_argmin")
def _k_arg(a: _Args) -> np.ndarray:
    x, axis = a["x"], int(a.py("axis", -1))
    idx = (np.argmax if a.op.type == "reduce_argmax" else np.argmin)(x, axis=axis)
    return np.expand_dims(idx, axis) if a.py("keep_dims", False) else idx


@_kernel("cumsum")
def _k_cumsum(a: _Args) -> np.ndarray:
    x, axis = a["x"], int(a.py("axis", 0))
    rev = bool(a.py("reverse", False))
    y = np.flip(x, axis) if rev else x
    c = np.cumsum(y, axis=axis)
    if a.py("exclusive", False):
        c = c - y
    return np.flip(c, axis) if rev else c


@_kernel("topk")
def _k_topk(a: _Args) -> tuple[np.ndarray, np.ndarray]:
    x, k, axis = a["x"], int(a.py("k", 1)), int(a.py("axis", -1))
    asc = bool(a.py("ascending", False))
    idx = np.argsort(x if asc else -x.astype(np.float64), axis=axis, kind="stable")  # -uint would wrap
    idx = np.take(idx, np.arange(x.shape[axis] if k == -1 else k), axis=axis)  # iOS17: k = -1 selects all
    values = np.take_along_axis(x, idx, axis=axis)
    return (values, idx) if a.py("return_indices", True) else values


@_kernel("argsort")
def _k_argsort(a: _Args) -> np.ndarray:
    x = a["x"]
    return np.argsort(x if a.py("ascending", False) else -x, axis=int(a.py("axis", -1)), kind="stable")


# ------------------------------------------------------------------------------------------ shape operations


@_kernel("reshape")
def _k_reshape(a: _Args) -> np.ndarray:
    x, shape = a["x"], [int(s) for s in a.py("shape")]
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_kernel("transpose")
def _k_transpose(a: _Args) -> np.ndarray:
    return np.transpose(a["x"], a.py("perm"))


@_kernel("expand_dims")
def _k_expand_dims(a: _Args) -> np.ndarray:
    x = a["x"]
    return np.expand_dims(x, tuple(int(i) for i in a.py("axes")))


@_kernel("squeeze")
def _k_squeeze(a: _Args) -> np.ndarray:
    x = a["x"]
    axes = _axes(a, x.ndim)
    return np.squeeze(x, axis=axes)


@_kernel("flatten2d")
def _k_flatten2d(a: _Args) -> np.ndarray:
    x = a["x"]  # d_prior = prod(shape[:axis]) as a python slice: axis may equal rank ((3,), axis=1 -> (3, 1))
    return x.reshape(math.prod(x.shape[: int(a.py("axis", 1))]), -1)


@_kernel("split")
def _k_split(a: _Args) -> tuple[np.ndarray, ...]:
    x, axis = a["x"], int(a.py("axis"))
    sizes = a.py("split_sizes")
    if sizes is None:
        return tuple(np.split(x, int(a.py("num_splits")), axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@_kernel("concat")
def _k_concat(a: _Args) -> np.ndarray:
    vals, axis = a.many("values"), int(a.py("axis"))
    if not a.py("interleave", False):
        return np.concatenate(vals, axis=axis)
    axis %= vals[0].ndim
    stacked = np.stack(vals, axis=axis + 1)
    return stacked.reshape(*vals[0].shape[:axis], -1, *vals[0].shape[axis + 1 :])


@_kernel("stack")
def _k_stack(a: _Args) -> np.ndarray:
    return np.stack(a.many("values"), axis=int(a.py("axis")))


@_kernel("slice_by_index")
def _k_slice_by_index(a: _Args) -> np.ndarray:
    x = a["x"]
    r = x.ndim
    begin, end = a.py("begin"), a.py("end")
    stride = a.py("stride", [1] * r)
    bmask, emask = a.py("begin_mask", [False] * r), a.py("end_mask", [False] * r)
    smask = a.py("squeeze_mask", [False] * r)
    index: list[Any] = []
    for i in range(r):
        if smask[i]:
            index.append(int(begin[i]) % x.shape[i])
        else:
            index.append(slice(None if bmask[i] else int(begin[i]), None if emask[i] else int(end[i]), int(stride[i])))
    return x[tuple(index)]


@_kernel("slice_by_size")
def _k_slice_by_size(a: _Args) -> np.ndarray:
    x, begin, size = a["x"], a.py("begin"), a.py("size")
    index = []
    for dim, b, s in zip(x.shape, begin, size, strict=True):
        b = int(b) % dim if dim else 0
        index.append(slice(b, dim if int(s) == -1 else b + int(s)))
    return x[tuple(index)]


@_kernel("tile")
def _k_tile(a: _Args) -> np.ndarray:
    return np.tile(a["x"], a.py("reps"))


@_kernel("pad")
def _k_pad(a: _Args) -> np.ndarray:
    x, pad, mode = a["x"], [int(p) for p in a.py("pad")], a.py("mode", "constant")
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if mode == "constant":
        return np.pad(x, widths, constant_values=a.py("constant_val", 0.0))
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise a.unsupported(f"pad mode '{mode}'")


@_kernel("reverse")
def _k_reverse(a: _Args) -> np.ndarray:
    x = a["x"]
    axes = _axes(a, x.ndim)
    return np.flip(x, axis=axes)


@_kernel("pixel_shuffle", "pixel_unshuffle", "depth_to_space", "space_to_depth")
def _k_space_depth(a: _Args) -> np.ndarray:
    x, t = a["x"], a.op.type
    b = int(a.py({"pixel_shuffle": "upscale_factor", "pixel_unshuffle": "downscale_factor"}.get(t, "block_size")))
    n, c, h, w = x.shape
    if t == "pixel_shuffle":  # CRD order
        return x.reshape(n, c // b**2, b, b, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // b**2, h * b, w * b)
    if t == "depth_to_space":  # DCR order
        return x.reshape(n, b, b, c // b**2, h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // b**2, h * b, w * b)
    y = x.reshape(n, c, h // b, b, w // b, b)
    perm = (0, 1, 3, 5, 2, 4) if t == "pixel_unshuffle" else (0, 3, 5, 1, 2, 4)
    return y.transpose(perm).reshape(n, c * b * b, h // b, w // b)


@_kernel("band_part")
def _k_band_part(a: _Args) -> np.ndarray:
    x = a["x"]
    lower, upper = int(a.py("lower", -1)), int(a.py("upper", -1))
    m, n = x.shape[-2:]
    i, j = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, 0)


@_kernel("shape")
def _k_shape(a: _Args) -> np.ndarray:
    return np.array(a["x"].shape, dtype=np.int32)


@_kernel("fill")
def _k_fill(a: _Args) -> np.ndarray:
    return np.full([int(s) for s in a.py("shape")], a.get("value", np.float32(0.0)))


@_kernel("range_1d")
def _k_range_1d(a: _Args) -> np.ndarray:
    return np.arange(a["start"], a["end"], a["step"])


@_kernel("gather")
def _k_gather(a: _Args) -> np.ndarray:
    x, idx = a["x"], np.asarray(a["indices"]).astype(np.int64)
    axis, bd = int(a.py("axis", 0)), int(a.py("batch_dims", 0))
    axis %= x.ndim
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if bd == 0:
        return np.take(x, idx, axis=axis)
    lead = x.shape[:bd]
    xb, ib = x.reshape(-1, *x.shape[bd:]), idx.reshape(-1, *idx.shape[bd:])
    out = np.stack([np.take(xb[k], ib[k], axis=axis - bd) for k in range(xb.shape[0])])
    return out.reshape(*lead, *out.shape[1:])


@_kernel("gather_along_axis")
def _k_gather_along_axis(a: _Args) -> np.ndarray:
    x, idx, axis = a["x"], np.asarray(a["indices"]).astype(np.int64), int(a.py("axis", 0))
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take_along_axis(x, idx, axis=axis)


@_kernel("gather_nd")
def _k_gather_nd(a: _Args) -> np.ndarray:
    x, idx, bd = a["x"], np.asarray(a["indices"]).astype(np.int64), int(a.py("batch_dims", 0))
    xb, ib = x.reshape(-1, *x.shape[bd:]), idx.reshape(-1, *idx.shape[bd:])  # tf.gather_nd with batch_dims
    out = np.stack([xb[k][tuple(np.moveaxis(ib[k], -1, 0))] for k in range(xb.shape[0])])
    return out.reshape(*x.shape[:bd], *out.shape[1:])


# -------------------------------------------------------------------------------------------- image resizing


def _nearest_index(n_in: int, n_out: int, scale: float) -> np.ndarray:
    return np.minimum(np.floor(np.arange(n_out) / scale).astype(np.int64), n_in - 1)


@_kernel("upsample_nearest_neighbor", "resize_nearest_neighbor")
def _k_nearest(a: _Args) -> np.ndarray:
    x = a["x"]
    h, w = x.shape[-2:]
    if a.op.type == "upsample_nearest_neighbor":
        sh, sw = float(a.py("scale_factor_height", 1)), float(a.py("scale_factor_width", 1))
        oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    else:
        oh, ow = int(a.py("target_size_height", 1)), int(a.py("target_size_width", 1))
        sh, sw = oh / h, ow / w
    return x[..., _nearest_index(h, oh, sh)[:, None], _nearest_index(w, ow, sw)[None, :]]


def _grid(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Source coordinates of the ``n_out`` samples (MIL resize_bilinear sampling modes)."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS"):
        if n_out == 1:
            g = np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            g = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        g = i * ((n_in - n_in / n_out) / (n_out - 1) if n_out > 1 else 0.0)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        g = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        g = (i + 0.5) * (n_in / n_out) - 0.5
    elif mode == "ASYMMETRIC":  # upsample_bilinear with align_corners=False, half_pixel_centers=False
        g = i * (n_in / n_out)
    else:
        raise ValueError(mode)
    return np.clip(g, 0, n_in - 1)


def _bilinear(x: np.ndarray, oh: int, ow: int, mode: str) -> np.ndarray:
    out = x
    for axis, n_out in ((-2, oh), (-1, ow)):
        n_in = out.shape[axis]
        g = _grid(n_in, n_out, mode)
        lo = np.floor(g).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (g - lo).astype(np.float32)
        shape = [n_out, 1] if axis == -2 else [n_out]
        out = np.take(out, lo, axis=axis) * (1 - frac.reshape(shape)) + np.take(out, hi, axis=axis) * frac.reshape(
            shape
        )
    return out


@_kernel("upsample_bilinear")
def _k_upsample_bilinear(a: _Args) -> np.ndarray:
    x = a["x"]
    h, w = x.shape[-2:]
    oh = int(math.floor(h * float(a.py("scale_factor_height", 1))))
    ow = int(math.floor(w * float(a.py("scale_factor_width", 1))))
    align = bool(a.py("align_corners", True))
    half = bool(a.py("half_pixel_centers", not align))
    mode = "STRICT_ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half else "ASYMMETRIC")
    return _bilinear(x, oh, ow, mode)


@_kernel("resize_bilinear")
def _k_resize_bilinear(a: _Args) -> np.ndarray:
    mode = a.py("sampling_mode", "DEFAULT")
    if mode not in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS"):
        raise a.unsupported(f"sampling_mode '{mode}'")
    return _bilinear(a["x"], int(a.py("target_size_height", 1)), int(a.py("target_size_width", 1)), mode)


@_kernel("crop")
def _k_crop(a: _Args) -> np.ndarray:
    x = a["x"]
    ch, cw = a.py("crop_height", [0, 0]), a.py("crop_width", [0, 0])
    return x[..., ch[0] : x.shape[-2] - ch[1], cw[0] : x.shape[-1] - cw[1]]


# ------------------------------------------------------------------------------------------ quantization ops


@_kernel("quantize")
def _k_quantize(a: _Args) -> np.ndarray:
    x = a["input"]
    axis = a.py("axis")
    zp = _per_axis(a.get("zero_point", np.int32(0)), x.ndim, axis).astype(np.float32)
    q = np.round(x / _per_axis(a["scale"], x.ndim, axis)) + zp
    info = np.iinfo(np.int8 if a.py("output_dtype") == "int8" else np.uint8)
    return np.clip(q, info.min, info.max)


@_kernel("dequantize", "constexpr_affine_dequantize")
def _k_dequantize(a: _Args) -> np.ndarray:
    q = np.asarray(a["input" if a.op.type == "dequantize" else "quantized_data"]).astype(np.float32)
    axis = a.py("axis")
    zp = _per_axis(np.asarray(a.get("zero_point", np.int32(0))), q.ndim, axis).astype(np.float32)
    return (q - zp) * _per_axis(a["scale"], q.ndim, axis)


def _repeat_blocks(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    for axis, (n, m) in enumerate(zip(shape, v.shape, strict=True)):
        if n % m:
            raise CoreMLSimError(f"block size does not divide: data dim {n} vs {m} blocks")
        v = np.repeat(v, n // m, axis=axis)
    return v


@_kernel("constexpr_blockwise_shift_scale")
def _k_blockwise_shift_scale(a: _Args) -> np.ndarray:
    data = np.asarray(a["data"]).astype(np.float32)
    off = _repeat_blocks(np.asarray(a["offset"]).astype(np.float32), data.shape) if a.has("offset") else 0.0
    return (data - off) * _repeat_blocks(a["scale"], data.shape)


@_kernel("constexpr_lut_to_dense")
def _k_lut_to_dense(a: _Args) -> np.ndarray:
    lut, idx = a["lut"], np.asarray(a["indices"])
    if a.has("shape"):  # iOS16: one LUT, indices packed into uint8 bytes
        shape = [int(s) for s in a.py("shape")]
        nbits = int(round(math.log2(lut.size)))
        return lut[_unpack_bits(idx, nbits, math.prod(shape), False).astype(np.int64)].reshape(shape)
    k = idx.ndim  # iOS18: lut [*blocks, palettes, vector_size]
    vsize = lut.shape[-1]
    axis = int(a.py("vector_axis", 0)) % k if vsize > 1 else k - 1
    idx_t, lut_t = np.swapaxes(idx, -1, axis), np.swapaxes(lut, k - 1, axis)
    blocks = lut_t.shape[:k]
    rep = [n // m for n, m in zip(idx_t.shape, blocks, strict=True)]
    block_idx = np.ix_(*[np.arange(n) // r for n, r in zip(idx_t.shape, rep, strict=True)])
    vals = lut_t[block_idx + (idx_t.astype(np.int64),)]  # [*idx_t.shape, vector_size]
    out = vals.reshape(*idx_t.shape[:-1], idx_t.shape[-1] * vsize)
    return np.swapaxes(out, -1, axis)


@_kernel("constexpr_cast")
def _k_constexpr_cast(a: _Args) -> np.ndarray:
    return a["source_val"]


SUPPORTED_OPS: tuple[str, ...] = tuple(sorted({*_KERNELS, "const"}))


# ---------------------------------------------------------------------------------------------------- executor


def _store(value: Any, var: _Var, precision: str, op: _Op) -> np.ndarray:
    """Round a kernel result to the op's declared output type (float16 stays float32 in ``"fp32"`` mode)."""
    arr = np.asarray(value)
    if var.dtype is not np.str_:
        arr = arr.astype(np.float32 if precision == "fp32" and var.dtype is np.float16 else var.dtype, copy=False)
    if var.shape is not None and arr.shape != var.shape:
        raise CoreMLSimError(
            f"{op.type} '{var.name}': computed shape {arr.shape} but the program declares {var.shape} "
            "(simulator bug or unsupported op variant)"
        )
    return arr


_DTYPE_NAMES = {np.float16: "fp16", np.float32: "fp32", np.float64: "fp64"}


@dataclass(frozen=True)
class OpReport:
    """fp16 health of one op output, from :func:`fp16_report`.

    Attributes:
        index: position of the op in execution order.
        name: output variable name.
        op_type: MIL op type.
        dtype: declared output type ("fp16" / "fp32").
        max_abs: largest finite magnitude of the fp32 shadow (the op computed in float32 on the same inputs).
        n_above_fp16_max: finite shadow values with magnitude > 65504 (they become inf when stored as fp16).
        n_nan: NaNs in the as-written (fp16) result.
        n_inf: infs in the as-written result.
        inputs_finite: whether all float inputs of the op were finite (False: NaN/inf came from upstream).
        local_rel_err: ``||fp16 result - shadow|| / ||shadow||`` over finite values: precision lost by this op.
        drift_rel_err: ``||fp16 result - fp32 program|| / ||fp32 program||`` over finite values: error
            accumulated from the inputs up to this op.
        max_intermediate: for sums, means and normalizations, the largest partial sum a naive fp16 kernel would
            hold (``None`` for other ops); above 65504 such a kernel would overflow although the output fits.
    """

    index: int
    name: str
    op_type: str
    dtype: str
    max_abs: float
    n_above_fp16_max: int
    n_nan: int
    n_inf: int
    inputs_finite: bool
    local_rel_err: float
    drift_rel_err: float
    max_intermediate: float | None

    @property
    def overflow(self) -> bool:
        """True when this op produced values above the fp16 range in an fp16 output."""
        return self.dtype == "fp16" and self.n_above_fp16_max > 0

    @property
    def severity(self) -> int:
        """4 overflow here, 3 NaN/inf created here, 2 NaN/inf from upstream, 1 fp16-range risk, 0 fine."""
        if self.overflow:
            return 4
        if self.n_nan + self.n_inf:
            return 3 if self.inputs_finite else 2
        risk = self.n_above_fp16_max > 0 or (self.max_intermediate or 0.0) > FP16_MAX
        return 1 if risk else 0


def _rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x64, r64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    ok = np.isfinite(x64) & np.isfinite(r64)
    if not ok.any():
        return math.nan
    num = float(np.linalg.norm(x64[ok] - r64[ok]))
    den = float(np.linalg.norm(r64[ok]))
    return num / den if den > 0 else num


class SimProgram:
    """A Core ML ML program loaded for numpy execution; build it with :func:`load_mlpackage`."""

    def __init__(self, path: Path, inputs: list[_Var], outputs: list[str], ops: list[_Op], consts: dict) -> None:
        """Check every op has a kernel and decompress the constexpr (compressed weight) ops once."""
        self.path = path
        self._inputs = inputs
        self._outputs = outputs
        self._consts = consts
        unknown = [op for op in ops if op.type not in _KERNELS]
        if unknown:
            first = unknown[0]
            others = sorted({op.type for op in unknown} - {first.type})
            raise UnsupportedOpError(
                first.type, first.outputs[0].name, f"not in SUPPORTED_OPS{'; also ' + str(others) if others else ''}"
            )
        self._ops: list[_Op] = []
        for op in ops:  # compile-time ops: decompress once, keep the declared (stored) dtype
            if op.type.startswith("constexpr_") and all(
                isinstance(b, _Const) or b in consts for bs in op.inputs.values() for b in bs
            ):
                args = _Args(op, self._lookup_const, round_fp16=False)
                self._consts[op.outputs[0].name] = _store(_KERNELS[op.type](args), op.outputs[0], "as_written", op)
                EXECUTED_OPS.add(op.type)
            else:
                self._ops.append(op)

    def _lookup_const(self, binding: Any) -> Any:
        return binding.value if isinstance(binding, _Const) else self._consts[binding]

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
        if precision not in _PRECISIONS:
            raise ConfigError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
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

    def _execute(
        self,
        inputs: Mapping[str, np.ndarray],
        precision: str,
        observe: Callable[[_Op, _Args, tuple[Any, ...], list[np.ndarray], Callable[[Any], Any]], None] | None = None,
    ) -> dict[str, np.ndarray]:
        env = self._feeds(inputs, precision)

        def lookup(binding: Any) -> Any:
            if isinstance(binding, _Const):
                return binding.value
            if binding in env:
                return env[binding]
            if binding in self._consts:
                return self._consts[binding]
            raise CoreMLSimError(f"variable '{binding}' is used before it is defined")

        with np.errstate(all="ignore"):
            for op in self._ops:
                round16 = (
                    precision == "as_written" and op.type != "cast" and any(v.dtype is np.float16 for v in op.outputs)
                )
                args = _Args(op, lookup, round16)
                raw = _KERNELS[op.type](args)
                EXECUTED_OPS.add(op.type)
                raws = raw if isinstance(raw, tuple) else (raw,)
                if len(raws) != len(op.outputs):
                    raise CoreMLSimError(
                        f"{op.type} '{op.outputs[0].name}': {len(raws)} results, expected {len(op.outputs)}"
                    )
                stored = [_store(r, v, precision, op) for r, v in zip(raws, op.outputs, strict=True)]
                env.update((v.name, s) for v, s in zip(op.outputs, stored, strict=True))
                if observe is not None:
                    observe(op, args, raws, stored, lookup)
        return env

    def predict(
        self, inputs: Mapping[str, np.ndarray], *, precision: Precision = "as_written", intermediates: bool = False
    ) -> dict[str, np.ndarray]:
        """Run the program.

        Args:
            inputs: input name -> array with the declared shape (cast to the declared dtype).
            precision: "as_written" (fp16 ops in fp16, see module docstring) or "fp32" (everything float32).
            intermediates: also return every op output (keyed by variable name), not just the program outputs.

        Returns:
            Output name -> array (float16 outputs stay float16 in "as_written", become float32 in "fp32").
        """
        env = self._execute(inputs, precision)
        if intermediates:
            return env
        return {name: env[name] for name in self._outputs}

    def fp16_report(self, inputs: Mapping[str, np.ndarray]) -> list[OpReport]:
        """Per-op fp16 overflow and precision report, most severe first (see :func:`fp16_report`)."""
        ref = self._execute(inputs, "fp32")
        reports: list[OpReport] = []

        def observe(op: _Op, args: _Args, raws: tuple, stored: list, lookup: Callable[[Any], Any]) -> None:
            in_finite = True
            for bs in op.inputs.values():
                for b in bs:
                    v = lookup(b)
                    if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all():
                        in_finite = False
            for var, raw, out in zip(op.outputs, raws, stored, strict=True):
                if var.dtype not in _DTYPE_NAMES:
                    continue
                shadow = np.asarray(raw, dtype=np.float32)
                finite = np.abs(shadow[np.isfinite(shadow)])
                reports.append(
                    OpReport(
                        index=op.index,
                        name=var.name,
                        op_type=op.type,
                        dtype=_DTYPE_NAMES[var.dtype],
                        max_abs=float(finite.max(initial=0.0)),
                        n_above_fp16_max=int((finite > FP16_MAX).sum()),
                        n_nan=int(np.isnan(out).sum()),
                        n_inf=int(np.isinf(out).sum()),
                        inputs_finite=in_finite,
                        local_rel_err=_rel_err(out, shadow),
                        drift_rel_err=_rel_err(out, ref[var.name]),
                        max_intermediate=args.intermediate,
                    )
                )

        self._execute(inputs, "as_written", observe)

        def order(r: OpReport) -> tuple[int, float]:
            drift = r.drift_rel_err if math.isfinite(r.drift_rel_err) else math.inf
            return -r.severity, float(r.index) if r.severity >= 2 else -drift

        return sorted(reports, key=order)


def fp16_report(program: SimProgram, inputs: Mapping[str, np.ndarray]) -> list[OpReport]:
    """Run ``program`` as written and in fp32 and report each float op output, most severe first.

    Severity order: ops whose fp16 output overflowed (their float32 shadow exceeds 65504), ops that created
    NaN/inf from finite inputs, ops that only propagated NaN/inf (these three by execution order, so the origin
    comes first), ops at risk (fp32 values above the fp16 range, or a partial sum above it), then the rest by
    drift from the fp32 program (largest first).
    """
    return program.fp16_report(inputs)


def load_mlpackage(path: str | Path, *, function: str = "main") -> SimProgram:
    """Load an ML program ``.mlpackage`` (spec + weight blobs) for numpy execution.

    Args:
        path: the ``.mlpackage`` directory written by ``MLModel.save``.
        function: the program function to run (multifunction packages have several).

    Raises:
        CoreMLSimError: the package is unreadable or not an ML program.
        UnsupportedOpError: the program contains an op this simulator does not implement.
    """
    path = Path(path)
    manifest_file = path / "Manifest.json"
    if not manifest_file.is_file():
        raise CoreMLSimError(f"{path}: no Manifest.json; pass the .mlpackage directory written by MLModel.save")
    manifest = json.loads(manifest_file.read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    model_file = path / "Data" / root["path"]
    inputs, outputs, ops, consts = _parse_program(model_file, function)
    program = SimProgram(path, inputs, outputs, ops, consts)
    logger.info("coreml_sim: loaded %s (%d ops, %d constants)", path.name, len(program._ops), len(consts))
    return program
