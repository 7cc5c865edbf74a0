"""ResShift's ``UNetModelSwin`` denoiser, written from the spec (shared/spec/resshift-architecture.md §1).

State-dict keys equal upstream's (564 entries for the official x4 config), so official ResShift, SinSR and
TAD-SR checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tadsr.config import UNetConfig
from tadsr.models.ops import GroupNorm32, timestep_embedding
from tadsr.models.swin import BasicLayer, SwinBlock, WindowAttention

__all__ = ["UNetModelSwin", "ResBlock"]


class ResBlock(nn.Module):
    """Residual block with scale-shift timestep conditioning (keys ``in_layers``, ``emb_layers``, ``out_layers``)."""

    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.out_channels = cout
        self.in_layers = nn.Sequential(GroupNorm32(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_layers = nn.Sequential(
            GroupNorm32(cout), nn.SiLU(), nn.Dropout(p=0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        # (2, 1, Cout, 1, 1) constant (1 + scale, shift) for a fixed timestep; see UNetModelSwin.fold_timestep
        self.register_buffer("folded", None, persistent=False)

    def scale_shift(self, emb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each (B, Cout, 1, 1), from the time embedding (B, emb_dim) or the folded constant."""
        if self.folded is not None:
            return self.folded[0], self.folded[1]
        assert emb is not None, "time embedding required (timestep not folded)"
        e = self.emb_layers(emb).to(torch.float32)[:, :, None, None]
        scale, shift = e[:, : self.out_channels], e[:, self.out_channels :]
        return 1 + scale, shift

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.in_layers(x)
        one_plus_scale, shift = self.scale_shift(emb)
        h = self.out_layers[0](h) * one_plus_scale.to(h.dtype) + shift.to(h.dtype)
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """3x3 conv, stride 2, symmetric zero padding 1 (key ``op``)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (key ``conv``)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """Sequential whose ResBlocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModelSwin(nn.Module):
    """Swin-UNet denoiser: ``forward(x, timesteps, lq) -> x0``.

    Args (forward):
        x: (B, 3, h, w) float, the *scaled* noisy latent ``x_t / sqrt(kappa² eta_t + 1)``.
        timesteps: (B,) int64 step indices in [0, T).
        lq: (B, 3, h, w) LR image in [-1, 1] (padded), h and w multiples of ``cfg.pad_multiple``.

    Returns:
        (B, 3, h, w) predicted clean latent.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        heads = cfg.swin_embed_dim // cfg.num_head_channels

        def swin(ch: int, ds: int) -> BasicLayer:
            return BasicLayer(
                ch,
                cfg.swin_embed_dim,
                heads,
                cfg.window_size,
                cfg.swin_depth,
                cfg.mlp_ratio,
                cfg.image_size // ds,
                cfg.mask_rule,
                cfg.attn_impl,
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = cfg.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels + 3, ch, 3, padding=1))])
        chans = [ch]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, mult * mc, emb_dim)]
                ch = mult * mc
                if cfg.image_size // ds in cfg.attention_resolutions and i == 0:
                    layers.append(swin(ch, ds))
                self.input_blocks.append(TimestepSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(ResBlock(ch, ch, emb_dim), swin(ch, ds), ResBlock(ch, ch, emb_dim))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + chans.pop(), mult * mc, emb_dim)]
                ch = mult * mc
                if cfg.image_size // ds in cfg.attention_resolutions and i == 0:
                    layers.append(swin(ch, ds))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) int steps -> (B, 4 * model_channels) embedding."""
        return self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels))

    def forward_with_embedding(self, x: torch.Tensor, emb: torch.Tensor | None, lq: torch.Tensor) -> torch.Tensor:
        """Forward with a precomputed time embedding (``None`` after :meth:`fold_timestep`)."""
        h = torch.cat([x, lq.to(x.dtype)], dim=1)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x, self.time_embedding(timesteps), lq)

    # -- inference helpers --------------------------------------------------------------------------------
    def swin_blocks(self) -> list[SwinBlock]:
        return [m for m in self.modules() if isinstance(m, SwinBlock)]

    def freeze_attention_bias(self) -> None:
        """Gather every relative-position bias once (inference/export); undone by ``unfreeze_attention_bias``."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.freeze()

    def unfreeze_attention_bias(self) -> None:
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.unfreeze()

    @torch.no_grad()
    def fold_timestep(self, t: int) -> None:
        """Bake a fixed timestep: every ResBlock's (1 + scale, shift) becomes a constant buffer.

        Afterwards call ``forward_with_embedding(x, None, lq)``. Used by the export graphs of the one-step
        student (t = T - 1); undone by :meth:`unfold_timestep` (and by ``train()``).
        """
        emb = self.time_embedding(torch.tensor([t], dtype=torch.int64, device=next(self.parameters()).device))
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.folded = None
                m.folded = torch.stack(m.scale_shift(emb)).detach().clone()

    def unfold_timestep(self) -> None:
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.folded = None

    def train(self, mode: bool = True) -> UNetModelSwin:
        if mode:
            self.unfreeze_attention_bias()
            self.unfold_timestep()
        return super().train(mode)
