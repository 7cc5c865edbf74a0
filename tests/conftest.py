"""Shared test setup: slow-test opt-in, golden data location, thread limits, the ``tadsr all --smoke`` run.

Tiers: the default tier runs everything not marked ``slow`` (``slow`` = the official-size architecture only,
opt in with ``--runslow``); ``checkpoint`` marks the checkpoint-format tests, synthetic upstream-format files by
default and the real ones when ``TADSR_CKPT_DIR`` is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
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
    skip = pytest.mark.skip(reason="official-size test: opt in with --runslow (or TADSR_RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201 - pluggy hook wrapper
    """Keep each phase's report on the test item (``item.rep_call.passed``) for fixtures that need the outcome."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def under_ci() -> bool:
    """Whether the tests run under CI (``CI`` set to anything but empty, ``0`` or ``false``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def load_golden(tag: str) -> dict[str, np.ndarray]:
    path = GOLDEN_DIR / f"resshift_{tag}.npz"
    if not path.exists():
        msg = f"golden file {path} not found (set TADSR_GOLDEN_DIR to the shared/golden folder)"
        if under_ci():  # CI lays shared/ beside the clone: a missing golden file there is a failure
            pytest.fail(msg)
        pytest.skip(msg)
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module's tests (timing-independent numerics); the previous count is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@dataclass(frozen=True)
class MainJobRun:
    """A finished ``tadsr all --smoke`` run: its folder, exit code, console log and wall time (None if reused)."""

    out: Path
    rc: int
    log: str
    seconds: float | None


def _reuse(out: Path) -> MainJobRun:
    verdicts = [json.loads((out / "parity" / sub / "parity.json").read_text())["passed"]
                for sub in ("artifacts", "int8") if (out / "parity" / sub / "parity.json").exists()]  # fmt: skip
    log = out / "smoke.log"
    return MainJobRun(out, 0 if verdicts and all(verdicts) else 1, log.read_text() if log.exists() else "", None)


@pytest.fixture(scope="session")
def tiny_all(tmp_path_factory: pytest.TempPathFactory) -> MainJobRun:
    """``tadsr all --smoke`` (the bundled model, every format) run once per session in a fresh process.

    ``TADSR_TINY_ALL_DIR=DIR`` reuses a finished run in DIR (one with SUMMARY.md), else runs into DIR and keeps it:
    local iteration on tests/test_every_format.py then costs seconds instead of minutes.
    """
    keep = os.environ.get("TADSR_TINY_ALL_DIR")
    out = Path(keep) if keep else tmp_path_factory.mktemp("tiny_all") / "out"
    if keep and (out / "SUMMARY.md").exists():
        return _reuse(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", "import sys; from tadsr.cli import main; sys.exit(main(sys.argv[1:]))",
           "all", "--smoke", "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, check=False)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if out.is_dir():
        (out / "smoke.log").write_text(log)
    if proc.returncode not in (0, 1) or not (out / "SUMMARY.md").exists():
        pytest.fail(f"tadsr all --smoke exited {proc.returncode} without a SUMMARY.md:\n{log[-4000:]}")
    return MainJobRun(out, proc.returncode, log, seconds)


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
