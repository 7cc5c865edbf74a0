"""Frozen configuration dataclasses and named presets.

Field names follow the upstream YAML keys (``model.params``, ``autoencoder.params.ddconfig`` and
``diffusion.params`` of ResShift / SinSR / TAD-SR configs) so official configs map one to one.
Fields that upstream does not have (``mask_rule``, ``attn_impl``) are explicit graph-changing choices.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Any

from tadsr.errors import ConfigError

__all__ = [
    "UNetConfig",
    "VQConfig",
    "ScheduleConfig",
    "Preset",
    "PRESETS",
    "SCHEDULES",
    "get_preset",
    "replace",
]

MASK_RULES = ("upstream", "corrected")
ATTN_IMPLS = ("math", "sdpa")


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """``UNetModelSwin`` hyper-parameters (upstream ``model.params``)."""

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 160
    out_channels: int = 3
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    attention_resolutions: tuple[int, ...] = (64, 32, 16, 8)
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    conv_resample: bool = True
    dims: int = 2
    num_heads: int = 1
    num_head_channels: int = 32
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    swin_depth: int = 2
    swin_embed_dim: int = 192
    window_size: int = 8
    mlp_ratio: int = 4
    patch_norm: bool = False
    cond_lq: bool = True
    lq_size: int = 64
    # Not upstream: which shifted-window mask rule to build (see spec §1.3) and the attention kernel.
    mask_rule: str = "upstream"
    attn_impl: str = "math"

    def __post_init__(self) -> None:
        _tuplify(self, "num_res_blocks", "attention_resolutions", "channel_mult")
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ConfigError(
                f"num_res_blocks {self.num_res_blocks} must have one entry per channel_mult level {self.channel_mult}"
            )
        if self.mask_rule not in MASK_RULES:
            raise ConfigError(f"mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.swin_embed_dim % self.num_head_channels:
            raise ConfigError("swin_embed_dim must be a multiple of num_head_channels")
        if not self.cond_lq or self.lq_size != self.image_size:
            raise ConfigError("only the x4 layout (cond_lq=True, lq_size == image_size) is supported")
        for c in (self.model_channels, self.swin_embed_dim):
            if c % 32:
                raise ConfigError(f"channel count {c} must be a multiple of 32 (GroupNorm with 32 groups)")
        if self.dropout != 0.0 or self.resblock_updown or not self.conv_resample or self.dims != 2:
            raise ConfigError("only dropout=0, resblock_updown=False, conv_resample=True, dims=2 are supported")

    @property
    def pad_multiple(self) -> int:
        """Latent / LR sides must be multiples of this (window size at the coarsest level)."""
        return self.window_size * 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True, kw_only=True)
class VQConfig:
    """``VQModelTorch`` hyper-parameters (upstream ``autoencoder.params`` + ``ddconfig``)."""

    embed_dim: int = 3
    n_embed: int = 8192
    double_z: bool = False
    z_channels: int = 3
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _tuplify(self, "ch_mult", "attn_resolutions")
        if self.double_z:
            raise ConfigError("double_z=True (KL autoencoders) is not supported")
        if self.attn_resolutions:
            raise ConfigError("attention outside the mid block (attn_resolutions) is not supported")
        if self.ch % 32:
            raise ConfigError("ch must be a multiple of 32 (GroupNorm with 32 groups)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Residual-shifting diffusion (upstream ``diffusion.params``)."""

    schedule_name: str = "exponential"
    steps: int = 15
    min_noise_level: float = 0.04
    etas_end: float = 0.99
    kappa: float = 2.0
    power: float = 0.3
    predict_type: str = "xstart"
    normalize_input: bool = True
    latent_flag: bool = True
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule_name != "exponential":
            raise ConfigError(f"only the exponential schedule is supported, got {self.schedule_name!r}")
        if self.predict_type != "xstart":
            raise ConfigError(f"only predict_type 'xstart' is supported, got {self.predict_type!r}")
        if self.steps < 2:
            raise ConfigError("steps must be >= 2")
        if not (self.normalize_input and self.latent_flag):
            raise ConfigError("normalize_input and latent_flag must be True (all ResShift-family x4 models)")


