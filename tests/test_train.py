"""Training code (tadsr.train): loss signs, gradient routing, exact reparametrisation, stage smoke runs, resume.

Everything runs a "micro" preset (2 UNet levels -> 16x16 latents, 4-step schedule) on a few synthetic photos,
so the whole file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadsr.checkpoint import load_state_dict
from tadsr.errors import ConfigError, InputError
from tadsr.config import PRESETS, SCHEDULES, Preset, UNetConfig, VQConfig
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.schedule import make_schedule
from tadsr.train.autoencoder import AEConfig, standardize_latent_, train_autoencoder
from tadsr.train.data import LatentPool, build_latent_pool, degrade_x4, load_pairs, sample_crops, to_unit
from tadsr.train.disc import TimeAwareDiscriminator, teacher_features
from tadsr.train.distill import DistillConfig, Distiller, train_distill
from tadsr.train.losses import (
    LOG_MSE_EPS,
    latent_regression,
    chroma_loss,
    ddim_teacher_sample,
    generator_adv_loss,
    hinge_d_loss,
    hsd_gradient,
    hsd_loss,
    implied_noise,
    perturb,
)
from tadsr.train.teacher import TeacherConfig, train_teacher

MICRO = Preset(
    name="test-micro",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=(1, 1), attention_resolutions=(64, 32),
                    swin_embed_dim=32),  # fmt: skip
    vq=VQConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, n_embed=64),
    schedule=SCHEDULES["v3"],
    teacher_schedules=((4, SCHEDULES["v3"]),),
)
CROP = 4 * MICRO.pad_multiple  # 64 px HR, 16 px LR / latent
LAT = MICRO.pad_multiple
DEV = torch.device("cpu")


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESETS, "test-micro", MICRO)


@pytest.fixture(autouse=True, scope="module")
def no_onednn():  # noqa: ANN201
    """Tiny shapes: oneDNN's per-shape kernel creation costs more than the convolutions themselves."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before


def _teacher(seed: int = 0) -> UNetModelSwin:
    torch.manual_seed(seed)
    net = UNetModelSwin(MICRO.unet)
    with torch.no_grad():  # non-zero output layers so gradients are informative
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def _pool(n: int = 4) -> LatentPool:
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(n, 3, LAT, LAT, generator=g)
    zy = z0 + 0.3 * torch.randn(n, 3, LAT, LAT, generator=g)
    return LatentPool(z0, zy, torch.rand(n, 3, LAT, LAT, generator=g) * 2 - 1)


# -- losses ----------------------------------------------------------------------------------------------------
def test_hsd_direction_points_from_teacher_to_student() -> None:
    sched = make_schedule(SCHEDULES["v1"])
    g = torch.Generator().manual_seed(0)
    zy, z_tch = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    x_s = (z_tch + 0.5 * torch.randn(2, 3, 8, 8, generator=g)).requires_grad_(True)
    zero = lambda x, t, lq: torch.zeros_like(x)  # noqa: E731  (a denoiser that keeps nothing)
    res = hsd_gradient(zero, sched, x_s, z_tch, zy, zy, torch.Generator().manual_seed(1))
    factor = (1 - torch.tensor(sched.etas)[res.t]) / (sched.kappa * torch.tensor(sched.sqrt_etas)[res.t])
    expected = factor.float().view(-1, 1, 1, 1) * (x_s.detach() - z_tch)
    torch.testing.assert_close(res.grad, expected, rtol=1e-4, atol=1e-4)  # closed form of spec §4
    loss = hsd_loss(x_s, res.grad).mean()
    loss.backward()
    torch.testing.assert_close(x_s.grad, res.grad / (3 * 8 * 8) / 2)
    with torch.no_grad():  # a descent step moves the student towards the teacher's sample
        before = (x_s - z_tch).norm()
        after = (x_s - 0.01 * x_s.grad / x_s.grad.norm() - z_tch).norm()
    assert after < before


def test_hsd_leaves_teacher_untouched() -> None:
    sched = make_schedule(MICRO.schedule)
    teacher = _teacher().eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    p = _pool(2)
    x_s = p.z0.clone().requires_grad_(True)
    for noise in ("gaussian", "uniform"):
        res = hsd_gradient(teacher, sched, x_s, p.z0 + 0.1, p.zy, p.lq, torch.Generator().manual_seed(0), noise=noise)
        assert res.grad.abs().sum() > 0 and not res.grad.requires_grad
        hsd_loss(x_s, res.grad).mean().backward()
    assert x_s.grad is not None and x_s.grad.abs().sum() > 0
    assert all(q.grad is None for q in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_hinge_and_generator_signs() -> None:
    big = torch.full((2, 10), 3.0)
    assert hinge_d_loss(big, -big).item() == 0.0  # confident, correct D: no loss
    assert hinge_d_loss(-big, big).item() == pytest.approx(8.0)  # confident, wrong D
    real = torch.zeros(2, 10, requires_grad=True)
    fake = torch.zeros(2, 10, requires_grad=True)
    hinge_d_loss(real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # descent raises D(real), lowers D(fake)
    f = torch.zeros(2, 10, requires_grad=True)
    generator_adv_loss(f).mean().backward()
    assert (f.grad < 0).all()  # the generator is pushed to raise D(fake)


def test_implied_noise_inverts_perturb() -> None:
    sched = make_schedule(SCHEDULES["v1"])
    g = torch.Generator().manual_seed(0)
    x0, zy, n = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0, 7, 14])
    torch.testing.assert_close(implied_noise(sched, perturb(sched, x0, zy, t, n), x0, zy, t), n, rtol=1e-4, atol=1e-4)


