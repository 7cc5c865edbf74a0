"""Artifact sets: which artifact folders run together (one fused ``pipeline`` graph, or the three components).

An artifact folder holds one graph (``manifest.json`` says which). A *set* is what upscales an image: a fused
``pipeline`` artifact, or the ``encoder`` / ``denoiser`` / ``decoder`` artifacts of one format, precision and
tile. :func:`find_artifact_sets` finds every set under some folders (the benchmark runs them all, parity checks
them all), :func:`select_set` picks the one set to run (``tadsr upscale``), and :func:`group_sets` forms the
sets of given artifact folders. numpy-free and torch-free.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tadsr.errors import InputError
from tadsr.runtime.runner import MANIFEST_NAME, read_manifest

__all__ = ["COMPONENTS", "ArtifactSet", "artifact_dirs", "find_artifact_sets", "group_sets", "select_set"]

logger = logging.getLogger(__name__)

COMPONENTS = ("encoder", "denoiser", "decoder")
"""The component graphs of a non-fused set, in the order they run."""

SetKey = tuple[str, str, int]  # format, precision, tile


@dataclass(frozen=True)
class ArtifactSet:
    """A runnable set: one fused ``pipeline`` artifact or the three component artifacts of one format/precision/tile.

    Attributes:
        name: ``<format>-<precision>-<layout>`` (made unique by :func:`find_artifact_sets`).
        format, precision, tile: shared by every member.
        layout: ``"fused"`` (``dirs == {"pipeline": dir}``) or ``"components"`` (``dirs`` keyed by
            :data:`COMPONENTS`).
        dirs: graph name -> artifact folder.
        manifests: graph name -> that folder's manifest.
    """

    name: str
    format: str
    precision: str
    tile: int
    layout: str  # fused | components
    dirs: dict[str, Path]
    manifests: dict[str, dict[str, Any]] = field(repr=False, default_factory=dict)

    @property
    def key(self) -> SetKey:
        return (self.format, self.precision, self.tile)

    @property
    def size_bytes(self) -> int:
        return sum(int(f["bytes"]) for m in self.manifests.values() for f in m["files"])

    @property
    def preset(self) -> str | None:
        return next(iter(self.manifests.values())).get("preset", {}).get("name")


def _key(manifest: Mapping[str, Any]) -> SetKey:
    return (str(manifest.get("format")), str(manifest.get("precision")), int(manifest["graph"].get("tile", 0)))


def _make(key: SetKey, layout: str, members: Mapping[str, tuple[Path, dict[str, Any]]]) -> ArtifactSet:
    fmt, prec, tile = key
    return ArtifactSet(f"{fmt}-{prec}-{layout}", fmt, prec, tile, layout, {g: d for g, (d, _) in members.items()},
                       {g: m for g, (_, m) in members.items()})  # fmt: skip


def group_sets(artifacts: Iterable[tuple[Path, dict[str, Any]]], *, where: Path | str = "") -> list[ArtifactSet]:
    """The sets formed by ``(folder, manifest)`` pairs: per format / precision / tile (in order of first
    appearance), its fused pipeline (if present), then its component set (if all three are present).
    An incomplete component set is logged and left out."""
    groups: dict[SetKey, dict[str, tuple[Path, dict[str, Any]]]] = {}
    for folder, manifest in artifacts:
        groups.setdefault(_key(manifest), {})[manifest["graph"]["name"]] = (Path(folder), manifest)
    sets: list[ArtifactSet] = []
    for key, graphs in groups.items():
        if "pipeline" in graphs:
            sets.append(_make(key, "fused", {"pipeline": graphs["pipeline"]}))
        if all(c in graphs for c in COMPONENTS):
            sets.append(_make(key, "components", {c: graphs[c] for c in COMPONENTS}))
        elif any(c in graphs for c in COMPONENTS):
            logger.warning("%s: %s/%s t%d has only %s of the components; left out", where, *key,
                           sorted(set(graphs) & set(COMPONENTS)))  # fmt: skip
    return sets


def _children(path: Path) -> list[Path]:
    return sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
    )


def artifact_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is an artifact folder, else its artifact subfolders (sorted, hidden ones skipped:
    an export's staging folders are hidden).

    Raises:
        InputError: ``path`` is not a folder, or holds no artifact.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"artifact folder {path} does not exist; pass an artifact folder (with {MANIFEST_NAME}) "
                         "or their parent")  # fmt: skip
    if (path / MANIFEST_NAME).is_file():
        return [path]
    found = _children(path)
    if not found:
        raise InputError(f"{path} holds no artifact folder (none has a {MANIFEST_NAME}); pass the folder written "
                         "by tadsr export / tadsr quantize")  # fmt: skip
    return found


def _lone_graph(path: Path, graph: str) -> InputError:
    return InputError(f"{path} holds only the {graph!r} graph; pass the fused 'pipeline' artifact, or the parent "
                      "folder that holds the encoder, denoiser and decoder artifacts")  # fmt: skip


def _read_loose(folder: Path) -> dict[str, Any]:
    """The manifest as JSON, unchecked (the runner that loads the artifact checks it)."""
    path = folder / MANIFEST_NAME
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a readable manifest: {e}") from e
    if not isinstance(m, dict) or not isinstance(m.get("graph"), dict):
        raise InputError(f"{path} is not an artifact manifest (no graph record); re-export the artifact")
    return m


def find_artifact_sets(paths: Sequence[Path], *, strict: bool = True) -> list[ArtifactSet]:
    """Every runnable artifact set under ``paths`` (each an artifact folder, or a folder of artifact folders).

    A folder of artifacts yields, per format / precision / tile, its fused pipeline (if present) and its component
    set (if all three are present). Duplicate names get the folder name appended. ``strict``: every manifest
    is checked (:func:`tadsr.runtime.runner.read_manifest`); else only read, and checked when its runner loads.

    Raises:
        InputError: a path is missing, holds a lone component, or holds nothing runnable.
    """
    read = read_manifest if strict else _read_loose
    sets: list[ArtifactSet] = []
    for path in map(Path, paths):
        if (path / MANIFEST_NAME).is_file():
            m = read(path)
            if m["graph"]["name"] != "pipeline":
                raise _lone_graph(path, m["graph"]["name"])
            sets.append(_make(_key(m), "fused", {"pipeline": (path, m)}))
            continue
        if not path.is_dir():
            raise InputError(f"artifact folder {path} does not exist")
        found = group_sets(((d, read(d)) for d in _children(path)), where=path)
        if not found:
            raise InputError(f"no runnable artifact set in {path}: need a 'pipeline' artifact or all of "
                             "encoder/denoiser/decoder (folders written by tadsr export / tadsr quantize)")  # fmt: skip
        sets += found
    names = [s.name for s in sets]
    return [
        replace(s, name=f"{s.name} ({next(iter(s.dirs.values())).parent.name})") if names.count(s.name) > 1 else s
        for s in sets
    ]


def select_set(sets: Sequence[ArtifactSet], *, fmt: str | None = None, precision: str | None = None,
               tile: int | None = None, where: Path | str = "") -> ArtifactSet:  # fmt: skip
    """The one set to run among ``sets``: those matching ``fmt`` / ``precision`` / ``tile`` must share one
    format / precision / tile; a fused pipeline is preferred over the component set.

    Raises:
        InputError: no set matches, or several formats / precisions / tiles do (says how to choose).
    """
    match = [s for s in sets if (not fmt or s.format == fmt) and (not precision or s.precision == precision)
             and (not tile or s.tile == tile)]  # fmt: skip
    if not match:
        what = ", ".join(s.name for s in sets) or "none"
        raise InputError(f"no runnable artifact set in {where} (format={fmt or 'any'}, precision={precision or 'any'})"
                         f": need a 'pipeline' artifact or all of encoder/denoiser/decoder; found: {what}")  # fmt: skip
    keys = list(dict.fromkeys(s.key for s in match))
    if len(keys) > 1:
        choices = ", ".join(f"{k[0]}/{k[1]}/t{k[2]}" for k in keys)
        raise InputError(f"several artifact sets in {where} ({choices}); choose with --format/--precision/--tile")
    return min(match, key=lambda s: s.layout != "fused")
