"""Whole-image upscaling with exported artifacts: the fused ``pipeline`` graph or the three component graphs.

:class:`MobileSRPipeline` turns runners (one fused graph, or encoder -> denoiser -> decoder) into the
``run_tiles(lr_tiles, noise)`` function of :mod:`tadsr.runtime.tiling` and upscales images of any size.
The prior sample between encoder and denoiser (``x_t = z_y + s * noise``) uses the constant recorded in the
artifact's manifest, so the host needs no model code; the noise is the portable field of
:mod:`tadsr.runtime.tiling` (a manifest whose ``noise`` record names another generator is refused).
numpy only (plus the backend runtimes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.errors import ConfigError
from tadsr.runtime.artifacts import find_artifact_sets, select_set
from tadsr.runtime.runner import MANIFEST_NAME, load_runner
from tadsr.runtime.tiling import check_noise_spec, upscale_tiled

__all__ = ["MobileSRPipeline", "find_artifacts"]

log = logging.getLogger(__name__)


def find_artifacts(
    path: Path, *, fmt: str | None = None, precision: str | None = None, tile: int | None = None
) -> dict[str, Path]:
    """Pick the artifact folder(s) to run from ``path``.

    ``path`` is an artifact folder (a fused ``pipeline`` graph), or a folder of artifacts (an export or
    quantize output). In the latter case a matching ``pipeline`` artifact is preferred, else the three
    component artifacts of the same format / precision / tile (:func:`tadsr.runtime.artifacts.select_set`).

    Returns:
        ``{"pipeline": dir}`` or ``{"encoder": dir, "denoiser": dir, "decoder": dir}``.
    """
    path = Path(path)
    sets = find_artifact_sets([path], strict=False)
    return dict(select_set(sets, fmt=fmt, precision=precision, tile=tile, where=path).dirs)


class MobileSRPipeline:
    """Upscale images with exported artifacts.

    Args:
        artifacts: ``{"pipeline": dir}`` or the three component dirs (see :func:`find_artifacts`).
        backend: runner backend override (e.g. ``"coreml-sim"``).
        low_memory: ONNX Runtime artifacts run without the memory arena and weight pre-packing (lower peak RSS,
            see :class:`~tadsr.runtime.onnx_runner.OnnxRunner`); no effect on other backends.
        **runner_opts: passed to :func:`tadsr.runtime.runner.load_runner` (e.g. ``threads=2``).
    """

    def __init__(
        self, artifacts: dict[str, Path], *, backend: str | None = None, low_memory: bool = False, **runner_opts: Any
    ) -> None:
        self.runners = {g: load_runner(d, backend=backend, low_memory=low_memory, **runner_opts)
                        for g, d in artifacts.items()}  # fmt: skip
        for g, r in self.runners.items():
            check_noise_spec(getattr(r, "manifest", {}).get("noise"), f"{artifacts[g]}/{MANIFEST_NAME}")
        first = next(iter(self.runners.values())).spec
        self.tile = first.tile
        self.scale = first.scale
        self.fused = "pipeline" in self.runners
        for g, r in self.runners.items():
            if r.spec.tile != self.tile:
                raise ConfigError(f"artifacts have different tiles: {g} {r.spec.tile} vs {self.tile}")
        if self.fused:
            noise = next(t for t in self.runners["pipeline"].spec.inputs if t.name == "noise")
            self.noise_shape = noise.shape[1:]
            self.noise_scale = None
        else:
            xt = next(t for t in self.runners["denoiser"].spec.inputs if t.name == "x_t")
            self.noise_shape = xt.shape[1:]
            consts = self.runners["denoiser"].spec.constants
            if "prior_noise_scale" not in consts:
                raise ConfigError("denoiser manifest lacks the 'prior_noise_scale' constant (re-export it)")
            self.noise_scale = np.float32(consts["prior_noise_scale"])
        self.batch = min(int(r.spec.inputs[0].shape[0]) for r in self.runners.values())

    @classmethod
    def from_path(
        cls, path: Path, *, fmt: str | None = None, precision: str | None = None, tile: int | None = None,
        backend: str | None = None, low_memory: bool = False, **runner_opts: Any,
    ) -> MobileSRPipeline:
        return cls(find_artifacts(path, fmt=fmt, precision=precision, tile=tile), backend=backend,
                   low_memory=low_memory, **runner_opts)  # fmt: skip

    @property
    def description(self) -> str:
        r = next(iter(self.runners.values())).spec
        kind = "pipeline" if self.fused else "encoder+denoiser+decoder"
        return f"{kind} {r.format}/{r.precision} tile {self.tile}"

    def run_tiles(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """(B,3,t,t) LR tiles + (B,C,t,t) noise -> (B,3,st,st) SR tiles, one graph call per tile."""
        outs = []
        for i in range(lr.shape[0]):
            lr_i = np.ascontiguousarray(lr[i : i + 1], dtype=np.float32)
            n_i = np.ascontiguousarray(noise[i : i + 1], dtype=np.float32)
            if self.fused:
                out = self.runners["pipeline"].run({"lr": lr_i, "noise": n_i})["sr"]
            else:
                z_y = self.runners["encoder"].run({"lr": lr_i})["z_y"]
                x_t = (z_y + self.noise_scale * n_i).astype(np.float32)
                x0 = self.runners["denoiser"].run({"x_t": x_t, "lr": lr_i})["x0"]
                out = self.runners["decoder"].run({"x0": x0})["sr"]
            outs.append(out)
        return np.concatenate(outs, axis=0)

    def upscale(
        self, lr: np.ndarray, *, seed: int = 0, overlap: int = 16, blend: str = "feather", progress: bool = False
    ) -> np.ndarray:
        """(1,3,H,W) LR in [-1,1] of any size -> (1,3,sH,sW) SR in [-1,1] (tiled, host-side noise)."""
        return upscale_tiled(
            lr, self.run_tiles, tile=self.tile, scale=self.scale, overlap=min(overlap, self.tile - 1), seed=seed,
            noise_shape_fn=lambda t: tuple(self.noise_shape), batch=1, blend=blend, progress=progress,
        )

