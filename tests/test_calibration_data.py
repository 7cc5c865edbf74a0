"""Calibration / training patches: determinism, DIV2K layout, errors, the shipped set and the photo split."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tadsr.train import photos
from tadsr.train.calibration_set import build_shipped_calibration
from tadsr.train.photos import PhotoRecord, load_photo_set, split_of

from tadsr.errors import InputError
from tadsr.imresize import imresize
from tadsr.patches import (
    default_calibration_dir,
    find_images,
    sample_patches,
)

REPO = Path(__file__).resolve().parents[1]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth-ish random RGB uint8 image (a few sinusoids plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(yy / rng.uniform(3, 9) + c) * np.cos(xx / rng.uniform(3, 9)) for c in range(3)], -1)
    img = 127.5 + 100 * base + rng.normal(0, 10, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "a.png", _image(100, 90, 1))
    _save(root / "sub" / "b.jpg", _image(72, 130, 2))
    _save(root / "c.bmp", _image(80, 80, 3))
    (root / "notes.txt").write_text("not an image, ignored by suffix")
    return root


def test_shapes_ranges_and_determinism(folder: Path) -> None:
    a = sample_patches(folder, num_patches=7, tile=16, scale=4, seed=0)
    b = sample_patches(folder, num_patches=7, tile=16, scale=4, seed=0)
    c = sample_patches(folder, num_patches=7, tile=16, scale=4, seed=1)
    assert a.lr.shape == (7, 3, 16, 16) and a.hr.shape == (7, 3, 64, 64)
    assert a.lr.dtype == np.float32 and a.hr.dtype == np.float32
    assert a.lr.min() >= -1 and a.lr.max() <= 1 and a.hr.min() >= -1 and a.hr.max() <= 1
    assert len(a) == 7 and a.lr_source == "bicubic"
    np.testing.assert_array_equal(a.lr, b.lr)
    np.testing.assert_array_equal(a.hr, b.hr)
    assert a.origins == b.origins and a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash and not np.array_equal(a.hr, c.hr)
    assert {o.path.name for o in a.origins} == {"a.png", "b.jpg", "c.bmp"}  # 7 patches dealt over 3 images
    assert all(o.y % 4 == 0 and o.x % 4 == 0 for o in a.origins)


def test_hash_is_location_independent(folder: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    a = sample_patches(folder, num_patches=3, tile=16, seed=5)
    b = sample_patches(copy, num_patches=3, tile=16, seed=5)
    assert a.content_hash == b.content_hash
    np.testing.assert_array_equal(a.hr, b.hr)


def test_patches_match_image_and_whole_image_bicubic(folder: Path) -> None:
    ps = sample_patches(folder, num_patches=6, tile=16, scale=4, seed=3, lr_uint8=False)
    for k, (path, y, x) in enumerate(ps.origins):
        img = np.asarray(Image.open(path).convert("RGB"), np.float64) / 255.0
        np.testing.assert_allclose(ps.hr[k], img[y : y + 64, x : x + 64].transpose(2, 0, 1) * 2 - 1, atol=1e-6)
        lr_full = np.clip(imresize(img, 1 / 4), 0, 1)  # DIV2K convention: downscale the whole image, then crop
        lr_ref = lr_full[y // 4 : y // 4 + 16, x // 4 : x // 4 + 16].transpose(2, 0, 1) * 2 - 1
        np.testing.assert_allclose(ps.lr[k], lr_ref, atol=1e-6)
    q = sample_patches(folder, num_patches=6, tile=16, scale=4, seed=3)  # default: LR rounded to 8 bits
    np.testing.assert_allclose(q.lr, ps.lr, atol=1 / 255 + 1e-6)
    np.testing.assert_allclose((q.lr + 1) * 127.5, np.round((q.lr + 1) * 127.5), atol=1e-3)


def test_min_std_avoids_flat_patches(tmp_path: Path) -> None:
    img = np.full((256, 256, 3), 128, np.uint8)
    img[:, 192:] = _image(256, 64, 9)  # only the right quarter has texture
    _save(tmp_path / "half_flat.png", img)
    ps = sample_patches(tmp_path, num_patches=8, tile=8, seed=0, min_std=0.05)
    grey = ((ps.hr + 1) / 2).mean(axis=1)
    assert (grey.reshape(8, -1).std(axis=1) >= 0.05).sum() >= 7


def _fake_div2k(root: Path, with_lr: bool = True) -> None:
    for name, seed in (("0001", 1), ("0002", 2)):
        hr = _image(96, 80, seed)
        _save(root / "DIV2K_train_HR" / f"{name}.png", hr)
        if with_lr:  # a distinct LR (not the bicubic of HR) proves the file is used
            _save(root / "DIV2K_train_LR_bicubic" / "X4" / f"{name}x4.png", _image(24, 20, seed + 10))
    _save(root / "DIV2K_valid_HR" / "0801.png", _image(64, 64, 3))
    if with_lr:
        _save(root / "DIV2K_valid_LR_bicubic" / "X4" / "0801x4.png", _image(16, 16, 13))


def test_div2k_layout_pairs_hr_with_lr(tmp_path: Path) -> None:
    _fake_div2k(tmp_path)
    found = find_images(tmp_path)
    assert found.layout == "div2k"
    assert [(p.hr.name, p.lr.name if p.lr else None) for p in found.images] == [
        ("0001.png", "0001x4.png"), ("0002.png", "0002x4.png"), ("0801.png", "0801x4.png"),
    ]  # fmt: skip
    ps = sample_patches(tmp_path, num_patches=5, tile=8, scale=4, seed=0)
    assert ps.lr_source == "files" and ps.lr.shape == (5, 3, 8, 8)
    for k, (path, y, x) in enumerate(ps.origins):
        lr_path = path.parent.parent / path.parent.name.replace("_HR", "_LR_bicubic") / "X4" / f"{path.stem}x4.png"
        lr = np.asarray(Image.open(lr_path), np.float64) / 255.0
        np.testing.assert_allclose(ps.lr[k], lr[y // 4 : y // 4 + 8, x // 4 : x // 4 + 8].transpose(2, 0, 1) * 2 - 1,
                                   atol=1e-6)  # fmt: skip
    one_split = find_images(tmp_path / "DIV2K_train_HR")  # pointing at the HR folder itself also pairs
    assert one_split.layout == "div2k" and all(p.lr is not None for p in one_split.images)


def test_div2k_without_lr_uses_bicubic_and_missing_lr_is_an_error(tmp_path: Path) -> None:
    _fake_div2k(tmp_path, with_lr=False)
    assert sample_patches(tmp_path, num_patches=2, tile=8).lr_source == "bicubic"
    _save(tmp_path / "DIV2K_train_LR_bicubic" / "X4" / "0001x4.png", _image(24, 20, 4))  # 0002x4 missing
    with pytest.raises(InputError, match="0002"):
        find_images(tmp_path)


def test_lr_dir_for_plain_folder(tmp_path: Path) -> None:
    _save(tmp_path / "hr" / "x.png", _image(64, 64, 1))
    _save(tmp_path / "lr" / "x.png", _image(16, 16, 2))
    ps = sample_patches(tmp_path / "hr", num_patches=1, tile=16, lr_dir=tmp_path / "lr")
    assert ps.lr_source == "files"
    np.testing.assert_allclose(ps.lr[0], _image(16, 16, 2).transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_error_missing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        sample_patches(tmp_path / "nope", num_patches=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        sample_patches(tmp_path / "empty", num_patches=1)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match="readme.txt"):
        sample_patches(tmp_path / "docs", num_patches=1)


def test_error_non_image_file_is_named(folder: Path) -> None:
    (folder / "broken.png").write_text("this is not a PNG")
    with pytest.raises(InputError, match="broken.png"):
        sample_patches(folder, num_patches=2, tile=16)


def test_small_images_skipped_or_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "tiny1.png", _image(40, 50, 1))
    _save(tmp_path / "tiny2.png", _image(63, 200, 2))
    with pytest.raises(InputError, match=r"tiny1\.png.*tiny2\.png"):
        sample_patches(tmp_path, num_patches=2, tile=16)
    _save(tmp_path / "big.png", _image(64, 64, 3))
    with caplog.at_level(logging.WARNING):
        ps = sample_patches(tmp_path, num_patches=3, tile=16)
    assert "tiny1.png" in caplog.text and "tiny2.png" in caplog.text
    assert {o.path.name for o in ps.origins} == {"big.png"}


@pytest.mark.parametrize("kwargs", [{"num_patches": 0}, {"num_patches": 2, "tile": 0}, {"num_patches": 2.5}])
def test_bad_arguments(folder: Path, kwargs: dict) -> None:
    with pytest.raises(InputError):
        sample_patches(folder, **kwargs)


# ----------------------------------------------------------------------------------------- shipped calibration


def test_shipped_calibration_set() -> None:
    calib = default_calibration_dir()
    pngs = sorted(calib.glob("calib_*.png"))
    assert len(pngs) == 48
    assert sum(p.stat().st_size for p in pngs) < 6e6
    sources = (calib / "SOURCES.md").read_text(encoding="utf-8")
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (256, 256) and im.mode == "RGB"
        row = next(line for line in sources.splitlines() if line.startswith(f"| {p.name} |"))
        assert "| train/" in row and "/val/" not in row and "| (" in row  # photo, licence, crop box recorded
    ps = sample_patches(calib, num_patches=6, tile=64, seed=0)
    assert ps.hr.shape == (6, 3, 256, 256) and all(o.y == 0 and o.x == 0 for o in ps.origins)


def _fake_photo_set(root: Path) -> None:
    records = []
    for i in range(6):
        split = "val" if i >= 4 else "train"
        rel = f"{split}/p{i}.png"
        img = _image(96, 96, i)
        if split == "val":
            img[:] = 7  # a value no train image has, so any leak would show
        _save(root / rel, img)
        records.append(PhotoRecord(file=rel, origin=f"/src/p{i}.jpg", package="pkg", license="CC0-1.0",
                                   upstream_license=None, copyright="me", split=split,
                                   original_size=(192, 192), size=(96, 96)))  # fmt: skip
    doc = {"version": 1, "val_fraction": 0.3, "seed": 0, "photos": [asdict(r) for r in records]}
    (root / "SOURCES.json").write_text(json.dumps(doc))


def test_build_shipped_calibration_uses_train_only_and_is_deterministic(tmp_path: Path) -> None:
    _fake_photo_set(tmp_path / "photos")
    a = build_shipped_calibration(tmp_path / "photos", tmp_path / "a", num_patches=10, patch_size=32)
    b = build_shipped_calibration(tmp_path / "photos", tmp_path / "b", num_patches=10, patch_size=32)
    assert len(a) == 10
    for pa, pb in zip(a, b, strict=True):
        arr = np.asarray(Image.open(pa))
        np.testing.assert_array_equal(arr, np.asarray(Image.open(pb)))
        assert not (arr == 7).all()
    md = (tmp_path / "a" / "SOURCES.md").read_text()
    assert "train/p" in md and "val/p" not in md and "CC0-1.0" in md


@pytest.mark.skipif(not (REPO / "data" / "photos" / "SOURCES.json").is_file(), reason="no local photo set")
def test_shipped_crop_boxes_point_at_train_photos() -> None:
    """Each shipped patch equals the crop its SOURCES.md row names, in a train photo of the local photo set."""
    photo_set = load_photo_set(REPO / "data" / "photos")
    splits = {r.file: r.split for r in photo_set.records}
    calib = default_calibration_dir()
    rows = [line for line in (calib / "SOURCES.md").read_text().splitlines() if line.startswith("| calib_")]
    assert len(rows) == 48
    decoded: dict[str, np.ndarray] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        photo = cells[1].split(" ")[0]
        x0, y0, x1, y1 = (int(v) for v in cells[-1].strip("()").split(","))
        assert splits[photo] == "train"
        if photo not in decoded:
            decoded[photo] = np.asarray(Image.open(photo_set.root / photo).convert("RGB"))
        img = decoded[photo]
        np.testing.assert_array_equal(np.asarray(Image.open(calib / cells[0])), img[y0:y1, x0:x1])


# ----------------------------------------------------------------------------------------- photo set


def test_split_rule_is_per_name_and_stable() -> None:
    names = [f"photo_{i}" for i in range(400)]
    val = [n for n in names if split_of(n, val_fraction=0.15) == "val"]
    assert 30 < len(val) < 90  # ~15 %
    assert val == [n for n in names if split_of(n, val_fraction=0.15, seed=0) == "val"]
    assert all(split_of(n, val_fraction=0.0) == "train" for n in names[:20])
    assert all(split_of(n, val_fraction=1.0) == "val" for n in names[:20])


def test_missing_package_error_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(photos, "PLASMA_DIR", tmp_path / "no_wallpapers")
    with pytest.raises(InputError, match="apt-get install plasma-workspace-wallpapers mate-backgrounds"):
        photos.collect_photos(tmp_path / "out")


def test_load_photo_set_round_trip(tmp_path: Path) -> None:
    _fake_photo_set(tmp_path)
    ps = load_photo_set(tmp_path)
    assert [p.name for p in ps.train] == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert [p.name for p in ps.val] == ["p4.png", "p5.png"]
    with pytest.raises(InputError, match="python -m tadsr.train.photos"):
        load_photo_set(tmp_path / "nothing")


def _rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A Qt resource file (format 2) with one folder ``/d`` holding ``files`` (name -> (data, zlib?))."""
    import struct
    import zlib

    names, data = b"", b""
    name_off: dict[str, int] = {}
    for n in ["d", *files]:
        name_off[n] = len(names)
        names += struct.pack(">HI", len(n), 0) + n.encode("utf-16-be")
    nodes = [
        struct.pack(">IHII", 0, 2, 1, 1) + bytes(8),
        struct.pack(">IHII", name_off["d"], 2, len(files), 2) + bytes(8),
    ]
    for n, (raw, packed) in files.items():
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw) if packed else raw
        nodes.append(struct.pack(">IHHHI", name_off[n], 1 if packed else 0, 0, 0, len(data)) + bytes(8))
        data += struct.pack(">I", len(blob)) + blob
    tree = b"".join(nodes)
    head = 24
    return (
        b"qres"
        + struct.pack(">IIIII", 2, head, head + len(tree), head + len(tree) + len(data), 0)
        + tree
        + data
        + names
    )