SCHEDULES: dict[str, ScheduleConfig] = {
    "v1": ScheduleConfig(steps=15, min_noise_level=0.04),
    "v3": ScheduleConfig(steps=4, min_noise_level=0.2),
}


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named model family: denoiser + autoencoder + schedules.

    Attributes:
        name: preset name.
        unet: denoiser config (student and teacher share it).
        vq: autoencoder config.
        schedule: the schedule the one-step student was distilled from (its t = T - 1 is the student step).
        teacher_schedules: teacher schedules selectable by step count.
        scale: super-resolution factor (bicubic factor before encoding).
        bundled_weights: file stem of weights shipped in ``tadsr/weights`` (``None``: none shipped).
    """

    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: SCHEDULES["v1"])
    teacher_schedules: tuple[tuple[int, ScheduleConfig], ...] = ((15, SCHEDULES["v1"]), (4, SCHEDULES["v3"]))
    scale: int = 4
    bundled_weights: str | None = None

    def __post_init__(self) -> None:
        if self.scale != self.vq.downsample_factor:
            raise ConfigError(f"scale {self.scale} must equal the autoencoder downsample factor")
        if self.vq.embed_dim != self.unet.out_channels or self.unet.in_channels != self.vq.embed_dim:
            raise ConfigError("UNet in/out channels must equal the autoencoder embed_dim")

    def teacher_schedule(self, steps: int) -> ScheduleConfig:
        for n, sched in self.teacher_schedules:
            if n == steps:
                return sched
        known = ", ".join(str(n) for n, _ in self.teacher_schedules)
        raise ConfigError(f"preset {self.name!r} has no {steps}-step teacher schedule (known: {known}); "
                          "respacing is not implemented")

    @property
    def pad_multiple(self) -> int:
        return self.unet.pad_multiple

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        return cls(
            name=d["name"],
            unet=UNetConfig(**d["unet"]),
            vq=VQConfig(**d["vq"]),
            schedule=ScheduleConfig(**d["schedule"]),
            teacher_schedules=tuple((int(n), ScheduleConfig(**s)) for n, s in d["teacher_schedules"]),
            scale=int(d["scale"]),
            bundled_weights=d.get("bundled_weights"),
        )


def _tuplify(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, int):
            v = (v,)
        object.__setattr__(obj, n, tuple(int(x) for x in v))


#: LR tile ``tadsr upscale`` runs a preset at when ``--tile`` is not given. The bundled networks normalise with
#: GroupNorm over the whole tile and were trained on 64-px LR tiles (256-px HR crops); at 128 their one-step output
#: loses 2.1 dB PSNR-Y on held-out 512-px crops (benchmarks/results/tile_choice_s41.md). Other presets keep
#: upstream's 512-px HR chop (128 LR).
UPSCALE_TILES: dict[str, int] = {"bundled": 64}
DEFAULT_UPSCALE_TILE = 128


def upscale_tile(preset: str) -> int:
    """Default LR tile of ``tadsr upscale`` for ``preset`` (see :data:`UPSCALE_TILES`)."""
    return UPSCALE_TILES.get(preset, DEFAULT_UPSCALE_TILE)


PRESETS: dict[str, Preset] = {
    "official-x4": Preset(name="official-x4"),
    "tiny": Preset(
        name="tiny",
        unet=UNetConfig(model_channels=32, num_res_blocks=(1, 1, 1, 1), swin_embed_dim=64),
        vq=VQConfig(ch=32, num_res_blocks=1, n_embed=256),
    ),
    # Shipped small model (tadsr/weights/bundled_*.safetensors, trained by python -m tadsr.train.build_bundled):
    # the official block types and Swin levels at smaller widths; 15-step v1 teacher only.
    "bundled": Preset(
        name="bundled",
        unet=UNetConfig(model_channels=32, num_res_blocks=(1, 1, 1, 1), channel_mult=(1, 2, 2, 2), swin_embed_dim=64),
        vq=VQConfig(ch=32, num_res_blocks=1, n_embed=4096),
        teacher_schedules=((15, SCHEDULES["v1"]),),
        bundled_weights="bundled",
    ),
}


def get_preset(name: str | Preset) -> Preset:
    """Return a preset by name (or pass a :class:`Preset` through)."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
