"""tadsr.formats.rewrites: each rewrite equals what it replaces (module level and on the tiny-preset graphs).

Module-level checks run in float64 where the maths is exact (atol 1e-10) and in float32 at 1e-5. Whole
graphs run in float32: the denoiser at atol 1e-5 (its GroupNorm32 forces float32), encoder/decoder at 5e-5:
there the rewritten graph is *closer* to a float64 evaluation than torch's own GroupNorm kernel (decoder:
1.1e-5 vs 3.2e-5), so the float32 gap measures torch's rounding; the same VQ modules are compared in float64
on a small input (1e-10).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tadsr.errors import ConfigError
from tadsr.formats import rewrites as rw
from tadsr.formats.graphs import make_graphs
from tadsr.models import unet_swin, vqgan
from tadsr.models.ops import GroupNorm32
from tadsr.models.swin import SwinBlock


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread, restored after


@pytest.fixture(scope="module")
def graphs(tiny_models):
    return make_graphs(tiny_models, 64)


def _randomize(m: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_decomposed_group_norm(affine, eps):
    gn = _randomize(nn.GroupNorm(8, 32, eps=eps, affine=affine), 1)
    x = torch.randn(2, 32, 9, 7, dtype=torch.float64) * 3 + 5  # offset: a two-pass variance must handle it
    dec = rw.DecomposedGroupNorm(gn)
    torch.testing.assert_close(dec.double()(x), copy.deepcopy(gn).double()(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(rw.DecomposedGroupNorm(gn)(x.float()), gn(x.float()), atol=1e-5, rtol=0)


def test_decompose_group_norm_swaps_subclasses_on_a_copy():
    net = nn.Sequential(GroupNorm32(64), nn.SiLU(), nn.Sequential(nn.GroupNorm(32, 64, eps=1e-6)))
    out = rw.decompose_group_norm(net)
    assert [type(m).__name__ for m in out.modules()].count("DecomposedGroupNorm") == 2
    assert not any(isinstance(m, nn.GroupNorm) for m in out.modules())
    assert isinstance(net[0], GroupNorm32)  # the original is untouched
    x = torch.randn(1, 64, 8, 8)
    torch.testing.assert_close(out(x), net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [unet_swin.Upsample, vqgan.Upsample])
def test_transposed_upsample_equals_nearest_plus_conv(cls):
    up = _randomize(cls(6), 2).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    got = rw.TransposedUpsample(up.conv)(x)
    assert got.shape == (2, 6, 10, 14)
    torch.testing.assert_close(got, up(x), atol=1e-10, rtol=0)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_transposed_upsample_rejects_other_convs():
    with pytest.raises(ConfigError, match="3x3"):
        rw.upsample_conv_as_transposed(nn.Conv2d(4, 4, 5, padding=2))


@pytest.mark.parametrize("shift", [0, 4])
@pytest.mark.parametrize("batch", [1, 2])
def test_baked_swin_block(shift, batch):
    blk = _randomize(SwinBlock(64, 2, 8, shift, 4, 16), 3, scale=0.1).eval()  # outputs ~4: 1e-5 is ~10 ulp
    blk.attn.freeze()
    x = torch.randn(batch, 64, 16, 16)
    with torch.no_grad():
        ref = blk(x)
        baked = rw.BakedSwinBlock(blk, 16, 16)
        got = baked(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (baked.attn.mask is None) == (shift == 0)
    with pytest.raises(ConfigError, match="16x16"):
        baked(torch.randn(1, 64, 24, 24))


def test_bake_refuses_blocks_seen_at_two_sizes():
    blk = SwinBlock(64, 2, 8, 4, 4, 16).eval()
    net = nn.ModuleDict({"b": blk})

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = blk

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x).mean() + self.b(x[..., :8, :8]).mean()

    assert net  # keeps ``blk`` referenced twice
    with pytest.raises(ConfigError, match="two feature sizes"):
        rw.bake_window_attention(Two(), (torch.randn(1, 64, 16, 16),))


def test_codebook_search_equals_upstream():
    vq = vqgan.VectorQuantizer(64, 3)
    nn.init.normal_(vq.embedding.weight)
    z = torch.randn(1, 3, 16, 16)
    ex = rw.ExportVectorQuantizer(vq)
    assert torch.equal(ex.indices(z), vq.indices(z))
    assert torch.equal(ex.indices(z, chunk=50), vq.indices(z))  # ragged chunks


def test_norm_folded_resblock(graphs):
    net = graphs["denoiser"][0].unet
    blk = next(m for m in net.modules() if isinstance(m, unet_swin.ResBlock))
    x = torch.randn(1, blk.in_layers[2].in_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rw.NormFoldedResBlock(blk)(x), blk(x, None), atol=1e-5, rtol=0)
    unfolded = copy.deepcopy(blk)
    unfolded.folded = None
    with pytest.raises(ConfigError, match="fold_timestep"):
        rw.NormFoldedResBlock(unfolded)


def test_tiny_denoiser_rewritten_fp32(graphs):
    g, spec = graphs["denoiser"]
    ex = spec.example_inputs(seed=3)
    out, report = rw.apply_rewrites(g, ex, "xnnpack")
    assert report.applied == {"bake_window_attention": 18, "fold_scale_shift_into_norm": 14,
                              "decompose_group_norm": 65, "fold_upsample_conv": 3, "fold_codebook_norms": 0}  # fmt: skip
    assert not any(isinstance(m, (SwinBlock, nn.GroupNorm, unet_swin.Upsample)) for m in out.modules())
    assert any(isinstance(m, SwinBlock) for m in g.modules())  # the caller's graph is not changed
    with torch.no_grad():
        torch.testing.assert_close(out(*ex), g(*ex), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_tiny_autoencoder_graphs_rewritten(graphs, name):
    g, spec = graphs[name]
    ex = spec.example_inputs(seed=4)
    out, report = rw.apply_rewrites(g, ex, "xnnpack")
    assert report.applied["decompose_group_norm"] == (12 if name == "encoder" else 18)
    assert report.applied["fold_codebook_norms"] == (name == "decoder")
    with torch.no_grad():
        # float32 rounding of the GroupNorm kernels (torch's own is 3.2e-5 off a float64 evaluation here)
        torch.testing.assert_close(out(*ex), g(*ex), atol=5e-5, rtol=0)
        if name == "decoder":  # same codes as the upstream search
            assert torch.equal(out.quantize.indices(ex[0]), g.quantize.indices(ex[0]))


def test_tiny_autoencoder_modules_rewritten_fp64(tiny_models):
    """The same rewrites on the VQ encoder/decoder modules in float64 (small input): equal to 1e-10."""
    ae = copy.deepcopy(tiny_models.autoencoder).double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 2 - 1
    for net, inp in ((ae.encoder, x), (ae.decoder, torch.randn(1, 3, 16, 16, dtype=torch.float64))):
        out, _ = rw.apply_rewrites(net, (inp,), "xnnpack")
        with torch.no_grad():
            torch.testing.assert_close(out(inp), net(inp), atol=1e-10, rtol=0)


def test_rewrite_sets_and_errors(graphs):
    g, spec = graphs["encoder"]
    ex = spec.example_inputs()
    same, report = rw.apply_rewrites(g, ex, "none")
    assert report.applied == {} and same is not g
    _, report = rw.apply_rewrites(g, ex, ["decompose_group_norm"])
    assert list(report.applied) == ["decompose_group_norm"]
    with pytest.raises(ConfigError, match="unknown rewrite set"):
        rw.apply_rewrites(g, ex, "tensorrt")
    with pytest.raises(ConfigError, match="unknown rewrites"):
        rw.apply_rewrites(g, ex, ["fuse_everything"])
