"""``tadsr all`` (the README's main job): bad input fails fast with exit 2; the exit code is the parity verdict;
``--smoke`` plans the reduced run. The real end-to-end run is tests/test_every_format.py (``tadsr all --smoke``)."""

from __future__ import annotations

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


@pytest.mark.parametrize("verdicts, want", [((True, True), 0), ((True, False), 1), ((False, True), 1)])
def test_exit_code_is_the_parity_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verdicts, want) -> None:
    """``tadsr all`` with every stage stubbed: it exits 1 exactly when a parity report (fp32 folders, INT8
    folders) failed, and says so."""
    calls: dict[str, list] = {"export": [], "quantize": [], "parity": [], "bench": []}
    _stub_stages(monkeypatch, tmp_path, calls, verdicts=iter(verdicts))
    out = tmp_path / "out"
    assert main(["-q", "all", "--jobs", "1", "--out", str(out), "--preset", "tiny", "--init", "random",
                 "--format", "onnx"]) == want  # fmt: skip
    assert ("parity: PASS" if want == 0 else "parity: FAIL") in (out / "SUMMARY.md").read_text()
    assert [kw["select"] for kw in calls["parity"]] == [
        [f"{g}-onnx-fp32-t64" for g in ("pipeline", "encoder", "denoiser", "decoder")],
        [f"{g}-onnx-int8-t64" for g in ("pipeline", "encoder", "denoiser", "decoder")]]  # fmt: skip


def _stub_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, calls: dict[str, list], verdicts=None) -> None:
    """Every stage of ``tadsr all`` replaced by a recorder (export returns one fp32 result per graph, INT8 one
    folder per fp32 artifact, parity the next of ``verdicts`` or a pass)."""
    from types import SimpleNamespace

    import tadsr.bench.bench
    import tadsr.export.api
    import tadsr.parity.check
    import tadsr.pipeline
    import tadsr.quantize.api
    from tadsr.parity.records import ParityResult

    def export(models, **kw):
        calls["export"].append(kw)
        graphs = [n for g in kw["graphs"] for n in (("encoder", "denoiser", "decoder") if g == "components" else (g,))]
        return [SimpleNamespace(precision=p, path=_artifact(kw["out_dir"] / f"{g}-{kw['formats'][0]}-{p}-t64",
                                                            sources=models.sources))
                for g in graphs for p in kw["precisions"]]  # fmt: skip

    def parity(path, **kw):
        calls["parity"].append(kw)
        passed = True if verdicts is None else next(verdicts)
        return ParityResult(path, [SimpleNamespace(passed=passed, error=None)])

    md = tmp_path / "bench.md"
    md.write_text("| system |\n")
    monkeypatch.setattr(tadsr.pipeline, "load_models", lambda **kw: _FakeModels())
    monkeypatch.setattr(tadsr.export.api, "export_model", export)
    monkeypatch.setattr(tadsr.quantize.api, "quantize_artifact",
                        lambda path, **kw: calls["quantize"].append((path.name, kw))
                        or [_artifact(kw["out_dir"] / path.name.replace("-fp32-", "-int8-"))])  # fmt: skip
    monkeypatch.setattr(tadsr.parity.check, "check_parity", parity)
    monkeypatch.setattr(tadsr.parity.check, "write_report", lambda *a, **kw: None)
    monkeypatch.setattr(tadsr.bench.bench, "run_bench",
                        lambda cfg, **kw: calls["bench"].append(cfg) or SimpleNamespace(files={"markdown": md}))  # fmt: skip


def _artifact(folder: Path, data: bytes | None = None, sources: dict | None = None) -> Path:
    """A minimal artifact folder: one model file (``data``, default the folder's name) and a manifest with its
    sha256."""
    import hashlib
    import json

    from tadsr.runtime.runner import SCHEMA_VERSION

    folder.mkdir(parents=True, exist_ok=True)
    data = folder.name.encode() if data is None else data
    (folder / "model.bin").write_bytes(data)
    graph, fmt, precision = folder.name.split("-")[:3]
    manifest = {"schema": SCHEMA_VERSION, "graph": graph, "format": fmt, "precision": precision,
                "files": [{"name": "model.bin", "sha256": hashlib.sha256(data).hexdigest()}], "sources": sources}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