def test_read_rcc_round_trip(tmp_path: Path) -> None:
    payload = {"a.webp": (b"plain bytes", False), "b.png": (b"x" * 1000 + b"tail", True)}
    (tmp_path / "t.rcc").write_bytes(_rcc(payload))
    assert photos.read_rcc(tmp_path / "t.rcc") == [("/d/a.webp", b"plain bytes"), ("/d/b.png", b"x" * 1000 + b"tail")]
    (tmp_path / "bad.rcc").write_bytes(b"nope" + bytes(20))
    with pytest.raises(InputError, match="not a Qt resource file"):
        photos.read_rcc(tmp_path / "bad.rcc")


def test_dep5_match_by_file_name_ignores_wildcards() -> None:
    stanzas = [
        {"Files": "*", "License": "GPL-3+", "Copyright": "all"},
        {"Files": "16.04/Bridge.jpg 20.04/Kite.jpg", "License": "CC-BY-SA-4.0", "Copyright": "someone"},
        {"Files": "debian/*", "License": "Expat", "Copyright": "packager"},
    ]
    assert photos._dep5_match(stanzas, "Bridge.jpg", basename=True)[:2] == ("CC-BY-SA-4.0", "someone")
    assert photos._dep5_match(stanzas, "Other.jpg", basename=True)[0] == "GPL-3+"  # not the debian/* stanza
    assert photos._dep5_match(stanzas, "debian/x")[0] == "Expat"
    assert not photos._is_licence_ok("") and not photos._is_licence_ok("All rights reserved")
    assert photos._is_licence_ok("CC-BY-SA-3.0") and photos._is_licence_ok("Public domain (NASA)")


def test_captures_do_not_depend_on_the_thread_count(tiny_models) -> None:
    """The reference captures (whose ranges set the INT8 scales) are the same bytes whatever torch's thread count
    in the calling process: with 2 threads a convolution splits its work differently and the last bits move
    (the bundled model's captures differed by 2e-6, and by a codebook flip in one HR output, session 19)."""
    import torch

    from tadsr.quantize.calibration import capture

    lr = np.random.default_rng(3).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(capture(tiny_models, lr, seed=0))
            assert torch.get_num_threads() == n  # the caller's setting is given back
    finally:
        torch.set_num_threads(before)
    for k in ("z_y", "x0", "sr"):
        assert np.array_equal(getattr(runs[0], k), getattr(runs[1], k)), k
