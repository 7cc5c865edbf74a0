"""PyTorch reference pipelines: the one-step student and the T-step teacher sampler.

Both reproduce the upstream ResShift / SinSR / TAD-SR inference path (spec §3-4): reflect-pad the LR image
to multiples of 64, bicubic x4, VQ encode, prior sample, denoiser, quantised VQ decode, crop, clamp.
Noise is always explicit (a tensor) or drawn from a seed on the CPU, so results are reproducible.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from tadsr.checkpoint import fill_rule_, load_into, load_state_dict, sha256_file
from tadsr.color_fix import check_color_fix, color_fix
from tadsr.config import Preset, get_preset
from tadsr.errors import ConfigError, InputError
from tadsr.models.light_ae import LightAutoencoder
from tadsr.models.ops import bicubic_x4_reference, reflect_pad_to_multiple
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.schedule import Schedule, make_schedule

__all__ = [
    "Models", "load_models", "load_denoiser", "load_autoencoder", "OneStepPipeline", "TeacherPipeline", "DoNothingPipeline", "make_noise",
    "bundled_weight_path",
]  # fmt: skip

log = logging.getLogger(__name__)

CkptLike = str | Path | Mapping[str, torch.Tensor] | None
DEFAULT_SEED = 12345  # upstream samplers' seed


@dataclass
class Models:
    """Loaded networks of one model family.

    Attributes:
        preset: the configuration.
        student: the one-step denoiser (or the teacher itself when only a teacher was given).
        autoencoder: the VQ-f4 first stage.
        teacher: the multi-step denoiser, if loaded.
        sources: where each network came from (path + sha256, ``bundled:<file>`` or ``random-fill``).
        light_autoencoder: the light encoder/decoder distilled from ``autoencoder``
            (:mod:`tadsr.models.light_ae`), if loaded; the pipelines and graphs then use it instead.
    """

    preset: Preset
    student: UNetModelSwin
    autoencoder: VQModelTorch
    teacher: UNetModelSwin | None = None
    sources: dict[str, Any] = field(default_factory=dict)
    light_autoencoder: LightAutoencoder | None = None


def bundled_weight_path(preset: Preset, part: str) -> Path | None:
    """Path of a shipped weight file (``tadsr/weights/<stem>_<part>.safetensors``) or None."""
    if not preset.bundled_weights:
        return None
    p = Path(str(resources.files("tadsr") / "weights" / f"{preset.bundled_weights}_{part}.safetensors"))
    return p if p.exists() else None


def _source(ckpt: CkptLike) -> dict[str, str]:
    if isinstance(ckpt, (str, Path)):
        return {"path": str(ckpt), "sha256": sha256_file(ckpt)}
    return {"path": "<in-memory state dict>", "sha256": ""}


def _build(
    module: torch.nn.Module, ckpt: CkptLike, preset: Preset, part: str, kind: str, init: str | None, required: bool
) -> tuple[torch.nn.Module | None, dict[str, str] | None]:
    if ckpt is not None:
        load_into(module, load_state_dict(ckpt), kind=kind, source=str(ckpt) if not isinstance(ckpt, Mapping) else "")
        return module, _source(ckpt)
    if init == "random":
        fill_rule_(module)
        return module, {"path": "random-fill", "sha256": ""}
    bundled = bundled_weight_path(preset, part)
    if bundled is not None:
        load_into(module, load_state_dict(bundled), kind=kind, source=str(bundled))
        return module, {"path": f"bundled:{bundled.name}", "sha256": sha256_file(bundled)}
    if not required:
        return None, None
    raise ConfigError(
        f"no {part} weights: pass a checkpoint (--{part} PATH), use a preset with bundled weights, "
        f"or init='random' (--init random) for deterministic random weights (latency work and tests only)"
    )


DEFAULT_PRESET = "bundled"


@functools.cache
def _shapes(preset: Preset, kind: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a preset's network, built on the meta device (no memory; ~1 s for the official UNet)."""
    with torch.device("meta"):
        net = UNetModelSwin(preset.unet) if kind == "denoiser" else VQModelTorch(preset.vq)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def infer_preset(student: CkptLike = None, teacher: CkptLike = None, autoencoder: CkptLike = None) -> str:
    """The name of the preset whose networks have exactly the keys and shapes of the given checkpoints.

    Lets ``tadsr upscale x.png y.png --student TAD-SR.pth --autoencoder autoencoder_vq_f4.pth`` work without
    ``--preset official-x4``. Without checkpoints the answer is :data:`DEFAULT_PRESET` (the shipped model).

    Raises:
        CheckpointError: no preset matches every given checkpoint (the strict load then names the keys).
    """
    from tadsr.config import PRESETS
    from tadsr.errors import CheckpointError

    given = [(c, "denoiser") for c in (student, teacher) if c is not None]
    given += [(autoencoder, "autoencoder")] if autoencoder is not None else []
    if not given:
        return DEFAULT_PRESET
    shapes = [({k: tuple(v.shape) for k, v in load_state_dict(c).items()}, kind) for c, kind in given]
    for name, preset in PRESETS.items():
        if all(sd == _shapes(preset, kind) for sd, kind in shapes):
            return name
    names = ", ".join(str(c) if not isinstance(c, Mapping) else "<state dict>" for c, _ in given)
    raise CheckpointError(
        f"no preset ({', '.join(PRESETS)}) has the keys and shapes of {names}; pass --preset NAME to see the "
        "missing / unexpected / mis-shaped keys against that preset"
    )


