"""Artifact folders: what a backend exporter returns, the manifest, and atomic writing.

An artifact is a folder ``<out>/<graph>-<format>-<precision>-t<tile>/`` holding the model file(s) and a
``manifest.json`` (see :func:`build_manifest`). It is built in a hidden temp folder next to its final place
(:func:`staged_artifact`) and renamed into place by :meth:`Staging.commit` only after parity passed; on any
failure the temp folder is removed and nothing appears under the final name. An existing artifact of the
same name is replaced only by a successful commit.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tadsr import fileio, versions
from tadsr.errors import ExportError
from tadsr.runtime.tiling import NOISE_SPEC
from tadsr.runtime.runner import MANIFEST_NAME, SCHEMA_VERSION, sha256_path

__all__ = [
    "BackendResult",
    "PRECISIONS",
    "Staging",
    "artifact_name",
    "build_manifest",
    "write_manifest",
    "staged_artifact",
    "tool_versions",
    "file_entries",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")



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
        measured: outputs on the held-out cases that the recipe search measured on a model identical to the written
            one but for its metadata (ONNX INT8), or None; not part of the manifest.
        measured_taps: the intermediate tensors that run also fetched, per case (ONNX INT8: the VQ lookup's latent
            and codes), or None; not part of the manifest.
    """

    files: list[str]
    format: str
    precision: str
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    measured: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    measured_taps: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(replace(self, measured=None, measured_taps=None)).items()
                if k not in ("measured", "measured_taps")}  # fmt: skip


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the export toolchain (``None`` when a package is not installed); no imports.

    The tools are :data:`tadsr.versions.EXPORT_TOOLS` (the one list, shared with the benchmark report).
    """
    return versions.tool_versions(versions.EXPORT_TOOLS)


def artifact_name(graph: str, fmt: str, precision: str, tile: int) -> str:
    """``<graph>-<format>-<precision>-t<tile>``, e.g. ``pipeline-onnx-fp32-t64``."""
    return f"{graph}-{fmt}-{precision}-t{tile}"


def file_entries(folder: Path, files: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"name", "sha256", "bytes"}]`` for model files (or folders) inside ``folder``.

    Raises:
        ExportError: a listed file does not exist (the backend's result is wrong).
    """
    entries = []
    for name in files:
        path = Path(folder) / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.exists():
            raise ExportError(f"backend result lists {name!r}, which is not a file inside {folder}")
        digest, size = sha256_path(path)
        entries.append({"name": Path(name).as_posix(), "sha256": digest, "bytes": size})
    return entries


def build_manifest(
    *,
    folder: Path,
    graph_spec: Mapping[str, Any],
    backend: BackendResult,
    preset: Mapping[str, Any],
    sources: Mapping[str, Any],
    parity: Sequence[Mapping[str, Any]] = (),
    parity_passed: bool | None = None,
    parent: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of the artifact whose files are in ``folder`` (hashes computed now).

    Keys: ``schema``, ``graph`` (GraphSpec dict), ``format``, ``precision``, ``files``, ``preset``, ``sources``
    (checkpoint paths and sha256), ``tool_versions``, ``parity`` (hop results), ``parity_passed``,
    ``backend_info`` (``BackendResult.info`` plus its ``warnings``), ``parent``, ``created`` (UTC ISO time),
    ``noise`` (the host-side noise generator every runtime must use: :data:`tadsr.runtime.tiling.NOISE_SPEC`).
    """
    manifest = {
        "schema": SCHEMA_VERSION,
        "graph": dict(graph_spec),
        "format": backend.format,
        "precision": backend.precision,
        "files": file_entries(folder, backend.files),
        "preset": dict(preset),
        "sources": dict(sources),
        "tool_versions": tool_versions(),
        "parity": [dict(h) for h in parity],
        "parity_passed": parity_passed,
        "backend_info": {**backend.info, "warnings": list(backend.warnings)},
        "parent": parent,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "noise": dict(NOISE_SPEC),
    }
    if extra:
        manifest.update(extra)
    # JSON-normalised (tuples -> lists, Paths -> str), so the dict in memory equals the file
    return json.loads(json.dumps(manifest, allow_nan=False, default=_json_default))


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``folder/manifest.json`` (replaced atomically, UTF-8, sorted keys, strict JSON: no NaN/inf)."""
    path = Path(folder) / MANIFEST_NAME
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    return fileio.write_text(path, text + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


@dataclass
class Staging:
    """A temp folder that becomes ``final`` on :meth:`commit`."""

    path: Path
    final: Path
    committed: bool = False

    def commit(self) -> Path:
        """Move the staged folder to its final name, replacing an existing one only now.

        Another process may commit the same name at the same moment (two exports into one ``--out``): the swap
        is retried, the last commit wins, and neither leaves a temp folder or a half-replaced artifact.

        Raises:
            ExportError: the folder could not be moved into place (says why).
        """
        final = self.final
        for attempt in range(5):
            try:
                self._swap_in(final)
                break
            except OSError as e:
                # ENOTEMPTY / EEXIST: someone else's folder appeared at `final`; ENOENT: theirs vanished mid-swap
                if e.errno not in fileio.RACE_ERRNOS or attempt == 4:
                    raise ExportError(
                        f"cannot move the new artifact into {final}: {e.strerror or e} (is another export writing "
                        "the same artifact into this --out?); rerun it"
                    ) from e
                logger.debug("commit of %s raced with another writer (%s); retrying", final, e.strerror)
        self.committed = True
        logger.debug("committed %s", final)
        return final

    def _swap_in(self, final: Path) -> None:
        fileio.replace_folder(self.path, final)


@contextmanager
def staged_artifact(out_dir: Path, name: str) -> Iterator[Staging]:
    """Context manager yielding a :class:`Staging` in ``out_dir``; an uncommitted temp folder is removed on exit.

    The temp folder is ``out_dir/.<name>.tmp-XXXX`` (same file system, so the final rename is atomic).
    """
    out_dir = Path(out_dir)
    tmp = out_dir / f".{name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # default permissions (mkdtemp's 0700 would survive the rename)
    stage = Staging(tmp, out_dir / name)
    try:
        yield stage
    finally:
        if not stage.committed and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
