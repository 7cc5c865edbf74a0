"""Shared test setup: slow-test opt-in, golden data location, thread limits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("TADSR_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run full-size (slow) tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("TADSR_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="full-size test: opt in with --runslow (or TADSR_RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201 - pluggy hook wrapper
    """Keep each phase's report on the test item (``item.rep_call.passed``) for fixtures that need the outcome."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def load_golden(tag: str) -> dict[str, np.ndarray]:
    path = GOLDEN_DIR / f"resshift_{tag}.npz"
    if not path.exists():
        msg = f"golden file {path} not found (set TADSR_GOLDEN_DIR to the shared/golden folder)"
        if os.environ.get("CI"):  # CI lays shared/ beside the clone: a missing golden file there is a failure
            pytest.fail(msg)
        pytest.skip(msg)
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def tiny_models():
    import tadsr

    return tadsr.load_models(preset="tiny", init="random")


@pytest.fixture(scope="session")
def tiny_onnx_artifacts(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny-preset ONNX fp32 artifacts (pipeline + encoder/denoiser/decoder), exported once per session."""
    from tadsr.export.api import export_model

    out = tmp_path_factory.mktemp("tiny_onnx")
    export_model(tiny_models, formats=("onnx",), graphs=("pipeline", "components"), tile=64, out_dir=out, n_real=1)
    return out


@pytest.fixture(scope="session")
def tiny_executorch_encoder(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny-preset ExecuTorch (XNNPACK) fp32 encoder artifact (the cheapest real lowering), once per session."""
    from tadsr.export.api import export_model

    out = tmp_path_factory.mktemp("tiny_et_encoder")
    (res,) = export_model(tiny_models, formats=("executorch",), graphs=("encoder",), tile=64, out_dir=out, n_real=1)
    return res.path


@pytest.fixture(scope="session")
def tiny_executorch_pipeline(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny-preset ExecuTorch (XNNPACK) fp32 pipeline artifact, exported once per session (~2.5 min: slow tests)."""
    from tadsr.export.api import export_model

    out = tmp_path_factory.mktemp("tiny_et")
    (res,) = export_model(tiny_models, formats=("executorch",), graphs=("pipeline",), tile=64, out_dir=out, n_real=1)
    return res.path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny photo folder (train/ and val/ of blocky textured PNGs) for the training and distillation tests."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, sizes in (("train", [(160, 200), (136, 144)]), ("val", [(128, 132)])):
        (root / split).mkdir()
        for i, (h, w) in enumerate(sizes):
            base = rng.normal(size=(h // 8 + 1, w // 8 + 1, 3))
            img = np.kron(base, np.ones((8, 8, 1)))[:h, :w] * 40 + 128 + rng.normal(size=(h, w, 3)) * 8
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / f"img{i}.png")
    return root
