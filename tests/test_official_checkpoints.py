"""Official checkpoints from ``TADSR_CKPT_DIR`` (``-m checkpoint``): each file found loads strictly and runs.

The default tier proves the same reading code on synthetic upstream-format files (``test_checkpoint.py``:
flat, ``state_dict`` / ``model`` / ``params_ema`` / ``ema`` wrappers, ``module.`` / ``_orig_mod.`` prefixes).
These tests read the real files when the folder is given, and are skipped, with the reason, when it is not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tadsr
from tadsr.pipeline import infer_preset

pytestmark = pytest.mark.checkpoint

# upstream file name -> the role it plays in load_models
OFFICIAL = {
    "resshift_realsrx4_s15_v1.pth": "teacher",
    "resshift_realsrx4_s4_v3.pth": "teacher",
    "SinSR_v1.pth": "student",
    "TAD-SR.pth": "student",
}
AUTOENCODER = "autoencoder_vq_f4.pth"


def _ckpt_dir() -> Path:
    value = os.environ.get("TADSR_CKPT_DIR")
    if not value:
        pytest.skip("official checkpoint tests need TADSR_CKPT_DIR=/path/to/weights")
    folder = Path(value)
    if not folder.is_dir():
        pytest.fail(f"TADSR_CKPT_DIR={value} is not a folder")
    return folder


def _file(name: str) -> Path:
    path = _ckpt_dir() / name
    if not path.is_file():
        pytest.skip(f"{name} not in TADSR_CKPT_DIR")
    return path


def test_autoencoder_is_official_x4() -> None:
    assert infer_preset(autoencoder=_file(AUTOENCODER)) == "official-x4"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_denoiser_loads_strictly_and_upscales(name: str) -> None:
    role, path, ae = OFFICIAL[name], _file(name), _file(AUTOENCODER)
    assert infer_preset(**{role: path}, autoencoder=ae) == "official-x4"
    models = tadsr.load_models(**{role: path}, autoencoder=ae, preset="official-x4")
    lr = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        sr = tadsr.OneStepPipeline(models)(lr, seed=0)
    assert sr.shape == (1, 3, 256, 256)
    assert torch.isfinite(sr).all()
    assert float(sr.std()) > 1e-3  # a real model's output is not constant
