"""Every format end to end on a small model: the default tier's proof that the whole product works.

One ``tadsr all --smoke`` run (the session fixture ``tiny_all`` in conftest.py; ``TADSR_TINY_ALL_DIR`` reuses a
finished one) on the shipped ``bundled`` model (smaller than the ``tiny`` preset and trained, so the INT8 floors
are met; random ``tiny`` weights miss them) exports the fused pipeline to ONNX, ExecuTorch and Core ML, with the
three components for ONNX and Core ML and the encoder for ExecuTorch (cli/main_job._SMOKE_GRAPHS), makes the
INT8 of the ONNX pipeline and components and of the ExecuTorch and Core ML encoders, checks parity and benchmarks. These tests read its
folder: every artifact is there with the files its manifest lists (sha256-checked), loads in a fresh process
through :mod:`tadsr.runtime` and upscales a small image, and every parity verdict passed.

Test names carry the coverage table of ``benchmarks/test_tiers.py``: ``test_export_pipeline``,
``test_export_components``, ``test_int8``, ``test_runtime_run``, ``test_parity_verdict`` and ``test_tadsr_all``,
each parametrized by format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tadsr.runtime.runner import read_manifest, verify_files

FORMATS = ("onnx", "executorch", "coreml")
COMPONENTS = ("encoder", "denoiser", "decoder")
# the fp32 components the smoke exports per format (cli/main_job._SMOKE_GRAPHS: ExecuTorch lowers the fused
# pipeline and the encoder; its denoiser's single partition is checked inside the pipeline by test_export_executorch)
FP32_COMPONENTS = {"onnx": COMPONENTS, "executorch": ("encoder",), "coreml": COMPONENTS}
TILE = 64

# The INT8 artifacts of the smoke (cli/main_job._SMOKE_INT8): the ONNX fused pipeline and components, and the
# encoder alone for ExecuTorch and Core ML (their INT8 pipelines take minutes to lower or convert), Core ML's in
# W8A8 ("int8") and weight-only ("w8"). A kind is "pipeline", "components" (a runnable set of three) or one
# component's name.
INT8_SETS = {
    "onnx": [("pipeline", "int8"), ("components", "int8")],
    "executorch": [("encoder", "int8")],
    "coreml": [("encoder", "int8"), ("encoder", "w8")],  # both also checked by test_quantize::test_coreml_w8a8_and_w8
}
FP32_SETS = {fmt: [("pipeline", "fp32"), *([("components", "fp32")] if FP32_COMPONENTS[fmt] == COMPONENTS else
                   [(g, "fp32") for g in FP32_COMPONENTS[fmt]])] for fmt in FORMATS}  # fmt: skip
RUN_SETS = [pytest.param(fmt, kind, prec, id=f"{fmt}-{kind}-{prec}")
            for fmt in FORMATS for kind, prec in [*FP32_SETS[fmt], *INT8_SETS[fmt]]]


def _graphs(kind: str) -> tuple[str, ...]:
    return COMPONENTS if kind == "components" else (kind,)


def _folder(run_dir: Path, graph: str, fmt: str, precision: str) -> Path:
    sub = "artifacts" if precision in ("fp32", "fp16") else "int8"
    return run_dir / sub / f"{graph}-{fmt}-{precision}-t{TILE}"


def _complete(folder: Path) -> dict[str, Any]:
    """The folder's manifest after checking that every file it lists is there with its sha256."""
    assert folder.is_dir(), f"missing artifact folder {folder}"
    manifest = read_manifest(folder)
    assert manifest["files"], f"{folder}: manifest lists no model file"
    verify_files(folder, manifest)
    return manifest