def test_ddim_sampler_returns_oracle_x0() -> None:
    sched = make_schedule(SCHEDULES["v1"])
    x0 = torch.randn(2, 3, 4, 4)
    zy = torch.randn(2, 3, 4, 4)
    oracle = lambda x, t, lq: x0  # noqa: E731
    out = ddim_teacher_sample(oracle, sched, sched.prior_sample(zy, torch.randn(2, 3, 4, 4)), zy, zy)
    torch.testing.assert_close(out, x0)


# -- discriminator and distillation gradient routing ------------------------------------------------------------
def test_discriminator_shapes() -> None:
    teacher = _teacher()
    d = TimeAwareDiscriminator.for_teacher(teacher, c_dim=8)
    t = torch.tensor([0, 2])
    feats = teacher_features(teacher, torch.randn(2, 3, LAT, LAT), t, torch.randn(2, 3, LAT, LAT))
    assert [f.shape[-1] for f in feats] == [8, 8, 8]  # the downsample, the last input block, the middle block
    assert d(feats, t).shape == (2, 8 * 8 * 8 * 3)


def _distiller(**kw: object) -> Distiller:
    cfg = DistillConfig(preset="test-micro", batch=2, c_dim=8, amp=False, warmup=1, **kw)  # type: ignore[arg-type]
    return Distiller(cfg, _teacher(), DEV)


def test_discriminator_step_updates_only_heads() -> None:
    d = _distiller()
    p = _pool(2)
    sched, t_d = d.sched, torch.tensor([0, 2])
    x_s = d.student(sched.scale_input(sched.prior_sample(p.zy, torch.randn_like(p.zy)), 3), torch.tensor([3, 3]), p.lq)
    u = torch.randn_like(p.z0)
    with torch.no_grad():
        feat_r = d._features(perturb(sched, p.z0, p.zy, t_d, u), t_d, p.lq)
    feat_f = d._features(perturb(sched, x_s, p.zy, t_d, u), t_d, p.lq)
    assert all(f.requires_grad for f in feat_f) and not any(f.requires_grad for f in feat_r)
    logits = d.disc([torch.cat([r, f.detach()]) for r, f in zip(feat_r, feat_f)], torch.cat([t_d, t_d]))
    hinge_d_loss(logits[:2], logits[2:]).backward()
    assert all(q.grad is None for q in d.student_net.parameters())
    assert all(q.grad is None for q in d.teacher.parameters())
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in d.disc_net.parameters())
    d.opt_d.step()  # the heads' last convs start at zero: only an updated D passes gradients back (as upstream)
    d.disc_net.zero_grad(set_to_none=True)
    generator_adv_loss(d.disc(feat_f, t_d)).mean().backward()  # generator side reaches the student through the teacher
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in d.student_net.parameters())
    assert all(q.grad is None for q in d.teacher.parameters())


# -- autoencoder ------------------------------------------------------------------------------------------------
def test_standardize_latent_is_exact() -> None:
    torch.manual_seed(0)
    vq = VQModelTorch(MICRO.vq).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(vq.encode(x).permute(0, 2, 3, 1).reshape(-1, 3)[:64])
        z = vq.encode(x)
        before = vq.decode(z)
        standardize_latent_(vq, z)
        z2 = vq.encode(x)
        after = vq.decode(z2)
    assert abs(float(z2.std()) - 1.0) < 1e-3 and float(z2.mean(dim=(0, 2, 3)).abs().max()) < 1e-3
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_flips_commute_with_degradation() -> None:
    hr = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    lr = degrade_x4(hr)
    np.testing.assert_array_equal(degrade_x4(np.ascontiguousarray(hr[:, ::-1])), lr[:, ::-1])
    np.testing.assert_array_equal(degrade_x4(np.ascontiguousarray(hr.transpose(1, 0, 2))), lr.transpose(1, 0, 2))


def test_plain_image_folder_is_held_out(photos: Path, tmp_path: Path) -> None:
    flat = tmp_path / "bench"
    flat.mkdir()
    for f in (photos / "val").iterdir():
        shutil.copy(f, flat / f.name)
    (flat / "notes.txt").write_text("not an image")
    got, want = load_pairs(flat, "val"), load_pairs(photos, "val")
    assert got.names == want.names == ("img0",)
    np.testing.assert_array_equal(got.hr[0], want.hr[0])
    np.testing.assert_array_equal(got.lr[0], want.lr[0])
    with pytest.raises(InputError, match="plain image folder"):
        load_pairs(flat, "train")
    only_val = tmp_path / "only_val"
    shutil.copytree(photos / "val", only_val / "val")
    with pytest.raises(InputError, match="has no train/ folder"):
        load_pairs(only_val, "train")
    with pytest.raises(InputError, match="not a photo set"):
        load_pairs(flat / "img0.png", "val")


def test_crops_are_aligned(photos: Path) -> None:
    pairs = load_pairs(photos, "train")
    hr, lr = sample_crops(pairs, np.random.default_rng(0), 3, 64, augment=False)
    assert hr.shape == (3, 3, 64, 64) and lr.shape == (3, 3, 16, 16)
    for h, low in zip(hr, lr):  # the LR crop is the MATLAB-bicubic image of its HR crop away from the borders
        d = degrade_x4(np.ascontiguousarray(h.transpose(1, 2, 0))).transpose(2, 0, 1).astype(int) - low
        assert np.abs(d[:, 2:-2, 2:-2]).max() <= 1


