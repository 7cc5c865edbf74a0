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
* **Noise on the host.** The noise is one standard-normal field over the padded image's latent, a pure function
  of ``(seed, channel, latent row, latent column)`` (Philox4x32-10 + Box-Muller, *Portable noise* below,
  recorded in every manifest as ``"noise"`` so C++/Kotlin/Swift ports draw the same values); each tile reads
  its window (``tile_noise``). Outputs are reproducible across backends, hosts, batch sizes and processing
  orders, and overlapping tiles agree on the noise they share. (Upstream draws from the CUDA stream in tile
  order, which nothing else can reproduce. Earlier versions of this module drew each tile from
  ``numpy.random.default_rng([seed, y, x])``; outputs for a given seed changed once when the portable field
  replaced it.)
* **Feather blending (default).** Upstream sums tile outputs and divides by the per-pixel count, a uniform
  average. Neighbouring tiles never agree exactly (GroupNorm statistics and attention are per tile, and a
  tile's context differs from its neighbour's), and with uniform weights a tile's influence jumps from 0 to 1/2
  at its edge, so a disagreement d shows up as a step of d/2 along every tile edge: a visible seam grid. The default
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


Portable noise
--------------

Every runtime (this numpy one, the C++ runner in ``runtime/cpp``, a Kotlin or Swift port) must draw the same
noise for the same seed, or the same artifact gives different pictures on different hosts. So the noise is a
pure function of ``(seed, channel, latent row, latent column)``, specified here in full and recorded in every
artifact's manifest (:data:`NOISE_SPEC`, key ``"noise"``):

