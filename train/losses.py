"""Losses and samplers of the three stages (autoencoder, ResShift teacher, TAD-SR distillation).

Equations follow shared/spec/tadsr-distillation.md (§1, §3-5, §8) and resshift-architecture.md §3; the
decisions on the flagged ambiguities are recorded in train/DECISIONS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tadsr.metrics import YCBCR_BT601
from tadsr.schedule import Schedule

__all__ = [
    "LATENT_LOSSES",
    "check_latent_loss",
    "latent_regression",
    "ssim_loss",
    "fft_loss",
    "chroma_loss",
    "perturb",
    "implied_noise",
    "ddim_teacher_sample",
    "hsd_gradient",
    "HsdResult",
    "hsd_loss",
    "hinge_d_loss",
    "generator_adv_loss",
    "Denoiser",
]

# (x_t scaled for the network, t (B,), lq) -> x0 prediction
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- regression in the latent space (teacher and student) ----------------------------------------------------------
LATENT_LOSSES = ("mse", "log")
LOG_MSE_EPS = 1e-4  # MSE floor of "log" (the stage-1 student on its pool: min 0.003, median 0.037, mean 0.062)
LATENT_LOSS_HELP = ("regression to the GT latent: mse (default) or log (each crop weighted by the batch mean MSE over "
                    "its own: smooth crops count as much as textured ones)")


def check_latent_loss(name: str, kind: str) -> None:
    """Raise ValueError unless ``kind`` is one of :data:`LATENT_LOSSES` (``name``: the setting, for the message)."""
    if kind not in LATENT_LOSSES:
        raise ValueError(f"{name} must be one of {LATENT_LOSSES}, got {kind!r}")


def latent_regression(x: torch.Tensor, z0: torch.Tensor, kind: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop loss of a regression to the GT latent, and the per-crop MSE (for logging).

    ``mse``: the MSE itself. ``log``: ``mean(mse) * log(mse + eps)`` with the batch mean held constant, whose
    gradient is each crop's MSE gradient times ``mean(mse) / (mse + eps)``: the gradient of the mean log-MSE
    (the mean latent PSNR, up to a constant) at the plain MSE's scale. Under ``mse`` a smooth crop, whose
    error is small, hardly counts and its bias stays; under ``log`` halving any crop's error is worth the same.
    """
    mse = (x - z0).square().flatten(1).mean(1)
    if kind == "mse":
        return mse, mse
    check_latent_loss("latent loss", kind)
    return mse.detach().mean() * torch.log(mse + LOG_MSE_EPS), mse


# -- autoencoder --------------------------------------------------------------------------------------------
def _gauss_window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM`` of two (B, C, H, W) images in [-1, 1] (11x11 Gaussian, sigma 1.5, valid region), scalar."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    c = a.shape[1]
    g = _gauss_window(device=a.device)
    wx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, wx, groups=c), wy, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a**2
    s_bb = filt(b * b) - mu_b**2
    s_ab = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return 1 - m.mean()


def fft_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the orthonormal 2-D spectra (real and imaginary parts), scalar."""
    fa = torch.fft.rfft2(a.float(), norm="ortho")
    fb = torch.fft.rfft2(b.float(), norm="ortho")
    return (torch.view_as_real(fa) - torch.view_as_real(fb)).abs().mean()


def chroma_loss(a: torch.Tensor, b: torch.Tensor, pool: int = 4) -> torch.Tensor:
    """Mean absolute difference of the BT.601 Cb and Cr of ``pool``-px block means, scalar; images in [-1, 1].

    The colour of regions (one block per latent pixel at the default 4), on the 0-1 chroma scale: an RGB loss
    weighs a chroma error no more than a luma error of the same size, though natural images' chroma is smooth
    (bicubic x4 keeps it to ~48 dB) and a shift of it is what the eye sees first.
    """
    m = torch.as_tensor(YCBCR_BT601[1:] / (2 * 255.0), dtype=a.dtype, device=a.device)  # [-1, 1] RGB -> Cb, Cr
    d = torch.einsum("ij,bjhw->bihw", m, a - b)
    return F.avg_pool2d(d.float(), pool).abs().mean()


# -- residual-shifting process ------------------------------------------------------------------------------
def _per_sample(table, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return Schedule._gather(table, t, like)


def perturb(sched: Schedule, x0: torch.Tensor, zy: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x0 + eta_t (z_y - x0) + kappa sqrt(eta_t) n`` per sample (the ResShift forward marginal)."""
    return sched.q_sample(x0, zy, t, noise)