# -- stage smoke runs and resume ----------------------------------------------------------------------------------
def test_autoencoder_smoke_and_resume(photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pairs = load_pairs(photos, "train")
    cfg = AEConfig(preset="test-micro", steps=2, batch=1, crop=32, final_crop=CROP, final_frac=0.5, restart_every=1,
                   amp=False, log_every=1)  # fmt: skip
    res = train_autoencoder(cfg, pairs, tmp_path / "ae", DEV)
    assert res.steps == 2 and json.loads((tmp_path / "ae/state.json").read_text())["step"] == 2
    vq = VQModelTorch(MICRO.vq)
    vq.load_state_dict(load_state_dict(res.weights), strict=True)
    assert {"psnr_rgb", "usage", "perplexity"} <= set(res.metrics)
    with caplog.at_level(logging.INFO, logger="tadsr.train.autoencoder"):
        res2 = train_autoencoder(AEConfig(**{**cfg.__dict__, "steps": 3}), pairs, tmp_path / "ae", DEV)
    assert "resumed" in caplog.text and "at step 2" in caplog.text
    assert res2.steps == 3 and json.loads((tmp_path / "ae/state.json").read_text())["step"] == 3


def test_autoencoder_decoder_refit_keeps_every_latent(photos: Path, tmp_path: Path) -> None:
    """part='decoder' changes post_quant_conv + decoder only: encoder, quant_conv and codebook stay bit for bit."""
    pairs = load_pairs(photos, "train")
    base = train_autoencoder(AEConfig(preset="test-micro", steps=1, batch=1, crop=CROP, final_crop=CROP, amp=False),
                             pairs, tmp_path / "base", DEV)  # fmt: skip
    cfg = AEConfig(preset="test-micro", steps=3, batch=1, crop=CROP, final_crop=CROP, amp=False, lr=1e-2,
                   restart_every=1, part="decoder")  # fmt: skip
    with pytest.raises(ConfigError, match="init"):
        train_autoencoder(cfg, pairs, tmp_path / "no_init", DEV)
    res = train_autoencoder(cfg, pairs, tmp_path / "dec", DEV, init=base.weights)
    before, after = load_state_dict(base.weights), load_state_dict(res.weights)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.split(".")[0] in ("encoder", "quant_conv", "quantize")]
    trained = [k for k in before if k.split(".")[0] in ("decoder", "post_quant_conv")]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2
    with pytest.raises(ConfigError, match="part"):
        AEConfig(part="encoder")  # type: ignore[arg-type]


def test_autoencoder_cli_refits_the_decoder_of_init(photos: Path, tmp_path: Path) -> None:
    from tadsr.train.autoencoder import main as ae_main

    pairs = load_pairs(photos, "train")
    base = train_autoencoder(AEConfig(preset="test-micro", steps=1, batch=1, crop=CROP, final_crop=CROP, amp=False),
                             pairs, tmp_path / "base", DEV)  # fmt: skip
    args = ["--photos", str(photos), "--out", str(tmp_path / "cli"), "--preset", "test-micro", "--steps", "2",
            "--batch", "2", "--crop", str(CROP), "--threads", "1", "--lr", "1e-2", "--part", "decoder",
            "--blur-frac", "0.5", "--init", str(base.weights), "--chroma-weight", "3"]  # fmt: skip
    assert ae_main(args) == 0
    state = json.loads((tmp_path / "cli/state.json").read_text())
    assert state["config"]["part"] == "decoder" and state["config"]["blur_frac"] == 0.5
    assert state["config"]["chroma_weight"] == 3.0
    assert state["config"]["crop"] == state["config"]["final_crop"] == CROP
    before, after = load_state_dict(base.weights), load_state_dict(tmp_path / "cli/final.safetensors")
    assert torch.equal(before["quantize.embedding.weight"], after["quantize.embedding.weight"])
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])


def test_chroma_loss_sees_block_colour_only() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    grey = torch.rand(2, 1, 16, 16, generator=g).expand(2, 3, 16, 16) * 0.2  # equal R, G, B: luma only
    assert chroma_loss(x + grey, x).item() == pytest.approx(0.0, abs=1e-7)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1).float()
    blue = torch.tensor([0.0, 0.0, 0.1]).view(1, 3, 1, 1)
    assert chroma_loss(x + blue * checker, x).item() == pytest.approx(0.0, abs=1e-7)  # averages out in each block
    # a uniform +0.1 on B (in [-1, 1]) moves Cb by 112 * 0.05 / 255 and Cr by 18.214 * 0.05 / 255 (0-1 scale)
    want = (112.0 + 18.214) * 0.05 / 255 / 2
    assert chroma_loss(x + blue, x).item() == pytest.approx(want, rel=1e-5)


def test_autoencoder_chroma_weight_adds_the_chroma_term() -> None:
    import tadsr.train.autoencoder as ae_mod

    x = torch.rand(1, 3, 8, 8) * 2 - 1
    rec = x + torch.tensor([0.0, 0.0, 0.1]).view(1, 3, 1, 1)
    base = AEConfig(preset="test-micro", ssim_weight=0.0, fft_weight=0.0)
    with_c = AEConfig(preset="test-micro", ssim_weight=0.0, fft_weight=0.0, chroma_weight=2.0)
    l0 = ae_mod._rec_loss(base, *ae_mod._rec_losses(base, rec, x))
    l2 = ae_mod._rec_loss(with_c, *ae_mod._rec_losses(with_c, rec, x))
    assert (l2 - l0).item() == pytest.approx(2.0 * chroma_loss(rec, x).item(), rel=1e-5) and l2 > l0