def test_tadsr_all_smoke(tiny_all) -> None:
    """The smoke run itself: its exit code is the parity verdict (0: every report passed), and SUMMARY.md names
    every stage and holds the benchmark."""
    summary = (tiny_all.out / "SUMMARY.md").read_text()
    passed = all(e["passed"] for e in _parity(tiny_all.out))  # the verdicts themselves: test_parity_verdict
    assert tiny_all.rc == (0 if passed else 1), f"tadsr all --smoke exited {tiny_all.rc}:\n{tiny_all.log[-3000:]}"
    assert ("parity: PASS" if passed else "parity: FAIL") in summary
    assert "preset `bundled`" in summary and "smoke" in summary
    stages = [f"{verb} {fmt}{sub}" for fmt in FORMATS for verb, sub in (("export", ""), ("parity", " artifacts"),
                                                                         ("parity", " int8"))]  # fmt: skip
    for stage in ("load", "format lanes", *stages, "bench"):
        assert f"| {stage} |" in summary, f"SUMMARY.md lacks the {stage!r} stage"
    for stage in ("load", *stages, "bench"):  # each with its own peak RSS (GB)
        row = next(line for line in summary.splitlines() if line.startswith(f"| {stage} |"))
        assert float(row.split("|")[3]) > 0.1, row
    # the format lanes ran side by side in their own processes (the tier asks for all three at once: conftest),
    # each with its measured peak RSS
    assert "3 at once in separate processes" in summary
    for fmt in FORMATS:
        row = next(line for line in summary.splitlines() if line.startswith(f"| {fmt} | "))
        assert float(row.split("|")[3]) > 0.1, row  # peak RSS GB of the lane's own process
    assert "## Benchmark" in summary
    assert list((tiny_all.out / "bench").glob("*.json")), "no benchmark report"


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_pipeline(tiny_all, fmt: str) -> None:
    manifest = _complete(_folder(tiny_all.out, "pipeline", fmt, "fp32"))
    assert manifest["format"] == fmt and manifest["graph"]["name"] == "pipeline"
    assert manifest["parity_passed"] is True


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_components(tiny_all, fmt: str) -> None:
    for graph in FP32_COMPONENTS[fmt]:
        manifest = _complete(_folder(tiny_all.out, graph, fmt, "fp32"))
        assert manifest["graph"]["name"] == graph and manifest["parity_passed"] is True
    written = {d.name for d in (tiny_all.out / "artifacts").glob(f"*-{fmt}-*")}
    assert written == {_folder(tiny_all.out, g, fmt, "fp32").name for g in ("pipeline", *FP32_COMPONENTS[fmt])}


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8(tiny_all, fmt: str) -> None:
    """The INT8 artifacts of the smoke, each with the recipe that made it."""
    for kind, precision in INT8_SETS[fmt]:
        for graph in _graphs(kind):
            folder = _folder(tiny_all.out, graph, fmt, precision)
            manifest = _complete(folder)
            assert manifest["precision"] == precision
            assert (folder / "recipe.json").is_file(), f"{folder} has no recipe.json"
    written = {d.name for d in (tiny_all.out / "int8").glob(f"*-{fmt}-*")}
    assert written == {_folder(tiny_all.out, g, fmt, p).name for k, p in INT8_SETS[fmt] for g in _graphs(k)}


_RUN = """
import sys
import numpy as np
from tadsr.runtime.pipeline import MobileSRPipeline
pipe = MobileSRPipeline(dict(a.split("=", 1) for a in sys.argv[1:]))
lr = np.random.default_rng(0).uniform(-1, 1, (1, 3, 40, 48)).astype(np.float32)
sr = pipe.upscale(lr, seed=0)
assert sr.shape == (1, 3, 40 * pipe.scale, 48 * pipe.scale), sr.shape
assert np.isfinite(sr).all() and float(sr.std()) > 0, "non-finite or constant output"
print(pipe.description, "ok")
"""
# one component alone (not a runnable set): its runner on random inputs of its manifest's shapes
_RUN_ONE = """
import sys
import numpy as np
from tadsr.runtime.runner import load_runner
runner = load_runner(sys.argv[1].split("=", 1)[1])
rng = np.random.default_rng(0)
outs = runner.run({t.name: rng.uniform(-1, 1, t.shape).astype(t.dtype) for t in runner.spec.inputs})
assert outs and all(np.isfinite(v).all() and float(v.std()) > 0 for v in outs.values()), "non-finite or constant"
print(sorted(outs), "ok")
"""


@pytest.mark.parametrize("fmt, kind, precision", RUN_SETS)
def test_runtime_run(tiny_all, fmt: str, kind: str, precision: str) -> None:
    """Each artifact set loads in a fresh process (no torch modules pre-imported by the tests) and upscales a
    small image through tadsr.runtime."""
    graphs = _graphs(kind)
    args = [f"{g}={_folder(tiny_all.out, g, fmt, precision)}" for g in graphs]
    script = _RUN if kind in ("pipeline", "components") else _RUN_ONE
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, f"{fmt} {kind} {precision} failed in a fresh process:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("ok")


