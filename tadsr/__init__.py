"""tadsr-mobile: one-step diffusion super-resolution (TAD-SR / SinSR / ResShift) for phones."""

from tadsr.checkpoint import load_state_dict
from tadsr.config import PRESETS, Preset, get_preset
from tadsr.errors import CheckpointError, ConfigError, InputError, TadsrError
from tadsr.pipeline import Models, OneStepPipeline, TeacherPipeline, load_models

__version__ = "0.1.0"

__all__ = [
    "load_state_dict",
    "load_models",
    "Models",
    "OneStepPipeline",
    "TeacherPipeline",
    "PRESETS",
    "Preset",
    "get_preset",
    "TadsrError",
    "ConfigError",
    "CheckpointError",
    "InputError",
]
