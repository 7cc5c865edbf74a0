"""Light autoencoder for the VQ-f4 latent: a conv-only encoder and decoder distilled from a frozen ``VQModelTorch``.

The full first stage encodes the bicubic x4-upsampled LR image (4h x 4w) down to the h x w latent and decodes
through attention and GroupNorm at up to 4h x 4w; it is ~90 % of the one-step pipeline's work. The light one:

* ``LightEncoder``: LR (B, 3, h, w) in [-1, 1] -> z_y (B, embed_dim, h, w), straight at LR resolution (no
  bicubic x4 first): 3x3 conv, residual conv blocks, 3x3 conv.
* ``LightDecoder``: latent (B, embed_dim, h, w) -> image (B, 3, 4h, 4w): residual conv blocks at LR resolution,
  then two (conv, pixel-shuffle x2, ReLU, conv) stages.
* The codebook quantisation stays: :class:`LightAutoencoder` carries a copy of the frozen autoencoder's codebook
  (``quantize.embedding.weight``) and ``decode`` quantises exactly like ``VQModelTorch.decode``.

Only Conv2d, ReLU, add, PixelShuffle and a global average pool (plus the codebook argmin): no attention, no
normalisation, so it quantises to INT8 without per-tensor statistics surprises and maps onto NPUs. The tile-wide
context branch (:attr:`LightAEConfig.global_context`, on by default because the VQ-f4 latent needs it) is the only
non-local part; without it every output pixel depends on a bounded neighbourhood (tiles agree at seams once the
overlap exceeds :attr:`LightAEConfig.receptive_field`). Trained by ``tadsr distill-ae``
(:mod:`tadsr.train.distill_ae`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tadsr.config import Preset, get_preset
from tadsr.errors import CheckpointError, ConfigError
from tadsr.models.vqgan import VectorQuantizer

__all__ = [
    "LightAEConfig",
    "LIGHT_CONFIGS",
    "light_config",
    "LightEncoder",
    "LightDecoder",
    "LightAutoencoder",
    "META_CONFIG",
    "load_light_autoencoder",
    "config_from_file",
]

META_CONFIG = "light_ae_config"  # safetensors metadata key holding the LightAEConfig as JSON


@dataclass(frozen=True, kw_only=True)
class LightAEConfig:
    """Widths and depths of the light encoder / decoder.

    Attributes:
        embed_dim: latent channels (the autoencoder's ``embed_dim``).
        n_embed: codebook size (the autoencoder's ``n_embed``).
        enc_ch: encoder width (at LR resolution).
        enc_blocks: encoder residual blocks.
        dec_ch: decoder width at LR resolution.
        dec_blocks: decoder residual blocks at LR resolution.
        up_ch: decoder widths after the first and the second pixel shuffle (2x and 4x resolution).
        global_context: every residual block adds a per-channel bias computed from the mean of its input over the
            whole tile (global average pool + two 1x1 convs, squeeze-excite style). The VQ-f4 autoencoder's GroupNorm
            and attention make its latent's meaning depend on the whole tile (decoding a 16-px window of a 64-px
            latent alone shifts the colours by 11-17 dB PSNR on the bundled model), so a purely local light network
            cannot match it; with this branch the light networks see the same context as the full ones. False:
            strictly tile-local networks (every output pixel depends on :attr:`receptive_field` LR pixels only).
    """

    embed_dim: int = 3
    n_embed: int = 8192
    enc_ch: int = 32
    enc_blocks: int = 3
    dec_ch: int = 64
    dec_blocks: int = 4
    up_ch: tuple[int, int] = (32, 16)
    global_context: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "up_ch", tuple(int(c) for c in self.up_ch))
        if len(self.up_ch) != 2:
            raise ConfigError(f"up_ch must have two widths (2x and 4x stages), got {self.up_ch}")
        for name in ("embed_dim", "n_embed", "enc_ch", "dec_ch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"LightAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.up_ch) < 1 or self.enc_blocks < 0 or self.dec_blocks < 0:
            raise ConfigError("LightAEConfig: widths must be >= 1 and block counts >= 0")

    @property
    def receptive_field(self) -> tuple[int, int]:
        """(encoder, decoder) receptive field in LR pixels (side of the square of LR pixels an output depends on)."""
        enc = 2 + 2 * self.enc_blocks  # radius: one LR px per 3x3 conv at LR resolution
        dec = (2 + 2 * self.dec_blocks) + 2  # LR convs, then the 2x and 4x convs (< 1 LR px each, rounded up)
        return 2 * enc + 1, 2 * dec + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LightAEConfig:
        conv = {"up_ch": tuple, "global_context": bool}
        return cls(**{k: conv.get(k, int)(v) for k, v in d.items()})


# Per preset. Sized so that light encoder + decoder FLOPs are ~2 % (official) / ~8 % (bundled) of the full ones
# (benchmarks/light_ae.py prints the counts).
LIGHT_CONFIGS: dict[str, dict[str, Any]] = {
    "official-x4": dict(enc_ch=64, enc_blocks=4, dec_ch=128, dec_blocks=6, up_ch=(64, 32)),
    "bundled": dict(enc_ch=32, enc_blocks=3, dec_ch=64, dec_blocks=4, up_ch=(32, 16)),
    "tiny": dict(enc_ch=16, enc_blocks=1, dec_ch=16, dec_blocks=1, up_ch=(16, 8)),
}


def light_config(preset: str | Preset, **overrides: Any) -> LightAEConfig:
    """The light autoencoder config of a preset (presets not listed get the ``tiny`` widths)."""
    p = get_preset(preset)
    base = dict(LIGHT_CONFIGS.get(p.name, LIGHT_CONFIGS["tiny"]))
    base.update(overrides)
    return LightAEConfig(embed_dim=p.vq.embed_dim, n_embed=p.vq.n_embed, **base)


class _ResBlock(nn.Module):
    """x + conv(relu(conv(x) + ctx(x))): two 3x3 convs, same width; ``ctx`` (optional) is a per-channel bias from the
    tile mean of x (global average pool, 1x1 conv, ReLU, 1x1 conv)."""

    def __init__(self, c: int, global_context: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        if global_context:
            self.ctx1 = nn.Conv2d(c, c, 1)
            self.ctx2 = nn.Conv2d(c, c, 1)
        else:
            self.ctx1 = self.ctx2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        if self.ctx1 is not None and self.ctx2 is not None:
            h = h + self.ctx2(torch.relu(self.ctx1(x.mean(dim=(2, 3), keepdim=True))))
        return x + self.conv2(torch.relu(h))


class LightEncoder(nn.Module):
    """LR (B, 3, h, w) in [-1, 1] -> z_y (B, embed_dim, h, w)."""

    def __init__(self, cfg: LightAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.enc_ch, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(cfg.enc_ch, cfg.global_context) for _ in range(cfg.enc_blocks)])
        self.conv_out = nn.Conv2d(cfg.enc_ch, cfg.embed_dim, 3, padding=1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.conv_out(torch.relu(self.blocks(self.conv_in(lr))))


class LightDecoder(nn.Module):
    """Quantised latent (B, embed_dim, h, w) -> image (B, 3, 4h, 4w) (not clamped)."""

    def __init__(self, cfg: LightAEConfig) -> None:
        super().__init__()
        c, (c2, c4) = cfg.dec_ch, cfg.up_ch
        self.conv_in = nn.Conv2d(cfg.embed_dim, c, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(c, cfg.global_context) for _ in range(cfg.dec_blocks)])
        self.up1 = nn.Conv2d(c, 4 * c2, 3, padding=1)
        self.conv2 = nn.Conv2d(c2, c2, 3, padding=1)
        self.up2 = nn.Conv2d(c2, 4 * c4, 3, padding=1)
        self.conv_out = nn.Conv2d(c4, 3, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(z))
        h = torch.relu(self.shuffle(self.up1(torch.relu(h))))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.shuffle(self.up2(h)))
        return self.conv_out(h)


class LightAutoencoder(nn.Module):
    """Light encoder + the frozen codebook + light decoder; the drop-in for ``VQModelTorch`` in the pipelines.

    ``encode`` takes the LR image itself (not its bicubic x4 upsampling); ``decode`` quantises through the
    codebook (argmin, first minimum on ties, as ``VQModelTorch.decode``) and returns the x4 image (not clamped).
    State-dict keys: ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``.
    """

    def __init__(self, cfg: LightAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = LightEncoder(cfg)
        self.decoder = LightDecoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) LR in [-1, 1] -> (B, embed_dim, h, w) latent (not quantised)."""
        return self.encoder(lr)

    def decode(self, z: torch.Tensor, *, force_not_quantize: bool = False, chunk: int | None = None) -> torch.Tensor:
        """(B, embed_dim, h, w) latent -> (B, 3, 4h, 4w) image (not clamped), quantised unless asked not to."""
        if not force_not_quantize:
            z, _ = self.quantize(z, chunk)
        return self.decoder(z)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(lr))