def _parity(run_dir: Path) -> list[dict[str, Any]]:
    entries = []
    for sub in ("artifacts", "int8"):
        path = run_dir / "parity" / sub / "parity.json"
        assert path.is_file(), f"missing parity report {path}"
        report = json.loads(path.read_text())
        entries += [*report["artifacts"], *report["sets"]]
    return entries


PARITY_CASES = [pytest.param(fmt, group, id=f"{fmt}-{group}") for fmt in FORMATS for group in ("fp32", "int8")]


@pytest.mark.parametrize("fmt, group", PARITY_CASES)
def test_parity_verdict(tiny_all, fmt: str, group: str) -> None:
    """Every artifact and whole-image set of the format (fp32 exports, or INT8) has a passing parity verdict."""
    precisions = {"fp32"} if group == "fp32" else {p for _, p in INT8_SETS[fmt]}
    entries = [e for e in _parity(tiny_all.out) if e["format"] == fmt and e["precision"] in precisions]
    checked = {Path(e["path"]).name for e in entries if "path" in e}
    if group == "fp32":
        want = {_folder(tiny_all.out, g, fmt, "fp32").name for g in ("pipeline", *FP32_COMPONENTS[fmt])}
    else:
        want = {_folder(tiny_all.out, g, fmt, p).name for k, p in INT8_SETS[fmt] for g in _graphs(k)}
    assert want <= checked, f"parity checked no verdict for {sorted(want - checked)}"
    runnable = group == "fp32" or any(k in ("pipeline", "components") for k, _ in INT8_SETS[fmt])
    assert not runnable or any("kind" in e for e in entries), f"no whole-image set check for {fmt} {group}"
    failed = [Path(e["path"]).name if "path" in e else f"{e['kind']} set" for e in entries if not e["passed"]]
    assert not failed, f"{fmt} {group} parity failures: {failed}"


def prefill_mismatches(out: Path, smoke: bool) -> list[str]:
    """Where the quick path's prefill request (cli/main_job.capture_request) differs from what the INT8 stages of
    the finished job in ``out`` recorded: their parent's preset and sources, their calibration and held-out patches
    (content hash, seed). Empty: the prefill's captures are the ones they read."""
    from tadsr.cli.main_job import SMOKE_DEFAULTS, MainJobConfig, capture_request
    from tadsr.pipeline import load_models

    cfg = MainJobConfig(out=out, smoke=smoke, num_patches=SMOKE_DEFAULTS["num_patches"] if smoke else None)
    manifest, calib, hold = capture_request(cfg, load_models(preset="bundled"))
    bad = []
    for folder in sorted((out / "int8").glob("*-onnx-int8-t64")):
        int8 = read_manifest(folder)
        parent = read_manifest(out / "artifacts" / folder.name.replace("-int8-", "-fp32-"))
        for what, mine, theirs in (("model", [manifest["preset"], manifest["sources"]],
                                    [parent["preset"], parent["sources"]]),
                                   ("calibration", [calib[0].content_hash, calib[1]["seed"]],
                                    [int8["calibration"]["content_hash"], int8["calibration"]["seed"]]),
                                   ("held-out", [hold[0].content_hash, hold[1]["seed"]],
                                    [int8["heldout"]["content_hash"], int8["heldout"]["seed"]])):  # fmt: skip
            if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
                bad.append(f"{folder.name}: {what}")
    return bad


def test_captures_prefilled_before_split_lanes_are_the_ones_int8_reads(tiny_all) -> None:
    """The quick path captures once before its graph-group lanes start (cli/main_job._prefill_captures); the
    lanes' INT8 stages only read them if the key is the one they compute from their fp32 artifact's manifest and
    their patches. The smoke's ONNX INT8 stages recorded theirs: the prefill's request must be the same."""
    assert list((tiny_all.out / "int8").glob("*-onnx-int8-t64")), "no ONNX INT8 folder in the smoke"
    assert prefill_mismatches(tiny_all.out, smoke=True) == []
