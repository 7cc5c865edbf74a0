"""MATLAB-compatible bicubic imresize: invariants, a slow per-pixel reference, and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tadsr.errors import InputError
from tadsr.imresize import cubic, imresize, resize_weights


def _keys(x: float) -> float:
    """Keys' cubic (a = -0.5) written out piecewise, independently of tadsr.imresize.cubic."""
    t = abs(x)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def _reflect(k: int, n: int) -> int:
    """MATLAB's symmetric padding, one bounce at a time."""
    while k < 0 or k >= n:
        k = -k - 1 if k < 0 else 2 * n - 1 - k
    return k


def _taps_1d(i: int, n: int, scale: float, aa: bool) -> dict[int, float]:
    """Normalised {input index: weight} for output pixel i (0-based) along an axis of length n."""
    u = (i + 0.5) / scale - 0.5
    stretch = aa and scale < 1
    half = 2 / scale if stretch else 2
    taps: dict[int, float] = {}
    for k in range(math.floor(u - half) - 1, math.ceil(u + half) + 2):
        wk = scale * _keys(scale * (u - k)) if stretch else _keys(u - k)
        if wk != 0.0:
            src = _reflect(k, n)
            taps[src] = taps.get(src, 0.0) + wk
    total = sum(taps.values())
    return {k: v / total for k, v in taps.items()}


def _slow_imresize(img: np.ndarray, scale: float, aa: bool = True) -> np.ndarray:
    """Direct per-output-pixel 2-D sum (no matrices, no separability tricks)."""
    h, w = img.shape[:2]
    oh, ow = math.ceil(h * scale), math.ceil(w * scale)
    out = np.zeros((oh, ow) + img.shape[2:], dtype=np.float64)
    rows = [_taps_1d(i, h, scale, aa) for i in range(oh)]
    cols = [_taps_1d(j, w, scale, aa) for j in range(ow)]
    for i in range(oh):
        for j in range(ow):
            acc = np.zeros(img.shape[2:], dtype=np.float64)
            for r, wr in rows[i].items():
                for c, wc in cols[j].items():
                    acc = acc + wr * wc * img[r, c]
            out[i, j] = acc
    return out


def test_cubic_kernel_values() -> None:
    xs = np.array([-2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.25, 0.75, 1.25, 1.75, 2.0, 3.0])
    np.testing.assert_allclose(cubic(xs), [_keys(x) for x in xs], atol=1e-15)
    assert cubic(np.array(0.0)) == 1.0


@pytest.mark.parametrize("shape", [(64, 64), (67, 50), (5, 9), (1, 7), (33, 21, 3)])
def test_output_size_is_ceil(shape: tuple[int, ...]) -> None:
    out = imresize(np.zeros(shape), 1 / 4)
    assert out.shape == (math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)) + shape[2:]


def test_constant_image_stays_constant() -> None:
    img = np.full((37, 29, 3), 0.3125)
    np.testing.assert_allclose(imresize(img, 1 / 4), 0.3125, atol=1e-12)


def test_linear_ramp_stays_linear_in_interior() -> None:
    h, w = 64, 48
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.01 * yy - 0.02 * xx + 0.5
    out = imresize(img, 1 / 4)
    # output pixel i samples input coordinate 4*i + 1.5; the x4 antialias kernel reaches 8 input pixels out,
    # so outputs whose support stays inside the image (2 <= i < n/4 - 2) see no mirrored taps.
    u_y = 4 * np.arange(out.shape[0]) + 1.5
    u_x = 4 * np.arange(out.shape[1]) + 1.5
    expected = 0.01 * u_y[:, None] - 0.02 * u_x[None, :] + 0.5
    np.testing.assert_allclose(out[2:-2, 2:-2], expected[2:-2, 2:-2], atol=1e-12)
    # at the border the mirrored taps bend the ramp: that is MATLAB's behaviour, not a bug
    assert abs(out[0, 0] - expected[0, 0]) > 1e-3


@pytest.mark.parametrize(
    ("shape", "scale", "aa"),
    [((13, 10, 3), 1 / 4, True), ((9, 11), 1 / 2, True), ((12, 7), 1 / 3, True), ((6, 5, 2), 2.0, True),
     ((10, 10), 0.7, True), ((17, 9), 1 / 4, False)],
)  # fmt: skip
def test_matches_slow_reference(shape: tuple[int, ...], scale: float, aa: bool) -> None:
    rng = np.random.default_rng(0)
    img = rng.random(shape)
    np.testing.assert_allclose(imresize(img, scale, antialiasing=aa), _slow_imresize(img, scale, aa), atol=1e-12)


def test_known_values() -> None:
    img = np.arange(16.0).reshape(4, 4)
    # Octave's (MATLAB-compatible) imresize(reshape(0:15,4,4)', 0.5, 'bicubic', 'AntiAliasing', false)
    np.testing.assert_allclose(imresize(img, 0.5, antialiasing=False), [[2.1875, 4.3125], [10.6875, 12.8125]])
    # With antialiasing, worked by hand from MATLAB's definition: 1-D taps at input -3..4 (mirrored to
    # 2,1,0,0,1,2,3,3) with weights 0.5*k(0.5*d) give 0.4609375 for the ramp 0..3, hence 4*0.4609375 + 0.4609375.
    np.testing.assert_allclose(imresize(img, 0.5), [[2.3046875, 4.3828125], [10.6171875, 12.6953125]])


def test_weights_rows_sum_to_one_and_dtype_kept() -> None:
    mat = resize_weights(50, 13, 0.25)
    np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-12)
    assert imresize(np.ones((8, 8), np.float32), 0.25).dtype == np.float32
    assert imresize(np.ones((8, 8), np.uint8), 0.25).dtype == np.float64


def test_bad_input_raises() -> None:
    with pytest.raises(InputError):
        imresize(np.zeros((4,)), 0.5)
    with pytest.raises(InputError):
        imresize(np.zeros((4, 4)), 0.0)
    with pytest.raises(InputError):
        imresize(np.zeros((0, 4)), 0.5)
