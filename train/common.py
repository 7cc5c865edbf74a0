"""Shared training machinery: devices, seeding, DDP, EMA, LR schedules, resumable stage checkpoints.

A stage writes into its own folder::

    <dir>/model.safetensors   raw trainable weights (safetensors, upstream key names)
    <dir>/ema.safetensors     EMA weights (what validation and shipping use)
    <dir>/extra.safetensors   other trainable nets of the stage (the discriminator heads), if any
    <dir>/optim.pt            optimizer state dicts (tensors + plain containers; loaded with weights_only=True)
    <dir>/state.json          step, config, elapsed seconds, recent losses

Randomness is derived from ``(seed, rank, step)`` at every step, so a resumed run draws exactly the numbers an
uninterrupted run would have drawn, without saving generator states.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from tadsr import fileio
from tadsr.checkpoint import load_state_dict, save_safetensors
from tadsr.errors import ConfigError

__all__ = [
    "DistEnv",
    "init_distributed",
    "resolve_device",
    "step_generator",
    "step_seed",
    "Ema",
    "warmup_cosine",
    "StageCheckpoint",
    "StepPlanner",
    "autocast",
    "to_memory_format",
    "setup_logging",
    "RunningMean",
    "unwrap",
]

log = logging.getLogger(__name__)


# -- devices and processes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Process-group facts: ``world == 1`` means no torch.distributed at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"cpu"``, ``"cuda"`` (this process's local GPU under torchrun) or ``"auto"`` (cuda when present)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but torch.cuda.is_available() is False; use --device cpu")
        dev = torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        return dev
    if name != "cpu":
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or auto")
    return torch.device("cpu")


def init_distributed(device_name: str) -> tuple[DistEnv, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 is set; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if rank != 0:  # one log per job: the other ranks report warnings only
        logging.getLogger().setLevel(logging.WARNING)
    return DistEnv(rank=rank, world=world, local_rank=local), device


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _AmpFields(Protocol):
    @property
    def amp(self) -> bool: ...
    @property
    def cpu_amp(self) -> bool: ...


_AmpConfig = TypeVar("_AmpConfig", bound=_AmpFields)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), as torch's CPU backend reports it.

    Elsewhere torch emulates bf16 with fp32 arithmetic plus conversions: the GT-only student step at batch 8,
    crop 256, 2 threads ran at 2.9 samples/s under bf16 autocast and 5.3 in fp32 on an Intel Xeon with AVX-512
    but no BF16 (session 35), while an AMD EPYC with AVX-512 BF16 gained up to 1.5x from it.
    """
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if c is not None)


def resolve_cpu_amp(cfg: _AmpConfig, device: torch.device, stage: str) -> _AmpConfig:
    """``cfg`` with ``cpu_amp`` as the stage will run on ``device``: bf16 autocast on the CPU only when autocast is
    on (``amp``; ``--no-amp`` asks for nothing) and the CPU has native bf16 (:func:`cpu_has_native_bf16`); asked
    for on another CPU, the stage runs fp32 and says so once."""
    asked = cfg.amp and cfg.cpu_amp
    if asked and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("%s: bf16 autocast on the CPU was asked for (--cpu-bf16 or the recipe), but this CPU has no "
                    "native bf16 (AVX-512 BF16 or AMX), where emulated bf16 is slower than fp32: training in fp32",
                    stage)  # fmt: skip
        asked = False
    return dataclasses.replace(cfg, cpu_amp=asked)


def autocast(device: torch.device, enabled: bool, cpu: bool = False) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when enabled; on the CPU only when ``cpu`` is also set (a stage's ``cpu_amp``,
    worth it on CPUs with AVX-512 BF16 / AMX, see benchmarks/train_throughput.py); a no-op otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels-last layout when asked and 4-D; ``x`` itself otherwise."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# -- randomness -------------------------------------------------------------------------------------------
def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for (run seed, process rank, step, stream), independent across all four."""
    return int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, rank: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """A torch generator on ``device`` seeded by :func:`step_seed`."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, rank, step, stream))


