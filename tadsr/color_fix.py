"""Colour correction of an SR output from its own LR input (the StableSR-family post-process), in torch.

Latent SR models can drift in colour: the denoiser or the autoencoder moves the low frequencies that the LR
image already pins down. A colour fix takes those low frequencies back from the bicubic-upsampled LR:

* ``wavelet``: split both images into a high-frequency part and a low-frequency residual with
  :data:`WAVELET_LEVELS` levels of an "à trous" decomposition (level ``i`` blurs the previous low-pass image with
  the 3x3 binomial kernel ``[1 2 1]ᵀ[1 2 1] / 16`` dilated by ``2**i``, edges replicated); the output is the SR's
  high-frequency part plus the reference's low-frequency residual.
* ``adain``: per image and channel, shift and scale the SR so that its mean and standard deviation over the
  image equal the reference's (adaptive instance normalisation).
* ``none``: no change (the default everywhere: upstream parity).

Written from the published description (Wang et al., "Exploiting Diffusion Prior for Real-World Image
Super-Resolution" (StableSR), 2023: colour correction by AdaIN or by wavelet low-frequency replacement).
Every operation (conv2d with dilation, replicate padding, mean / variance) exports to ONNX, Core ML and
ExecuTorch, so the same module runs inside the fused pipeline graph (:class:`tadsr.formats.graphs.PipelineGraph`) and in the reference pipelines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tadsr.errors import ConfigError

__all__ = ["COLOR_FIXES", "WAVELET_LEVELS", "ColorFix", "check_color_fix", "color_fix", "wavelet_split"]

COLOR_FIXES = ("none", "wavelet", "adain")
WAVELET_LEVELS = 5
ADAIN_EPS = 1e-5


def check_color_fix(name: str) -> str:
    """``name`` if it is one of :data:`COLOR_FIXES`, else a :class:`ConfigError`."""
    if name not in COLOR_FIXES:
        raise ConfigError(f"unknown colour fix {name!r}; choose from {', '.join(COLOR_FIXES)}")
    return name


def _binomial_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=dtype, device=device)
    k = torch.outer(k1, k1) / 16.0
    return k.expand(channels, 1, 3, 3).contiguous()


def wavelet_split(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)`` with ``high + low == x``: ``levels`` dilated 3x3 binomial blurs ("à trous").

    Args:
        x: (B, C, H, W) image.
        levels: number of blur levels; level ``i`` uses dilation ``2**i``.
    """
    kernel = _binomial_kernel(x.shape[1], x.dtype, x.device)
    low = x
    for i in range(levels):
        d = 2**i
        low = F.conv2d(F.pad(low, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=x.shape[1])
    return x - low, low


def _adain(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    mu_x, mu_r = x.mean(dim=(2, 3), keepdim=True), ref.mean(dim=(2, 3), keepdim=True)
    std_x = (x - mu_x).square().mean(dim=(2, 3), keepdim=True).add(ADAIN_EPS).sqrt()
    std_r = (ref - mu_r).square().mean(dim=(2, 3), keepdim=True).add(ADAIN_EPS).sqrt()
    return (x - mu_x) * (std_r / std_x) + mu_r


def color_fix(sr: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    """Colour-correct ``sr`` towards ``ref`` (same shape, e.g. the bicubic-upsampled LR); not clamped.

    Raises:
        ConfigError: unknown ``method``.
        ValueError: shapes differ.
    """
    check_color_fix(method)
    if method == "none":
        return sr
    if sr.shape != ref.shape:
        raise ValueError(f"colour fix needs equal shapes, got {tuple(sr.shape)} and {tuple(ref.shape)}")
    if method == "adain":
        return _adain(sr, ref)
    high, _ = wavelet_split(sr)
    _, low = wavelet_split(ref)
    return high + low


class ColorFix(nn.Module):
    """:func:`color_fix` as a module (for export graphs): ``forward(sr, ref) -> clamp(fix(sr, ref), -1, 1)``."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = check_color_fix(method)

    def forward(self, sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return color_fix(sr, ref, self.method).clamp(-1.0, 1.0)
