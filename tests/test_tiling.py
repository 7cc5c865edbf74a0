"""Tiling exactness, noise reproducibility and seamless blending (tadsr.runtime.tiling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tadsr.errors import InputError
from tadsr.runtime.tiling import axis_weights, pad_for_tiles, plan_tiles, tile_noise, tile_starts, upscale_tiled

SCALE = 4


def nearest_x4(lr_tiles: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """An identity-like model: nearest-neighbour x4 upsampling of the LR tile."""
    return np.repeat(np.repeat(lr_tiles, SCALE, axis=2), SCALE, axis=3)


def nonlinear(lr_tiles: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A model whose output depends on the tile content, its noise, and tile-wide statistics."""
    up = nearest_x4(lr_tiles, noise)
    shift = 0.1 * noise[:, :1].mean(axis=(2, 3), keepdims=True) + 0.3 * lr_tiles.std(axis=(1, 2, 3), keepdims=True)
    return np.tanh(1.5 * up + shift + 0.05 * nearest_x4(noise[:, :3], noise))


def random_lr(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)


def test_tile_starts_match_upstream_rule() -> None:
    assert tile_starts(1000, 512, 64) == [0, 448, 488]
    assert tile_starts(960, 512, 64) == [0, 448]
    assert tile_starts(512, 512, 64) == [0]
    assert tile_starts(130, 64, 0) == [0, 64, 66]
    assert plan_tiles(64, 96, 64, 32) == [(0, 0), (0, 32)]
    with pytest.raises(ValueError):
        tile_starts(100, 64, 64)
    with pytest.raises(ValueError):
        tile_starts(50, 64, 0)


def test_padding_reflects_and_handles_short_sides() -> None:
    lr = random_lr(20, 1)
    padded = pad_for_tiles(lr, 64)
    assert padded.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(padded[..., :20, :1], lr)
    assert np.all(padded == padded[..., :1])  # a 1 px column is repeated
    # a 20 px side padded by 44 keeps reflecting: 0..19, 18..0, 1..19, 18..13 (a triangle wave of period 38)
    idx = 19 - np.abs(19 - np.arange(64) % 38)
    np.testing.assert_array_equal(padded[0, :, :, 0], lr[0, :, idx, 0].T)
    assert pad_for_tiles(random_lr(97, 61), 32).shape[2:] == (128, 64)


@pytest.mark.parametrize("size", [(97, 61), (130, 200)])
@pytest.mark.parametrize("overlap", [0, 16, 32])
@pytest.mark.parametrize("blend", ["feather", "average"])
def test_identity_runner_reproduces_input(size: tuple[int, int], overlap: int, blend: str) -> None:
    lr = random_lr(*size)
    out = upscale_tiled(lr, nearest_x4, tile=64, overlap=overlap, blend=blend, batch=4)
    assert out.shape == (1, 3, SCALE * size[0], SCALE * size[1]) and out.dtype == np.float32
    np.testing.assert_allclose(out, nearest_x4(lr, lr), rtol=0, atol=1e-6)


def test_tiles_in_padding_are_skipped() -> None:
    calls = []
    lr = random_lr(65, 70)  # padded to 128: the tiles at 96 lie wholly in the padding

    def run(lr_tiles: np.ndarray, noise: np.ndarray) -> np.ndarray:
        calls.append(len(lr_tiles))
        return nearest_x4(lr_tiles, noise)

    out = upscale_tiled(lr, run, tile=32, overlap=0)
    assert tile_starts(128, 32, 0) == [0, 32, 64, 96] and len(calls) == 9
    np.testing.assert_allclose(out, nearest_x4(lr, lr), atol=1e-6)


def test_tiny_image_single_pixel() -> None:
    lr = random_lr(1, 1)
    out = upscale_tiled(lr, nearest_x4, tile=32, overlap=8)
    np.testing.assert_allclose(out, np.broadcast_to(lr, (1, 3, 4, 4)), atol=1e-6)


@pytest.mark.parametrize("size", [(97, 61), (64, 64), (5, 40)])
def test_tile_covering_image_equals_direct_call(size: tuple[int, int]) -> None:
    lr = random_lr(*size, seed=1)
    out = upscale_tiled(lr, nonlinear, tile=128, overlap=16, seed=7, latent_channels=4)
    padded = pad_for_tiles(lr, 128)
    assert padded.shape[2:] == (128, 128)
    direct = nonlinear(padded, tile_noise(7, 0, 0, (4, 128, 128))[None])
    expected = np.clip(direct[:, :, : SCALE * size[0], : SCALE * size[1]], -1, 1)
    np.testing.assert_array_equal(out, expected)


