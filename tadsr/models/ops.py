"""Small shared building blocks: GroupNorm32, timestep embedding, bicubic x4, export-friendly roll."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GroupNorm32",
    "timestep_embedding",
    "roll2d",
    "bicubic_x4_reference",
    "BicubicUpsample",
    "BICUBIC_X4_TAPS",
    "reflect_pad_to_multiple",
]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 and cast back to the input dtype (upstream ``GroupNorm32``)."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(32, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]`` (cosine half first), float32, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def roll2d(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``torch.roll(x, (shift, shift), dims=(-2, -1))`` written as slice + concat (exports to every backend)."""
    if shift == 0:
        return x
    h, w = x.shape[-2], x.shape[-1]
    sh, sw = shift % h, shift % w
    if sh:
        x = torch.cat([x[..., h - sh :, :], x[..., : h - sh, :]], dim=-2)
    if sw:
        x = torch.cat([x[..., :, w - sw :], x[..., :, : w - sw]], dim=-1)
    return x


def bicubic_x4_reference(x: torch.Tensor) -> torch.Tensor:
    """Upstream upsampling: ``F.interpolate(x, scale_factor=4, mode="bicubic")`` (A=-0.75, half-pixel, no AA)."""
    return F.interpolate(x, scale_factor=4, mode="bicubic")


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_taps(scale: int) -> torch.Tensor:
    """Polyphase taps (scale, 5) over padded source offsets -2..2 for integer upscaling (PyTorch convention)."""
    taps = torch.zeros(scale, 5, dtype=torch.float64)
    for r in range(scale):
        src = (r + 0.5) / scale - 0.5  # source coordinate relative to k
        base = math.floor(src)
        frac = src - base
        for i, off in enumerate(range(base - 1, base + 3)):
            taps[r, off + 2] = _cubic(frac - (off - base))
    return taps


BICUBIC_X4_TAPS = _bicubic_taps(4)


class BicubicUpsample(nn.Module):
    """Bicubic x``scale`` upsampling as a fixed separable polyphase convolution with edge replication.

    Equal to :func:`bicubic_x4_reference` up to float rounding (~4e-7), but made only of concat, conv2d,
    permute and reshape, so Core ML (no bicubic converter) and ExecuTorch (no portable bicubic kernel)
    can run it. Input (B, C, H, W) -> (B, C, scale*H, scale*W), any dtype the convs support.
    """

    def __init__(self, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        taps = _bicubic_taps(scale).to(torch.float32)
        self.register_buffer("weight_w", taps.view(scale, 1, 1, 5).clone(), persistent=False)
        self.register_buffer("weight_h", taps.view(scale, 1, 5, 1).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.scale
        y = x.reshape(b * c, 1, h, w)
        # width: replicate-pad 2 on each side, conv to `s` phases, interleave phases
        y = torch.cat([y[..., :1], y[..., :1], y, y[..., -1:], y[..., -1:]], dim=-1)
        y = F.conv2d(y, self.weight_w.to(y.dtype))  # (bc, s, h, w)
        y = y.permute(0, 2, 3, 1).reshape(b * c, 1, h, w * s)
        # height
        y = torch.cat([y[..., :1, :], y[..., :1, :], y, y[..., -1:, :], y[..., -1:, :]], dim=-2)
        y = F.conv2d(y, self.weight_h.to(y.dtype))  # (bc, s, h, ws)
        y = y.permute(0, 2, 1, 3).reshape(b, c, h * s, w * s)
        return y


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad bottom/right so both sides are multiples of ``multiple`` (upstream §4.3).

    Upstream raises when the pad is not smaller than the side (sides < multiple/2 + 1); here such images
    are reflect-padded repeatedly (a documented extension), which equals upstream whenever upstream works.

    Returns:
        The padded tensor and the original (h, w).
    """
    h, w = x.shape[-2:]
    th = -(-h // multiple) * multiple
    tw = -(-w // multiple) * multiple
    while x.shape[-2] < th or x.shape[-1] < tw:
        ph = min(th - x.shape[-2], x.shape[-2] - 1)
        pw = min(tw - x.shape[-1], x.shape[-1] - 1)
        if ph == 0 and pw == 0:  # 1-pixel side: reflect impossible, replicate instead
            x = F.pad(x, (0, tw - x.shape[-1], 0, th - x.shape[-2]), mode="replicate")
            break
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x, (h, w)
