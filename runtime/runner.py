"""Load an exported artifact and run it: numpy arrays in, numpy arrays out, whatever the backend.

An artifact is a folder with the model file(s) and ``manifest.json`` (written by :mod:`tadsr.formats.artifact`).
:func:`load_runner` reads the manifest, checks every listed file against its sha256, picks the backend from the
manifest's ``"format"`` and returns a :class:`Runner` whose :meth:`~Runner.run` checks inputs against the
manifest (names, shapes, dtypes) before calling the backend.

Backends (imported lazily, so a missing or broken backend only matters when it is asked for):

==========  =====================================  ===========================================================
format      module                                 class
==========  =====================================  ===========================================================
onnx        ``tadsr.runtime.onnx_runner``          ``OnnxRunner`` (ONNX Runtime, CPU by default)
executorch  ``tadsr.runtime.executorch_runner``    ``ExecuTorchRunner``
coreml      ``tadsr.runtime.coreml_runner``        ``CoreMLRunner`` (Core ML on macOS, else ``coreml-sim``)
==========  =====================================  ===========================================================

Backend contract: the class is constructed as ``Cls(artifact_dir, manifest, **opts)`` after the files were
verified, and implements ``run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]`` for inputs that
already match the spec. ``backend`` (the name the caller asked for, e.g. ``"coreml-sim"``) is passed in
``opts`` when given.

Nothing here imports torch or the model code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tadsr.errors import ConfigError, InputError, InputSpecError, RunnerError

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "TensorInfo",
    "RunnerSpec",
    "Runner",
    "CheckedRunner",
    "BACKENDS",
    "load_runner",
    "read_manifest",
    "verify_files",
    "sha256_path",
    "check_inputs",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

# format -> (module, class, backend names accepted for it)
BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "onnx": ("tadsr.runtime.onnx_runner", "OnnxRunner", ("onnx", "onnxruntime")),
    "executorch": ("tadsr.runtime.executorch_runner", "ExecuTorchRunner", ("executorch",)),
    "coreml": ("tadsr.runtime.coreml_runner", "CoreMLRunner", ("coreml", "coreml-sim")),
}


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape and dtype (numpy name) of one graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorInfo:
        vr = d.get("value_range")
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d.get("dtype", "float32")),
                   (float(vr[0]), float(vr[1])) if vr is not None else None)  # fmt: skip


@dataclass(frozen=True)
class RunnerSpec:
    """The interface of an artifact as its manifest states it."""

    graph: str
    format: str
    precision: str
    tile: int
    scale: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    constants: Mapping[str, Any]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> RunnerSpec:
        g = manifest["graph"]
        return cls(
            graph=str(g["name"]),
            format=str(manifest["format"]),
            precision=str(manifest["precision"]),
            tile=int(g["tile"]),
            scale=int(g["scale"]),
            inputs=tuple(TensorInfo.from_dict(d) for d in g["inputs"]),
            outputs=tuple(TensorInfo.from_dict(d) for d in g["outputs"]),
            constants=dict(g.get("constants", {})),
        )


@runtime_checkable
class Runner(Protocol):
    """Anything that runs an artifact: ``spec`` (from the manifest) and ``run(inputs) -> outputs``."""

    spec: RunnerSpec

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. ``inputs``/outputs: name -> array with the spec's shape and dtype."""
        ...


# ----------------------------------------------------------------------------------------------- manifest


def sha256_path(path: Path) -> tuple[str, int]:
    r"""sha256 hex and size in bytes of a file, or of a folder (e.g. ``.mlpackage``).

    A folder's digest is the sha256 of the lines ``<relative posix path>\\0<file sha256>\\n`` over its files in
    sorted order, so renaming, adding, removing or changing any file inside changes it.
    """
    path = Path(path)
    if path.is_dir():
        h, total = hashlib.sha256(), 0
        for f in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
            digest, size = sha256_path(f)
            h.update(f"{f.relative_to(path).as_posix()}\0{digest}\n".encode())
            total += size
        return h.hexdigest(), total
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest(), path.stat().st_size


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    """Read and sanity-check ``artifact_dir/manifest.json``.

    Raises:
        InputError: no such folder or manifest, unreadable JSON, unknown schema, or missing keys.
    """
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST_NAME
    if not artifact_dir.is_dir():
        raise InputError(f"artifact folder {artifact_dir} does not exist; pass the folder `tadsr export` wrote")
    if not path.is_file():
        raise InputError(f"{artifact_dir} has no {MANIFEST_NAME}; it is not an artifact folder written by tadsr export")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON ({e}); re-export the artifact") from e
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"{path}: manifest schema {got!r} is not {SCHEMA_VERSION}; re-export with this tadsr version")
    missing = [k for k in ("graph", "format", "precision", "files") if k not in manifest]
    if missing:
        raise InputError(f"{path} lacks {missing}; re-export the artifact")
    return manifest


