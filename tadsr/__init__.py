"""tadsr-mobile: one-step diffusion super-resolution (TAD-SR / SinSR / ResShift) for phones.

The public names below are imported lazily, so that ``tadsr.runtime`` (numpy + backend runtimes) can be
used in an app without torch installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_state_dict": "tadsr.checkpoint",
    "load_models": "tadsr.pipeline",
    "Models": "tadsr.pipeline",
    "OneStepPipeline": "tadsr.pipeline",
    "TeacherPipeline": "tadsr.pipeline",
    "PRESETS": "tadsr.config",
    "Preset": "tadsr.config",
    "get_preset": "tadsr.config",
    "TadsrError": "tadsr.errors",
    "ConfigError": "tadsr.errors",
    "CheckpointError": "tadsr.errors",
    "InputError": "tadsr.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tadsr' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
