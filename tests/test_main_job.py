"""``tadsr all`` (the README's main job): bad input fails fast with exit 2; a tiny ONNX run end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tadsr.cli import main


def test_bad_input_fails_before_any_work(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["-q", "all", "--out", str(f)]) == 2  # --out is a file
    assert main(["-q", "all", "--out", str(tmp_path / "o"), "--format", "tflite"]) == 2
    assert main(["-q", "all", "--out", str(tmp_path / "o"), "--tile", "48"]) == 2
    assert main(["-q", "all", "--out", str(tmp_path / "o"), "--student", str(tmp_path / "missing.pth")]) == 2
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.onnx"))


@pytest.mark.slow
def test_tiny_onnx_main_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["-q", "all", "--out", str(out), "--preset", "tiny", "--init", "random", "--format", "onnx",
               "--num-patches", "8", "--repeats", "5", "--teacher-steps", "2", "--threads", "2"])  # fmt: skip
    summary = (out / "SUMMARY.md").read_text()
    assert "preset `tiny` (random weights)" in summary and "## Benchmark" in summary
    report = json.loads(next((out / "bench").glob("*.json")).read_text())
    assert report and (out / "parity" / "artifacts" / "parity.json").exists()
    assert sorted(p.name for p in (out / "int8").iterdir() if p.is_dir()) == [
        "decoder-onnx-int8-t64", "denoiser-onnx-int8-t64", "encoder-onnx-int8-t64", "pipeline-onnx-int8-t64"]
    # the exit code is the parity verdict: 0 when both reports passed, 1 when one failed (random INT8 weights may
    # miss a floor; the report says which)
    reports = [out / "parity" / sub / "parity.json" for sub in ("artifacts", "int8")]
    verdicts = [json.loads(p.read_text())["passed"] for p in reports]
    assert rc == (0 if all(verdicts) else 1), (rc, verdicts)


@pytest.mark.parametrize("verdicts, want", [((True, True), 0), ((True, False), 1), ((False, True), 1)])
def test_exit_code_is_the_parity_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verdicts, want) -> None:
    """``tadsr all`` with every stage stubbed: it exits 1 exactly when a parity report failed, and says so."""
    from types import SimpleNamespace

    import tadsr.bench.bench
    import tadsr.export.api
    import tadsr.parity.check
    import tadsr.pipeline
    import tadsr.quantize.api

    results = iter(verdicts)
    md = tmp_path / "bench.md"
    md.write_text("| system |\n")
    monkeypatch.setattr(tadsr.pipeline, "load_models", lambda **kw: object())
    monkeypatch.setattr(tadsr.export.api, "export_model",
                        lambda *a, **kw: kw["out_dir"].mkdir(parents=True, exist_ok=True) or [])  # fmt: skip
    monkeypatch.setattr(tadsr.quantize.api, "quantize_artifact", lambda *a, **kw: [])
    monkeypatch.setattr(tadsr.parity.check, "check_parity", lambda *a, **kw: SimpleNamespace(passed=next(results)))
    monkeypatch.setattr(tadsr.parity.check, "write_report", lambda *a, **kw: None)
    monkeypatch.setattr(tadsr.bench.bench, "run_bench", lambda *a, **kw: SimpleNamespace(files={"markdown": md}))
    out = tmp_path / "out"
    assert main(["-q", "all", "--out", str(out), "--preset", "tiny", "--init", "random", "--format", "onnx"]) == want
    assert ("parity: PASS" if want == 0 else "parity: FAIL") in (out / "SUMMARY.md").read_text()
