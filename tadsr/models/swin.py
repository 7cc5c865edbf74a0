"""Swin layers of ResShift's ``UNetModelSwin`` (channel-first, GroupNorm token norms), written from the spec.

Key names follow upstream (``patch_embed.proj``, ``blocks.k.norm1``, ``blocks.k.attn.qkv`` ...), so official
state dicts load strictly.

Export-readiness:
  * masks are pure functions of the feature size; they are built with numpy once per size and cached
    (:func:`window_mask`), never with in-place writes inside ``forward``;
  * window partition / reverse use tensors of rank <= 5 (Core ML's limit), for any batch size;
  * the cyclic shift is slice + concat (:func:`tadsr.models.ops.roll2d`);
  * the relative position bias can be frozen into a (non-persistent) buffer with :meth:`WindowAttention.freeze`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tadsr.models.ops import GroupNorm32, roll2d

__all__ = ["window_mask", "compact_mask", "relative_position_index", "WindowAttention", "SwinBlock", "BasicLayer"]

MASK_VALUE = -100.0


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) int64: ``(i_n - i_m + w - 1) * (2w - 1) + (j_n - j_m + w - 1)``."""
    i, j = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    idx = (i[:, None] - i[None, :] + window - 1) * (2 * window - 1) + (j[:, None] - j[None, :] + window - 1)
    return torch.from_numpy(idx.astype(np.int64))


@functools.lru_cache(maxsize=64)
def _window_mask_np(h: int, w: int, window: int, shift: int, rule: str) -> np.ndarray:
    nh, nw = h // window, w // window
    ii, jj = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)  # token n = window * i + j

    def region(coord: np.ndarray, size: int) -> np.ndarray:
        return (coord >= size - window).astype(np.int64) + (coord >= size - shift).astype(np.int64)

    labels = np.empty((nh, nw, window * window), dtype=np.int64)
    for a in range(nh):
        for b in range(nw):
            if rule == "upstream":
                # Upstream quirk (spec §1.3): the in-window *column* j is compared with the *row* thresholds,
                # and nothing depends on the window column b or on the image width.
                labels[a, b] = region(window * a + jj, h)
            else:  # standard Swin: 3x3 regions of the rolled image
                labels[a, b] = 3 * region(window * a + ii, h) + region(window * b + jj, w)
    labels = labels.reshape(nh * nw, window * window)
    mask = np.where(labels[:, :, None] == labels[:, None, :], 0.0, MASK_VALUE).astype(np.float32)
    mask.setflags(write=False)
    return mask


def window_mask(h: int, w: int, window: int, shift: int, rule: str = "upstream") -> torch.Tensor:
    """Additive attention mask for a shifted block on an (h, w) feature map: (nW, window², window²) float32.

    ``rule="upstream"`` reproduces the official ResShift/SinSR mask (which released checkpoints were trained
    with); ``rule="corrected"`` builds the standard Swin mask. Masked pairs get -100 (as upstream).
    """
    return torch.from_numpy(_window_mask_np(h, w, window, shift, rule).copy())


