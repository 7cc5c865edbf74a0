"""Shared test setup: slow-test opt-in, golden data location, thread limits, the ``tadsr all --smoke`` run.

Tiers: the default tier runs everything not marked ``slow`` (``slow`` = the official-size architecture only,
opt in with ``--runslow``); ``checkpoint`` marks the checkpoint-format tests, synthetic upstream-format files by
default and the real ones when ``TADSR_CKPT_DIR`` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
    # the tests on the background `tadsr all --smoke` run last (a stable sort: file order otherwise kept), so the
    # smoke's format lanes overlap every other test instead of being waited for by the first one that needs it
    items.sort(key=_needs_smoke)
    if config.getoption("--runslow") or os.environ.get("TADSR_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="official-size test: opt in with --runslow (or TADSR_RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _needs_smoke(item: pytest.Item) -> bool:
    return "tiny_all" in getattr(item, "fixturenames", ())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the session's ``tadsr all --smoke`` when a selected test needs it (see :class:`_Smoke`)."""
    if any(_needs_smoke(item) for item in session.items) and not session.config.option.collectonly:
        _SMOKE.start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SMOKE.stop(keep=exitstatus != 0)


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


SMOKE_TIMEOUT_S = 3000


class _Smoke:
    """The session's ``tadsr all --smoke`` (the bundled model, every format) in a fresh background process.

    It starts when collection ends (``pytest_collection_finish``) if a selected test uses ``tiny_all``; those tests
    run last. Most of a lane's time is single-threaded Python, and so are most other tests, so the smoke's lanes and
    the rest of the tier share the two CI cores instead of taking turns. Its three format lanes run at once (one
    thread each): with two at a time, the lane that waited set the end (session 13). Its output goes to a file (a pipe nobody
    reads until the end would fill and stall it). ``TADSR_TINY_ALL_DIR=DIR`` reuses a finished run in DIR (one with
    SUMMARY.md), else runs into DIR and keeps it: local iteration on tests/test_every_format.py then costs seconds.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.out: Path | None = None
        self.root: Path | None = None  # a temporary folder this session made (removed after a passing session)
        self.t0 = 0.0
        self.threads = 1
        self.result: MainJobRun | None = None

    def start(self) -> None:
        keep = os.environ.get("TADSR_TINY_ALL_DIR")
        if keep:
            self.out = Path(keep)
            if (self.out / "SUMMARY.md").exists():
                self.result = _reuse(self.out)
                return
        else:
            self.root = Path(tempfile.mkdtemp(prefix="tadsr-smoke-"))
            self.out = self.root / "out"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", "import sys; from tadsr.cli import main; sys.exit(main(sys.argv[1:]))",
               "all", "--smoke", "--jobs", "3", "--out", str(self.out)]  # fmt: skip
        self.t0 = time.perf_counter()
        with open(self._log_path(), "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # one torch thread here while the smoke's two single-threaded lanes run: two OpenMP threads competing with
        # them for two cores spin and wait (pure-torch tests ran 5-18x slower, session 13)
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def _log_path(self) -> Path:
        assert self.out is not None
        return self.out.parent / f"{self.out.name}.log"

    def wait(self) -> MainJobRun:
        if self.result is not None:
            return self.result
        if self.proc is None:  # not started at collection (e.g. the fixture requested dynamically)
            self.start()
            if self.result is not None:
                return self.result
        assert self.proc is not None and self.out is not None
        try:
            rc = self.proc.wait(timeout=max(1.0, SMOKE_TIMEOUT_S - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            self.stop(keep=True)
            pytest.fail(f"tadsr all --smoke did not finish in {SMOKE_TIMEOUT_S} s (log: {self._log_path()})")
        seconds = time.perf_counter() - self.t0
        torch.set_num_threads(self.threads)
        log = self._log_path().read_text(errors="replace")
        if self.out.is_dir():
            (self.out / "smoke.log").write_text(log)
        if rc not in (0, 1) or not (self.out / "SUMMARY.md").exists():
            pytest.fail(f"tadsr all --smoke exited {rc} without a SUMMARY.md:\n{log[-4000:]}")
        self.result = MainJobRun(self.out, rc, log, seconds)
        return self.result

    def stop(self, keep: bool) -> None:
        """End a run still going (its whole process group: the lanes are its children); remove this session's
        temporary folder unless ``keep`` (a failed session keeps it to look at)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.root is not None and not keep:
            shutil.rmtree(self.root, ignore_errors=True)


_SMOKE = _Smoke()


@pytest.fixture(scope="session")
def tiny_all() -> MainJobRun:
    """The session's ``tadsr all --smoke`` run (started in the background at collection; see :class:`_Smoke`)."""
    return _SMOKE.wait()


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
