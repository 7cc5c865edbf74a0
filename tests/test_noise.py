"""The portable noise generator of tadsr.runtime.tiling: known answers, an independent scalar reference, windows.

The scalar reference below is written from the spec in the module docstring with Python ints and ``math``; the
published Random123 known-answer vectors pin Philox4x32-10 itself, and ``KNOWN_NORMALS`` pins a few float32
normals, the values a C++ / Kotlin / Swift port checks itself against (tests/test_cpp_runner.py does so for
``runtime/cpp``).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from tadsr.errors import ConfigError
from tadsr.runtime.tiling import NOISE_SPEC, check_noise_spec, noise_window, philox4x32_10, tile_noise

MASK = 0xFFFFFFFF

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip

# (seed, channel, y, x) -> float32 normal, from scalar_normal below
KNOWN_NORMALS = [
    ((0, 0, 0, 0), 0.991137683391571),
    ((0, 2, 5, 7), -1.5637718439102173),
    ((12345, 1, 63, 64), 0.017472397536039352),
    ((2**64 - 1, 0, 1000, 3), 0.749363362789154),
    ((7, 3, 0, 2**32 - 1), 0.4396955668926239),
]


def scalar_philox(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def scalar_normal(seed: int, c: int, y: int, x: int) -> float:
    w = scalar_philox((x, y, c, 0), (seed & MASK, seed >> 32))
    u0, u1 = (w[0] + 0.5) / 2**32, (w[1] + 0.5) / 2**32
    z = math.sqrt(-2.0 * math.log(u0)) * math.cos(2.0 * math.pi * u1)
    return struct.unpack("<f", struct.pack("<f", z))[0]


@pytest.mark.parametrize("ctr,key,want", RANDOM123_KAT)
def test_philox_known_answers(ctr, key, want) -> None:
    assert tuple(int(w) for w in philox4x32_10(ctr, key)) == want
    assert scalar_philox(ctr, key) == want


@pytest.mark.parametrize("pos,want", KNOWN_NORMALS)
def test_known_normals(pos, want) -> None:
    seed, c, y, x = pos
    assert scalar_normal(seed, c, y, x) == want
    assert noise_window(seed, (c + 1, 1, 1), y, x)[c, 0, 0] == np.float32(want)


def test_vectorised_matches_scalar_reference() -> None:
    seed, shape, y0, x0 = 2**40 + 99, (3, 5, 6), 61, 190
    got = noise_window(seed, shape, y0, x0)
    want = np.array([[[scalar_normal(seed, c, y0 + i, x0 + j) for j in range(shape[2])] for i in range(shape[1])]
                     for c in range(shape[0])], np.float32)  # fmt: skip
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, want)


def test_one_field_tiles_read_windows() -> None:
    field = noise_window(5, (4, 96, 80))
    # any window, any channel count: the same values at the same latent positions
    np.testing.assert_array_equal(tile_noise(5, 32, 16, (4, 64, 64)), field[:, 32:96, 16:80])
    np.testing.assert_array_equal(tile_noise(5, 40, 8, (2, 8, 8)), field[:2, 40:48, 8:16])
    # overlapping tiles agree on their overlap; another seed differs
    a, b = tile_noise(5, 0, 0, (4, 64, 64)), tile_noise(5, 0, 48, (4, 64, 64))
    np.testing.assert_array_equal(a[:, :, 48:], b[:, :, :16])
    assert not np.array_equal(a, tile_noise(6, 0, 0, (4, 64, 64)))
    stats = noise_window(11, (3, 256, 256))
    assert abs(float(stats.mean())) < 0.01 and abs(float(stats.std()) - 1.0) < 0.01


def test_bad_arguments_and_manifest_record() -> None:
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            noise_window(seed, (1, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        noise_window(0, (2, 2))
    check_noise_spec(None)
    check_noise_spec(dict(NOISE_SPEC))
    with pytest.raises(ConfigError, match="version 2"):
        check_noise_spec({**NOISE_SPEC, "version": 2})
    with pytest.raises(ConfigError, match="pcg64"):
        check_noise_spec({"algorithm": "pcg64", "version": 1})