def load_models(
    student: CkptLike = None,
    teacher: CkptLike = None,
    autoencoder: CkptLike = None,
    preset: str | Preset = "official-x4",
    *,
    init: str | None = None,
    device: str | torch.device = "cpu",
    light_autoencoder: CkptLike | bool = None,
) -> Models:
    """Build the networks of ``preset`` and load their weights.

    Args:
        student: one-step student checkpoint (path or state dict). If only ``teacher`` is given, the teacher
            also serves as the "student" network (a ResShift model run with one step is then *not* TAD-SR).
        teacher: multi-step teacher checkpoint; optional, needed only for teacher sampling.
        autoencoder: VQ-f4 checkpoint.
        preset: preset name or object.
        init: ``"random"`` fills unspecified networks with the deterministic golden fill rule.
        device: torch device.
        light_autoencoder: a light autoencoder (``tadsr distill-ae`` output, path or state dict), or True for
            the preset's shipped one (``bundled``; with ``init="random"``: random weights and the autoencoder's
            codebook). The pipelines and export graphs then run it instead of the VQ-f4 encoder / decoder.

    Raises:
        ConfigError: no weights available for a required network.
        CheckpointError: unreadable or mismatched checkpoints (keys listed).
    """
    p = get_preset(preset)
    if init not in (None, "random"):
        raise ConfigError(f"init must be None or 'random', got {init!r}")
    sources: dict[str, Any] = {}
    teacher_net, src = _build(UNetModelSwin(p.unet), teacher, p, "teacher", "denoiser", init, required=False)
    if src:
        sources["teacher"] = src
    if student is None and teacher is not None and init is None and bundled_weight_path(p, "student") is None:
        student_net, sources["student"] = teacher_net, sources["teacher"]
    else:
        student_net, sources["student"] = _build(UNetModelSwin(p.unet), student, p, "student", "denoiser", init, True)
    ae, sources["autoencoder"] = _build(VQModelTorch(p.vq), autoencoder, p, "autoencoder", "autoencoder", init, True)
    models = Models(preset=p, student=student_net, autoencoder=ae, teacher=teacher_net, sources=sources)  # type: ignore[arg-type]
    if light_autoencoder is not None and light_autoencoder is not False:
        light, sources["light_autoencoder"] = _build_light(light_autoencoder, p, ae, init)  # type: ignore[arg-type]
        models.light_autoencoder = light
    for m in (models.student, models.autoencoder, models.teacher, models.light_autoencoder):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return models


def load_denoiser(
    ckpt: CkptLike, preset: str | Preset = "official-x4", *, device: str | torch.device = "cpu"
) -> UNetModelSwin:
    """One denoiser (student or teacher) from a checkpoint, in eval mode without gradients.

    For comparing several denoisers over one loaded autoencoder without loading it again:
    ``dataclasses.replace(models, student=net, teacher=net)``.

    Raises:
        CheckpointError: unreadable or mismatched checkpoint (keys listed).
    """
    p = get_preset(preset)
    net, _ = _build(UNetModelSwin(p.unet), ckpt, p, "denoiser", "denoiser", None, True)
    return net.to(device).eval().requires_grad_(False)


def load_autoencoder(
    ckpt: CkptLike, preset: str | Preset = "official-x4", *, device: str | torch.device = "cpu"
) -> VQModelTorch:
    """One VQ-f4 autoencoder from a checkpoint, in eval mode without gradients (no denoiser is built).

    Raises:
        CheckpointError: unreadable or mismatched checkpoint (keys listed).
    """
    p = get_preset(preset)
    net, _ = _build(VQModelTorch(p.vq), ckpt, p, "autoencoder", "autoencoder", None, True)
    return net.to(device).eval().requires_grad_(False)


def _build_light(
    ckpt: CkptLike | bool, preset: Preset, ae: VQModelTorch, init: str | None
) -> tuple[LightAutoencoder, dict[str, str]]:
    """The light autoencoder for :func:`load_models` (``True``: the shipped one, or random with ``init='random'``)."""
    from tadsr.errors import CheckpointError
    from tadsr.models.light_ae import light_config, load_light_autoencoder

    if ckpt is True:
        path = bundled_weight_path(preset, "light_autoencoder")
        if path is None and init == "random":
            net = LightAutoencoder(light_config(preset))
            fill_rule_(net)
            net.quantize.embedding.weight.data.copy_(ae.quantize.embedding.weight.detach())
            return net, {"path": "random-fill", "sha256": ""}
        if path is None:
            raise ConfigError(
                f"preset {preset.name!r} ships no light autoencoder: pass --light-autoencoder CKPT (a tadsr distill-ae "
                "output) or init='random'"
            )
        net = load_light_autoencoder(path, preset)
        src = {"path": f"bundled:{path.name}", "sha256": sha256_file(path)}
    else:
        net = load_light_autoencoder(ckpt, preset)  # type: ignore[arg-type]
        src = _source(ckpt)  # type: ignore[arg-type]
    if not torch.equal(net.quantize.embedding.weight, ae.quantize.embedding.weight.detach().cpu()):
        raise CheckpointError(
            f"light autoencoder {src['path']} was distilled from another autoencoder than the loaded one: their "
            "codebooks differ, so the denoiser's latent would not match; distil one from this autoencoder "
            "(tadsr distill-ae --autoencoder CKPT)"
        )
    return net, src


def make_noise(shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from ``seed`` (device-independent)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)


def _check_lr(lr: torch.Tensor) -> None:
    if not isinstance(lr, torch.Tensor) or lr.dim() != 4 or lr.shape[1] != 3:
        shape = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
        raise InputError(f"lr must be a (B, 3, h, w) tensor in [-1, 1], got {shape}")
    if not lr.is_floating_point():
        raise InputError(f"lr must be floating point in [-1, 1], got {lr.dtype}")
    if lr.shape[-1] < 1 or lr.shape[-2] < 1:
        raise InputError(f"lr has an empty side: {tuple(lr.shape)}")
    lo, hi = float(lr.min()), float(lr.max())
    if lo < -1.5 or hi > 1.5:
        raise InputError(f"lr values span [{lo:.3g}, {hi:.3g}]; expected [-1, 1] (image/127.5 - 1)")


class _Base:
    def __init__(self, models: Models, *, decode_chunk: int | None = 4096, color_fix: str = "none") -> None:
        self.models = models
        self.preset = models.preset
        self.decode_chunk = decode_chunk
        self.color_fix = check_color_fix(color_fix)

    @property
    def device(self) -> torch.device:
        return next(self.models.autoencoder.parameters()).device

    @property
    def light(self) -> bool:
        """True when the light autoencoder (``models.light_autoencoder``) encodes and decodes."""
        return self.models.light_autoencoder is not None

    def prepare(self, lr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Validate and reflect-pad the LR batch to multiples of the preset's pad multiple."""
        _check_lr(lr)
        return reflect_pad_to_multiple(lr.to(self.device, torch.float32), self.preset.pad_multiple)

    def encode(self, lr_padded: torch.Tensor) -> torch.Tensor:
        """Padded LR (B, 3, h, w) -> z_y (B, 3, h, w) = quant_conv(Enc(bicubic x4(LR))) (light: LightEnc(LR))."""
        if self.models.light_autoencoder is not None:
            return self.models.light_autoencoder.encode(lr_padded)
        return self.models.autoencoder.encode(bicubic_x4_reference(lr_padded))

    def decode(self, z: torch.Tensor, hw: tuple[int, int], lr_padded: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> quantised decode, [colour fix,] crop to (4h, 4w), clamp to [-1, 1].

        With a colour fix (``color_fix`` of the constructor, see :mod:`tadsr.color_fix`) the clamped decode of the
        whole padded tile is corrected towards the bicubic x4 of ``lr_padded`` and clamped again before the
        crop, exactly as the fused export graph does.
        """
        s = self.preset.scale
        ae = self.models.light_autoencoder if self.models.light_autoencoder is not None else self.models.autoencoder
        img = ae.decode(z / self.schedule.cfg.scale_factor, chunk=self.decode_chunk)
        if self.color_fix != "none":
            if lr_padded is None:
                raise InputError(f"colour fix {self.color_fix!r} needs the padded LR: decode(z, hw, lr_padded)")
            img = color_fix(img.clamp(-1.0, 1.0), bicubic_x4_reference(lr_padded), self.color_fix).clamp(-1.0, 1.0)
        return img[..., : s * hw[0], : s * hw[1]].clamp(-1.0, 1.0)

    def _noise(self, noise: torch.Tensor | None, seed: int | None, shape: tuple[int, ...]) -> torch.Tensor:
        if noise is None:
            return make_noise(shape, DEFAULT_SEED if seed is None else seed, self.device)
        if tuple(noise.shape) != shape:
            raise InputError(f"noise must have shape {shape} (latent of the padded LR), got {tuple(noise.shape)}")
        return noise.to(self.device, torch.float32)

    schedule: Schedule


class OneStepPipeline(_Base):
    """One-step student (SinSR / TAD-SR): ``pipe(lr, noise=None, seed=None) -> sr``.

    ``lr`` (B, 3, h, w) in [-1, 1]; ``noise`` (B, 3, H, W) standard normal for the padded size
    (H, W = h, w rounded up to multiples of 64); returns (B, 3, 4h, 4w) in [-1, 1]. ``color_fix``:
    ``"none"`` (default, upstream behaviour), ``"wavelet"``, ``"adain"`` or ``"luma"`` (:mod:`tadsr.color_fix`).
    """

    def __init__(self, models: Models, *, decode_chunk: int | None = 4096, color_fix: str = "none") -> None:
        super().__init__(models, decode_chunk=decode_chunk, color_fix=color_fix)
        self.schedule = make_schedule(self.preset.schedule)
        self.timestep = self.schedule.num_steps - 1

    def denoise(self, z_y: torch.Tensor, noise: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """x0 = student(x_T / sqrt(kappa² eta_T + 1), T - 1, lq) with x_T = z_y + kappa sqrt(eta_T) noise."""
        x_t = self.schedule.prior_sample(z_y, noise)
        t = torch.full((z_y.shape[0],), self.timestep, dtype=torch.int64, device=z_y.device)
        return self.models.student(self.schedule.scale_input(x_t, self.timestep), t, lq)

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, noise: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        lr_p, hw = self.prepare(lr)
        noise = self._noise(noise, seed, (lr_p.shape[0], self.preset.vq.embed_dim, *lr_p.shape[-2:]))
        z_y = self.encode(lr_p)
        return self.decode(self.denoise(z_y, noise, lr_p), hw, lr_p)


class TeacherPipeline(_Base):
    """T-step ResShift sampler: ``pipe(lr, noises=None, seed=None) -> sr``.

    ``noises`` (T, C, H, W) for batch 1 or (T, B, C, H, W): ``noises[0]`` is the prior noise, ``noises[k]``
    (k >= 1) the posterior noise added at step t = T - k; no noise is added at t = 0.
    ``steps`` selects the schedule: 15 -> v1, 4 -> v3 (other values: no respacing, an error).
    ``color_fix`` as for :class:`OneStepPipeline`.
    """

    def __init__(
        self, models: Models, steps: int = 15, *, decode_chunk: int | None = 4096, color_fix: str = "none"
    ) -> None:
        super().__init__(models, decode_chunk=decode_chunk, color_fix=color_fix)
        if models.teacher is None:
            raise ConfigError("no teacher network loaded: pass teacher=... to load_models (--teacher CKPT)")
        self.schedule = make_schedule(self.preset.teacher_schedule(steps))

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, noises: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        lr_p, hw = self.prepare(lr)
        T = self.schedule.num_steps
        b = lr_p.shape[0]
        shape = (T, b, self.preset.vq.embed_dim, *lr_p.shape[-2:])
        if noises is not None and noises.dim() == 4 and b == 1:
            noises = noises[:, None]
        noises = self._noise(noises, seed, shape)
        return self.decode(self.sample(self.encode(lr_p), noises, lr_p), hw, lr_p)

    def sample(
        self,
        z_y: torch.Tensor,
        noises: torch.Tensor,
        lq: torch.Tensor,
        on_x0: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The sampler on a given ``z_y`` (B, C, H, W): ``noises`` (T, B, C, H, W) -> final latent ``z``.

        What ``__call__`` runs between ``encode`` and ``decode``, as :meth:`OneStepPipeline.denoise` is for
        the student: callers that compare networks on the same LR encode it once. ``on_x0(t, x0)``, if given, sees
        the teacher's x0 prediction at every step (diagnostics: ``benchmarks/teacher_per_t.py --chain``).
        """
        net = self.models.teacher
        assert net is not None
        T, b = self.schedule.num_steps, z_y.shape[0]
        z = self.schedule.prior_sample(z_y, noises[0])
        for t in range(T - 1, -1, -1):
            tt = torch.full((b,), t, dtype=torch.int64, device=z.device)
            x0 = net(self.schedule.scale_input(z, t), tt, lq)
            if on_x0 is not None:
                on_x0(t, x0)
            z = self.schedule.posterior_mean(z, x0, t)
            if t > 0:
                z = z + self.schedule.posterior_std(t) * noises[T - t]
        return z


class DoNothingPipeline(_Base):
    """The do-nothing baseline ``decode(encode(bicubic x4(LR)))`` through the same autoencoder: ``pipe(lr)``.

    No denoiser: the latent of the bicubic-upsampled LR is decoded as it is (the student's x0 replaced by z_y).
    A model that does not beat this path adds nothing over its own autoencoder. ``noise`` and ``seed`` are
    accepted and ignored, so that it drops into the same callers as :class:`OneStepPipeline`.
    """

    def __init__(self, models: Models, *, decode_chunk: int | None = 4096, color_fix: str = "none") -> None:
        super().__init__(models, decode_chunk=decode_chunk, color_fix=color_fix)
        self.schedule = make_schedule(self.preset.schedule)

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, noise: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        lr_p, hw = self.prepare(lr)
        return self.decode(self.encode(lr_p), hw, lr_p)
