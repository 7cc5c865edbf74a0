"""Structural facts of the networks: Swin mask rule, buffers, export-readiness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tadsr
from tadsr.config import UNetConfig, replace
from tadsr.models.ops import BicubicUpsample, bicubic_x4_reference, reflect_pad_to_multiple, roll2d
from tadsr.models.swin import SwinBlock, compact_mask, window_mask, window_partition, window_reverse
from tadsr.models.unet_swin import UNetModelSwin


def _nonzero_windows(mask: torch.Tensor) -> list[int]:
    return [i for i in range(mask.shape[0]) if mask[i].abs().sum() > 0]


def test_upstream_mask_anchors() -> None:
    # spec §7: 64x64 latent -> level 64 windows 56..63, level 32 windows 12..15, level 16 windows 2, 3
    assert _nonzero_windows(window_mask(64, 64, 8, 4)) == list(range(56, 64))
    assert _nonzero_windows(window_mask(32, 32, 8, 4)) == [12, 13, 14, 15]
    assert _nonzero_windows(window_mask(16, 16, 8, 4)) == [2, 3]
    assert _nonzero_windows(window_mask(64, 128, 8, 4)) == list(range(112, 128))
    m = window_mask(64, 64, 8, 4)[60]
    j = torch.arange(64) % 8
    # in the last window row, tokens with j < 4 and j >= 4 cannot attend to each other
    assert torch.equal(m != 0, (j[:, None] < 4) != (j[None, :] < 4))
    assert set(torch.unique(m).tolist()) == {0.0, -100.0}


def test_corrected_mask_is_standard_swin() -> None:
    m = window_mask(32, 32, 8, 4, rule="corrected")
    # standard Swin: masks on the last window row and the last window column
    assert _nonzero_windows(m) == [3, 7, 11, 12, 13, 14, 15]


def test_mask_rule_switch_changes_output(tiny_models) -> None:
    cfg = replace(tiny_models.preset.unet, mask_rule="corrected")
    net = UNetModelSwin(cfg)
    net.load_state_dict(tiny_models.student.state_dict())
    net.eval()
    x, lq = torch.randn(1, 3, 64, 64), torch.rand(1, 3, 64, 64) * 2 - 1
    t = torch.tensor([14])
    with torch.no_grad():
        assert (net(x, t, lq) - tiny_models.student(x, t, lq)).abs().max() > 1e-4


def test_attn_mask_buffers_unused(tiny_models) -> None:
    net = UNetModelSwin(tiny_models.preset.unet).eval()
    net.load_state_dict(tiny_models.student.state_dict())
    x, lq = torch.randn(1, 3, 64, 64), torch.rand(1, 3, 64, 64) * 2 - 1
    t = torch.tensor([14])
    with torch.no_grad():
        ref = net(x, t, lq)
        n = 0
        for name, buf in net.named_buffers():
            if name.endswith("attn_mask"):
                buf.normal_()
                n += 1
        assert n == 6  # blocks.1 of the shifted levels 64, 32, 16 in the encoder and decoder paths
        assert torch.equal(net(x, t, lq), ref)


def test_shifted_blocks_official() -> None:
    net = UNetModelSwin(tadsr.get_preset("official-x4").unet)
    shifted = sorted(n for n, m in net.named_modules() if getattr(m, "shift_size", 0) > 0)
    expected = sorted(f"{p}.1.blocks.1" for p in
                      ["input_blocks.1", "input_blocks.4", "input_blocks.7",
                       "output_blocks.3", "output_blocks.6", "output_blocks.9"])
    assert shifted == expected
    assert sum(p.numel() for p in net.parameters()) == 118_593_583


@pytest.mark.parametrize("rule", ["upstream", "corrected"])
def test_compact_mask_and_attention_impls(rule: str) -> None:
    """The compact mask equals the full one broadcast back; a shifted block gives the same output with the math and
    the sdpa attention, batch 2, on a non-square map (the full per-window mask, added naively, as the reference)."""
    full = window_mask(16, 24, 8, 4, rule)
    cm = compact_mask(full, 2, 3)
    assert cm.shape == ((2, 1, 1, 4096) if rule == "upstream" else (2, 3, 1, 4096))
    assert torch.equal(cm.expand(2, 3, 1, 4096).reshape(6, 64, 64), full)
    torch.manual_seed(0)
    blk = SwinBlock(32, 2, 8, 4, 2, 16, rule, "math").eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 32, 16, 24)
    tokens = window_partition(roll2d(blk.norm1(x), -4), 8)
    a = blk.attn
    q, k, v = a.qkv(tokens).reshape(12, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
    logits = (q * a.scale) @ k.transpose(-2, -1) + a.relative_position_bias() + full.repeat(2, 1, 1)[:, None]
    ref = a.proj((torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(12, 64, 32))
    with torch.no_grad():
        got = a(tokens, blk.mask_for(16, 24, x.device), 3)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        y_math = blk(x)
        blk.attn.attn_impl = "sdpa"
        torch.testing.assert_close(blk(x), y_math, atol=1e-5, rtol=1e-5)


def test_window_partition_roundtrip_and_roll() -> None:
    x = torch.randn(2, 5, 16, 24)
    w = window_partition(x, 8)
    assert w.shape == (2 * 6, 64, 5)
    assert torch.equal(w[1, 8 * 2 + 3], x[0, :, 2, 8 + 3])  # window 1 = row 0, col 1; token (2, 3)
    assert torch.equal(window_reverse(w, 8, 2, 16, 24), x)
    for s in (-4, 4):
        assert torch.equal(roll2d(x, s), torch.roll(x, (s, s), dims=(-2, -1)))


def test_folded_timestep_and_frozen_bias_match(tiny_models) -> None:
    import copy

    net = copy.deepcopy(tiny_models.student)
    x, lq = torch.randn(1, 3, 64, 128), torch.rand(1, 3, 64, 128) * 2 - 1
    t = torch.tensor([14])
    with torch.no_grad():
        ref = net(x, t, lq)
        net.fold_timestep(14)
        net.freeze_attention_bias()
        out = net.forward_with_embedding(x, None, lq)
    assert (out - ref).abs().max() < 1e-5
    net.train()  # training undoes folding
    assert all(getattr(m, "folded", None) is None for m in net.modules())


def test_bicubic_polyphase_any_size() -> None:
    x = torch.randn(2, 3, 13, 29)
    assert (BicubicUpsample(4)(x) - bicubic_x4_reference(x)).abs().max() < 2e-6


@pytest.mark.parametrize("hw", [(97, 61), (20, 5), (1, 1), (64, 64), (65, 128)])
def test_reflect_pad(hw: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *hw)
    y, orig = reflect_pad_to_multiple(x, 64)
    assert orig == hw and y.shape[-2] % 64 == 0 and y.shape[-1] % 64 == 0
    assert torch.equal(y[..., : hw[0], : hw[1]], x)
    if hw[0] > 32 and hw[1] > 32:  # where upstream's single reflect pad works, we equal it
        ph, pw = y.shape[-2] - hw[0], y.shape[-1] - hw[1]
        assert torch.equal(y, torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect"))


def test_config_validation() -> None:
    with pytest.raises(tadsr.ConfigError):
        UNetConfig(mask_rule="fixed")
    with pytest.raises(tadsr.ConfigError):
        UNetConfig(num_res_blocks=(1, 1))
    with pytest.raises(tadsr.ConfigError, match="unknown preset"):
        tadsr.get_preset("huge")
    p = tadsr.get_preset("tiny")
    assert tadsr.Preset.from_dict(p.to_dict()) == p


def test_pipeline_odd_size_and_seed(tiny_models) -> None:
    pipe = tadsr.OneStepPipeline(tiny_models)
    lr = torch.rand(1, 3, 37, 50) * 2 - 1
    a = pipe(lr, seed=3)
    b = pipe(lr, seed=3)
    c = pipe(lr, seed=4)
    assert a.shape == (1, 3, 148, 200)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    with pytest.raises(tadsr.InputError, match="noise must have shape"):
        pipe(lr, noise=torch.randn(1, 3, 37, 50))
    with pytest.raises(tadsr.InputError, match="expected \\[-1, 1\\]"):
        pipe(lr * 255)
    with pytest.raises(tadsr.InputError):
        pipe(torch.rand(3, 37, 50))


def test_teacher_needs_teacher_and_known_steps(tiny_models) -> None:
    m = tadsr.Models(preset=tiny_models.preset, student=tiny_models.student, autoencoder=tiny_models.autoencoder)
    with pytest.raises(tadsr.ConfigError, match="no teacher"):
        tadsr.TeacherPipeline(m)
    m.teacher = tiny_models.student
    with pytest.raises(tadsr.ConfigError, match="no 7-step teacher"):
        tadsr.TeacherPipeline(m, steps=7)
    assert np.isfinite(tadsr.TeacherPipeline(m, steps=4)(torch.zeros(1, 3, 64, 64), seed=0).numpy()).all()


def test_teacher_sample_is_the_call_between_encode_and_decode(tiny_models) -> None:
    """``TeacherPipeline.sample`` on a given z_y is what ``__call__`` runs (benchmarks encode once, then sample)."""
    from tadsr.pipeline import make_noise

    m = tadsr.Models(preset=tiny_models.preset, student=tiny_models.student, autoencoder=tiny_models.autoencoder,
                     teacher=tiny_models.student)  # fmt: skip
    pipe = tadsr.TeacherPipeline(m, steps=4)
    lr = torch.rand(2, 3, 37, 50, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lr_p, hw = pipe.prepare(lr)
    with torch.no_grad():
        z_y = pipe.encode(lr_p)
        z = pipe.sample(z_y, make_noise((4, *z_y.shape), 5), lr_p)
        seen: list[tuple[int, torch.Tensor]] = []
        z2 = pipe.sample(z_y, make_noise((4, *z_y.shape), 5), lr_p, on_x0=lambda t, x0: seen.append((t, x0)))
    assert z.shape == z_y.shape
    torch.testing.assert_close(pipe.decode(z, hw, lr_p), pipe(lr, seed=5), rtol=0, atol=0)
    torch.testing.assert_close(z2, z, rtol=0, atol=0)  # the callback only looks
    assert [t for t, _ in seen] == [3, 2, 1, 0] and all(x0.shape == z_y.shape for _, x0 in seen)
    torch.testing.assert_close(seen[-1][1], z, rtol=0, atol=0)  # no noise after t = 0: the last x0 is the output


def test_eager_codebook_search_runs_in_cache_sized_blocks_with_the_same_codes(monkeypatch) -> None:
    """``VectorQuantizer.forward`` (every eager decode) searches ``search_rows`` pixels at a time: the codes are those
    of one whole distance table (each pixel's distances are computed alone)."""
    from torch import nn

    from tadsr.models import vqgan

    vq = vqgan.VectorQuantizer(4096, 3)
    nn.init.normal_(vq.embedding.weight)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, 32, 32, generator=g)
    assert vq.search_rows() == vqgan.SEARCH_BLOCK_ELEMS // 4096 and vq.search_rows(10) == 10
    calls: list[int] = []
    real = vq.indices
    monkeypatch.setattr(vq, "indices", lambda z, chunk=None: calls.append(chunk) or real(z, chunk))
    with torch.no_grad():
        zq, idx = vq(z, chunk=4096)
    assert calls == [vq.search_rows()] and calls[0] < z.shape[2] * z.shape[3]
    assert torch.equal(idx, real(z))
    torch.testing.assert_close(zq, vq.embedding(idx).permute(0, 3, 1, 2), rtol=0, atol=1e-6)
