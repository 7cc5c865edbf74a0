"""TAD-SR's time-aware latent discriminator (spec §5): frozen teacher encoder features + trainable heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from tadsr.models.ops import timestep_embedding
from tadsr.models.unet_swin import Downsample, UNetModelSwin

__all__ = ["feature_block_indices", "teacher_features", "TimeAwareDiscriminator"]


def feature_block_indices(unet: UNetModelSwin) -> list[int]:
    """Input blocks whose outputs feed the heads: every downsample block and the last input block.

    For the official config these are h3, h6, h9 and h11 (spec §5.1); the middle block output is added.
    """
    idx = [i for i, blk in enumerate(unet.input_blocks) if any(isinstance(m, Downsample) for m in blk)]
    return idx + [len(unet.input_blocks) - 1]


def teacher_features(unet: UNetModelSwin, x_scaled: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> list[torch.Tensor]:
    """The encoder half of ``unet`` (input blocks + middle block) at steps ``t``: the 5 feature maps.

    Args:
        x_scaled: (B, C, h, w) latent already divided by ``s_t``.
        t: (B,) int64 steps (the teacher's own time embedding is used).
        lq: (B, 3, h, w) LR condition in [-1, 1].
    """
    keep = set(feature_block_indices(unet))
    emb = unet.time_embedding(t)
    h = torch.cat([x_scaled, lq.to(x_scaled.dtype)], dim=1)
    feats = []
    for i, block in enumerate(unet.input_blocks):
        h = block(h, emb)
        if i in keep:
            feats.append(h)
    feats.append(unet.middle_block(h, emb))
    return feats


class _ResidualConv1d(nn.Module):
    """``(x + LeakyReLU(GN4(SN-Conv1d k=9 circular(x)))) / sqrt(2)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = spectral_norm(nn.Conv1d(c, c, 9, padding=4, padding_mode="circular"), eps=1e-12)
        self.norm = nn.GroupNorm(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + F.leaky_relu(self.norm(self.conv(x)), 0.2)) / math.sqrt(2)


class DiscHead(nn.Module):
    """One time-conditioned head on a (B, C, H, W) feature map -> (B, c_dim * H * W) logits."""

    def __init__(self, c: int, c_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.time_proj = nn.Linear(embed_dim, 2 * c)
        self.norm = nn.GroupNorm(32, c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.proj = spectral_norm(nn.Conv1d(c, c, 1), eps=1e-12)
        self.proj_norm = nn.GroupNorm(4, c)
        self.res = _ResidualConv1d(c)
        self.out = spectral_norm(nn.Conv1d(c, c_dim, 1), eps=1e-12)

    def forward(self, feat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.time_proj(F.silu(timestep_embedding(t, self.embed_dim)))[:, :, None, None]
        scale, shift = e.chunk(2, dim=1)
        h = self.norm(feat.float()) * (1 + scale) + shift
        h = self.conv(F.silu(h)).flatten(2)
        h = F.leaky_relu(self.proj_norm(self.proj(h)), 0.2)
        return self.out(self.res(h)).flatten(1)


class TimeAwareDiscriminator(nn.Module):
    """Heads over the teacher's encoder features, logits of all heads concatenated (spec §5.2).

    Args:
        channels: feature channels, one per head (from :func:`teacher_features`).
        c_dim: output channels per head (64 upstream).
        embed_dim: width of the sinusoidal time embedding (the UNet's ``model_channels`` upstream).
    """

    def __init__(self, channels: list[int], c_dim: int = 64, embed_dim: int = 160) -> None:
        super().__init__()
        self.heads = nn.ModuleList([DiscHead(c, c_dim, embed_dim) for c in channels])

    @classmethod
    def for_teacher(cls, unet: UNetModelSwin, c_dim: int = 64) -> TimeAwareDiscriminator:
        channels = [_out_channels(unet.input_blocks[i]) for i in feature_block_indices(unet)]
        channels.append(_out_channels(unet.middle_block))
        return cls(channels, c_dim=c_dim, embed_dim=unet.cfg.model_channels)

    def forward(self, feats: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f, t) for head, f in zip(self.heads, feats)], dim=1)


def _out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels
