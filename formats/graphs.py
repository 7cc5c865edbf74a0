"""Export-ready graphs with fixed input specs: encoder, denoiser, decoder and the fused pipeline.

Every graph is a plain ``nn.Module`` whose ``forward`` takes and returns float32 NCHW tensors of a fixed
shape (one LR tile size per export). Host-side work (tiling, padding, noise) stays outside; what the
upstream code computes per call from Python (timestep embedding, Swin masks, relative position bias) is
baked as constants. Each graph equals the reference pipeline stage it replaces (see tests/test_graphs.py).

Graphs and their I/O (t = LR tile, s = scale, C = latent channels):

=========  ==========================================  ====================
graph      inputs                                      outputs
=========  ==========================================  ====================
encoder    lr (1,3,t,t) [-1,1]                         z_y (1,C,t,t)
denoiser   x_t (1,C,t,t) noisy latent, lr (1,3,t,t)    x0 (1,C,t,t)
decoder    x0 (1,C,t,t)                                sr (1,3,st,st) [-1,1]
pipeline   lr (1,3,t,t) [-1,1], noise (1,C,t,t) N(0,1)  sr (1,3,st,st) [-1,1]
=========  ==========================================  ====================

The fused ``pipeline`` graph can end with a colour fix (``make_graphs(..., color_fix="wavelet"|"adain"|"luma")``,
:mod:`tadsr.color_fix`) towards the bicubic x4 of its LR tile; the choice is recorded in the graph spec's
``constants["color_fix"]`` (and so in every artifact manifest). The default ``"none"`` builds the graph exactly
as before (upstream parity).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tadsr.color_fix import ColorFix, check_color_fix
from tadsr.errors import ConfigError
from tadsr.models.light_ae import LightAutoencoder
from tadsr.models.ops import BicubicUpsample
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import Models
from tadsr.runtime.artifacts import COMPONENTS
from tadsr.schedule import make_schedule

__all__ = [
    "TensorSpec",
    "GraphSpec",
    "EncoderGraph",
    "DenoiserGraph",
    "DecoderGraph",
    "PipelineGraph",
    "LightEncoderGraph",
    "LightDecoderGraph",
    "GRAPH_NAMES",
    "make_graph",
    "make_graphs",
    "check_tile",
]

GRAPH_NAMES = (*COMPONENTS, "pipeline")
DEFAULT_VQ_CHUNK = 4096


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, static shape, dtype and nominal value range."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None
    description: str = ""


@dataclass(frozen=True)
class GraphSpec:
    """Static interface of an exported graph."""

    name: str
    tile: int
    scale: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    constants: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded example inputs in each input's nominal range (uniform in range, else standard normal)."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for s in self.inputs:
            x = torch.randn(s.shape, generator=g)
            if s.value_range is not None:
                lo, hi = s.value_range
                x = torch.rand(s.shape, generator=g) * (hi - lo) + lo
            out.append(x)
        return tuple(out)


def check_tile(tile: int, multiple: int = 64) -> None:
    if not isinstance(tile, int) or tile <= 0 or tile % multiple:
        raise ConfigError(f"tile must be a positive multiple of {multiple} LR pixels (e.g. 64, 128), got {tile!r}")


def _prepared_student(models: Models, tile: int) -> UNetModelSwin:
    """Deep copy of the student with the one-step timestep folded, biases gathered and masks cached."""
    net = copy.deepcopy(models.student).eval().requires_grad_(False)
    net.fold_timestep(make_schedule(models.preset.schedule).num_steps - 1)
    net.freeze_attention_bias()
    # warm the per-size mask caches (constants during export)
    feat = tile
    for blk in net.swin_blocks():
        for f in (feat, feat // 2, feat // 4, feat // 8):
            if f >= blk.window_size:
                blk.mask_for(f, f, torch.device("cpu"))
    return net


class EncoderGraph(nn.Module):
    """lr -> z_y: fixed bicubic x4 (separable polyphase conv), VQ encoder, quant_conv."""

    def __init__(self, autoencoder: VQModelTorch, scale: int = 4) -> None:
        super().__init__()
        self.upsample = BicubicUpsample(scale)
        self.encoder = autoencoder.encoder
        self.quant_conv = autoencoder.quant_conv

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(self.upsample(lr)))


class DenoiserGraph(nn.Module):
    """(x_t, lr) -> x0 at the student's fixed step: input scaling and timestep embedding baked in."""

    def __init__(self, student: UNetModelSwin, input_scale: float) -> None:
        super().__init__()
        self.unet = student
        self.register_buffer("inv_input_scale", torch.tensor(1.0 / input_scale, dtype=torch.float32), persistent=False)
        self.register_buffer("input_scale", torch.tensor(input_scale, dtype=torch.float32), persistent=False)

    def forward(self, x_t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        return self.unet.forward_with_embedding(x_t / self.input_scale, None, lr)


class DecoderGraph(nn.Module):
    """x0 -> sr: codebook lookup (argmin, chunked over pixels), post_quant_conv, VQ decoder, clamp."""

    def __init__(self, autoencoder: VQModelTorch, chunk: int = DEFAULT_VQ_CHUNK) -> None:
        super().__init__()
        self.quantize = autoencoder.quantize
        self.post_quant_conv = autoencoder.post_quant_conv
        self.decoder = autoencoder.decoder
        self.chunk = chunk

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.from_codes(self.quantize.indices(x0, self.chunk))

    def from_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` code indices -> sr: the graph after its codebook search."""
        zq = self.quantize.embedding(idx).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(zq)).clamp(-1.0, 1.0)


class LightEncoderGraph(nn.Module):
    """lr -> z_y with the light encoder (:mod:`tadsr.models.light_ae`): convs at LR resolution, no upsampling."""

    def __init__(self, light: LightAutoencoder) -> None:
        super().__init__()
        self.encoder = light.encoder

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.encoder(lr)


class LightDecoderGraph(nn.Module):
    """x0 -> sr with the light decoder: the same codebook lookup (argmin, chunked), light decoder, clamp."""

    def __init__(self, light: LightAutoencoder, chunk: int = DEFAULT_VQ_CHUNK) -> None:
        super().__init__()
        self.quantize = light.quantize
        self.decoder = light.decoder
        self.chunk = chunk

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.from_codes(self.quantize.indices(x0, self.chunk))

    def from_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` code indices -> sr: the graph after its codebook search."""
        zq = self.quantize.embedding(idx).permute(0, 3, 1, 2)
        return self.decoder(zq).clamp(-1.0, 1.0)


class PipelineGraph(nn.Module):
    """(lr, noise) -> sr in one graph: encoder, prior sample, denoiser, decoder, clamp [, colour fix, clamp]."""

    def __init__(
        self, encoder: EncoderGraph, denoiser: DenoiserGraph, decoder: DecoderGraph, noise_scale: float,
        color_fix: str = "none",
    ) -> None:  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.denoiser = denoiser
        self.decoder = decoder
        self.register_buffer("noise_scale", torch.tensor(noise_scale, dtype=torch.float32), persistent=False)
        self.color_fix = check_color_fix(color_fix)
        self.fix = ColorFix(color_fix) if color_fix != "none" else None

    def forward(self, lr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.fix is None:
            z_y = self.encoder(lr)
            x_t = z_y + self.noise_scale * noise
            return self.decoder(self.denoiser(x_t, lr))
        up = self.encoder.upsample(lr)
        z_y = self.encoder.quant_conv(self.encoder.encoder(up))
        x_t = z_y + self.noise_scale * noise
        return self.fix(self.decoder(self.denoiser(x_t, lr)), up)


def graph_spec(models: Models, name: str, tile: int, color_fix: str = "none") -> GraphSpec:
    """The static interface of graph ``name`` for an LR tile of ``tile`` x ``tile``.

    A fused ``pipeline`` graph with a colour fix records it as ``constants["color_fix"]``.
    """
    check_tile(tile, models.preset.pad_multiple)
    if name not in GRAPH_NAMES:
        raise ConfigError(f"unknown graph {name!r}; choose from {', '.join(GRAPH_NAMES)}")
    p = models.preset
    s, c = p.scale, p.vq.embed_dim
    sched = make_schedule(p.schedule)
    lr = TensorSpec("lr", (1, 3, tile, tile), value_range=(-1.0, 1.0), description="LR tile, RGB in [-1, 1]")
    lat = (1, c, tile, tile)
    io = {
        "encoder": ((lr,), (TensorSpec("z_y", lat, description="latent of bicubic x4 LR (not quantised)"),)),
        "denoiser": (
            (TensorSpec("x_t", lat, description="noisy latent z_y + kappa sqrt(eta_T) eps (unscaled)"), lr),
            (TensorSpec("x0", lat, description="predicted clean latent"),),
        ),
        "decoder": (
            (TensorSpec("x0", lat, description="latent to decode (quantised inside)"),),
            (TensorSpec("sr", (1, 3, s * tile, s * tile), value_range=(-1.0, 1.0), description="SR tile in [-1, 1]"),),
        ),
        "pipeline": (
            (lr, TensorSpec("noise", lat, value_range=None, description="standard normal prior noise")),
            (TensorSpec("sr", (1, 3, s * tile, s * tile), value_range=(-1.0, 1.0), description="SR tile in [-1, 1]"),),
        ),
    }[name]
    constants = sched.constants()
    if name == "pipeline" and check_color_fix(color_fix) != "none":
        constants = {**constants, "color_fix": color_fix}
    return GraphSpec(name=name, tile=tile, scale=s, inputs=io[0], outputs=io[1], constants=constants)


def make_graphs(
    models: Models, tile: int = 64, names: tuple[str, ...] = GRAPH_NAMES, *, color_fix: str = "none"
) -> dict[str, tuple[nn.Module, GraphSpec]]:
    """Build the requested graphs (eval mode, no grad) with their specs.

    The graphs share the (deep-copied, timestep-folded) student and the autoencoder's modules, so building
    all four costs one copy of the weights. ``color_fix`` (``"none"``, ``"wavelet"``, ``"adain"``, ``"luma"``)
    applies to the fused ``pipeline`` graph only.
    """
    check_color_fix(color_fix)
    for n in names:
        if n not in GRAPH_NAMES:
            raise ConfigError(f"unknown graph {n!r}; choose from {', '.join(GRAPH_NAMES)}")
    check_tile(tile, models.preset.pad_multiple)
    sched = make_schedule(models.preset.schedule)
    light = models.light_autoencoder  # when loaded, the graphs (like the reference pipeline) use it
    enc: nn.Module = EncoderGraph(models.autoencoder, models.preset.scale)
    dec: nn.Module = DecoderGraph(models.autoencoder)
    if light is not None:
        enc, dec = LightEncoderGraph(light), LightDecoderGraph(light)
    den = DenoiserGraph(_prepared_student(models, tile), sched.input_scale(sched.num_steps - 1))
    pipe = PipelineGraph(enc, den, dec, sched.prior_noise_scale(), color_fix)
    all_graphs = {"encoder": enc, "denoiser": den, "decoder": dec, "pipeline": pipe}
    out = {}
    for n in names:
        g = all_graphs[n].eval().requires_grad_(False)
        out[n] = (g, graph_spec(models, n, tile, color_fix))
    return out


def make_graph(models: Models, name: str, tile: int = 64, *, color_fix: str = "none") -> tuple[nn.Module, GraphSpec]:
    return make_graphs(models, tile, (name,), color_fix=color_fix)[name]
