"""Colour correction of an SR output from its own LR input (the StableSR-family post-process), in torch.

Latent SR models can drift in colour: the denoiser or the autoencoder moves the low frequencies that the LR
image already pins down. A colour fix takes those low frequencies back from the bicubic-upsampled LR:

* ``wavelet``: split both images into a high-frequency part and a low-frequency residual with
  :data:`WAVELET_LEVELS` levels of an "à trous" decomposition (level ``i`` blurs the previous low-pass image with
  the 3x3 binomial kernel ``[1 2 1]ᵀ[1 2 1] / 16`` dilated by ``2**i``, edges replicated); the output is the SR's
  high-frequency part plus the reference's low-frequency residual.
* ``adain``: per image and channel, shift and scale the SR so that its mean and standard deviation over the
  image equal the reference's (adaptive instance normalisation).
* ``luma``: the reference with its luma detail replaced by the SR's: ``ref + Y(high(sr)) - Y(high(ref))`` on every
  channel, where ``Y`` is BT.601 luma (weights :data:`LUMA_WEIGHTS`) and ``high`` the wavelet split's
  high-frequency part over :data:`LUMA_LEVELS` levels. The SR keeps only what a super-resolver adds, fine luma
  detail; chroma and low-frequency luma come from the reference (the classic "super-resolve Y, interpolate
  CbCr" split). Adding ``d`` to all three channels changes luma by ``d`` and leaves BT.601 Cb and Cr unchanged, so
  the output's chroma is exactly the reference's. It fits latent models whose autoencoder loses colour (the
  bundled one reconstructs Cb / Cr 14 dB below bicubic, ``benchmarks/ae_colour_split.py``).
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

__all__ = [
    "COLOR_FIXES", "LUMA_LEVELS", "LUMA_WEIGHTS", "WAVELET_LEVELS", "ColorFix", "check_color_fix", "color_fix",
    "luma_fix", "wavelet_split",
]  # fmt: skip

COLOR_FIXES = ("none", "wavelet", "adain", "luma")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # BT.601 (MATLAB rgb2ycbcr's 65.481, 128.553, 24.966 over their sum 219)
WAVELET_LEVELS = 5
# levels of the ``luma`` fix: its detail band reaches 1 + 2 + 4 = 7 HR px, about what a x4 LR cannot hold; chosen on
# train crops (benchmarks/luma_levels.py: PSNR-Y 30.68 / SSIM-Y 0.840 at 3 levels, 30.17 / 0.838 at 5)
LUMA_LEVELS = 3
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


def _luma_detail(x: torch.Tensor, levels: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W): the high-frequency part of the BT.601 luma (a 1x1 convolution, then the split)."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return wavelet_split(F.conv2d(x, w), levels)[0]


def luma_fix(sr: torch.Tensor, ref: torch.Tensor, levels: int = LUMA_LEVELS) -> torch.Tensor:
    """The ``luma`` fix, ``ref + Y(high(sr)) - Y(high(ref))``, with ``levels`` wavelet levels (shapes already equal).

    :func:`color_fix` uses :data:`LUMA_LEVELS`; other counts are for sweeps (``benchmarks/luma_levels.py``)."""
    return ref + (_luma_detail(sr, levels) - _luma_detail(ref, levels))


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
    if method == "luma":
        return luma_fix(sr, ref)
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
