"""Reading a Core ML ML program: the ``.mlpackage`` manifest, the ``Model`` protobuf and the MIL weight blobs.

Only coremltools' generated protobuf modules are used (its package ``__init__`` imports torch and is not run).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tadsr.errors import BackendUnavailableError
from tadsr.runtime.coreml_sim.errors import CoreMLSimError, UnsupportedOpError

__all__ = ["Const", "Op", "Var", "parse_program", "read_mlpackage", "unpack_bits"]


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


def unpack_bits(raw: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
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
            return unpack_bits(raw, nbits, count, signed)
        out = np.asarray(raw).view(np_dtype)  # a read-only view into the memory map
        if out.size != count:
            raise CoreMLSimError(f"{self.path}@{offset}: blob holds {out.size} values, {count} expected")
        return out


@dataclass(frozen=True)
class Var:
    name: str
    dtype: Any  # numpy scalar type; np.str_ for strings
    shape: tuple[int, ...] | None  # None when a dimension is not static
    mil_dtype: int


@dataclass
class Op:
    type: str
    outputs: tuple[Var, ...]
    inputs: dict[str, tuple[Any, ...]]  # each binding: a variable name (str) or a decoded constant (Const)
    index: int


@dataclass(frozen=True)
class Const:
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
            arr = unpack_bits(raw, nbits, count, signed) if nbits else raw.view(np_dtype)
        elif which == "strings":
            vals = list(t.strings.values)
            return vals[0] if shape == () else np.array(vals, dtype=object).reshape(shape)
        else:
            arr = np.array(list(getattr(t, which).values)).astype(np_dtype)
        return arr.reshape(shape)


def parse_program(model_file: Path, function: str) -> tuple[list[Var], list[str], list[Op], dict[str, Any]]:
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
    inputs = [Var(i.name, *_tensor_type(i.type, f"input '{i.name}'")) for i in fn.inputs]
    consts: dict[str, Any] = {}
    ops: list[Op] = []
    for op_pb in block.operations:
        outs = tuple(Var(o.name, *_tensor_type(o.type, f"{op_pb.type} '{o.name}'")) for o in op_pb.outputs)
        where = f"{op_pb.type} '{outs[0].name if outs else '?'}'"
        if op_pb.blocks:
            raise UnsupportedOpError(op_pb.type, outs[0].name, "control flow (nested blocks) is not supported")
        if op_pb.type == "const":
            consts[outs[0].name] = decoder.value(op_pb.attributes["val"], where)
            continue
        bindings: dict[str, tuple[Any, ...]] = {}
        for key, arg in op_pb.inputs.items():
            bindings[key] = tuple(
                b.name if b.WhichOneof("binding") == "name" else Const(decoder.value(b.value, f"{where}.{key}"))
                for b in arg.arguments
            )
        for key, val in op_pb.attributes.items():  # constexpr ops keep their parameters as attributes
            if key != "name":
                bindings.setdefault(key, (Const(decoder.value(val, f"{where}.{key}")),))
        ops.append(Op(op_pb.type, outs, bindings, len(ops)))
    return inputs, list(block.outputs), ops, consts


def read_mlpackage(path: Path, function: str) -> tuple[list[Var], list[str], list[Op], dict[str, Any]]:
    """The program of an ``.mlpackage`` directory: its inputs, output names, ops and decoded constants."""
    manifest_file = path / "Manifest.json"
    if not manifest_file.is_file():
        raise CoreMLSimError(f"{path}: no Manifest.json; pass the .mlpackage directory written by MLModel.save")
    manifest = json.loads(manifest_file.read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    return parse_program(path / "Data" / root["path"], function)