* **Bits.** Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the
  Random123 reference), with counter ``(x, y, c, 0)`` (latent column, row, channel; uint32 each) and key
  ``(seed mod 2**32, seed // 2**32)`` for ``0 <= seed < 2**64``. Rounds: with ``M0 = 0xD2511F53``,
  ``M1 = 0xCD9E8D57``, ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (64-bit products),
  ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; between rounds the key is bumped by
  ``(0x9E3779B9, 0xBB67AE85)`` mod 2**32. Ten rounds. The output is four uint32 words ``w0..w3``.
* **Normal.** Box-Muller on the first two words, in float64: ``u0 = (w0 + 0.5) / 2**32``,
  ``u1 = (w1 + 0.5) / 2**32`` (both in (0, 1), never 0), ``z = sqrt(-2 ln u0) * cos(2 pi u1)``, then rounded
  to float32. ``w2`` and ``w3`` are unused.

The field covers the whole padded image's latent; the tile at latent origin ``(y0, x0)`` reads its window
``field[:, y0:y0+h, x0:x0+w]``. Because each value depends only on its own position, a window is computed
directly (nothing outside it is drawn) and overlapping tiles see the same noise where they overlap. Ports
agree bit for bit on the uint32 words; the float32 normals can differ in the last bit where two libm's
``log``/``cos`` round differently (one float32 ulp, rarely).

This replaced the per-tile ``numpy.random.default_rng([seed, y, x])`` noise of earlier versions (numpy's
PCG64 seeding cannot be reproduced outside numpy in a few lines), so outputs for a given seed changed once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from tadsr.errors import ConfigError, InputError, ModelOutputError, NonFiniteOutputError

__all__ = [
    "RunTiles",
    "tile_starts",
    "plan_tiles",
    "pad_for_tiles",
    "tile_noise",
    "axis_weights",
    "upscale_tiled",
    "NOISE_SPEC",
    "NOISE_ALGORITHM",
    "NOISE_VERSION",
    "philox4x32_10",
    "noise_window",
    "check_noise_spec",
]

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
    """The noise of the tile at latent origin ``(y, x)``: the window of the seed's portable noise field.

    ``shape`` is ``(C, h, w)``; the values are ``noise_window(seed, shape, y, x)`` (float32, see
    the *Portable noise* section below), so channel ``c`` at latent ``(y + i, x + j)`` is the same whatever the shape.
    For the VQ-f4 x4 models the latent grid is the LR grid, so ``(y, x)`` is also the tile's LR origin.
    """
    return noise_window(seed, shape, y, x)


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
        seed: noise seed in ``[0, 2**64)``; the tile at LR origin ``(y, x)`` with noise shape ``(C, h, w)`` gets
            ``tile_noise(seed, y * h // tile, x * w // tile, noise_shape)`` (its window of the latent field).
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
    if scale < 1 or batch < 1 or not 0 <= seed < 2**64 or pad_multiple < 1:
        raise ConfigError(
            f"need scale, batch, pad_multiple >= 1 and 0 <= seed < 2**64 (got {scale}, {batch}, {pad_multiple}, {seed})"
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
    if len(noise_shape) != 3:
        raise ConfigError(f"noise shape must be (C, h, w), got {noise_shape}")
    lat_h, lat_w = noise_shape[1], noise_shape[2]
    if any((o * lat_h) % tile for o in ys) or any((o * lat_w) % tile for o in xs):
        raise ConfigError(f"tile origins {ys} x {xs} do not fall on the latent grid of noise shape {noise_shape}")
    # tiles lying wholly in the padding would be cropped away: skip them (their noise does not shift others')
    jobs = [(iy, ix) for iy in range(len(ys)) if ys[iy] < height for ix in range(len(xs)) if xs[ix] < width]
    canvas = np.zeros((3, out_h, out_w), np.float32)
    with tqdm(total=len(jobs), disable=not progress, unit="tile", desc="tiles") as bar:
        for first in range(0, len(jobs), batch):
            chunk = jobs[first : first + batch]
            calls = chunk + [chunk[-1]] * (batch - len(chunk)) if pad_last_batch else chunk
            lr_tiles = np.stack([padded[0, :, ys[iy] : ys[iy] + tile, xs[ix] : xs[ix] + tile] for iy, ix in calls])
            noise = np.stack([tile_noise(seed, ys[iy] * lat_h // tile, xs[ix] * lat_w // tile, noise_shape)
                              for iy, ix in calls])  # fmt: skip
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


# --------------------------------------------------------------------------------------------- portable noise

NOISE_ALGORITHM = "philox4x32-10-boxmuller"
NOISE_VERSION = 1
NOISE_SPEC: dict[str, Any] = {
    "algorithm": NOISE_ALGORITHM,
    "version": NOISE_VERSION,
    "counter": ["x", "y", "channel", 0],
    "key": ["seed % 2**32", "seed // 2**32"],
    "multipliers": ["0xD2511F53", "0xCD9E8D57"],
    "key_bumps": ["0x9E3779B9", "0xBB67AE85"],
    "rounds": 10,
    "uniform": "u_i = (w_i + 0.5) * 2**-32, i = 0, 1 (float64)",
    "normal": "float32(sqrt(-2 * ln(u_0)) * cos(2 * pi * u_1)) (float64 math)",
    "layout": "one field over the padded image's latent; a tile at latent origin (y0, x0) reads "
    "field[c, y0 + i, x0 + j]",
    "doc": "tadsr.runtime.tiling (Portable noise)",
}

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def philox4x32_10(
    ctr: Sequence[np.ndarray | int], key: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 of broadcastable counter words (uint32 values) under one key: four uint32 word arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    m0, m1 = np.uint64(_M0), np.uint64(_M1)
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0 = m0 * c0  # < 2**64: exact in uint64
        p1 = m1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT) ^ c1 ^ np.uint64(k0),
            p1 & _MASK,
            (p0 >> _SHIFT) ^ c3 ^ np.uint64(k1),
            p0 & _MASK,
        )
    return tuple(np.broadcast_to(c, np.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)).astype(np.uint32)
                 for c in (c0, c1, c2, c3))  # type: ignore[return-value]  # fmt: skip


def noise_window(seed: int, shape: Sequence[int], y0: int = 0, x0: int = 0) -> np.ndarray:
    """The window ``field[:, y0:y0+h, x0:x0+w]`` of the seed's noise field, float32 of ``shape = (C, h, w)``.

    Args:
        seed: ``0 <= seed < 2**64``.
        shape: ``(C, h, w)`` (channels, latent rows, latent columns).
        y0, x0: latent origin of the window, ``>= 0``; ``y0 + h`` and ``x0 + w`` at most ``2**32``.

    Raises:
        ConfigError: seed, shape or origin out of range.
    """
    if len(shape) != 3 or min(shape) < 0:
        raise ConfigError(f"noise shape must be (C, h, w) with non-negative sides, got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    if not 0 <= seed < 2**64:
        raise ConfigError(f"noise seed must be in [0, 2**64), got {seed}")
    if y0 < 0 or x0 < 0 or y0 + h > 2**32 or x0 + w > 2**32 or c > 2**32:
        raise ConfigError(f"noise window origin ({y0}, {x0}) / shape {tuple(shape)} out of the uint32 counter range")
    xs = np.arange(x0, x0 + w, dtype=np.uint64)[None, None, :]
    ys = np.arange(y0, y0 + h, dtype=np.uint64)[None, :, None]
    cs = np.arange(c, dtype=np.uint64)[:, None, None]
    w0, w1, _, _ = philox4x32_10((xs, ys, cs, 0), (seed & 0xFFFFFFFF, seed >> 32))
    u0 = (w0.astype(np.float64) + 0.5) * 2.0**-32
    u1 = (w1.astype(np.float64) + 0.5) * 2.0**-32
    z = np.sqrt(-2.0 * np.log(u0))
    z *= np.cos((2.0 * math.pi) * u1)
    return z.astype(np.float32)


def check_noise_spec(record: Mapping[str, Any] | None, where: str = "manifest") -> None:
    """Accept a manifest's ``noise`` record if it names this generator (absent: artifacts older than the record).

    Raises:
        ConfigError: the record names another algorithm or version (the artifact wants noise this runtime
            cannot draw).
    """
    if record is None:
        return
    if not isinstance(record, Mapping):
        raise ConfigError(f"{where}: 'noise' must be an object, got {type(record).__name__}")
    algo, version = record.get("algorithm"), record.get("version")
    if algo != NOISE_ALGORITHM or version != NOISE_VERSION:
        raise ConfigError(
            f"{where} asks for noise {algo!r} version {version!r}; this runtime draws {NOISE_ALGORITHM!r} "
            f"version {NOISE_VERSION} (tadsr.runtime.tiling); upgrade tadsr or re-export the artifact"
        )
