"""VQGAN-f4 first stage (upstream ``VQModelTorch``), written from the spec (§2).

``encode`` returns the continuous latent (no quantisation); ``decode`` quantises through the codebook
(argmin of squared distances, first minimum on ties) before the decoder. 205 state-dict entries for the
official config, upstream key names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tadsr.config import VQConfig

__all__ = ["VQModelTorch", "VectorQuantizer"]


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head full spatial self-attention (O((hw)²) memory)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).permute(0, 2, 1)  # (b, hw, c)
        k = self.k(n).reshape(b, c, h * w)  # (b, c, hw)
        v = self.v(n).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)  # (b, hw_q, hw_k)
        o = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then 3x3 stride-2 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            block_in = cfg.ch * in_mult[i]
            block_out = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level.block = nn.ModuleList(blocks)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        ups: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level.block = nn.ModuleList(blocks)
            if i != 0:
                level.upsample = Upsample(block_in)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# Elements of the (pixels x n_embed) distance table that the eager search computes at a time (1 MiB of fp32): the
# block stays in the CPU cache through the five passes over it (matmul, two adds, scale, argmin). One table for a
# 64-px tile (4096 x 4096 codes, 64 MiB) goes to memory and back on each pass: 3x slower on the 2-core CI machine.
SEARCH_BLOCK_ELEMS = 1 << 18


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser (key ``embedding``); the straight-through form of upstream."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def search_rows(self, chunk: int | None = None) -> int:
        """Pixels per distance table in the eager search: cache-sized, and at most ``chunk`` (same codes either way:
        each pixel's distances are computed alone)."""
        rows = max(1, SEARCH_BLOCK_ELEMS // self.embedding.num_embeddings)
        return rows if chunk is None else max(1, min(int(chunk), rows))

    def indices(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, C, h, w) latent -> (B, h, w) int64 code indices.

        Args:
            chunk: if set, the (pixels x n_embed) distance table is computed ``chunk`` pixels at a time
                (bounded memory; identical result).
        """
        b, c, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight
        e2 = torch.sum(e**2, dim=1)
        if chunk is None or chunk >= zf.shape[0]:
            parts = [zf]
        else:
            parts = list(torch.split(zf, chunk, dim=0))
        idx = []
        for p in parts:
            d = torch.sum(p**2, dim=1, keepdim=True) + e2 - 2 * torch.einsum("bd,dn->bn", p, e.t())
            idx.append(torch.argmin(d, dim=1))
        return torch.cat(idx).reshape(b, h, w)

    def forward(self, z: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise (B, C, h, w) -> (z_q (B, C, h, w), indices (B, h, w)); the search runs in cache-sized blocks of
        at most ``chunk`` pixels (:meth:`search_rows`; the export graphs call :meth:`indices` with their own chunk)."""
        idx = self.indices(z, self.search_rows(chunk))
        zq = self.embedding(idx).permute(0, 3, 1, 2)
        zq = z + (zq - z).detach()
        return zq, idx


class VQModelTorch(nn.Module):
    """VQGAN autoencoder with ``encode`` (continuous) and ``decode`` (quantised)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 4h, 4w) image in [-1, 1] -> (B, embed_dim, h, w) latent (not quantised)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, *, force_not_quantize: bool = False, chunk: int | None = None) -> torch.Tensor:
        """(B, embed_dim, h, w) latent -> (B, 3, 4h, 4w) image (not clamped), quantised unless asked not to."""
        if not force_not_quantize:
            z, _ = self.quantize(z, chunk)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