def verify_files(artifact_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Check that every file the manifest lists exists and has the recorded sha256.

    Raises:
        InputError: a file is missing, outside the folder, or was modified (names the file and both digests).
    """
    artifact_dir = Path(artifact_dir)
    if not manifest["files"]:
        raise InputError(f"{artifact_dir / MANIFEST_NAME} lists no model files")
    for entry in manifest["files"]:
        name = Path(str(entry["name"]))
        if name.is_absolute() or ".." in name.parts:
            raise InputError(
                f"{artifact_dir / MANIFEST_NAME} names the model file {str(name)!r}, outside the artifact folder; "
                "the manifest was edited or is not from tadsr export: re-export the artifact"
            )
        path = artifact_dir / name
        if not path.exists():
            raise InputError(f"model file {path} listed in the manifest is missing; restore it or re-export")
        digest, _ = sha256_path(path)
        if digest != entry["sha256"]:
            raise InputError(
                f"model file {path} does not match its manifest (sha256 {digest[:16]}..., manifest says "
                f"{entry['sha256'][:16]}...): it was modified or truncated after export; re-export the artifact"
            )


# ------------------------------------------------------------------------------------------------- inputs


def check_inputs(spec: RunnerSpec, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check ``inputs`` against the spec: exactly its names, numpy arrays of its shapes and dtypes.

    Returns:
        The inputs as a plain dict in the spec's order (C-contiguous).

    Raises:
        InputSpecError: missing / unexpected names, not an array, wrong shape or dtype (says what was expected).
    """
    if not isinstance(inputs, Mapping):
        raise InputSpecError(f"inputs must be a dict name -> numpy array with names {spec.input_names}, "
                             f"got {type(inputs).__name__}")  # fmt: skip
    missing = [n for n in spec.input_names if n not in inputs]
    extra = [n for n in inputs if n not in spec.input_names]
    if missing or extra:
        raise InputSpecError(f"{spec.graph} expects inputs {spec.input_names}; missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        x = inputs[t.name]
        if not isinstance(x, np.ndarray):
            raise InputSpecError(f"input {t.name!r} must be a numpy array, got {type(x).__name__}")
        if tuple(x.shape) != t.shape:
            raise InputSpecError(
                f"input {t.name!r} has shape {tuple(x.shape)}, expected {t.shape} (fixed at export: tile {spec.tile}); "
                "cut tiles with tadsr.runtime.tiling or re-export with another --tile"
            )
        if x.dtype != np.dtype(t.dtype):
            raise InputSpecError(f"input {t.name!r} has dtype {x.dtype}, expected {t.dtype} (.astype(np.{t.dtype}))")
        out[t.name] = np.ascontiguousarray(x)
    return out


class CheckedRunner:
    """A backend runner behind the manifest checks; what :func:`load_runner` returns.

    Attributes:
        spec: the manifest's interface.
        manifest: the full manifest.
        artifact_dir: the folder.
        backend: backend name (``"onnx"``, ``"executorch"``, ``"coreml"``, ``"coreml-sim"``).
        inner: the backend runner object.
    """

    def __init__(self, inner: Any, spec: RunnerSpec, manifest: dict[str, Any], artifact_dir: Path, backend: str):
        self.inner = inner
        self.spec = spec
        self.manifest = manifest
        self.artifact_dir = artifact_dir
        self.backend = backend

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs`` against the manifest, run the backend, return ``{output name: array}``."""
        outs = self.inner.run(check_inputs(self.spec, inputs))
        missing = [n for n in self.spec.output_names if n not in outs]
        if missing:
            raise RunnerError(f"{self.backend} runner returned {sorted(outs)}, missing outputs {missing}; the model "
                              f"file does not match its manifest: re-export {self.artifact_dir}")
        return {n: np.asarray(outs[n]) for n in self.spec.output_names}

    def __repr__(self) -> str:
        return f"CheckedRunner({self.backend}, {self.artifact_dir})"


def _backend_class(fmt: str, backend: str | None) -> tuple[type, str]:
    if fmt not in BACKENDS:
        raise InputError(f"manifest format {fmt!r} is unknown; known formats: {', '.join(BACKENDS)}")
    module_name, cls_name, names = BACKENDS[fmt]
    if backend is not None and backend not in names:
        raise ConfigError(f"backend {backend!r} cannot run a {fmt} artifact; use one of {', '.join(names)}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ConfigError(f"the {fmt} runner ({module_name}) is not part of this installation") from e
    try:
        return getattr(module, cls_name), backend or fmt
    except AttributeError as e:
        raise ConfigError(f"{module_name} does not define {cls_name}") from e


def load_runner(artifact_dir: Path, *, backend: str | None = None, low_memory: bool = False, **opts: Any) -> CheckedRunner:
    """Open an artifact folder for inference.

    Args:
        artifact_dir: folder with ``manifest.json`` and the model file(s).
        backend: ``None`` (from the manifest's format) or a backend name valid for it (``"coreml-sim"``
            forces the numpy Core ML simulator).
        low_memory: ONNX Runtime without its memory arena and weight pre-packing (lower peak RSS); ignored by the
            other backends, which keep no such copies.
        **opts: backend options (e.g. ``threads=1``, ``providers=[...]`` for ONNX Runtime).

    Raises:
        InputError: missing folder / manifest, tampered or missing model file.
        ConfigError: backend not valid for the format, or its runner module is not installed.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    verify_files(artifact_dir, manifest)
    spec = RunnerSpec.from_manifest(manifest)
    cls, name = _backend_class(spec.format, backend)
    if backend is not None:
        opts["backend"] = backend
    if low_memory and spec.format == "onnx":  # any backend name of the format ("onnx", "onnxruntime")
        opts["low_memory"] = True
    inner = cls(artifact_dir, manifest, **opts)
    logger.debug("loaded %s with %s", artifact_dir, name)
    return CheckedRunner(inner, spec, manifest, artifact_dir, str(getattr(inner, "backend", None) or name))