def test_noise_depends_only_on_seed_and_position() -> None:
    lr = random_lr(70, 90)
    tiles = [(y, x) for y, x in plan_tiles(128, 128, 32, 8) if y < 70 and x < 90]  # others lie in the padding
    outputs = []
    for batch, pad_last in [(1, False), (3, False), (5, True)]:
        seen: list[np.ndarray] = []

        def run(
            lr_tiles: np.ndarray, noise: np.ndarray, batch: int = batch, pad_last: bool = pad_last, seen: list = seen
        ) -> np.ndarray:
            assert noise.dtype == np.float32 and noise.shape[1:] == (3, 32, 32)
            assert len(noise) == batch or not pad_last  # pad_last_batch keeps the call shape fixed
            seen.extend(noise)
            return nonlinear(lr_tiles, noise)

        outputs.append(upscale_tiled(lr, run, tile=32, overlap=8, seed=3, batch=batch, pad_last_batch=pad_last))
        assert len(seen) == len(tiles) + (-len(tiles) % batch if pad_last else 0)
        for k, (y, x) in enumerate(tiles):
            np.testing.assert_array_equal(seen[k], tile_noise(3, y, x, (3, 32, 32)))
    assert len(tiles) % 5 != 0  # so the last call of 5 was padded
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])
    assert not np.array_equal(tile_noise(3, 0, 0, (3, 4, 4)), tile_noise(4, 0, 0, (3, 4, 4)))


@pytest.mark.parametrize("overlap", [0, 8, 16])
def test_blend_weights_sum_to_one(overlap: int) -> None:
    # A constant model output must come back unchanged everywhere (normalised weights sum to one) ...
    out = upscale_tiled(
        random_lr(97, 61), lambda lr, n: np.full((len(lr), 3, 128, 128), 0.3, np.float32), tile=32, overlap=overlap
    )
    np.testing.assert_allclose(out, 0.3, rtol=0, atol=1e-6)
    # ... and at the nominal overlap the raw feather windows are already a partition of unity.
    size, stride = 4 * 32, 4 * (32 - overlap)
    total = np.zeros(size + 2 * stride)
    for i, window in enumerate(axis_weights(3, size, 4 * overlap, "feather")):
        assert window.min() > 0
        total[i * stride : i * stride + size] += window
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_feather_hides_seams() -> None:
    h, w, tile, overlap = 64, 128, 32, 8  # already multiples of 64: no padding
    yy, xx = np.mgrid[0:h, 0:w] / 20.0
    lr = np.broadcast_to((0.5 * np.sin(yy) * np.cos(xx))[None, None], (1, 3, h, w)).astype(np.float32)

    def offset_model(lr_tiles: np.ndarray, noise: np.ndarray) -> np.ndarray:
        # smooth content plus a per-tile offset (each tile's noise differs), as real tiles disagree
        return nearest_x4(lr_tiles, noise) + 0.2 * np.sign(noise[:, :1, :1, :1])

    def max_jumps(blend: str) -> tuple[float, float]:
        err = upscale_tiled(lr, offset_model, tile=tile, overlap=overlap, blend=blend)[0] - nearest_x4(lr, lr)[0]
        jumps = np.abs(np.diff(err, axis=2))  # between columns c and c+1
        edges = set()
        for x in tile_starts(w, tile, overlap):
            edges |= {4 * x - 1, 4 * (x + tile) - 1}
        border = np.zeros(jumps.shape[2], bool)
        border[[c for c in edges if 0 <= c < jumps.shape[2]]] = True
        return float(jumps[:, :, border].max()), float(jumps[:, :, ~border].max())

    at_border, elsewhere = max_jumps("feather")
    assert at_border <= elsewhere + 1e-6
    assert elsewhere < 0.05  # the 0.2 offsets are spread over the 32-px ramp
    at_border_avg, _ = max_jumps("average")
    assert at_border_avg > 0.15  # uniform averaging leaves steps of ~offset/2 at the tile edges


def test_rejects_bad_inputs() -> None:
    with pytest.raises(InputError):
        upscale_tiled(np.zeros((3, 8, 8), np.float32), nearest_x4, tile=32)
    with pytest.raises(InputError):
        upscale_tiled(np.zeros((1, 3, 8, 8), np.uint8), nearest_x4, tile=32)
    with pytest.raises(ValueError, match="returned shape"):
        upscale_tiled(random_lr(8, 8), lambda lr, n: lr, tile=32)
    with pytest.raises(ValueError, match="blend"):
        upscale_tiled(random_lr(8, 8), nearest_x4, tile=32, blend="max")


def test_progress_bar_runs() -> None:
    out = upscale_tiled(random_lr(40, 40), nearest_x4, tile=32, overlap=8, progress=True)
    assert out.shape == (1, 3, 160, 160)


def test_no_torch_import() -> None:
    # an app has no torch: the module may import only numpy, Pillow, tqdm, the stdlib and tadsr.errors
    # (the tadsr package __init__ is outside this module's control)
    import ast

    from tadsr.runtime import tiling as module

    tree = ast.parse(Path(module.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.split(".")[0] == "torch" for name in names)
    assert {name for name in names if name.startswith("tadsr")} <= {"tadsr.errors"}
