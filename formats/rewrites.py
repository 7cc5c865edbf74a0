"""Graph-changing rewrites for mobile backends, each an explicit function with an equivalence test.

The export graphs of :mod:`tadsr.formats.graphs` already have static shapes, cached Swin masks, slice+concat
rolls and rank <= 5 windows. What remains are ops the mobile delegates do not take as written:

==============================  =====================================================  =====================
rewrite                         what it does                                           why
==============================  =====================================================  =====================
``bake_window_attention``       Swin block for its one feature size: q/k/v as three    ``select``, 4-D matmul
                                linears (1/sqrt(d) folded into q), relative bias       (``expand``),
                                (1, heads, N, N) and compact shift mask as             ``repeat`` and
                                constants, 3-D ``bmm``                                 ``unsqueeze`` stay
                                                                                       outside XNNPACK
``fold_scale_shift_into_norm``  timestep-folded ``(1 + scale, shift)`` of each         constant ``select``
                                ResBlock moved into its GroupNorm affine               ops, 2 ops per block
``decompose_group_norm``        ``nn.GroupNorm`` -> reshape (B, G, C/G, HW), two-pass  XNNPACK has no GN;
                                mean / variance as 4-D ``mean`` over dims (2, 3),      the fp16 Core ML
                                staged (W, H, C/G: XNNPACK sums sequentially), rsqrt,  selector keeps the
                                affine                                                 stats fp32 by name
``fold_upsample_conv``          nearest x2 + 3x3 conv -> one ``ConvTranspose2d``       no XNNPACK nearest
                                (k 4, s 2, p 1), exact re-arrangement of the taps      upsampling; 2.25x
                                                                                       fewer MACs
``fold_codebook_norms``         VQ search ``argmin |e|² - 2 z.e`` with ``|e|²`` and    ``sum`` ops outside
                                ``-2e`` constants (``|z|²`` dropped: same argmin)      XNNPACK; fewer ops
==============================  =====================================================  =====================

All rewrites work on a deep copy (the caller's graph is never changed), keep parameter values (no
retraining) and agree with the original graph to float rounding (tests/test_rewrites.py, atol 1e-5 on the
tiny preset). :func:`apply_rewrites` runs a named set of them and reports what it changed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tadsr.errors import ConfigError
from tadsr.models import unet_swin, vqgan
from tadsr.models.ops import roll2d
from tadsr.models.swin import SwinBlock, WindowAttention, add_window_mask, window_partition, window_reverse

__all__ = [
    "DecomposedGroupNorm",
    "BakedWindowAttention",
    "BakedSwinBlock",
    "NormFoldedResBlock",
    "TransposedUpsample",
    "ExportVectorQuantizer",
    "bake_window_attention",
    "fold_scale_shift_into_norm",
    "decompose_group_norm",
    "fold_upsample_conv",
    "upsample_conv_as_transposed",
    "fold_codebook_norms",
    "REWRITES",
    "BACKEND_REWRITES",
    "RewriteReport",
    "apply_rewrites",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------------------------------------
class DecomposedGroupNorm(nn.Module):
    """GroupNorm written as reshape + mean/variance arithmetic (same parameters, same maths).

    ``x (B, C, H, W)`` -> ``(B, G, C/G, H*W)``; ``mu = mean(x)`` per group; ``d = x - mu``;
    ``var = mean(d * d)`` (biased, as GroupNorm); ``y = d * rsqrt(var + eps)`` -> affine.
    Every reduction is a 4-D mean over the two innermost dims (XNNPACK's global average pooling), done in
    stages (over W, then H, then C/G): XNNPACK accumulates a mean sequentially in float32, so one mean over
    the C/G*H*W (262144 at the VQ encoder's full resolution) elements of a group loses ~1e-3 of the output
    when the group has a large offset (real photos), where the staged means stay at float rounding. The
    statistics submodule names (``stats``) let the Core ML fp16 selector keep them in fp32.
    """

    def __init__(self, gn: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = gn.num_groups
        self.num_channels = gn.num_channels
        self.eps = float(gn.eps)
        self.affine = gn.affine
        if gn.affine:
            self.weight = nn.Parameter(gn.weight.detach().clone().view(1, -1, 1, 1), requires_grad=False)
            self.bias = nn.Parameter(gn.bias.detach().clone().view(1, -1, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xf = x.reshape(b, self.num_groups, c // self.num_groups, h * w)
        d = xf - self._mean(xf, (w, h, c // self.num_groups))
        var = self._mean(d * d, (w, h, c // self.num_groups))
        y = (d * torch.rsqrt(var + self.eps)).reshape(b, c, h, w)
        if self.affine:
            y = y * self.weight + self.bias
        return y

    @staticmethod
    def _mean(t: torch.Tensor, stages: tuple[int, ...]) -> torch.Tensor:
        """(B, G, C/G, H*W) -> (B, G, 1, 1) group means, innermost stage first (sizes multiply to C/G*H*W)."""
        b, g = t.shape[:2]
        rest = t.shape[2] * t.shape[3]
        for k in stages:
            if k == 1:
                continue
            rest //= k
            t = t.reshape(b, g * rest, k, 1).mean(dim=(2, 3), keepdim=True)
        return t.reshape(b, g, 1, 1)


def _swap(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[str, nn.Module], nn.Module]) -> int:
    """Replace every submodule for which ``match`` holds by ``make(qualified_name, module)``; returns the count."""
    targets = [(name, m) for name, m in model.named_modules() if name and match(m)]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(name, m))
    return len(targets)


def decompose_group_norm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.GroupNorm`` (incl. ``GroupNorm32``) by :class:`DecomposedGroupNorm`.

    Args:
        model: any module; not changed unless ``inplace``.
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The rewritten module (float32 in, float32 out; equal to ~1e-6).
    """
    out = model if inplace else copy.deepcopy(model)
    n = _swap(out, lambda m: isinstance(m, nn.GroupNorm), lambda _, m: DecomposedGroupNorm(m))
    log.debug("decompose_group_norm: %d GroupNorm modules", n)
    return out


# --------------------------------------------------------------------------------------------------------
# Swin window attention at a fixed feature size
# --------------------------------------------------------------------------------------------------------
class BakedWindowAttention(nn.Module):
    """Window attention for one fixed feature size: split q/k/v, constant bias and mask, 3-D bmm.

    ``forward(x)`` with ``x`` (B * nW, N, C) tokens. ``rel_bias`` (1, heads, N, N) is the gathered relative
    position bias, ``mask`` the block's :func:`~tadsr.models.swin.compact_mask` for its feature size
    (nh, nw or 1, 1, N²; -100 on masked pairs; absent for unshifted blocks) and ``nw`` its windows per row.
    The softmax scale is folded into the q projection.
    """

    def __init__(self, attn: WindowAttention, mask: torch.Tensor | None, nw: int = 1) -> None:
        super().__init__()
        c, heads = attn.dim, attn.num_heads
        self.num_heads, self.head_dim, self.dim = heads, attn.head_dim, c
        w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
        self.q, self.k, self.v = (nn.Linear(c, c) for _ in range(3))
        with torch.no_grad():
            self.q.weight.copy_(w[:c] * attn.scale)
            self.q.bias.copy_(b[:c] * attn.scale)
            self.k.weight.copy_(w[c : 2 * c])
            self.k.bias.copy_(b[c : 2 * c])
            self.v.weight.copy_(w[2 * c :])
            self.v.bias.copy_(b[2 * c :])
        self.proj = copy.deepcopy(attn.proj)
        rel = attn.relative_position_bias().detach().float()[None].contiguous().clone()
        self.register_buffer("rel_bias", rel, persistent=False)
        m = None if mask is None else mask.detach().float().contiguous().clone()
        self.register_buffer("mask", m, persistent=False)
        self.nw = int(nw)
        self.requires_grad_(False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        bw, n, _ = t.shape  # (bw, n, c) -> (bw * heads, n, hd)
        return t.reshape(bw, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3).reshape(bw * self.num_heads, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bw, n, c = x.shape
        h = self.num_heads
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        attn = torch.bmm(q, k.transpose(1, 2)).reshape(bw, h, n, n) + self.rel_bias
        if self.mask is not None:
            attn = add_window_mask(attn, self.mask, self.nw)
        attn = torch.softmax(attn, dim=-1).reshape(bw * h, n, n)
        out = torch.bmm(attn, v)  # (bw * heads, n, hd)
        out = out.reshape(bw, h, n, self.head_dim).permute(0, 2, 1, 3).reshape(bw, n, c)
        return self.proj(out)


class BakedSwinBlock(nn.Module):
    """A :class:`SwinBlock` specialised to one (H, W) feature size with a :class:`BakedWindowAttention`."""

    def __init__(self, blk: SwinBlock, h: int, w: int) -> None:
        super().__init__()
        self.window_size, self.shift_size, self.h, self.w = blk.window_size, blk.shift_size, h, w
        self.norm1 = blk.norm1
        self.attn = BakedWindowAttention(blk.attn, blk.mask_for(h, w, torch.device("cpu")), w // blk.window_size)
        self.norm2 = blk.norm2
        self.mlp = blk.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if (h, w) != (self.h, self.w):
            raise ConfigError(f"baked Swin block expects a {self.h}x{self.w} feature map, got {h}x{w}")
        y = roll2d(self.norm1(x), -self.shift_size)
        y = self.attn(window_partition(y, self.window_size))
        y = roll2d(window_reverse(y, self.window_size, b, h, w), self.shift_size)
        x = x + y
        return x + self.mlp(self.norm2(x))


def _record_input_shapes(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], kinds: tuple[type, ...]
) -> dict[str, tuple[int, ...]]:
    """Run ``model`` once and record the first input shape of every submodule of one of ``kinds``."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, kinds):

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                shape = tuple(args[0].shape)
                if shapes.setdefault(name, shape) != shape:
                    raise ConfigError(f"{name} runs at two feature sizes ({shapes[name]} and {shape}); cannot bake")

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for hd in handles:
            hd.remove()
    return shapes


def bake_window_attention(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], *, inplace: bool = False
) -> nn.Module:
    """Replace every :class:`SwinBlock` by a :class:`BakedSwinBlock` for the feature size it runs at.

    Args:
        model: a graph containing Swin blocks; it is run once on ``example_inputs`` to find each block's
            feature size (the graphs have static shapes, so each block sees exactly one size).
        example_inputs: inputs of the graph's fixed shapes.
        inplace: change ``model`` itself instead of a deep copy.

    Raises:
        ConfigError: a block runs at two sizes (not a static-shape graph).
    """
    out = model if inplace else copy.deepcopy(model)
    shapes = _record_input_shapes(out, example_inputs, (SwinBlock,))
    n = _swap(out, lambda m: isinstance(m, SwinBlock), lambda name, m: BakedSwinBlock(m, *shapes[name][-2:]))
    log.debug("bake_window_attention: %d Swin blocks", n)
    return out


# --------------------------------------------------------------------------------------------------------
# Nearest x2 upsampling + 3x3 conv  ->  one transposed conv
# --------------------------------------------------------------------------------------------------------
# Along one axis, conv3x3(pad 1) of a nearest-x2 upsampled signal is
#   out[2m]   = w0 x[m-1] + (w1 + w2) x[m]
#   out[2m+1] = (w0 + w1) x[m] + w2 x[m+1]
# which is conv_transpose(stride 2, padding 1, kernel 4) with taps (w2, w1 + w2, w0 + w1, w0):
# PyTorch's transposed conv adds x[i] w'[k] to out[2i - 1 + k]. Zero padding at the borders agrees.
_UP_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)


def upsample_conv_as_transposed(conv: nn.Conv2d) -> nn.ConvTranspose2d:
    """The ``ConvTranspose2d(k=4, s=2, p=1)`` equal to nearest x2 upsampling followed by ``conv`` (3x3, pad 1)."""
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        raise ConfigError(f"expected a 3x3 / pad 1 / stride 1 conv after the upsampling, got {conv}")
    w = conv.weight.detach().double()  # (cout, cin, 3, 3)
    wt = torch.einsum("ka,oiab,lb->iokl", _UP_TAPS, w, _UP_TAPS)  # (cin, cout, 4, 4)
    out = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 4, stride=2, padding=1, bias=conv.bias is not None,
                             dtype=conv.weight.dtype, device=conv.weight.device)  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(wt.to(conv.weight.dtype))
        if conv.bias is not None:
            out.bias.copy_(conv.bias.detach())
    return out.requires_grad_(False)


class TransposedUpsample(nn.Module):
    """Nearest x2 + 3x3 conv as one transposed conv (2.25x fewer MACs; no nearest-upsample op)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = upsample_conv_as_transposed(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def fold_upsample_conv(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace the UNet's and the VQ decoder's ``Upsample`` (nearest x2 + conv) by :class:`TransposedUpsample`."""
    out = model if inplace else copy.deepcopy(model)
    kinds = (unet_swin.Upsample, vqgan.Upsample)
    n = _swap(out, lambda m: isinstance(m, kinds), lambda _, m: TransposedUpsample(m.conv))
    log.debug("fold_upsample_conv: %d Upsample modules", n)
    return out


# --------------------------------------------------------------------------------------------------------
# Folded timestep conditioning  ->  GroupNorm affine
# --------------------------------------------------------------------------------------------------------
class NormFoldedResBlock(nn.Module):
    """A timestep-folded :class:`~tadsr.models.unet_swin.ResBlock` whose ``(1 + scale, shift)`` sit in the
    affine of its second GroupNorm: ``GN(h) w (1+s) + b (1+s) + t`` (no separate mul/add, no constant slicing).
    """

    def __init__(self, blk: unet_swin.ResBlock) -> None:
        super().__init__()
        if blk.folded is None:
            raise ConfigError("fold_scale_shift_into_norm needs a timestep-folded UNet (UNetModelSwin.fold_timestep)")
        gn = copy.deepcopy(blk.out_layers[0])
        one_plus_scale, shift = (t.detach().reshape(-1) for t in blk.folded)
        with torch.no_grad():
            gn.bias.copy_(gn.bias * one_plus_scale + shift)
            gn.weight.mul_(one_plus_scale)
        self.in_layers = blk.in_layers
        self.out_layers = nn.Sequential(gn, *list(blk.out_layers)[1:])
        self.skip_connection = blk.skip_connection

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.skip_connection(x) + self.out_layers(self.in_layers(x))


def fold_scale_shift_into_norm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every timestep-folded ResBlock by a :class:`NormFoldedResBlock` (batch size 1 constants)."""
    out = model if inplace else copy.deepcopy(model)
    n = _swap(out, lambda m: isinstance(m, unet_swin.ResBlock), lambda _, m: NormFoldedResBlock(m))
    log.debug("fold_scale_shift_into_norm: %d ResBlocks", n)
    return out


# --------------------------------------------------------------------------------------------------------
# VQ codebook search with constant codebook norms
# --------------------------------------------------------------------------------------------------------
class ExportVectorQuantizer(nn.Module):
    """Codebook search as one matmul + one add against constants (keys ``embedding`` kept).

    ``argmin_n |z|² + |e_n|² - 2 z.e_n`` equals ``argmin_n |e_n|² + z.(-2 e_n)``: ``|z|²`` does not depend on
    the code and ``|e_n|²`` (``e2``) and ``-2 e`` (``neg2_et``, exact scaling) are constants. What is left
    outside XNNPACK is the int64 part: ``argmin``, the index reshape and the ``embedding`` gather.
    """

    def __init__(self, vq: vqgan.VectorQuantizer) -> None:
        super().__init__()
        self.embedding = vq.embedding
        e = vq.embedding.weight.detach()
        self.register_buffer("e2", torch.sum(e**2, dim=1)[None].clone(), persistent=False)  # (1, n)
        self.register_buffer("neg2_et", (-2.0 * e).t().contiguous().clone(), persistent=False)  # (C, n)

    def indices(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, C, h, w) latent -> (B, h, w) int64 code indices (first minimum on ties)."""
        b, c, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, c)
        parts = [zf] if chunk is None or chunk >= zf.shape[0] else list(torch.split(zf, chunk, dim=0))
        idx = [torch.argmin(torch.mm(p, self.neg2_et) + self.e2, dim=1) for p in parts]
        return (idx[0] if len(idx) == 1 else torch.cat(idx)).reshape(b, h, w)


def fold_codebook_norms(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``VectorQuantizer`` by an :class:`ExportVectorQuantizer` (``indices`` + ``embedding``)."""
    out = model if inplace else copy.deepcopy(model)
    n = _swap(out, lambda m: isinstance(m, vqgan.VectorQuantizer), lambda _, m: ExportVectorQuantizer(m))
    log.debug("fold_codebook_norms: %d quantizers", n)
    return out


# --------------------------------------------------------------------------------------------------------
# Named sets
# --------------------------------------------------------------------------------------------------------
def _count(kinds: tuple[type, ...]) -> Callable[[nn.Module], int]:
    return lambda model: sum(isinstance(m, kinds) for m in model.modules())


# canonical order: baking runs the graph to record feature sizes, so it comes first; the ResBlock fold
# moves constants into GroupNorm affines before those are decomposed.
REWRITES: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module], int]]] = {
    "bake_window_attention": (bake_window_attention, _count((SwinBlock,))),
    "fold_scale_shift_into_norm": (fold_scale_shift_into_norm, _count((unet_swin.ResBlock,))),
    "decompose_group_norm": (decompose_group_norm, _count((nn.GroupNorm,))),
    "fold_upsample_conv": (fold_upsample_conv, _count((unet_swin.Upsample, vqgan.Upsample))),
    "fold_codebook_norms": (fold_codebook_norms, _count((vqgan.VectorQuantizer,))),
}
BACKEND_REWRITES: dict[str, tuple[str, ...]] = {
    "xnnpack": tuple(REWRITES),
    # Core ML converts GroupNorm itself, but decomposed statistics are named MIL ops the fp16 selector can
    # keep in fp32 while the normalised output runs in fp16.
    "coreml": tuple(REWRITES),
    "none": (),
}


@dataclass
class RewriteReport:
    """What :func:`apply_rewrites` changed: rewrite name -> number of modules replaced."""

    applied: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, int]:
        return dict(self.applied)


def apply_rewrites(
    graph: nn.Module, example_inputs: Sequence[torch.Tensor], names: Sequence[str] | str = "xnnpack"
) -> tuple[nn.Module, RewriteReport]:
    """Deep-copy ``graph`` and apply the named rewrites (or a backend's set) in the canonical order.

    Args:
        graph: an export graph (eval mode); not changed.
        example_inputs: inputs of its fixed shapes (``bake_window_attention`` runs the graph once).
        names: a key of :data:`BACKEND_REWRITES` or names from :data:`REWRITES`.

    Returns:
        The rewritten copy (eval, no grad) and the number of modules each rewrite replaced.

    Raises:
        ConfigError: unknown rewrite or backend name.
    """
    if isinstance(names, str):
        if names not in BACKEND_REWRITES:
            raise ConfigError(f"unknown rewrite set {names!r}; choose from {', '.join(BACKEND_REWRITES)}")
        names = BACKEND_REWRITES[names]
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise ConfigError(f"unknown rewrites {unknown}; choose from {', '.join(REWRITES)}")
    out = copy.deepcopy(graph).eval()
    report = RewriteReport()
    for name, (fn, count) in REWRITES.items():
        if name not in names:
            continue
        report.applied[name] = count(out)
        if name == "bake_window_attention":
            fn(out, example_inputs, inplace=True)
        else:
            fn(out, inplace=True)
    return out.requires_grad_(False), report