# -- optimisation helpers ---------------------------------------------------------------------------------
def warmup_cosine(step: int, progress: float, warmup: int, final_frac: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps (step 0 -> 1/warmup), then a cosine over the
    training progress (0..1) down to ``final_frac``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


class Ema:
    """Exponential moving average of a module's state dict (floating entries only).

    ``relative_position_index`` and other integer buffers are copied, not averaged. The decay ramps up as
    ``min(rate, (1 + n) / (10 + n))`` so short runs are not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        self.rate = rate
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.rate, (1 + self.updates) / (10 + self.updates))
        for k, v in unwrap(model).state_dict().items():
            e = self.state[k]
            if v.is_floating_point() and "relative_position_index" not in k:
                e.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                e.copy_(v)

    def load(self, state: Mapping[str, torch.Tensor], updates: int) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
        self.updates = updates


class RunningMean:
    """Mean of each logged quantity since the last :meth:`pop`.

    Values may be floats or 0-d tensors; tensors are summed where they live and read back only in
    :meth:`pop`, so logging does not synchronise the GPU every step.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, float | torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


# -- time budget ------------------------------------------------------------------------------------------
class StepPlanner:
    """Training progress in [0, 1]: by steps, or by wall-clock time when the stage has a time limit.

    ``pause_after_s`` ends this run early without changing the progress (see :meth:`paused`).
    With a time limit the stage runs until its time (including time spent before a resume) is used up or
    ``max_steps`` is reached, whichever comes first; LR schedules and phase switches read :meth:`progress`, so
    they adapt to the speed of the machine and to steps of unequal cost. Under DDP the value is agreed by all
    ranks (max over ranks) so every replica uses the same LR and stops at the same step.
    """

    def __init__(
        self, max_steps: int, time_limit_s: float | None, *, elapsed_s: float = 0.0,
        device: torch.device | None = None, pause_after_s: float | None = None,
    ) -> None:  # fmt: skip
        self.max_steps = max_steps
        self.time_limit_s = time_limit_s
        self.pause_after_s = pause_after_s
        self._first_step: int | None = None
        self.elapsed_before = elapsed_s
        self.device = device or torch.device("cpu")
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of this stage so far, including runs before a resume."""
        return self.elapsed_before + time.perf_counter() - self._started

    def progress(self, step: int) -> float:
        p = step / max(1, self.max_steps)
        if self.time_limit_s is not None:
            p = max(p, self.elapsed() / self.time_limit_s)
        return min(1.0, _sync_max(p, self.device))

    def should_stop(self, step: int, progress: float | None = None) -> bool:
        """True once ``max_steps`` are done, the time is up, or this run's ``pause_after_s`` has passed."""
        if step >= self.max_steps or (progress if progress is not None else self.progress(step)) >= 1.0:
            return True
        if self._first_step is None:
            self._first_step = step
        return step > self._first_step and self.paused()  # a run makes at least one step

    def paused(self) -> bool:
        """True once this run (not counting runs before a resume) has used ``pause_after_s``.

        A pause does not touch the progress, so the LR schedule of a stage trained in several sessions (one per
        day on a CPU) is the one of an uninterrupted run of ``max_steps``; the stage saves a checkpoint and
        the next run resumes it.
        """
        if self.pause_after_s is None:
            return False
        return _sync_max(time.perf_counter() - self._started, self.device) >= self.pause_after_s


def _sync_max(value: float, device: torch.device, minimum: bool = False) -> float:
    """Max (or min) of a scalar over all ranks; the value itself without torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([-value if minimum else value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return -float(t) if minimum else float(t)


# -- stage checkpoints ------------------------------------------------------------------------------------
class StageCheckpoint:
    """Reads and writes one stage's resumable state in a folder (see module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file() and (self.folder / "model.safetensors").is_file()

    def save(
        self,
        *,
        model: nn.Module,
        ema: Ema | None,
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: dict[str, Any],
        extra: nn.Module | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = dict(metadata or {})
        save_safetensors(unwrap(model).state_dict(), self.folder / "model.safetensors", meta)
        if ema is not None:
            save_safetensors(ema.state, self.folder / "ema.safetensors", meta)
            state = {**state, "ema_updates": ema.updates}
        if extra is not None:
            save_safetensors(unwrap(extra).state_dict(), self.folder / "extra.safetensors", meta)
        with fileio.atomic_path(self.folder / "optim.pt") as tmp:
            torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp)
        fileio.write_text(self.state_path, json.dumps(state, indent=2, sort_keys=True) + "\n")

    def load(
        self,
        *,
        model: nn.Module,
        ema: Ema | None,
        optimizers: Mapping[str, torch.optim.Optimizer],
        extra: nn.Module | None = None,
    ) -> dict[str, Any]:
        """Restore weights and optimizer states in place; return the JSON state."""
        state = json.loads(self.state_path.read_text())
        unwrap(model).load_state_dict(load_state_dict(self.folder / "model.safetensors"), strict=True)
        if ema is not None:
            ema.load(load_state_dict(self.folder / "ema.safetensors"), int(state.get("ema_updates", 0)))
        if extra is not None:
            unwrap(extra).load_state_dict(load_state_dict(self.folder / "extra.safetensors"), strict=True)
        opt = torch.load(self.folder / "optim.pt", map_location="cpu", weights_only=True)
        for k, o in optimizers.items():
            o.load_state_dict(opt[k])
        return state


def setup_logging(verbose: bool = False, log_file: Path | None = None) -> None:
    """Configure the root logger for the command-line entry points (library code never does this)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size``."""
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