class _FakeModels:
    """What the main job reads of the loaded models before its stages: the networks' parameter counts and the
    checkpoint digests."""

    def __init__(self, digest: str = "0" * 64) -> None:
        import torch

        self.student = self.autoencoder = torch.nn.Linear(2, 2)
        self.light_autoencoder = None
        self.sources = {"student": {"path": "s", "sha256": digest}, "autoencoder": {"path": "a", "sha256": digest}}


def test_smoke_plans_the_reduced_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--smoke``: every format exports the pipeline and components in fp32 (ExecuTorch: the encoder alone); INT8 of the ONNX pipeline and components
    and of the ExecuTorch and Core ML encoders only, the HR budget on the ONNX decoder only; small
    calibration, parity and benchmark settings. Without it, the full job's plan."""
    calls: dict[str, list] = {"export": [], "quantize": [], "parity": [], "bench": []}
    _stub_stages(monkeypatch, tmp_path, calls)
    assert main(["-q", "all", "--jobs", "1", "--smoke", "--out", str(tmp_path / "smoke")]) == 0
    assert [(c["formats"], c["graphs"], c["precisions"]) for c in calls["export"]] == [
        ((fmt,), graphs, ("fp32",)) for fmt, graphs in (("onnx", ("pipeline", "components")),
                                                        ("executorch", ("pipeline", "encoder")),
                                                        ("coreml", ("pipeline", "components")))]  # fmt: skip
    assert all(c["n_real"] == 1 for c in calls["export"])
    assert sorted(name for name, _ in calls["quantize"]) == sorted(
        ["pipeline-onnx-fp32-t64", "encoder-onnx-fp32-t64", "denoiser-onnx-fp32-t64", "decoder-onnx-fp32-t64",
         "encoder-executorch-fp32-t64", "encoder-coreml-fp32-t64"])  # fmt: skip
    assert all(kw["num_patches"] == 8 and kw["sensitivity_budget"] <= 8 and kw["parity_gate"] is False
               and "weight_only" not in kw for _, kw in calls["quantize"])  # fmt: skip (Core ML: W8A8 and W8)
    # the HR budget's searches run on the ONNX encoder and decoder; the other INT8 graphs keep the PSNR floor
    budget = sorted(name for name, kw in calls["quantize"] if kw.get("hr_budget_db", "default") is not None)
    assert budget == ["decoder-onnx-fp32-t64"], budget
    assert all(kw["options"].patches == 1 and kw["options"].whole_images == 1 for kw in calls["parity"])
    assert all(kw["options"].gate_tiles for kw in calls["parity"])  # the fp32 exports' gates ran these cases
    (bench,) = calls["bench"]
    assert bench.repeats == 1 and bench.teacher_steps == 15 and bench.max_images == 1
    summary = (tmp_path / "smoke" / "SUMMARY.md").read_text()
    assert "smoke" in summary and "one after the other in this process" in summary
    rows = [line.split("|") for line in summary.splitlines() if line.startswith(("| onnx |", "| coreml |"))]
    assert len(rows) == 2 and all(float(r[4]) > 0 for r in rows)  # the estimate is shown for in-process lanes too

    for recorded in calls.values():
        recorded.clear()
    assert main(["-q", "all", "--jobs", "1", "--out", str(tmp_path / "full")]) == 0
    assert [c["precisions"] for c in calls["export"]] == [("fp32",), ("fp32",), ("fp32", "fp16")]
    assert len(calls["quantize"]) == 4 + 4 + 1 and all(kw["num_patches"] is None for _, kw in calls["quantize"])
    (bench,) = calls["bench"]
    assert bench.repeats == 5 and bench.teacher_steps == 15 and bench.max_images is None


