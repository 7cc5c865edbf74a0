"""tadsr-mobile: one-step diffusion super-resolution (TAD-SR / SinSR / ResShift) for phones.

The public names below are imported lazily, so that ``tadsr.runtime`` (numpy + backend runtimes) can be
used in an app without torch installed.
"""

from __future__ import annotations

from tadsr.lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
