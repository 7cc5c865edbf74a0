"""Where a parity check's reference comes from (:class:`ReferenceSpec`), what it runs (:class:`ParityOptions`),
and what the artifacts of one call share (:class:`Session`: reference networks, graphs, reference runs,
localisation traces; :class:`TraceCache` keeps traces across calls for the caller that owns it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tadsr import fileio
from tadsr.config import get_preset
from tadsr.errors import ConfigError, InputError
from tadsr.formats.localize import GraphTrace, trace_graph, trace_program
from tadsr.formats.registry import FORMAT_NAMES, get_format
from tadsr.parity.hops import ReferenceRuns, real_lr_patches, reference_runs_on
from tadsr.pipeline import Models, load_models
from tadsr.provenance import PARTS, manifest_preset, models_from_manifest, uses_light_autoencoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSpec:
    """Where the PyTorch reference comes from: the manifest (all None) or explicit model arguments.

    Attributes:
        student, autoencoder: checkpoint paths.
        preset: preset name (default: the artifact manifest's preset).
        init: ``"random"`` for the deterministic fill rule on networks without a checkpoint.
        light_autoencoder: light autoencoder checkpoint (default: the manifest's, when it records one).
    """

    student: Path | None = None
    autoencoder: Path | None = None
    preset: str | None = None
    init: str | None = None
    light_autoencoder: Path | None = None

    @property
    def from_manifest(self) -> bool:
        """No network argument other than the light autoencoder: the manifest names the weights."""
        return self.student is None and self.autoencoder is None and self.preset is None and self.init is None


def _load_reference(manifest: Mapping[str, Any], ref: ReferenceSpec) -> tuple[Models, list[str]]:
    """The reference networks for an artifact, and warnings about how they relate to its manifest.

    The light autoencoder comes with them when the artifact was exported with it (``sources.light_autoencoder``,
    or ``ref.light_autoencoder``)."""
    warnings: list[str] = []
    if ref.from_manifest:
        return models_from_manifest(manifest, overrides={"light_autoencoder": ref.light_autoencoder}), warnings
    preset = get_preset(ref.preset) if ref.preset else manifest_preset(manifest)
    mp = (manifest.get("preset") or {}).get("name")
    if mp and mp != preset.name:
        warnings.append(f"reference preset {preset.name!r} differs from the artifact's preset {mp!r}")
    light: Path | bool | None = ref.light_autoencoder
    if light is None and uses_light_autoencoder(manifest):
        src = manifest["sources"]["light_autoencoder"]
        if not str(src.get("path", "")).startswith(("bundled:", "random-fill")):
            raise InputError("the artifact was exported with the light autoencoder "
                             f"{src.get('path')}: pass it with --light-autoencoder CKPT")  # fmt: skip
        light = True
    models = load_models(student=ref.student, autoencoder=ref.autoencoder, preset=preset, init=ref.init,
                         light_autoencoder=light)  # fmt: skip
    for part in PARTS:
        want = ((manifest.get("sources") or {}).get(part) or {}).get("sha256")
        got = models.sources.get(part, {}).get("sha256")
        if want and got and want != got:
            warnings.append(f"the reference {part} ({models.sources[part]['path']}) is not the checkpoint the "
                            "artifact was exported from (sha256 differs)")  # fmt: skip
    if models.light_autoencoder is not None and not uses_light_autoencoder(manifest):
        warnings.append("the reference runs the light autoencoder; the artifact was exported with the full one")
    return models, warnings


@dataclass(frozen=True)
class ParityOptions:
    """What :func:`check_parity` runs.

    Attributes:
        seed: seed of the seeded case and of the whole-image noise.
        patches: real LR patches per artifact (besides the seeded case).
        images: folder of images: real patches are cut from it (MATLAB bicubic /scale), and its images are the
            whole-image inputs; None: the shipped calibration set for both.
        whole_images: number of whole images per pipeline artifact / component set (0: none).
        max_side: whole images are centre-cropped to at most this many LR pixels per side (runtime bound): the
            width, and ``max_side - 7`` rows (an odd height: a partial last tile).
        max_rows: a lower cap on the rows (None: ``max_side - 7``), for a strip of tiles instead of a grid.
        overlap: LR overlap between tiles.
        diagnose: localise every artifact, not only failing ones.
        backend: runner backend override (e.g. ``"coreml-sim"``).
        threads: intra-op threads for ONNX Runtime and torch (None: library defaults).
        gate_tiles: take an artifact's tile hops from its write-time parity gate (the manifest's ``parity``)
            instead of running them again, where that gate ran exactly this check: files verified by sha256,
            the same cases (seed, real patches and their content hash), the reference the manifest names, the
            floors of today's numerics.json, no backend override and no diagnosis asked; for an INT8 artifact, where
            its write's gate judged every held-out tile against the fp32 artifact and the reference under today's
            INT8 floors (more tiles than the check's). ``tadsr all`` sets it for the folders it has just written;
            whole images always run.
    """

    seed: int = 0
    patches: int = 3
    images: Path | None = None
    whole_images: int = 2
    max_side: int = 160
    max_rows: int | None = None
    overlap: int = 16
    diagnose: bool = False
    backend: str | None = None
    threads: int | None = None
    gate_tiles: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0 or self.patches < 0 or self.whole_images < 0 or self.max_side < 1 or self.overlap < 0:
            raise ConfigError("seed, --patches, --whole-images and --overlap must be >= 0, --max-side >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.images is not None and not Path(self.images).is_dir():
            raise InputError(f"--images {self.images} is not a folder of images")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def runner_kwargs(fmt: str, threads: int | None) -> dict[str, Any]:
    """The runner options a format's runner takes for ``threads`` (:meth:`FormatSpec.runner_kwargs`; none for a
    format this build does not know, or when no thread count is asked for)."""
    return get_format(fmt).runner_kwargs(threads) if fmt in FORMAT_NAMES else {}


class WholeRefs(dict):
    """Whole-image references by key (image, latents per tile), kept in memory and, with ``folder``, on disk
    (``<folder>/<key digest>.npz``, written atomically, ``salt`` mixed into the name): the format lanes of one
    ``tadsr all`` run are separate processes and compare with the same references."""

    def __init__(self, folder: Path | None = None, salt: str = "") -> None:
        super().__init__()
        self.folder = None if folder is None else Path(folder)
        self.salt = salt

    def _path(self, key: tuple) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{hashlib.sha256((json.dumps(key) + self.salt).encode()).hexdigest()[:32]}.npz"

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        path = self._path(key) if isinstance(key, tuple) else None
        if path is None or not path.is_file():
            return False
        try:
            with np.load(path, allow_pickle=False) as z:
                value = (z["image"], [z[f"x0_{i}"] for i in range(int(z["tiles"]))])
        except (OSError, KeyError, ValueError) as e:
            logger.warning("ignoring the unreadable whole-image reference %s (%s)", path, e)
            return False
        super().__setitem__(key, value)
        return True

    def __setitem__(self, key: tuple, value: tuple[np.ndarray, list[np.ndarray]]) -> None:
        super().__setitem__(key, value)
        path = self._path(key)
        if path is not None:
            image, x0s = value
            arrays = {"image": image, "tiles": np.array(len(x0s)), **{f"x0_{i}": x for i, x in enumerate(x0s)}}
            path.parent.mkdir(parents=True, exist_ok=True)
            fileio.write_with(path, lambda f: np.savez(f, **arrays))


class TraceCache:
    """torch.export traces for localisation (a few seconds to a minute each), kept across :func:`check_parity`
    calls by the caller that owns this object (``tadsr all``, the benchmarks): the ``kept`` last used ones; and the
    whole-image references of the weights the manifests name (the fp32 and the INT8 folders of one model are
    compared with the same tiled reference images, computed once; with ``refs_folder`` also across processes,
    see :class:`WholeRefs`)."""

    def __init__(self, kept: int = 4, refs_folder: Path | None = None, salt: str = "") -> None:
        self.kept = kept
        self._traces: OrderedDict[tuple, GraphTrace] = OrderedDict()
        self.whole_refs: WholeRefs = WholeRefs(refs_folder, salt)

    def get(self, key: tuple) -> GraphTrace | None:
        if key not in self._traces:
            return None
        self._traces.move_to_end(key)
        return self._traces[key]

    def put(self, key: tuple, trace: GraphTrace) -> None:
        self._traces[key] = trace
        self._traces.move_to_end(key)
        while len(self._traces) > self.kept:
            self._traces.popitem(last=False)

    def __len__(self) -> int:
        return len(self._traces)


class Session:
    """Caches shared by the artifacts of one call: reference networks, graphs, reference runs, traces."""

    def __init__(self, ref: ReferenceSpec, opts: ParityOptions, traces: TraceCache | None = None) -> None:
        self.ref = ref
        self.opts = opts
        self.shared = traces
        self._models: dict[str, tuple[Models, list[str]]] = {}
        self._graphs: dict[tuple[str, int], dict[str, Any]] = {}
        self._runs: dict[tuple[str, int], ReferenceRuns] = {}
        self._traces: dict[tuple[str, int, str, str], GraphTrace] = {}
        # whole-image references (image, latents per tile) by (model key, image, tile, overlap, seed): every set
        # of one model (pipeline and components, fp32 and fp16, INT8 and W8) is compared with the same one; kept
        # across calls by ``traces`` when the reference comes from the manifests (the model key names the weights)
        shared = traces is not None and ref.from_manifest
        self.whole_refs: dict[tuple, tuple[np.ndarray, list[np.ndarray]]] = traces.whole_refs if shared else {}

    def key(self, manifest: Mapping[str, Any]) -> str:
        if not self.ref.from_manifest:
            return "args"
        return json.dumps([manifest.get("preset"), manifest.get("sources")], sort_keys=True, default=str)

    def models(self, manifest: Mapping[str, Any]) -> tuple[Models, list[str]]:
        k = self.key(manifest)
        if k not in self._models:
            t0 = time.perf_counter()
            self._models[k] = _load_reference(manifest, self.ref)
            logger.info("reference networks (%s): %.1fs", self._models[k][0].preset.name, time.perf_counter() - t0)
        return self._models[k]

    def graph(self, manifest: Mapping[str, Any], name: str, tile: int) -> tuple[Any, Any]:
        from tadsr.formats.graphs import make_graphs

        k = (self.key(manifest), tile)
        if k not in self._graphs:
            self._graphs[k] = make_graphs(self.models(manifest)[0], tile)
        return self._graphs[k][name]

    def runs(self, manifest: Mapping[str, Any], tile: int) -> ReferenceRuns:
        k = (self.key(manifest), tile)
        if k not in self._runs:
            models = self.models(manifest)[0]
            lrs, source = real_patches(tile, models.preset.scale, self.opts)
            self._runs[k] = reference_runs_on(models, lrs, source)
        return self._runs[k]

    def trace(self, manifest: Mapping[str, Any], name: str, tile: int, variant: str) -> GraphTrace:
        k = (repr(self.ref), self.key(manifest), tile, name, variant)
        kept = self.shared.get(k) if self.shared is not None else None
        if kept is not None:
            return kept
        if k not in self._traces:
            t0 = time.perf_counter()
            module, spec = self.graph(manifest, name, tile)
            if variant == "coreml":  # the program the Core ML exporter converts (rewrites + decompositions)
                from tadsr.formats.coreml.export import exported_program

                self._traces[k] = trace_program(exported_program(module, spec)[0], spec, "coreml export")
            else:
                self._traces[k] = trace_graph(module, spec, variant=variant)
            logger.info("torch.export of %s (%s naming) for localisation: %.1fs", name, variant,
                        time.perf_counter() - t0)  # fmt: skip
        if self.shared is not None:
            self.shared.put(k, self._traces[k])
        return self._traces[k]


def real_patches(tile: int, scale: int, opts: ParityOptions) -> tuple[np.ndarray, str]:
    """The real LR patches of a check (``opts.images``, or the shipped calibration set) and their description."""
    if opts.images is None:
        return real_lr_patches(tile, scale, opts.patches)
    from tadsr.patches import sample_patches

    if opts.patches == 0:
        return np.zeros((0, 3, tile, tile), np.float32), "none"
    ps = sample_patches(Path(opts.images), num_patches=opts.patches, tile=tile, scale=scale, seed=opts.seed)
    return ps.lr.astype(
        np.float32
    ), f"{opts.images}: {opts.patches} patches (MATLAB bicubic /{scale}), seed {opts.seed}"
