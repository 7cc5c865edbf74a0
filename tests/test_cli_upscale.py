"""``tadsr upscale`` with the PyTorch reference on real photos (tiny preset, random weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tadsr.cli import main

PHOTO = Path(__file__).resolve().parents[1] / "tadsr" / "data" / "calib"


def _photo() -> Image.Image:
    files = sorted(PHOTO.glob("*.png"))
    assert files, f"shipped calibration photos missing in {PHOTO}"
    return Image.open(files[0]).convert("RGB")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("in")
    src = _photo()
    src.crop((0, 0, 97, 61)).save(d / "odd.png")
    src.crop((10, 10, 60, 47)).convert("L").save(d / "grey.jpg", quality=95)
    rgba = src.crop((0, 0, 40, 40)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 40)))
    rgba.save(d / "rgba.png")
    g16 = (np.asarray(src.crop((0, 0, 33, 21)).convert("L")).astype(np.uint16) * 257)
    Image.fromarray(g16).save(d / "grey16.png")
    assert Image.open(d / "grey16.png").mode == "I;16"
    return d


def test_upscale_folder(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["-q", "upscale", str(inputs), str(out), "--preset", "tiny", "--init", "random", "--tile", "64"])
    assert rc == 0
    expect = {"odd.png": (388, 244), "grey.png": (200, 148), "rgba.png": (160, 160), "grey16.png": (132, 84)}
    for name, size in expect.items():
        im = Image.open(out / name)
        assert im.size == size, name
        assert im.mode == ("RGBA" if name == "rgba.png" else "RGB")
        arr = np.asarray(im)
        assert arr.dtype == np.uint8 and arr.std() > 1.0  # not blank
    alpha = np.asarray(Image.open(out / "rgba.png"))[..., 3]
    assert alpha[0].mean() < 30 < 220 < alpha[-1].mean()  # the vertical gradient alpha is kept, upscaled


def test_upscale_teacher_file(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.png"
    rc = main(["-q", "upscale", str(inputs / "grey16.png"), str(out), "--preset", "tiny", "--init", "random",
               "--steps", "4", "--tile", "64"])
    assert rc == 0 and Image.open(out).size == (132, 84)


def test_upscale_default_tile_is_the_presets(inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --tile, upscale runs the preset's tile (bundled: 64, the tile its GroupNorm networks were trained
    on); --tile still wins."""
    import tadsr.runtime.tiling as tiling
    from tadsr import config

    assert config.upscale_tile("bundled") == 64 and config.upscale_tile("official-x4") == 128
    real, tiles = tiling.upscale_tiled, []

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        tiles.append(k["tile"])
        return real(*a, **k)

    monkeypatch.setattr(tiling, "upscale_tiled", spy)
    args = ["-q", "upscale", str(inputs / "odd.png"), str(tmp_path / "o.png"), "--preset", "tiny", "--init", "random"]
    assert main(args) == 0 and tiles == [128]  # 97 x 61 LR: one 128 tile
    monkeypatch.setitem(config.UPSCALE_TILES, "tiny", 64)
    assert main(args) == 0 and tiles[-1] == 64
    assert main([*args, "--tile", "128"]) == 0 and tiles[-1] == 128
    assert main([*args, "--overlap", "64"]) == 2  # overlap must stay below the preset's tile


def test_upscale_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "note.png").write_text("not an image")
    assert main(["-q", "upscale", str(tmp_path / "note.png"), str(tmp_path / "o.png"), "--preset", "tiny",
                 "--init", "random"]) == 2
    assert main(["-q", "upscale", str(tmp_path / "missing"), str(tmp_path / "o"), "--preset", "tiny"]) == 2
    assert main(["-q", "upscale", str(tmp_path / "note.png"), str(tmp_path / "o.png"), "--tile", "96"]) == 2
    # folder with one broken image: the good one is still written, exit code 1
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "bad.png").write_bytes(b"\x89PNG broken")
    _photo().crop((0, 0, 30, 30)).save(d / "good.png")
    assert main(["-q", "upscale", str(d), str(tmp_path / "mo"), "--preset", "tiny", "--init", "random",
                 "--tile", "64"]) == 1
    assert (tmp_path / "mo" / "good.png").exists() and not (tmp_path / "mo" / "bad.png").exists()


def test_named_path_parses_name_equals_path() -> None:
    """The ``NAME=PATH`` argparse type of the benchmark scripts (``--net``, ``--teacher``, ``--set``)."""
    import argparse

    from tadsr.cli.common import named_path

    assert named_path("s36=train/candidates/a=b.safetensors") == ("s36", Path("train/candidates/a=b.safetensors"))
    for bad in ("train/x.safetensors", "=x", "name="):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
            named_path(bad)
