"""Whole-image super-resolution with a fixed-tile model: pad, cut overlapping tiles, draw noise, blend.

numpy only; the model is any ``run_tiles(lr_tiles, noise) -> sr_tiles`` callable (an ONNX / Core ML /
ExecuTorch runner, or the torch reference), so every backend sees the same tiles and the same noise.

Differences from upstream (spec §4.3), and why:

* **Fixed tile.** Exported graphs have a fixed input shape, so every call gets a ``tile x tile`` crop. The LR
  image is reflect-padded on the bottom/right to at least ``tile`` and to a multiple of ``pad_multiple``
  (64 as upstream), so an image smaller than the tile is one padded call, exactly as upstream's untiled
  path when the padded size equals the tile. Tile origins follow upstream (``0, stride, 2*stride, ...``,
  the last one moved flush with the padded border). Upstream's torch reflect padding fails when the pad is
  not smaller than the side (e.g. a 20 px side padded to 64); ``np.pad(mode="reflect")`` instead keeps
  reflecting (0 1 2 1 0 1 2 ...), which equals torch's result whenever torch works, and a 1 px side is
  repeated (edge padding).
* **Noise on the host.** Each tile's noise is ``np.random.default_rng([seed, y, x]).standard_normal``
  (float32, shape ``(latent_channels, tile, tile)``) with ``(y, x)`` the tile's LR origin, so it depends only
  on the seed and the tile position: outputs are reproducible across backends, batch sizes and processing
  orders. (Upstream draws from the CUDA stream in tile order, which nothing else can reproduce.)
* **Feather blending (default).** Upstream sums tile outputs and divides by the per-pixel count, a uniform
  average. Neighbouring tiles never agree exactly (GroupNorm statistics and attention are per tile, and each
  tile has its own noise), and with uniform weights a tile's influence jumps from 0 to 1/2 at its edge, so
  a disagreement d shows up as a step of d/2 along every tile edge: a visible seam grid. The default
  ``blend="feather"`` gives each tile a separable window that rises as a raised cosine, strictly positive,
  across ``overlap * scale`` output pixels on every edge that has a neighbour, and is 1 elsewhere (including
  at the image border). Ramps of two neighbours at the nominal overlap are complementary (they sum to one;
  with ``overlap > tile / 2`` a tile's two ramps meet and multiply),
  the transition has zero slope at both ends, and the result is divided by the summed weights, so any layout
  (the flush last tile overlaps more; four tiles meet at corners) is a convex combination of the tiles. A pixel
  covered by one tile gets that tile's value unchanged, so a tile covering the whole image reproduces the
  direct call exactly. ``blend="average"`` reproduces upstream. With ``overlap=0`` both are a plain mosaic
  (except where the flush last tile overlaps, which is averaged).

Tiles lying wholly in the padding are not run. Memory stays bounded: tiles are run ``batch`` at a time and
accumulated into one float32 canvas of the output size (3 x scale*H x scale*W); the normaliser is separable
(the tiles form a grid and each window is an outer product), so it is two 1-D arrays instead of a second canvas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from tadsr.errors import ConfigError, InputError, ModelOutputError, NonFiniteOutputError

__all__ = ["RunTiles", "tile_starts", "plan_tiles", "pad_for_tiles", "tile_noise", "axis_weights", "upscale_tiled"]

logger = logging.getLogger(__name__)

RunTiles = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``run_tiles(lr_tiles (B,3,t,t) float32 in [-1,1], noise (B,*noise_shape) float32) -> sr (B,3,t*s,t*s)``."""

BLENDS = ("feather", "average")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis, as upstream: ``0, stride, 2*stride, ... < length``, overruns moved flush.

    Args:
        length: the (padded) side, at least ``tile``.
        tile: tile side.
        overlap: overlap between consecutive tiles, ``0 <= overlap < tile`` (stride ``tile - overlap``).

    Returns:
        Increasing origins; the first is 0 and the last is ``length - tile``.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ConfigError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length < tile:
        raise InputError(f"side {length} is shorter than the tile {tile}; pad the image first (pad_for_tiles)")
    starts: list[int] = []
    for start in range(0, length, tile - overlap):
        start = min(start, length - tile)
        if not starts or start != starts[-1]:
            starts.append(start)
    return starts


