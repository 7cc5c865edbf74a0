"""Sanity metrics (LR consistency, colour error, FAIL reasons) and the colour-fix option (reference, graph, ONNX).

Known answers on synthetic images: a +0.05 shift of the red channel gives an LR consistency of exactly
10 log10(3 / 0.05²) dB; two neutral greys at L* 48 and 52 differ by exactly ΔE00 = 4 (S_L = 1 at L̄ = 50);
a wavelet colour fix undoes a constant colour offset exactly and keeps a Nyquist checkerboard; AdaIN undoes a
per-channel affine map exactly; the luma fix gives exactly the reference's BT.601 chroma and keeps a luma checkerboard
of the SR while dropping its colour.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadsr.color_fix import LUMA_LEVELS, LUMA_WEIGHTS, color_fix, luma_fix, wavelet_split
from tadsr.errors import ConfigError, InputError
from tadsr.imresize import imresize
from tadsr.metrics import YCBCR_BT601, color_error, lr_consistency, rgb_to_y, rgb_to_ycbcr, sanity_failures
from tadsr.pipeline import DoNothingPipeline, OneStepPipeline, make_noise


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB in [0.2, 0.7] (no clipping under small shifts)."""
    rng = np.random.default_rng(seed)
    small = rng.random((h // 8, w // 8, 3))
    return 0.2 + 0.5 * np.clip(imresize(small, 8.0), 0.0, 1.0)


def _grey_for_lightness(L: float) -> float:
    """sRGB grey level whose CIELAB L* is ``L`` (D65), from the published formulas."""
    fy = (L + 16.0) / 116.0
    y = fy**3 if fy**3 > 216 / 24389 else (L / (24389 / 27))
    return 12.92 * y if y <= 0.0031308 else 1.055 * y ** (1 / 2.4) - 0.055


# ---------------------------------------------------------------------------------------------- metrics


def test_lr_consistency_known_answer() -> None:
    hr = _smooth(64, 64)
    lr = imresize(hr, 0.25)
    assert lr_consistency(hr, lr) == math.inf
    shifted = hr.copy()
    shifted[..., 0] += 0.05  # bicubic taps sum to one: the LR of the SR is the LR + 0.05 on red
    assert lr_consistency(shifted, lr) == pytest.approx(10 * math.log10(3 / 0.05**2), abs=1e-6)
    assert lr_consistency(np.moveaxis(shifted, -1, 0), np.moveaxis(lr, -1, 0)) == pytest.approx(30.7918, abs=1e-3)
    with pytest.raises(ValueError, match="not 4x"):
        lr_consistency(hr, lr[:-1])


def test_ycbcr_known_answers() -> None:
    # MATLAB rgb2ycbcr on 8-bit white, black, red, green, blue (0-255 scale)
    rgb = np.array([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    want = np.array([[235, 128, 128], [16, 128, 128], [81.481, 90.203, 240], [144.553, 53.797, 34.214],
                     [40.966, 240, 109.786]])  # fmt: skip
    np.testing.assert_allclose(rgb_to_ycbcr(rgb)[0] * 255, want, atol=1e-9)
    chw = np.random.default_rng(0).random((3, 5, 7))
    np.testing.assert_allclose(rgb_to_ycbcr(chw)[..., 0], rgb_to_y(chw), atol=1e-12)  # CHW in, HWC out
    assert rgb_to_ycbcr(chw).shape == (5, 7, 3)


def test_color_error_known_answer_and_texture_blindness() -> None:
    a = np.full((32, 32, 3), _grey_for_lightness(48.0))
    b = np.full((32, 32, 3), _grey_for_lightness(52.0))
    assert color_error(a, b) == pytest.approx(4.0, abs=2e-3)
    hr = _smooth(64, 64, seed=1)
    checker = 0.1 * (np.indices((64, 64)).sum(0) % 2 * 2 - 1)[..., None]
    assert color_error(hr + checker, hr) < 0.3  # texture is not a colour error
    tinted = hr.copy()
    tinted[..., 2] -= 0.1
    assert color_error(tinted, hr) > 3.0


def test_sanity_failures_flag_each_limit() -> None:
    assert sanity_failures([37.0, 36.0], psnr_y=26.0, do_nothing_psnr_y=25.0) == []
    assert any("mean 34.8" in r for r in sanity_failures([34.0, 35.5]))
    worst = sanity_failures([40.0, 40.0, 29.5])
    assert len(worst) == 1 and "worst 29.5" in worst[0]
    loses = sanity_failures([40.0], psnr_y=25.0, do_nothing_psnr_y=25.0)
    assert len(loses) == 1 and "do-nothing" in loses[0]


# ------------------------------------------------------------------------------------------- colour fix


def test_wavelet_fix_replaces_low_band_and_keeps_texture() -> None:
    ref = torch.from_numpy(np.moveaxis(_smooth(128, 128, 2), -1, 0)[None]).float() * 2 - 1
    high, low = wavelet_split(ref)
    torch.testing.assert_close(high + low, ref)
    offset = torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)
    torch.testing.assert_close(color_fix(ref + offset, ref, "wavelet"), ref, atol=1e-5, rtol=0)
    checker = 0.1 * ((torch.arange(128)[:, None] + torch.arange(128)[None]) % 2 * 2 - 1).float()
    fixed = color_fix(ref + checker + offset, ref, "wavelet")
    inner = (..., slice(32, -32), slice(32, -32))  # beyond the reach (1+2+4+8+16 px) of the replicated edges
    torch.testing.assert_close(fixed[inner], (ref + checker)[inner], atol=1e-5, rtol=0)


def test_luma_fix_keeps_the_srs_luma_detail_and_the_references_colour() -> None:
    ref = torch.from_numpy(np.moveaxis(_smooth(128, 128, 4), -1, 0)[None]).float() * 2 - 1
    checker = 0.1 * ((torch.arange(128)[:, None] + torch.arange(128)[None]) % 2 * 2 - 1).float()
    tint = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1) * torch.linspace(0, 1, 128).view(1, 1, 1, 128)
    fixed = color_fix(ref + checker + tint, ref, "luma")  # luma detail + a colour ramp (chroma and low luma)
    torch.testing.assert_close(luma_fix(ref + checker + tint, ref, LUMA_LEVELS), fixed, atol=0, rtol=0)
    assert not torch.allclose(luma_fix(ref + checker + tint, ref, LUMA_LEVELS + 3), fixed, atol=1e-3)  # levels used
    ycc = torch.from_numpy(YCBCR_BT601).float() / 255
    chroma = lambda x: torch.einsum("ij,bjhw->bihw", ycc[1:], x)  # noqa: E731
    torch.testing.assert_close(chroma(fixed), chroma(ref), atol=1e-5, rtol=0)  # everywhere, edges included
    inner = (..., slice(32, -32), slice(32, -32))
    torch.testing.assert_close(fixed[inner], (ref + checker)[inner], atol=1e-5, rtol=0)
    assert sum(LUMA_WEIGHTS) == pytest.approx(1.0) and torch.allclose(ycc[0] / ycc[0].sum(), torch.tensor(LUMA_WEIGHTS))
    v = torch.tensor([LUMA_WEIGHTS[1], -LUMA_WEIGHTS[0], 0.0]).view(1, 3, 1, 1)  # zero luma: a chroma-only pattern
    torch.testing.assert_close(color_fix(ref + checker * v, ref, "luma")[inner], ref[inner], atol=1e-5, rtol=0)
    torch.testing.assert_close(color_fix(ref + checker * v, ref, "wavelet")[inner], (ref + checker * v)[inner],
                               atol=1e-5, rtol=0)  # the wavelet fix keeps the SR's chroma detail  # fmt: skip


def test_adain_fix_undoes_an_affine_colour_map() -> None:
    ref = torch.from_numpy(np.moveaxis(_smooth(32, 32, 3), -1, 0)[None]).float()
    sr = ref * torch.tensor([1.5, 0.7, 1.0]).view(1, 3, 1, 1) + torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(color_fix(sr, ref, "adain"), ref, atol=1e-4, rtol=0)
    assert color_fix(sr, ref, "none") is sr
    with pytest.raises(ConfigError, match="wavelet"):
        color_fix(sr, ref, "histogram")


@pytest.fixture(scope="module")
def tiny():
    import tadsr

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tadsr.load_models(preset="tiny", init="random")
    torch.set_num_threads(n)


def _lr_and_noise(models, side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    photo = min((Path(__file__).resolve().parents[1] / "tadsr" / "data" / "calib").glob("*.png"))
    arr = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float32)[:side, :side]
    lr = torch.from_numpy(arr.transpose(2, 0, 1)[None] / 127.5 - 1.0)
    return lr, make_noise((1, models.preset.vq.embed_dim, side, side), 7)


def test_default_off_is_the_unfixed_path(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from tadsr.formats.graphs import make_graphs

    import tadsr.pipeline as pipeline_mod

    lr, noise = _lr_and_noise(tiny)
    before = OneStepPipeline(tiny)(lr, noise=noise)
    monkeypatch.setattr(pipeline_mod, "color_fix", lambda *a, **k: pytest.fail("colour fix ran by default"))
    torch.testing.assert_close(OneStepPipeline(tiny, color_fix="none")(lr, noise=noise), before, atol=0, rtol=0)
    graph, spec = make_graphs(tiny, 64, ("pipeline",))["pipeline"]
    assert graph.fix is None and "color_fix" not in spec.constants
    fixed = OneStepPipeline(tiny, color_fix="adain")
    with pytest.raises(InputError, match="needs the padded LR"):
        fixed.decode(fixed.encode(fixed.prepare(lr)[0]), (64, 64))


@pytest.mark.parametrize("fix", ["wavelet", "adain", "luma"])
def test_reference_and_graph_agree(tiny, fix: str) -> None:
    from tadsr.formats.graphs import make_graphs

    lr, noise = _lr_and_noise(tiny)
    ref = OneStepPipeline(tiny, color_fix=fix)(lr, noise=noise)
    plain = OneStepPipeline(tiny)(lr, noise=noise)
    graph, spec = make_graphs(tiny, 64, ("pipeline",), color_fix=fix)["pipeline"]
    with torch.no_grad():
        out = graph(lr, noise)
    assert spec.constants["color_fix"] == fix
    assert (ref - out).abs().max() < 1e-3
    assert (ref - plain).abs().max() > 0.05  # the fix does change the output


def test_do_nothing_pipeline_is_decode_of_encoded_bicubic(tiny) -> None:
    from tadsr.models.ops import bicubic_x4_reference

    lr, _ = _lr_and_noise(tiny)
    ae = tiny.autoencoder
    with torch.no_grad():
        expect = ae.decode(ae.encode(bicubic_x4_reference(lr)), chunk=4096).clamp(-1, 1)
    torch.testing.assert_close(DoNothingPipeline(tiny)(lr), expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fix", ["wavelet", "luma"])
def test_onnx_pipeline_with_colour_fix(tiny, tmp_path: Path, fix: str) -> None:
    """The fused graph with a fix exports to ONNX and runs there like the fixed reference; parity uses that reference."""
    import onnxruntime as ort
    from tadsr.formats.graphs import make_graphs
    from tadsr.formats.onnx.export import export_onnx
    from tadsr.parity.hops import make_cases

    graph, spec = make_graphs(tiny, 64, ("pipeline",), color_fix=fix)["pipeline"]
    assert spec.to_dict()["constants"]["color_fix"] == fix  # what export_model writes to manifest["graph"]
    export_onnx(graph, spec, tmp_path, simplify=False, optimize=False)
    lr, noise = _lr_and_noise(tiny)
    sess = ort.InferenceSession(str(tmp_path / "pipeline.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(["sr"], {"lr": lr.numpy(), "noise": noise.numpy()})[0]
    ref = OneStepPipeline(tiny, color_fix=fix)(lr, noise=noise).numpy()
    plain = OneStepPipeline(tiny)(lr, noise=noise).numpy()
    assert np.abs(out - ref).max() < 2e-3
    assert np.abs(out - plain).max() > 0.05
    cases, _ = make_cases(tiny, spec, n_real=1)
    for c in cases:
        want = OneStepPipeline(tiny, color_fix=fix)(
            torch.from_numpy(c.inputs["lr"]), noise=torch.from_numpy(c.inputs["noise"])
        ).numpy()
        np.testing.assert_allclose(c.reference["sr"], want, atol=1e-5)


def test_upscale_cli_colour_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tadsr.pipeline as pipeline_mod
    from tadsr.cli import main

    seen = []

    class Spy(pipeline_mod.OneStepPipeline):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            seen.append(self.color_fix)

    monkeypatch.setattr(pipeline_mod, "OneStepPipeline", Spy)
    photo = min((Path(__file__).resolve().parents[1] / "tadsr" / "data" / "calib").glob("*.png"))
    Image.open(photo).convert("RGB").crop((0, 0, 40, 36)).save(tmp_path / "in.png")
    outs = {}
    for fix in ("none", "adain"):
        rc = main(["-q", "upscale", str(tmp_path / "in.png"), str(tmp_path / f"{fix}.png"), "--preset", "tiny",
                   "--init", "random", "--tile", "64", "--color-fix", fix])  # fmt: skip
        assert rc == 0
        outs[fix] = np.asarray(Image.open(tmp_path / f"{fix}.png"), dtype=np.float64)
    assert seen == ["none", "adain"]
    assert np.abs(outs["adain"] - outs["none"]).max() > 10
    rc = main(["-q", "upscale", str(tmp_path / "in.png"), str(tmp_path / "x.png"), "--artifact", str(tmp_path),
               "--color-fix", "wavelet"])  # fmt: skip
    assert rc == 2 and "drop --color-fix" in caplog.text


def test_cli_colour_fix_choices_are_the_librarys() -> None:
    """``tadsr upscale`` / ``export`` / ``bench`` list the choices literally (the CLI imports no torch): keep them in step."""
    import argparse

    from tadsr.cli import build_parser
    from tadsr.color_fix import COLOR_FIXES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for verb in ("upscale", "export", "bench"):
        opt = next(a for a in sub.choices[verb]._actions if "--color-fix" in a.option_strings)
        assert list(opt.choices) == list(COLOR_FIXES), verb
