"""Residual-shifting diffusion schedule (ResShift, spec §3) as float64 tables plus the float32 operations.

All tables are float64 numpy arrays indexed by the code step ``t = 0..T-1``; tensors are gathered and cast
to float32 exactly as upstream does (value first cast to float32, then the float32 arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tadsr.config import ScheduleConfig

__all__ = ["Schedule", "make_schedule"]


@dataclass(frozen=True)
class Schedule:
    """Tables of a residual-shifting schedule (float64, index = t).

    Attributes:
        cfg: the config it was built from.
        sqrt_etas, etas: shifting schedule sqrt(eta_t) and eta_t.
        posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2:
            the posterior q(x_{t-1} | x_t, x_0) = N(c1 x_t + c2 x_0, sigma²).
    """

    cfg: ScheduleConfig
    sqrt_etas: np.ndarray
    etas: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_steps(self) -> int:
        return self.cfg.steps

    @property
    def kappa(self) -> float:
        return self.cfg.kappa

    # -- float32 constants as the upstream sampler computes them ------------------------------------------
    def prior_noise_scale(self) -> float:
        """float32(kappa * sqrt(eta_{T-1})): x_T = z_y + scale * eps (1.98 for the official schedules)."""
        return float(np.float32(self.kappa * self.sqrt_etas[-1]))

    def input_scale(self, t: int) -> float:
        """float32 sqrt(float32(eta_t) * kappa² + 1): the network sees x_t / input_scale(t)."""
        eta = torch.tensor(self.etas[t], dtype=torch.float32)
        return float(torch.sqrt(eta * self.kappa**2 + 1))

    def prior_sample(self, z_y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = z_y + kappa sqrt(eta_{T-1}) eps."""
        return z_y + self.prior_noise_scale() * noise

    def scale_input(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """x_t / sqrt(kappa² eta_t + 1) (a float32 division, as upstream)."""
        return x_t / torch.tensor(self.input_scale(t), dtype=x_t.dtype, device=x_t.device)

    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) eps, for a batch of steps t (B,)."""
        eta = self._gather(self.etas, t, x0)
        sqrt_eta = self._gather(self.sqrt_etas, t, x0)
        return x0 + eta * (y - x0) + self.kappa * sqrt_eta * noise

    def scale_input_batch(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample input scaling for a batch of steps t (B,)."""
        eta = self._gather(self.etas, t, x_t)
        return x_t / torch.sqrt(eta * self.kappa**2 + 1)

    def posterior_mean(self, x_t: torch.Tensor, x0: torch.Tensor, t: int) -> torch.Tensor:
        c1 = torch.tensor(self.posterior_mean_coef1[t], dtype=torch.float32)
        c2 = torch.tensor(self.posterior_mean_coef2[t], dtype=torch.float32)
        return c1 * x_t + c2 * x0

    def posterior_std(self, t: int) -> float:
        """exp(0.5 log sigma²_t) in float32 (clipped log-variance, as upstream)."""
        logv = torch.tensor(self.posterior_log_variance_clipped[t], dtype=torch.float32)
        return float(torch.exp(0.5 * logv))

    @staticmethod
    def _gather(table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        vals = torch.from_numpy(table).to(device=like.device)[t.long()].to(torch.float32)
        return vals.reshape(-1, *([1] * (like.dim() - 1)))

    def constants(self) -> dict[str, float]:
        """The one-step student's constants, for manifests."""
        t = self.num_steps - 1
        return {
            "steps": self.num_steps,
            "kappa": self.kappa,
            "student_timestep": t,
            "sqrt_eta_T": float(self.sqrt_etas[-1]),
            "prior_noise_scale": self.prior_noise_scale(),
            "input_scale": self.input_scale(t),
        }


def make_schedule(cfg: ScheduleConfig) -> Schedule:
    """Build the exponential residual-shifting schedule (ResShift 2024 rule for the first level)."""
    T = cfg.steps
    s1 = min(cfg.min_noise_level / cfg.kappa, cfg.min_noise_level)
    increaser = math.exp(1.0 / (T - 1) * math.log(cfg.etas_end / s1))
    base = np.ones(T) * increaser
    power_timestep = np.linspace(0, 1, T, endpoint=True) ** cfg.power * (T - 1)
    sqrt_etas = np.power(base, power_timestep) * s1
    etas = sqrt_etas**2
    etas_prev = np.append(0.0, etas[:-1])
    alpha = etas - etas_prev
    var = cfg.kappa**2 * etas_prev / etas * alpha
    log_var_clipped = np.log(np.append(var[1], var[1:]))
    c1 = etas_prev / etas
    c2 = alpha / etas
    return Schedule(cfg, sqrt_etas, etas, var, log_var_clipped, c1, c2)