def compact_mask(mask: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """(nW, N, N) additive mask of an ``nh`` x ``nw`` window grid -> (nh, nw or 1, 1, N * N), broadcastable.

    The window-column axis is dropped when every window of a row has the same mask (always the case for the
    upstream rule, whose labels do not depend on the window column), so an exported graph stores an ``nw``
    times smaller constant; the unit axis broadcasts over heads. :meth:`WindowAttention.forward` adds it to
    the logits viewed as (B, nh, nw, heads, N * N) (rank 5, Core ML's limit).
    """
    n2 = mask.shape[-1] * mask.shape[-2]
    m = mask.reshape(nh, nw, 1, n2)
    if nw > 1 and bool((m == m[:, :1]).all()):
        m = m[:, :1]
    return m.contiguous()


def add_window_mask(attn: torch.Tensor, mask: torch.Tensor, nw: int) -> torch.Tensor:
    """Logits (B * nh * nw, heads, N, N) + a :func:`compact_mask` of that grid -> same shape."""
    bw, heads, n, _ = attn.shape
    nh = mask.shape[0]
    return (attn.reshape(bw // (nh * nw), nh, nw, heads, n * n) + mask).reshape(bw, heads, n, n)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * nW, window², C), windows row-major, tokens row-major; rank <= 5."""
    b, c, h, w = x.shape
    nh, nw = h // window, w // window
    x = x.reshape(b * c, nh, window, nw, window).permute(0, 1, 3, 2, 4)  # (bc, nh, nw, win, win)
    x = x.reshape(b, c, nh * nw, window * window).permute(0, 2, 3, 1)  # (b, nW, N, c)
    return x.reshape(b * nh * nw, window * window, c)


def window_reverse(x: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window², C) -> (B, C, H, W)."""
    c = x.shape[-1]
    nh, nw = h // window, w // window
    x = x.reshape(b, nh * nw, window * window, c).permute(0, 3, 1, 2)  # (b, c, nW, N)
    x = x.reshape(b * c, nh, nw, window, window).permute(0, 1, 3, 2, 4)  # (bc, nh, win, nw, win)
    return x.reshape(b, c, h, w)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside 8x8 windows with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, attn_impl: str = "math") -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("frozen_bias", None, persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table (or the frozen copy)."""
        if self.frozen_bias is not None:
            return self.frozen_bias
        n = self.window_size**2
        idx = relative_position_index(self.window_size).to(self.relative_position_bias_table.device)
        bias = self.relative_position_bias_table[idx.reshape(-1)].reshape(n, n, self.num_heads)
        return bias.permute(2, 0, 1).contiguous()

    @torch.no_grad()
    def freeze(self) -> None:
        """Precompute the bias once (inference / export). Call :meth:`unfreeze` before training."""
        self.frozen_bias = None
        self.frozen_bias = self.relative_position_bias().detach().clone()

    def unfreeze(self) -> None:
        self.frozen_bias = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, nw: int = 1) -> torch.Tensor:
        """x: (B * nW, N, C) tokens; mask: a :func:`compact_mask` (nh, nw or 1, 1, N²) or None; nw: windows per row.

        Bias and mask are added to the logits one after the other (never summed into a per-window tensor
        first), so an exported graph keeps two small constants instead of a folded (nW, heads, N, N) one.
        """
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (bw, heads, n, hd)
        bias = self.relative_position_bias()  # (heads, n, n)
        if self.attn_impl == "sdpa":
            full = bias[None].expand(bw, -1, -1, -1)
            if mask is not None:
                full = add_window_mask(full, mask, nw)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=full.to(q.dtype), scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
            if mask is not None:
                attn = add_window_mask(attn, mask.to(attn.dtype), nw)
            out = torch.softmax(attn, dim=-1) @ v
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """1x1-conv MLP (keys ``fc1``, ``fc2``), exact-erf GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One Swin transformer block on a channel-first (B, C, H, W) map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: int,
        nominal_resolution: int,
        mask_rule: str = "upstream",
        attn_impl: str = "math",
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.mask_rule = mask_rule
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_impl)
        self.norm2 = GroupNorm32(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        if shift_size > 0:
            # Persistent only for strict compatibility with official checkpoints; never read in forward
            # (upstream recomputes the mask on every call, spec §1.3).
            r = nominal_resolution
            self.register_buffer("attn_mask", window_mask(r, r, window_size, shift_size, mask_rule))
        self._mask_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def mask_for(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """The (cached) :func:`compact_mask` for an (h, w) map, or None for unshifted blocks."""
        if self.shift_size == 0:
            return None
        key = (h, w, str(device))
        m = self._mask_cache.get(key)
        if m is None:
            full = window_mask(h, w, self.window_size, self.shift_size, self.mask_rule)
            m = compact_mask(full, h // self.window_size, w // self.window_size).to(device)
            self._mask_cache[key] = m
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm1(x)
        y = roll2d(y, -self.shift_size)
        y = window_partition(y, self.window_size)
        y = self.attn(y, self.mask_for(h, w, x.device), w // self.window_size)
        y = window_reverse(y, self.window_size, b, h, w)
        y = roll2d(y, self.shift_size)
        x = x + y
        return x + self.mlp(self.norm2(x))


class _Proj(nn.Module):
    """Holds a 1x1 conv under the key ``proj`` (upstream ``patch_embed.proj`` / ``patch_unembed.proj``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BasicLayer(nn.Module):
    """Swin sub-layer of a UNet block: 1x1 in-projection, ``depth`` Swin blocks, 1x1 out-projection.

    No residual around the layer. A block shifts (by window/2) when its index is odd and the level's
    nominal resolution (``image_size / downsampling``) is larger than the window.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        num_heads: int,
        window_size: int,
        depth: int,
        mlp_ratio: int,
        nominal_resolution: int,
        mask_rule: str = "upstream",
        attn_impl: str = "math",
    ) -> None:
        super().__init__()
        self.patch_embed = _Proj(in_chans, embed_dim)
        shift = 0 if nominal_resolution <= window_size else window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(
                embed_dim,
                num_heads,
                window_size,
                shift if i % 2 == 1 else 0,
                mlp_ratio,
                nominal_resolution,
                mask_rule,
                attn_impl,
            )
            for i in range(depth)
        )
        self.patch_unembed = _Proj(embed_dim, in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.patch_unembed(x)