def test_light_runs_every_stage_on_the_light_autoencoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tadsr all --light`` / ``--light-autoencoder CKPT``: the models every stage gets carry the light
    autoencoder (exports, INT8 and parity read it back from the manifests; bench gets the same models)."""
    import tadsr.pipeline

    calls: dict[str, list] = {"export": [], "quantize": [], "parity": [], "bench": [], "load": []}
    _stub_stages(monkeypatch, tmp_path, calls)
    monkeypatch.setattr(tadsr.pipeline, "load_models", lambda **kw: calls["load"].append(kw) or _FakeModels())
    assert main(["-q", "all", "--jobs", "1", "--smoke", "--light", "--format", "onnx",
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    assert calls["load"][-1]["light_autoencoder"] is True
    assert "light autoencoder (shipped)" in (tmp_path / "a" / "SUMMARY.md").read_text()
    ckpt = tmp_path / "light.safetensors"
    assert main(["-q", "all", "--jobs", "1", "--smoke", "--light-autoencoder", str(ckpt), "--format", "onnx",
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    assert calls["load"][-1]["light_autoencoder"] == ckpt
    assert main(["-q", "all", "--jobs", "1", "--smoke", "--format", "onnx", "--out", str(tmp_path / "c")]) == 0
    assert calls["load"][-1]["light_autoencoder"] is None


def test_resume_reuses_finished_intact_stages_with_the_same_inputs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``--resume`` skips the export and INT8 stages an earlier run finished with the same inputs; a damaged
    folder, another checkpoint or no ``--resume`` redoes them; parity always runs."""
    import tadsr.pipeline

    calls: dict[str, list] = {"export": [], "quantize": [], "parity": [], "bench": []}
    _stub_stages(monkeypatch, tmp_path, calls)
    out = tmp_path / "out"
    args = ["-q", "all", "--jobs", "1", "--smoke", "--format", "onnx", "coreml", "--out", str(out)]
    assert main(args) == 0
    assert (len(calls["export"]), len(calls["quantize"]), len(calls["parity"])) == (2, 5, 4)
    for recorded in calls.values():
        recorded.clear()
    assert main([*args, "--resume"]) == 0  # everything reused
    assert (len(calls["export"]), len(calls["quantize"]), len(calls["parity"])) == (0, 0, 4)
    assert main(args) == 0  # without --resume: all again
    assert (len(calls["export"]), len(calls["quantize"])) == (2, 5)
    for recorded in calls.values():
        recorded.clear()
    (out / "int8" / "decoder-onnx-int8-t64" / "model.bin").write_bytes(b"truncated")
    (out / "artifacts" / "pipeline-coreml-fp32-t64" / "model.bin").unlink()
    assert main([*args, "--resume"]) == 0  # the damaged INT8 folder, the whole Core ML lane
    assert [c["formats"] for c in calls["export"]] == [("coreml",)]
    # the re-exported Core ML pipeline has the same bytes: its INT8 folder is reused
    assert [name for name, _ in calls["quantize"]] == ["decoder-onnx-fp32-t64"]
    for recorded in calls.values():
        recorded.clear()
    _artifact(out / "artifacts" / "encoder-onnx-fp32-t64", b"re-exported with other bytes")  # INT8 of it again
    assert main([*args, "--resume"]) == 0
    assert (len(calls["export"]), [name for name, _ in calls["quantize"]]) == (0, ["encoder-onnx-fp32-t64"])
    for recorded in calls.values():
        recorded.clear()
    monkeypatch.setattr(tadsr.pipeline, "load_models", lambda **kw: _FakeModels("1" * 64))  # another checkpoint
    assert main([*args, "--resume"]) == 0
    assert (len(calls["export"]), len(calls["quantize"])) == (2, 5)


def test_a_stage_key_changes_with_its_inputs_and_the_toolkit(monkeypatch: pytest.MonkeyPatch) -> None:
    """An edited tadsr (its source digest) or other settings give another key: nothing stale is reused."""
    from tadsr.cli import resume

    key = resume.stage_key(format="onnx", tile=64)
    assert key == resume.stage_key(tile=64, format="onnx") and key != resume.stage_key(format="onnx", tile=128)
    assert len(resume.source_digest()) == 64
    monkeypatch.setattr(resume, "source_digest", lambda: "edited")
    assert resume.stage_key(format="onnx", tile=64) != key


def test_a_single_format_runs_its_graph_groups_as_lanes_side_by_side(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """With fewer formats than CPUs (the quick path ``--format onnx`` on 2 cores) a format that exports the fused
    pipeline and the components becomes one lane per group; each lane exports, quantizes and checks its own
    group only. With as many formats as slots (the README's main job on 2 cores) or one slot, one lane per format."""
    from tadsr.cli.main_job import MainJobConfig, _lane, _lane_names, lane_format

    cfg = MainJobConfig(out=tmp_path / "out", formats=("onnx",))
    assert _lane_names(cfg, 2) == ["onnx:pipeline", "onnx:components"] and _lane_names(cfg, 1) == ["onnx"]
    two = MainJobConfig(out=tmp_path / "out", formats=("onnx", "coreml"))
    assert _lane_names(two, 2) == ["onnx", "coreml"]
    assert _lane_names(two, 4) == ["onnx:pipeline", "onnx:components", "coreml"]  # Core ML: the pipeline alone
    assert _lane_names(MainJobConfig(out=tmp_path, formats=("onnx", "executorch", "coreml")), 2) == [
        "onnx", "executorch", "coreml"]  # fmt: skip
    assert [lane_format(n) for n in ("onnx", "onnx:components")] == ["onnx", "onnx"]

    calls: dict[str, list] = {"export": [], "quantize": [], "parity": [], "bench": []}
    _stub_stages(monkeypatch, tmp_path, calls)
    for lane, graphs in (("onnx:pipeline", ["pipeline"]), ("onnx:components", ["encoder", "denoiser", "decoder"])):
        for recorded in calls.values():
            recorded.clear()
        res = _lane(cfg, lane, _FakeModels(), captures=None)
        assert res.fmt == lane and [c["graphs"] for c in calls["export"]] == [(lane.split(":")[1],)]
        assert [name for name, _ in calls["quantize"]] == [f"{g}-onnx-fp32-t64" for g in graphs]
        assert [kw["select"] for kw in calls["parity"]] == [[f"{g}-onnx-{p}-t64" for g in graphs]
                                                            for p in ("fp32", "int8")]  # fmt: skip
        assert set(res.timings) == {f"export {lane}", *(f"quantize {g}-onnx-fp32-t64" for g in graphs),
                                    f"parity {lane} artifacts", f"parity {lane} int8"}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out" / ".resume").iterdir()) == ["onnx_components.json",
                                                                                "onnx_pipeline.json"]  # fmt: skip


def test_a_lane_stage_starts_on_the_cpus_the_finished_lanes_left(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """In a lane process whose threads were not fixed, a stage starts on the thread share run_lanes gives it now
    (torch's and cfg.threads, which the runtimes read); a fixed ``--threads`` or a smaller share changes nothing."""
    import torch

    from tadsr.cli import lanes
    from tadsr.cli.main_job import MainJobConfig, _stage

    share = tmp_path / "threads"
    share.write_text("2")
    monkeypatch.setenv(lanes.SHARE_ENV, str(share))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cfg = MainJobConfig(out=tmp_path, threads=1, grow_threads=True)
        assert _stage(cfg, "a", lambda: (cfg.threads, torch.get_num_threads())) == (2, 2)
        share.write_text("1")
        assert _stage(cfg, "b", lambda: cfg.threads) == 2  # never fewer
        torch.set_num_threads(1)
        fixed = MainJobConfig(out=tmp_path, threads=1)  # --threads 1 (grow_threads stays False)
        share.write_text("2")
        assert _stage(fixed, "c", lambda: (fixed.threads, torch.get_num_threads())) == (1, 1)
    finally:
        torch.set_num_threads(before)


def test_each_stage_records_its_own_peak_rss(tmp_path: Path) -> None:
    """A stage's peak RSS is its own (the kernel's mark restarts when it starts), not the process's peak so far."""
    import mmap

    import numpy as np

    from tadsr import memory
    from tadsr.cli.main_job import MainJobConfig, _stage

    if not memory.reset_peak():
        pytest.skip("no resettable RSS high-water mark here (Linux /proc/self/clear_refs)")
    cfg = MainJobConfig(out=tmp_path)

    def big() -> None:  # 400 MB of fresh pages, every one touched (not memory the allocator already holds)
        with mmap.mmap(-1, 400_000_000) as m:
            np.frombuffer(m, dtype=np.uint8)[::4096] = 1

    _stage(cfg, "big", big)
    _stage(cfg, "small", lambda: None)
    assert cfg.stage_rss["big"] - cfg.stage_rss["small"] > 0.3, cfg.stage_rss


def test_trim_hands_the_freed_heap_back() -> None:
    """Small allocations freed behind survivors stay resident in the C heap until memory.trim() returns them."""
    import numpy as np

    from tadsr import memory

    if memory.rss_bytes() is None:
        pytest.skip("no /proc/self/status here")
    keep, junk = [], []
    for i in range(60_000):  # 240 MB in 4 KB buffers (malloc'd), a 16-byte survivor every 50 pinning the heap
        junk.append(np.ones(4000, np.uint8))
        if i % 50 == 0:
            keep.append(np.ones(16, np.uint8))
    del junk
    before = memory.rss_bytes()
    if not memory.trim():
        pytest.skip("no glibc malloc_trim here")
    assert before - memory.rss_bytes() > 100e6, (before, memory.rss_bytes(), len(keep))
