"""Image reading, writing and model conversion (tadsr.runtime.imageio)."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tadsr.errors import InputError
from tadsr.runtime import imageio
from tadsr.runtime.imageio import from_model, list_images, read_image, to_model, upscale_alpha, write_png

RNG = np.random.default_rng(0)


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def png16(path: Path, samples: np.ndarray, colour_type: int) -> Path:
    """Hand-write a 16-bit PNG (Pillow cannot) with Paeth-filtered rows, so the decoder has to unfilter."""
    h, w = samples.shape[:2]
    raw = samples.astype(">u2").reshape(h, -1).view(np.uint8)
    bpp = raw.shape[1] // w

    def paeth(row: np.ndarray, prev: np.ndarray) -> np.ndarray:
        out = row.astype(np.int32).copy()
        for i in range(len(row)):
            a = int(row[i - bpp]) if i >= bpp else 0
            b, c = int(prev[i]), int(prev[i - bpp]) if i >= bpp else 0
            p = a + b - c
            pred = a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c
            out[i] = (int(row[i]) - pred) % 256
        return out.astype(np.uint8)

    prev = np.zeros(raw.shape[1], np.uint8)
    rows = []
    for row in raw:
        rows.append(b"\x04" + paeth(row, prev).tobytes())
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )
    return path


def test_rgb_and_grey(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    img = read_image(save(Image.fromarray(arr), tmp_path / "a.png"))
    assert img.rgb.dtype == np.float32 and img.rgb.shape == (6, 9, 3) and img.alpha is None
    assert (img.bit_depth, img.source_mode, img.size) == (8, "RGB", (9, 6))
    np.testing.assert_array_equal(img.rgb, arr.astype(np.float32) / 255)

    grey = read_image(save(Image.fromarray(arr[..., 0]), tmp_path / "g.bmp"))
    assert grey.source_mode == "L" and grey.rgb.shape == (6, 9, 3)
    np.testing.assert_array_equal(grey.rgb, np.repeat(arr[..., :1], 3, axis=2) / np.float32(255))

    bw = read_image(save(Image.fromarray(arr[..., 0] > 127), tmp_path / "b.png"))
    assert bw.source_mode == "1" and set(np.unique(bw.rgb)) <= {0.0, 1.0}


def test_16bit_grey_full_precision(tmp_path: Path) -> None:
    arr = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    for name in ("g16.png", "g16.tif"):
        img = read_image(save(Image.fromarray(arr), tmp_path / name))
        assert img.source_mode.startswith("I;16") and img.bit_depth == 16
        np.testing.assert_array_equal(img.rgb[..., 1], arr.astype(np.float32) / 65535)


def test_16bit_rgb_and_grey_alpha_png_full_precision(tmp_path: Path) -> None:
    rgba = RNG.integers(0, 65536, (4, 6, 4), dtype=np.uint16)
    img = read_image(png16(tmp_path / "rgb16.png", rgba[..., :3], 2))
    assert img.bit_depth == 16 and img.alpha is None
    np.testing.assert_array_equal(img.rgb, rgba[..., :3].astype(np.float32) / 65535)

    img = read_image(png16(tmp_path / "rgba16.png", rgba, 6))
    np.testing.assert_array_equal(img.alpha, rgba[..., 3].astype(np.float32) / 65535)

    img = read_image(png16(tmp_path / "la16.png", rgba[..., :2], 4))
    assert img.bit_depth == 16
    np.testing.assert_array_equal(img.rgb[..., 2], rgba[..., 0].astype(np.float32) / 65535)
    np.testing.assert_array_equal(img.alpha, rgba[..., 1].astype(np.float32) / 65535)


def test_16bit_rgb_tiff_full_precision(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    arr = RNG.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    for compression in (None, "zlib"):
        path = tmp_path / f"rgb16_{compression}.tiff"
        tifffile.imwrite(path, arr, photometric="rgb", compression=compression)
        img = read_image(path)
        assert img.bit_depth == 16
        np.testing.assert_array_equal(img.rgb, arr.astype(np.float32) / 65535)


def test_alpha_and_palette(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    img = read_image(save(Image.fromarray(arr), tmp_path / "rgba.png"))
    np.testing.assert_array_equal(img.rgb, arr[..., :3] / np.float32(255))
    np.testing.assert_array_equal(img.alpha, arr[..., 3] / np.float32(255))

    la = read_image(save(Image.fromarray(arr[..., 0]).convert("LA"), tmp_path / "la.png"))
    assert la.source_mode == "LA" and la.rgb.shape == (4, 5, 3)
    np.testing.assert_array_equal(la.alpha, 1.0)

    pal = Image.fromarray(arr[..., :3]).quantize(8)
    plain = read_image(save(pal, tmp_path / "p.png"))
    assert plain.source_mode == "P" and plain.alpha is None
    np.testing.assert_array_equal(plain.rgb, np.asarray(pal.convert("RGB")) / np.float32(255))
    seethrough = read_image(save(pal, tmp_path / "pt.png", transparency=0))
    assert seethrough.alpha is not None and seethrough.alpha.min() == 0.0 and seethrough.alpha.max() == 1.0


def test_cmyk_converted_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save(Image.new("CMYK", (3, 2), (0, 255, 255, 0)), tmp_path / "c.jpg")
    with caplog.at_level(logging.WARNING, logger=imageio.__name__):
        img = read_image(path)
    assert img.source_mode == "CMYK" and img.rgb.shape == (2, 3, 3)
    assert img.rgb[..., 0].mean() > 0.8 and img.rgb[..., 1:].mean() < 0.2  # red
    assert "CMYK" in caplog.text


def test_exif_orientation(tmp_path: Path) -> None:
    arr = np.zeros((24, 48, 3), np.uint8)
    arr[:, :24] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image is shown rotated 90 degrees clockwise
    img = read_image(save(Image.fromarray(arr), tmp_path / "r.jpg", exif=exif, quality=95))
    assert img.size == (24, 48) and img.rgb.shape == (48, 24, 3)
    assert img.rgb[:20].mean() > 0.9 and img.rgb[28:].mean() < 0.1  # the left half is now on top


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [("x.png", b"not an image at all\n", "not a readable image"), ("missing.png", None, "does not exist")],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes | None, reason: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_and_float_images(tmp_path: Path) -> None:
    full = save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.png"):
        read_image(cut)
    floats = save(Image.fromarray(np.zeros((3, 3), np.float32)), tmp_path / "f.tif")
    with pytest.raises(InputError, match="mode F"):
        read_image(floats)


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.Tiff", "d.webp", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.Tiff", "d.webp"]
    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image"):
        list_images(empty)
    with pytest.raises(InputError, match="does not exist"):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_write_png_round_trip(tmp_path: Path, bit_depth: int) -> None:
    rgb = RNG.uniform(-0.2, 1.2, (5, 6, 3)).astype(np.float32)
    alpha = RNG.uniform(0, 1, (5, 6)).astype(np.float32)
    peak = np.float32(2**bit_depth - 1)
    path = tmp_path / "out.png"
    write_png(path, rgb, alpha, bit_depth=bit_depth)
    back = read_image(path)
    assert back.bit_depth == bit_depth and os.listdir(tmp_path) == ["out.png"]
    np.testing.assert_array_equal(back.rgb, np.round(np.clip(rgb, 0, 1) * peak) / peak)
    np.testing.assert_array_equal(back.alpha, np.round(alpha * peak) / peak)


def test_write_png_rounds_half_to_even(tmp_path: Path) -> None:
    rgb = np.array([2.5, 3.5, 254.5], np.float32)[None, :, None].repeat(3, axis=2) / np.float32(255)
    assert np.array_equal(rgb[0, :, 0] * np.float32(255), [2.5, 3.5, 254.5])  # exact halves in float32
    write_png(tmp_path / "h.png", rgb)
    assert np.asarray(Image.open(tmp_path / "h.png"))[0, :, 0].tolist() == [2, 4, 254]


def test_write_png_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keep.png"
    write_png(path, np.zeros((2, 2, 3)))
    before = path.read_bytes()

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(InputError, match="No space"):
        write_png(path, np.ones((2, 2, 3)))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["keep.png"] and path.read_bytes() == before  # no temp left, old file intact


def test_write_png_unwritable(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing"):
        write_png(tmp_path / "missing" / "o.png", np.zeros((2, 2, 3)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file"):
        write_png(tmp_path / "file" / "o.png", np.zeros((2, 2, 3)))
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="locked"):
            write_png(locked / "o.png", np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        write_png(tmp_path / "n.png", np.full((2, 2, 3), np.nan))


def test_model_conversion_round_trip() -> None:
    rgb = RNG.uniform(0, 1, (7, 5, 3)).astype(np.float32)
    x = to_model(rgb)
    assert x.shape == (1, 3, 7, 5) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(x[0, 1], (rgb[..., 1] - np.float32(0.5)) / np.float32(0.5))
    np.testing.assert_allclose(from_model(x), rgb, atol=1e-7)
    clipped = from_model(np.array([-3.0, 0.0, 3.0], np.float32).reshape(1, 3, 1, 1))
    assert clipped.shape == (1, 1, 3) and clipped.ravel().tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        to_model(np.zeros((4, 4)))


def test_upscale_alpha() -> None:
    alpha = np.zeros((6, 5), np.float32)
    alpha[:, 2:] = 1.0
    up = upscale_alpha(alpha, 4)
    assert up.shape == (24, 20) and up.dtype == np.float32 and up.min() >= 0 and up.max() <= 1
    assert up[:, :6].max() == 0.0 and up[:, 12:].min() == 1.0
    np.testing.assert_allclose(upscale_alpha(np.full((3, 3), 0.25, np.float32)), 0.25, atol=1e-6)


def test_no_torch_import() -> None:
    # an app has no torch: the module may import only numpy, Pillow, tqdm, the stdlib, tadsr.errors and the
    # torch-free atomic writer tadsr.fileio
    # (the tadsr package __init__ is outside this module's control)
    import ast

    from tadsr.runtime import imageio as module

    tree = ast.parse(Path(module.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.split(".")[0] == "torch" for name in names)
    assert {name for name in names if name.startswith("tadsr")} <= {"tadsr.errors", "tadsr.fileio"}