def test_autoencoder_blur_frac_feeds_bicubic_of_the_lr(photos: Path) -> None:
    from tadsr.models.ops import bicubic_x4_reference
    from tadsr.train.autoencoder import _batch
    from tadsr.train.common import DistEnv, step_seed

    pairs = load_pairs(photos, "train")
    cfg = AEConfig(preset="test-micro", batch=4, crop=CROP, blur_frac=0.5)
    x = _batch(pairs, cfg, DistEnv(), 7, CROP, DEV)
    hr, lr = sample_crops(pairs, np.random.default_rng(step_seed(cfg.seed, 0, 7, stream=1)), 4, CROP)
    ref_hr = torch.from_numpy(hr).float() / 127.5 - 1
    ref_blur = bicubic_x4_reference(torch.from_numpy(lr).float() / 127.5 - 1)
    torch.testing.assert_close(x[:2], ref_blur[:2])
    torch.testing.assert_close(x[2:], ref_hr[2:])
    assert not torch.allclose(ref_blur[:2], ref_hr[:2], atol=1e-2)
    with pytest.raises(ConfigError, match="blur_frac"):
        AEConfig(blur_frac=1.5)


def test_autoencoder_student_rows_decode_the_pipelines_latent(photos: Path, tmp_path: Path) -> None:
    """student_frac rows decode exactly the latent OneStepPipeline hands its decoder, at whole tiles, against HR."""
    from tadsr.checkpoint import save_safetensors
    from tadsr.pipeline import OneStepPipeline, load_models
    from tadsr.train.autoencoder import _StudentLatents, _student_rows
    from tadsr.train.common import DistEnv

    pairs = load_pairs(photos, "train")
    base = train_autoencoder(AEConfig(preset="test-micro", steps=1, batch=1, crop=CROP, final_crop=CROP, amp=False),
                             pairs, tmp_path / "base", DEV)  # fmt: skip
    torch.manual_seed(3)
    student = tmp_path / "student.safetensors"
    save_safetensors(UNetModelSwin(MICRO.unet).state_dict(), student)
    models = load_models(student=student, autoencoder=base.weights, preset="test-micro")
    cfg = AEConfig(preset="test-micro", steps=2, batch=4, crop=CROP // 2, final_crop=CROP // 2, amp=False, lr=1e-2,
                   part="decoder", blur_frac=0.25, student_frac=0.5)  # fmt: skip
    hr, lq = _student_rows(pairs, cfg, DistEnv(), 5, CROP // 2, 2, CROP, DEV)
    assert hr.shape == (2, 3, CROP, CROP) and lq.shape == (2, 3, LAT, LAT)  # rounded up to a whole tile
    got = _StudentLatents(student, "test-micro", models.autoencoder, DEV)(lq, torch.Generator().manual_seed(1))
    noise = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    pipe = OneStepPipeline(models)
    with torch.no_grad():
        want = pipe.denoise(pipe.encode(lq), noise, lq)
    torch.testing.assert_close(got, want)
    res = train_autoencoder(cfg, pairs, tmp_path / "dec", DEV, init=base.weights, student=student)
    assert {"psnr_student", "l1_student", "psnr_rgb"} <= set(res.metrics)
    before, after = load_state_dict(base.weights), load_state_dict(res.weights)
    assert torch.equal(before["quantize.embedding.weight"], after["quantize.embedding.weight"])
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    with pytest.raises(ConfigError, match="--student"):
        train_autoencoder(cfg, pairs, tmp_path / "no_student", DEV, init=base.weights)
    with pytest.raises(ConfigError, match="part='decoder'"):
        AEConfig(student_frac=0.5)
    with pytest.raises(ConfigError, match="student_frac"):
        AEConfig(part="decoder", blur_frac=0.5, student_frac=0.75)


def test_teacher_smoke_resume_equals_straight_run(photos: Path, tmp_path: Path) -> None:
    pairs = load_pairs(photos, "train")
    torch.manual_seed(0)
    ae = VQModelTorch(MICRO.vq).eval()
    pool = build_latent_pool(ae, pairs, 3, seed=0, hr_size=CROP, device=DEV)
    assert pool.z0.shape == (3, 3, LAT, LAT) and pool.lq.shape == (3, 3, LAT, LAT)
    cfg = TeacherConfig(preset="test-micro", steps=2, batch=2, warmup=1, amp=False, log_every=1)
    straight = train_teacher(cfg, pool, tmp_path / "a", DEV)
    assert straight.steps == 2 and {"mse", "grad_norm"} <= set(straight.metrics)
    part = train_teacher(TeacherConfig(**{**cfg.__dict__, "steps": 1}), pool, tmp_path / "b", DEV)
    assert part.steps == 1
    # resuming with the 2-step recipe continues at step 1 (with warmup 1 the first LR does not depend on it)
    resumed = train_teacher(cfg, pool, tmp_path / "b", DEV)
    assert resumed.steps == 2
    a, b = load_state_dict(straight.weights), load_state_dict(resumed.weights)
    net = UNetModelSwin(MICRO.unet)
    net.load_state_dict(b, strict=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # identical to the uninterrupted run


def test_latent_pool_cache_is_reused_only_for_the_same_inputs(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    import tadsr.train.teacher as teacher_mod
    from tadsr.checkpoint import save_safetensors
    from tadsr.train.common import DistEnv

    torch.manual_seed(0)
    ae_path = tmp_path / "ae.safetensors"
    save_safetensors(VQModelTorch(MICRO.vq).state_dict(), ae_path)
    built = []
    real_build = teacher_mod.build_latent_pool
    monkeypatch.setattr(teacher_mod, "build_latent_pool", lambda *a, **k: built.append(1) or real_build(*a, **k))

    def pool(seed: int = 0, crop: int = CROP) -> LatentPool:
        return teacher_mod.pool_for(photos, ae_path, "test-micro", 3, seed, crop, DEV, DistEnv(), cache=tmp_path / "run")

    first = pool()
    assert len(built) == 1 and (tmp_path / "run/latent_pool.safetensors").is_file()
    again = pool()  # the next run of the same stage folder: read back, not encoded
    assert len(built) == 1
    assert all(torch.equal(getattr(first, k), getattr(again, k)) for k in ("z0", "zy", "lq"))
    pool(seed=1)  # another recipe: encoded again (and the cache now holds it)
    assert len(built) == 2
    torch.manual_seed(1)
    save_safetensors(VQModelTorch(MICRO.vq).state_dict(), ae_path)  # another autoencoder at the same path
    other = pool(seed=1)
    assert len(built) == 3 and not torch.equal(other.z0, first.z0)


def test_distill_smoke_resume_and_frozen_teacher(tmp_path: Path) -> None:
    pool = _pool(3)
    teacher = _teacher()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = DistillConfig(preset="test-micro", steps=2, batch=1, c_dim=8, amp=False, warmup=1, log_every=1)
    res = train_distill(cfg, pool, teacher, tmp_path / "d", DEV)
    assert res.steps == 2 and {"mse", "mse_hsd", "loss_d", "adv"} <= set(res.metrics)
    assert all(np.isfinite(v) for v in res.metrics.values())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())  # never stepped
    assert all(q.grad is None for q in teacher.parameters())  # frozen: gradients only pass through it
    student = load_state_dict(res.weights)
    assert any(not torch.equal(student[k], teacher_before[k]) for k in student)  # the student did move
    disc = load_state_dict(tmp_path / "d/extra.safetensors")
    assert any(k.endswith("conv.weight") and v.abs().sum() > 0 for k, v in disc.items())  # zero-init heads trained
    net = UNetModelSwin(MICRO.unet)
    net.load_state_dict(student, strict=True)
    assert (tmp_path / "d/optim.pt").is_file()
    res2 = train_distill(DistillConfig(**{**cfg.__dict__, "steps": 3}), pool, teacher, tmp_path / "d", DEV)
    assert res2.steps == 3 and json.loads((tmp_path / "d/state.json").read_text())["step"] == 3


def test_validation_table_and_grid(photos: Path, tmp_path: Path) -> None:
    from tadsr.pipeline import Models
    from tadsr.train.build_bundled import format_validation
    from tadsr.train.data import load_pairs as load
    from tadsr.train.validate import METHODS, format_sanity, save_grid, validate

    torch.manual_seed(0)
    teacher = _teacher()
    models = Models(MICRO, _teacher(1), VQModelTorch(MICRO.vq), teacher)
    res, outs, hr = validate(models, load(photos, "val"), DEV, crop=CROP, max_crops=2, batch=2)
    assert res.n_crops == 2 and set(res.mean) == set(METHODS) and hr.shape == (2, CROP, CROP, 3)
    assert all(np.isfinite(v["psnr"]) and 0 <= v["ssim"] <= 1 for v in res.mean.values())
    assert set(res.per_photo) == {"img0"} and len(res.per_crop["student_1"]["psnr_rgb"]) == 2
    assert "student, 1 step" in format_validation(res)
    # sanity metrics: random-weight denoisers fail, and the failure is a red row, not averaged away
    assert {"lr_cons", "lr_cons_worst", "de00"} <= set(res.mean["student_1"])
    assert any("LR consistency" in r for r in res.sanity["student_1"]) and "do_nothing" in res.mean
    assert res.sanity["autoencoder"] == []  # reconstructs the HR: not judged on LR consistency
    table = format_validation(res)
    assert table.count("❌ FAIL") == sum(bool(v) for v in res.sanity.values()) > 0
    grid = save_grid(outs, hr, res, tmp_path / "grid.png", rows=1)
    assert Image.open(grid).size == (4 * CROP + 3 * 4, 18 + CROP)
    # --color-fix: every pipeline runs with the fix, bicubic does not; the table says which fix it shows
    fixed, f_outs, _ = validate(models, load(photos, "val"), DEV, crop=CROP, max_crops=2, batch=2,
                                methods=("bicubic", "student_1", "teacher_15_ddim"), color_fix="luma")  # fmt: skip
    assert fixed.color_fix == "luma" and res.color_fix == "none" and "colour fix luma" in format_sanity(fixed)
    np.testing.assert_array_equal(f_outs["bicubic"], outs["bicubic"])
    for m in ("student_1", "teacher_15_ddim"):
        assert np.abs(f_outs[m].astype(int) - outs[m].astype(int)).max() > 20
        assert fixed.mean[m]["lr_cons"] > res.mean[m]["lr_cons"] + 3


def test_grid_crops_max_crops_spreads_evenly(photos: Path) -> None:
    from tadsr.train.data import grid_crops

    pairs = load_pairs(photos, "val")
    hr, lr, labels = grid_crops(pairs, CROP)
    assert len(labels) == 4  # the 128x132 val photo: a 2x2 grid of 64-px crops
    some_hr, some_lr, some = grid_crops(pairs, CROP, max_crops=2)
    assert some == [labels[0], labels[3]]  # first and last, as np.linspace(0, n - 1, 2) picks
    np.testing.assert_array_equal(some_hr, hr[[0, 3]])
    np.testing.assert_array_equal(some_lr, lr[[0, 3]])
    assert grid_crops(pairs, CROP, max_crops=9)[2] == labels  # fewer crops than the cap: all of them


def test_validate_cli_judges_at_a_chosen_tile(photos: Path, tmp_path: Path) -> None:
    """``--crop`` runs the val crops as tiles of that side (upscale's default is 512 for bundled, the main job's
    256) and names the side in the table; a side the networks cannot take as one tile is refused up front."""
    from tadsr.checkpoint import save_safetensors
    from tadsr.train.validate import main as validate_main

    w = tmp_path / "w"
    w.mkdir()
    torch.manual_seed(0)
    save_safetensors(_teacher(1).state_dict(), w / "test-micro_student.safetensors")
    save_safetensors(VQModelTorch(MICRO.vq).state_dict(), w / "test-micro_autoencoder.safetensors")
    args = ["--photos", str(photos), "--weights", str(w), "--preset", "test-micro", "--threads", "1",
            "--methods", "bicubic", "student_1"]  # fmt: skip
    assert validate_main([*args, "--crop", str(2 * CROP), "--md", str(tmp_path / "t.md"),
                          "--json", str(tmp_path / "t.json")]) == 0  # fmt: skip
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["crop"] == 2 * CROP and res["n_crops"] == 1  # the 128x132 val photo holds one 128-px crop
    assert f"1 crops of {2 * CROP}²" in (tmp_path / "t.md").read_text()
    for bad in (CROP + 4, 0):
        with pytest.raises(SystemExit):
            validate_main([*args, "--crop", str(bad)])


# -- hardware options and multi-session training ------------------------------------------------------------------
def test_teacher_paused_run_resumes_to_the_straight_run(tmp_path: Path) -> None:
    pool = _pool(3)
    cfg = TeacherConfig(preset="test-micro", steps=3, batch=2, warmup=2, amp=False, log_every=1)
    straight = train_teacher(cfg, pool, tmp_path / "a", DEV)
    paused = train_teacher(TeacherConfig(**{**cfg.__dict__, "pause_after_s": 0.0}), pool, tmp_path / "b", DEV)
    assert paused.steps == 1 and json.loads((tmp_path / "b/state.json").read_text())["step"] == 1
    resumed = train_teacher(cfg, pool, tmp_path / "b", DEV)  # next session: same recipe, no pause
    assert resumed.steps == 3
    a, b = load_state_dict(straight.weights), load_state_dict(resumed.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)  # warm-up and cosine follow the 3-step run exactly


def test_distill_paused_run_resumes_to_the_straight_run(tmp_path: Path) -> None:
    pool = _pool(3)
    cfg = DistillConfig(preset="test-micro", steps=2, batch=1, c_dim=8, amp=False, warmup=2, log_every=1)
    train_distill(cfg, pool, _teacher(), tmp_path / "a", DEV)  # the straight run: its files are compared below
    pause = DistillConfig(**{**cfg.__dict__, "pause_after_s": 0.0})
    paused = train_distill(pause, pool, _teacher(), tmp_path / "b", DEV)
    assert paused.steps == 1
    resumed = train_distill(cfg, pool, _teacher(), tmp_path / "b", DEV)
    assert resumed.steps == 2
    for name in ("final.safetensors", "extra.safetensors"):  # EMA student and discriminator heads
        a, b = load_state_dict(tmp_path / "a" / name), load_state_dict(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_cpu_bf16_and_channels_last_options_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tadsr.train.common as common

    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)  # bf16 autocast runs whatever this CPU is
    pool = _pool(3)
    cfg = TeacherConfig(preset="test-micro", steps=2, batch=2, warmup=1, amp=False, log_every=1)
    fp32 = train_teacher(cfg, pool, tmp_path / "fp32", DEV)
    amp_gpu_only = train_teacher(TeacherConfig(**{**cfg.__dict__, "amp": True}), pool, tmp_path / "amp", DEV)
    bf16 = train_teacher(TeacherConfig(**{**cfg.__dict__, "amp": True, "cpu_amp": True}), pool, tmp_path / "bf16", DEV)
    cl = train_teacher(TeacherConfig(**{**cfg.__dict__, "amp": True, "cpu_amp": True, "channels_last": True}),
                       pool, tmp_path / "cl", DEV)  # fmt: skip
    assert cl.steps == 2 and all(np.isfinite(v) for v in cl.metrics.values())
    a, g, b = (load_state_dict(r.weights) for r in (fp32, amp_gpu_only, bf16))
    assert all(torch.equal(a[k], g[k]) for k in a)  # amp alone is CUDA-only: the CPU run stays fp32
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 autocast really ran
    assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()) < 0.05  # and close
    dcfg = DistillConfig(preset="test-micro", batch=2, c_dim=8, amp=True, cpu_amp=True, warmup=1)
    with pytest.raises(ConfigError, match="channels_last"):  # segfaults in torch's CPU backward: refused
        Distiller(DistillConfig(**{**dcfg.__dict__, "channels_last": True}), _teacher(), DEV)
    d = Distiller(dcfg, _teacher(), DEV)
    p = _pool(2)
    out = d.step(p.z0, p.zy, p.lq, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in out.values())


def test_cpu_bf16_falls_back_to_fp32_with_a_warning_on_a_cpu_without_native_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    import tadsr.train.common as common

    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    pool = _pool(3)
    cfg = TeacherConfig(preset="test-micro", steps=2, batch=2, warmup=1, amp=True, log_every=1)
    fp32 = train_teacher(cfg, pool, tmp_path / "fp32", DEV)
    with caplog.at_level(logging.WARNING, logger="tadsr.train.common"):
        asked = train_teacher(TeacherConfig(**{**cfg.__dict__, "cpu_amp": True}), pool, tmp_path / "bf16", DEV)
    assert "no native bf16" in caplog.text and "teacher" in caplog.text
    a, b = load_state_dict(fp32.weights), load_state_dict(asked.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)  # it ran fp32, bit for bit
    state = json.loads((tmp_path / "bf16" / "state.json").read_text())
    assert state["config"]["cpu_amp"] is False  # the record says what ran
    on_cuda = common.resolve_cpu_amp(TeacherConfig(cpu_amp=True), torch.device("cuda"), "x")
    assert on_cuda.cpu_amp is True  # CUDA is not this CPU's business
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadsr.train.common"):
        no_amp = TeacherConfig(**{**cfg.__dict__, "amp": False, "cpu_amp": True})
        train_teacher(no_amp, pool, tmp_path / "no_amp", DEV)
    assert "no native bf16" not in caplog.text  # --cpu-bf16 with --no-amp asks for no autocast: nothing to warn of
    assert json.loads((tmp_path / "no_amp" / "state.json").read_text())["config"]["cpu_amp"] is False


def test_distill_gt_only_skips_the_teacher_and_regresses_to_the_gt_latent() -> None:
    d = _distiller(teacher_weight=0.0, hsd_weight=0.0, gan_weight=0.0, gt_weight=1.0, lr=1e-2)
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    disc_before = {k: v.clone() for k, v in d.disc_net.state_dict().items()}
    z0, zy, lq = _pool(2).batch(torch.tensor([0, 1]))
    first = [d.step(z0, zy, lq, torch.Generator().manual_seed(s)) for s in range(8)]
    assert not calls  # neither the T-step sample, HSD nor the discriminator's features ran the teacher
    assert all(torch.equal(disc_before[k], v) for k, v in d.disc_net.state_dict().items())
    assert {"loss", "mse_to_gt"} == set(first[0]) and float(first[0]["loss"]) == float(first[0]["mse_to_gt"])
    assert float(first[-1]["mse_to_gt"]) < 0.8 * float(first[0]["mse_to_gt"])  # the student moves towards z0
    full = _distiller(gt_weight=0.5)
    full.teacher.register_forward_hook(lambda *a: calls.append(1))
    out = full.step(z0, zy, lq, torch.Generator().manual_seed(0))
    assert calls and {"mse", "mse_hsd", "adv", "loss_d"} <= set(out)
    with pytest.raises(ValueError, match="loss weights"):
        DistillConfig(teacher_weight=0.0, hsd_weight=0.0, gan_weight=0.0)
    with pytest.raises(ValueError, match="loss weights"):
        DistillConfig(gt_weight=-1.0)


def test_log_latent_loss_weights_each_crop_by_the_batch_mean_error_over_its_own(tmp_path: Path) -> None:
    z0 = torch.stack([torch.full((3, 4, 4), v) for v in (0.05, 0.3, 1.0)])  # a smooth crop's small error, a large one
    x = torch.zeros_like(z0, requires_grad=True)
    plain, mse = latent_regression(x, z0, "mse")
    weighted, mse_log = latent_regression(x, z0, "log")
    torch.testing.assert_close(mse_log, mse)  # the logged MSE is the same either way
    g_plain, g_log = (torch.autograd.grad(v.sum(), x)[0] for v in (plain, weighted))
    ratio = (g_log / g_plain).flatten(1).mean(1)
    torch.testing.assert_close(ratio, mse.mean().detach() / (mse.detach() + LOG_MSE_EPS))
    assert ratio[0] > 100 * ratio[2] and ratio.mean() > 1  # the smooth crop's error now counts, at the MSE's scale
    # the student's GT regression (--gt-loss log)
    d = _distiller(teacher_weight=0.0, hsd_weight=0.0, gan_weight=0.0, gt_weight=1.0, gt_loss="log")
    out = d.step(*_pool(2).batch(torch.tensor([0, 1])), torch.Generator().manual_seed(0))
    m = float(out["mse_to_gt"])  # the log loss: mean(mse) * mean(log mse) <= mean(mse) * log(mean mse) (Jensen)
    assert m < 2 and float(out["loss"]) <= m * math.log(m + LOG_MSE_EPS) + 1e-6
    # the teacher's regression (--loss log): another update, the same logged MSE before it
    pool = _pool(3)
    cfg = TeacherConfig(preset="test-micro", steps=1, batch=3, warmup=1, amp=False, log_every=1)
    runs = {k: train_teacher(TeacherConfig(**{**cfg.__dict__, "loss": k}), pool, tmp_path / k, DEV)
            for k in ("mse", "log")}
    a, b = (load_state_dict(tmp_path / k / "model.safetensors") for k in ("mse", "log"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert runs["mse"].metrics["mse"] == pytest.approx(runs["log"].metrics["mse"])
    with pytest.raises(ValueError, match="gt_loss"):
        DistillConfig(gt_loss="l1")
    with pytest.raises(ValueError, match="loss must be"):
        TeacherConfig(loss="l1")


def test_distill_init_from_existing_student(tmp_path: Path) -> None:
    from tadsr.checkpoint import save_safetensors

    shipped = _teacher(seed=5).state_dict()
    save_safetensors(shipped, tmp_path / "student.safetensors")
    d = _distiller()
    d.init_student(tmp_path / "student.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in d.student_net.state_dict().items())
    assert all(torch.equal(shipped[k], v) for k, v in d.ema.state.items())  # EMA restarts from it too
    res = train_distill(DistillConfig(preset="test-micro", steps=1, batch=1, c_dim=8, amp=False, warmup=1),
                        _pool(2), _teacher(), tmp_path / "d", DEV, init=tmp_path / "student.safetensors")  # fmt: skip
    ema = load_state_dict(res.weights)
    k = next(k for k, v in shipped.items() if v.is_floating_point() and v.numel() > 100)
    # one EMA update of weight 0.82: the result is near the init, far from the teacher it was distilled from
    assert float((ema[k] - shipped[k]).abs().max()) < float((ema[k] - _teacher().state_dict()[k]).abs().max())


def _micro_checkpoints(folder: Path) -> tuple[Path, Path]:
    """A seeded random test-micro autoencoder and denoiser saved in ``folder``: (autoencoder, denoiser) paths."""
    from tadsr.checkpoint import save_safetensors

    torch.manual_seed(0)
    ae, net = folder / "ae.safetensors", folder / "net.safetensors"
    save_safetensors(VQModelTorch(MICRO.vq).state_dict(), ae)
    save_safetensors(_teacher().state_dict(), net)
    return ae, net


def _bench_script(name: str):  # noqa: ANN202  (a module of benchmarks/, loaded from its file)
    import importlib.util
    import sys as _sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    _sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gpu_train_run_dry_run(photos: Path, tmp_path: Path) -> None:
    """benchmarks/gpu_train_run.py on the CPU: prepare the compact photo copy, a step per stage, sanity table."""
    mod = _bench_script("gpu_train_run")
    counts = mod.prepare(photos, tmp_path / "p", max_side=150, min_side=64)
    assert counts["train"] == 2 and counts["val"] == 1
    assert max(Image.open(f).size[0] for f in (tmp_path / "p/train").iterdir()) <= 150  # resized, split kept
    ae, teacher = _micro_checkpoints(tmp_path)
    argv = ["--dry-run", "--dry-steps", "1", "--photos", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
            "--preset", "test-micro", "--autoencoder", str(ae), "--teacher", str(teacher)]
    assert mod.main(argv) == 0
    s = json.loads((tmp_path / "o/summary.json").read_text())
    assert s["teacher"]["steps"] == 1 and s["distill"]["steps"] == 1 and s["dry_run"]
    assert {"bicubic", "do_nothing", "student_1"} <= set(s["mean"]) and "lr_cons" in s["mean"]["student_1"]
    assert (tmp_path / "o/teacher/state.json").is_file() and (tmp_path / "o/bundled_student.safetensors").is_file()
    assert "LR consistency" in (tmp_path / "o/sanity.md").read_text()


def test_orientation_spread_do_nothing_column(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/orientation_spread.py --do-nothing: a column per rotation equal to the do-nothing pipeline's
    PSNR-Y on the rotated image, with no spread (it takes no noise), beside the network's seeds."""
    from tadsr.metrics import psnr_y_8bit
    from tadsr.pipeline import DoNothingPipeline, load_models

    ae, st = _micro_checkpoints(tmp_path)
    mod = _bench_script("orientation_spread")
    argv = ["--data", str(photos), "--net", f"s={st}", "--steps", "1", "--seeds", "2",
            "--autoencoder", str(ae), "--preset", "test-micro", "--threads", "1"]
    assert mod.main([*argv, "--do-nothing"]) == 0
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.splitlines() if r.startswith("| img0 |")]
    assert len(rows) == 4 and all(r[3].strip().endswith("(0.00)") for r in rows)
    pairs = load_pairs(photos, "val")
    models = load_models(autoencoder=ae, student=st, preset="test-micro")
    for k, row in enumerate(rows):
        lr, hr = (to_unit(np.rot90(a[0], k).transpose(2, 0, 1)[None]) for a in (pairs.lr, pairs.hr))
        assert float(row[3].split()[0]) == pytest.approx(psnr_y_8bit(DoNothingPipeline(models)(lr).numpy(), hr.numpy()),
                                                         abs=0.006)  # fmt: skip
    assert mod.main(argv) == 0 and "do-nothing" not in capsys.readouterr().out


def test_seed_ensemble_columns(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/seed_ensemble.py: per image the single seeds, their mean, the decoded mean latent of the seeds and
    the do-nothing path, each what the pipeline gives."""
    from tadsr.metrics import psnr_y_8bit
    from tadsr.pipeline import DoNothingPipeline, OneStepPipeline, load_models, make_noise

    ae, st = _micro_checkpoints(tmp_path)
    mod = _bench_script("seed_ensemble")
    argv = ["--data", str(photos), "--student", str(st), "--autoencoder", str(ae), "--preset", "test-micro",
            "--seeds", "2", "--show", "2", "--threads", "1"]
    assert mod.main(argv) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("| img0 |")).split("|")[2:-2]
    s0, s1, mean, ens, dn = (float(c.strip(" *")) for c in row)
    assert mean == pytest.approx((s0 + s1) / 2, abs=0.006)
    pairs = load_pairs(photos, "val")
    models = load_models(autoencoder=ae, student=st, preset="test-micro")
    lr, hr = (to_unit(a[0].transpose(2, 0, 1)[None]) for a in (pairs.lr, pairs.hr))
    assert dn == pytest.approx(psnr_y_8bit(DoNothingPipeline(models)(lr).numpy(), hr.numpy()), abs=0.006)
    pipe = OneStepPipeline(models)
    lr_p, hw = pipe.prepare(lr)
    with torch.no_grad():
        z_y = pipe.encode(lr_p)
        z = torch.stack([pipe.denoise(z_y, make_noise(tuple(z_y.shape), k), lr_p) for k in range(2)]).mean(0)
        assert ens == pytest.approx(psnr_y_8bit(pipe.decode(z, hw, lr_p).numpy(), hr.numpy()), abs=0.006)
    with pytest.raises(SystemExit, match="at least 2"):
        mod.main([*argv[:-6], "--seeds", "1"])