def implied_noise(
    sched: Schedule, x_t: torch.Tensor, x0_hat: torch.Tensor, zy: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Noise implied by an x0 prediction: ``(x_t - x0 - eta_t (z_y - x0)) / (kappa sqrt(eta_t))``."""
    eta = _per_sample(sched.etas, t, x_t)
    sqrt_eta = _per_sample(sched.sqrt_etas, t, x_t)
    return (x_t - x0_hat - eta * (zy - x0_hat)) / (sched.kappa * sqrt_eta)


@torch.no_grad()
def ddim_teacher_sample(
    teacher: Denoiser, sched: Schedule, x_T: torch.Tensor, zy: torch.Tensor, lq: torch.Tensor
) -> torch.Tensor:
    """The teacher's deterministic T-step sampler (eta = 0 form of the ResShift posterior, spec §3).

    ``x_{t-1} = k_t x0 + m_t x_t + j_t z_y`` with ``m = sqrt(eta_{t-1}/eta_t)``,
    ``k = 1 - eta_{t-1} + sqrt(eta_{t-1} eta_t) - m``, ``j = eta_{t-1} - sqrt(eta_{t-1} eta_t)``, ``eta_{-1} = 0``;
    the result is the last x0 prediction.
    """
    z = x_T
    b = x_T.shape[0]
    x0 = x_T
    for t in range(sched.num_steps - 1, -1, -1):
        tt = torch.full((b,), t, dtype=torch.int64, device=x_T.device)
        x0 = teacher(sched.scale_input_batch(z, tt), tt, lq).float()
        if t == 0:
            break
        e, ep = float(sched.etas[t]), float(sched.etas[t - 1])
        m = (ep / e) ** 0.5
        k = 1 - ep + (ep * e) ** 0.5 - m
        j = ep - (ep * e) ** 0.5
        z = k * x0 + m * z + j * zy
    return x0


# -- HSD (high-frequency enhanced score distillation, spec §4) -----------------------------------------------
@dataclass
class HsdResult:
    """``grad``: g = e_s - e_t (B, C, h, w), non-finite entries zeroed; ``t``: the sampled steps (B,)."""

    grad: torch.Tensor
    t: torch.Tensor


@torch.no_grad()
def hsd_gradient(
    teacher: Denoiser,
    sched: Schedule,
    x_student: torch.Tensor,
    z_teacher: torch.Tensor,
    zy: torch.Tensor,
    lq: torch.Tensor,
    generator: torch.Generator,
    *,
    t_max: int = 3,
    noise: str = "gaussian",
    double_scaling: bool = False,
) -> HsdResult:
    """HSD direction g for the student output (no autograd).

    Both latents are perturbed to the same small step ``t_h ~ U{0..t_max-1}`` with the same noise, the frozen
    teacher predicts x0 from each, and ``g`` is the difference of the implied noises (student minus teacher).

    Args:
        noise: ``"gaussian"`` (N(0, 1), our default) or ``"uniform"`` (U[0, 1), as the released code).
        double_scaling: divide the teacher input by ``s_t²`` instead of ``s_t`` (as the released code).
    """
    xs = x_student.detach().float()
    b = xs.shape[0]
    t = torch.randint(0, t_max, (b,), generator=generator, device=xs.device)
    if noise == "gaussian":
        n = torch.randn(xs.shape, generator=generator, device=xs.device)
    elif noise == "uniform":
        n = torch.rand(xs.shape, generator=generator, device=xs.device)
    else:
        raise ValueError(f"noise must be 'gaussian' or 'uniform', got {noise!r}")
    a_s = perturb(sched, xs, zy, t, n)
    a_t = perturb(sched, z_teacher.float(), zy, t, n)
    inp_s, inp_t = sched.scale_input_batch(a_s, t), sched.scale_input_batch(a_t, t)
    if double_scaling:
        inp_s, inp_t = sched.scale_input_batch(inp_s, t), sched.scale_input_batch(inp_t, t)
    d = teacher(torch.cat([inp_s, inp_t]), torch.cat([t, t]), torch.cat([lq, lq])).float()
    d_s, d_t = d[:b], d[b:]
    g = implied_noise(sched, a_s, d_s, zy, t) - implied_noise(sched, a_t, d_t, zy, t)
    return HsdResult(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), t)


def hsd_loss(x_student: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean_CHW(sg(g) * x_student)`` (B,): its gradient w.r.t. x_student is ``g / (C h w)``."""
    return (grad.detach() * x_student.float()).flatten(1).mean(1)


# -- adversarial (hinge, spec §5.3) ---------------------------------------------------------------------------
def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean relu(1 - D(real)) + mean relu(1 + D(fake))`` over all logits of a sample, then the batch."""
    return F.relu(1 - real_logits).flatten(1).mean(1).mean() + F.relu(1 + fake_logits).flatten(1).mean(1).mean()


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-mean D(fake)`` (B,), before the GAN weight."""
    return -fake_logits.flatten(1).mean(1)