def plan_tiles(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """LR tile origins ``(y, x)`` covering an ``h x w`` image already padded to at least ``tile`` per side.

    Row-major (all tiles of the first row first), as upstream; the last row/column is flush with the border.
    """
    return [(y, x) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_for_tiles(lr: np.ndarray, tile: int, pad_multiple: int = 64) -> np.ndarray:
    """Reflect-pad (bottom/right) a (1,3,H,W) image to at least ``tile`` and a multiple of ``pad_multiple``.

    Sides too short for one reflection keep reflecting (numpy's ``reflect``); a 1 px side is repeated.
    """
    h, w = lr.shape[-2:]
    ph, pw = _ceil_to(max(h, tile), pad_multiple) - h, _ceil_to(max(w, tile), pad_multiple) - w
    if ph == 0 and pw == 0:
        return lr
    return np.pad(lr, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")


def tile_noise(seed: int, y: int, x: int, shape: Sequence[int]) -> np.ndarray:
    """The noise of the tile at LR origin ``(y, x)``: float32 standard normal from ``default_rng([seed, y, x])``."""
    return np.random.default_rng([seed, y, x]).standard_normal(tuple(shape), dtype=np.float32)


def _raised_cosine(n: int) -> np.ndarray:
    """Rising ramp of ``n`` samples in (0, 1) with ``r[i] + r[n-1-i] == 1``."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)


def axis_weights(count: int, size: int, ramp: int, blend: str) -> list[np.ndarray]:
    """1-D blend windows of the ``count`` tiles along one axis (output pixels, float64, all > 0).

    Args:
        count: number of tiles along the axis.
        size: tile side in output pixels.
        ramp: feather ramp length in output pixels (``overlap * scale``), ``< size``.
        blend: ``"feather"`` (raised-cosine ramps on edges shared with a neighbour) or ``"average"`` (ones).

    Returns:
        One window of length ``size`` per tile.
    """
    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {BLENDS}, got {blend!r}")
    windows = []
    for i in range(count):
        window = np.ones(size)
        if blend == "feather" and ramp > 0:
            if i > 0:
                window[:ramp] *= _raised_cosine(ramp)
            if i < count - 1:
                window[size - ramp :] *= _raised_cosine(ramp)[::-1]
        windows.append(window)
    return windows


def _check_lr(lr: np.ndarray) -> np.ndarray:
    lr = np.asarray(lr)
    if lr.ndim != 4 or lr.shape[:2] != (1, 3) or lr.shape[2] < 1 or lr.shape[3] < 1:
        raise InputError(f"lr must be (1, 3, H, W) with H, W >= 1, got shape {lr.shape}")
    if not np.issubdtype(lr.dtype, np.floating):
        raise InputError(f"lr must be float in [-1, 1] (see imageio.to_model), got dtype {lr.dtype}")
    return lr.astype(np.float32, copy=False)


def _normaliser(starts: list[int], windows: list[np.ndarray], scale: int, out_len: int) -> np.ndarray:
    """Sum of the 1-D windows placed at their output positions, cropped to ``out_len``."""
    total = np.zeros(max(out_len, starts[-1] * scale + len(windows[-1])))
    for start, window in zip(starts, windows, strict=True):
        total[start * scale : start * scale + len(window)] += window
    return total[:out_len]


def upscale_tiled(
    lr: np.ndarray,
    run_tiles: RunTiles,
    *,
    tile: int,
    scale: int = 4,
    overlap: int = 16,
    seed: int = 0,
    latent_channels: int = 3,
    noise_shape_fn: Callable[[int], Sequence[int]] | None = None,
    batch: int = 1,
    pad_last_batch: bool = False,
    blend: str = "feather",
    pad_multiple: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Super-resolve a whole image of any size with a model that takes fixed ``tile x tile`` LR crops.

    See the module docstring for padding, noise and blending.

    Args:
        lr: (1, 3, H, W) float in [-1, 1], H, W >= 1.
        run_tiles: ``(lr_tiles (B,3,tile,tile) float32, noise (B,*noise_shape) float32) -> (B,3,tile*scale,
            tile*scale)``, B <= ``batch``.
        tile: LR tile side the model takes.
        scale: upscaling factor of the model.
        overlap: LR pixels shared by consecutive tiles, ``0 <= overlap < tile``.
        seed: non-negative noise seed; tile ``(y, x)`` gets ``tile_noise(seed, y, x, noise_shape)``.
        latent_channels: C of the default noise shape ``(C, tile, tile)``.
        noise_shape_fn: maps ``tile`` to the per-tile noise shape; overrides ``latent_channels``.
        batch: most tiles per ``run_tiles`` call.
        pad_last_batch: fill the last call up to exactly ``batch`` tiles (repeating its last tile, whose extra
            outputs are dropped), for graphs with a fixed batch dimension.
        blend: ``"feather"`` (default, seamless) or ``"average"`` (upstream's uniform average).
        pad_multiple: the padded LR sides are multiples of this (64 upstream).
        progress: show a tqdm bar over tiles.

    Returns:
        (1, 3, scale*H, scale*W) float32 in [-1, 1].

    Raises:
        InputError: ``lr`` is not a (1,3,H,W) float array.
        ConfigError: bad parameters.
        ModelOutputError: ``run_tiles`` returned the wrong shape.
        NonFiniteOutputError: ``run_tiles`` returned NaN or infinite values (a broken model).
    """
    lr = _check_lr(lr)
    if scale < 1 or batch < 1 or seed < 0 or pad_multiple < 1:
        raise ConfigError(
            f"need scale, batch, pad_multiple >= 1 and seed >= 0 (got {scale}, {batch}, {pad_multiple}, {seed})"
        )
    t0 = time.perf_counter()
    height, width = lr.shape[-2:]
    padded = pad_for_tiles(lr, tile, pad_multiple)
    ys = tile_starts(padded.shape[2], tile, overlap)
    xs = tile_starts(padded.shape[3], tile, overlap)
    out_h, out_w, size = height * scale, width * scale, tile * scale
    wy = axis_weights(len(ys), size, overlap * scale, blend)
    wx = axis_weights(len(xs), size, overlap * scale, blend)
    noise_shape = tuple(noise_shape_fn(tile)) if noise_shape_fn is not None else (latent_channels, tile, tile)
    # tiles lying wholly in the padding would be cropped away: skip them (their noise does not shift others')
    jobs = [(iy, ix) for iy in range(len(ys)) if ys[iy] < height for ix in range(len(xs)) if xs[ix] < width]
    canvas = np.zeros((3, out_h, out_w), np.float32)
    with tqdm(total=len(jobs), disable=not progress, unit="tile", desc="tiles") as bar:
        for first in range(0, len(jobs), batch):
            chunk = jobs[first : first + batch]
            calls = chunk + [chunk[-1]] * (batch - len(chunk)) if pad_last_batch else chunk
            lr_tiles = np.stack([padded[0, :, ys[iy] : ys[iy] + tile, xs[ix] : xs[ix] + tile] for iy, ix in calls])
            noise = np.stack([tile_noise(seed, ys[iy], xs[ix], noise_shape) for iy, ix in calls])
            sr = np.asarray(run_tiles(lr_tiles, noise))
            if sr.shape != (len(calls), 3, size, size):
                raise ModelOutputError(f"run_tiles returned shape {sr.shape}, expected {(len(calls), 3, size, size)}")
            if not np.isfinite(sr).all():
                raise NonFiniteOutputError(
                    f"the model returned NaN or infinite values for the tile at LR ({ys[chunk[0][0]]}, "
                    f"{xs[chunk[0][1]]}): its weights are broken or overflow; check the checkpoint or artifact"
                )
            for k, (iy, ix) in enumerate(chunk):
                _accumulate(canvas, np.clip(sr[k], -1.0, 1.0), ys[iy] * scale, xs[ix] * scale, wy[iy], wx[ix])
            bar.update(len(chunk))
    np.divide(canvas, _normaliser(ys, wy, scale, out_h).astype(np.float32)[:, None], out=canvas)
    np.divide(canvas, _normaliser(xs, wx, scale, out_w).astype(np.float32)[None, :], out=canvas)
    np.clip(canvas, -1.0, 1.0, out=canvas)
    logger.info(
        "tiled x%d upscale %dx%d -> %dx%d: %d tiles of %d (overlap %d, batch %d, %s) in %.2f s",
        scale, width, height, out_w, out_h, len(jobs), tile, overlap, batch, blend, time.perf_counter() - t0,
    )  # fmt: skip
    return canvas[None]


def _accumulate(canvas: np.ndarray, sr: np.ndarray, oy: int, ox: int, wy: np.ndarray, wx: np.ndarray) -> None:
    """Add one weighted tile output (3, S, S) at output origin (oy, ox), cropped to the canvas."""
    h = min(sr.shape[1], canvas.shape[1] - oy)
    w = min(sr.shape[2], canvas.shape[2] - ox)
    weight = (wy[:h, None] * wx[None, :w]).astype(np.float32)
    canvas[:, oy : oy + h, ox : ox + w] += sr[:, :h, :w] * weight