def config_from_file(path: str | Path) -> LightAEConfig | None:
    """The :class:`LightAEConfig` stored in a ``distill-ae`` safetensors file's metadata (None when absent)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable files are reported by load_state_dict with the reason
        return None
    if META_CONFIG not in meta:
        return None
    try:
        return LightAEConfig.from_dict(json.loads(meta[META_CONFIG]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {META_CONFIG} metadata ({e})") from e


def load_light_autoencoder(
    ckpt: str | Path | Mapping[str, torch.Tensor], preset: str | Preset | None = None
) -> LightAutoencoder:
    """A light autoencoder (eval, no grad) from a ``distill-ae`` file or a state dict.

    The config comes from the file's metadata, else from ``preset`` (:func:`light_config`).

    Raises:
        CheckpointError: unreadable file, no config, keys / shapes that do not match, or a light autoencoder for
            another latent than ``preset``'s (embed_dim, n_embed).
    """
    from tadsr.checkpoint import load_into, load_state_dict

    cfg = None if isinstance(ckpt, Mapping) else config_from_file(ckpt)
    if cfg is None:
        if preset is None:
            raise CheckpointError(f"{ckpt} has no {META_CONFIG} metadata; pass the preset it was distilled for")
        cfg = light_config(preset)
    if preset is not None:
        vq = get_preset(preset).vq
        if (cfg.embed_dim, cfg.n_embed) != (vq.embed_dim, vq.n_embed):
            raise CheckpointError(
                f"light autoencoder {ckpt if not isinstance(ckpt, Mapping) else '<state dict>'} is for a latent of "
                f"{cfg.embed_dim} channels / {cfg.n_embed} codes; preset {get_preset(preset).name!r} has "
                f"{vq.embed_dim} / {vq.n_embed}"
            )
    net = LightAutoencoder(cfg)
    src = "" if isinstance(ckpt, Mapping) else str(ckpt)
    load_into(net, load_state_dict(ckpt), kind="light autoencoder", source=src)
    return net.eval().requires_grad_(False)
