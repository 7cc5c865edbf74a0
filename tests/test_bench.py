"""Benchmark harness: a smoke run of the whole report on the tiny preset, plus the cheap parts on their own.

One ``run_bench`` (module fixture) on two 96x80 HR crops of the shipped calibration set: bicubic, the PyTorch
student, the 15-step teacher and the tiny ONNX fp32 artifacts (fused and components; exported once per session by
conftest's ``tiny_onnx_artifacts`` when it exists, else once here), 2 timed runs, memory in process. Everything
else (ratios, CLI parsing, paired data, Core ML listing, the memory probe of bicubic) costs milliseconds to seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tadsr.runtime.tiling import tile_noise

from tadsr.bench.bench import BenchConfig, SystemResult, compute_ratios, load_images, run_bench
from tadsr.cli.bench import add_bench_parser, config_from_args
from tadsr.bench.systems import STAGES, ArtifactSet, find_artifact_sets, probe_memory
from tadsr.errors import ConfigError, InputError
from tadsr.imresize import imresize

CALIB = Path(__file__).resolve().parents[1] / "tadsr" / "data" / "calib"
EXPECTED = {"bicubic", "torch-student", "torch-teacher-T15", "onnx-fp32-fused", "onnx-fp32-components"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench-data")
    for i in (0, 1):
        with Image.open(CALIB / f"calib_00{i}.png") as im:
            im.convert("RGB").crop((40, 60, 136, 140)).save(d / f"img{i}.png")  # 96x80
    return d


@pytest.fixture(scope="module")
def artifacts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Path:
    try:
        return request.getfixturevalue("tiny_onnx_artifacts")
    except pytest.FixtureLookupError:
        from tadsr.export.api import export_model

        out = tmp_path_factory.mktemp("bench-artifacts")
        export_model(tiny_models, graphs=("pipeline", "components"), tile=64, out_dir=out, n_real=1,
                     backend_options={"onnx": {"optimize": False}})  # fmt: skip
        return out


@pytest.fixture(scope="module")
def bench(artifacts: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory, tiny_models):
    cfg = BenchConfig(out_dir=tmp_path_factory.mktemp("bench-out") / "report", data=data_dir, artifacts=(artifacts,),
                      preset="tiny", init="random", teacher_steps=15, threads=1, repeats=2, warmup=0,
                      memory="inprocess", grid_crop=64)  # fmt: skip
    return run_bench(cfg, models=tiny_models)


def _numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def test_report_structure(bench):
    report = json.loads(bench.files["json"].read_text())
    assert report == json.loads(json.dumps(bench.report))
    assert set(bench.files) == {"json", "markdown", "latency_psnr", "stage_latency", "grid"}
    assert {"cpu", "cores_logical", "os", "python", "load_avg_start", "load_avg_end"} <= set(report["machine"])
    assert report["versions"]["torch"] and report["versions"]["onnxruntime"]
    c = report["conditions"]
    assert (c["tile"], c["overlap"], c["seed"], c["repeats"], c["teacher_steps"]) == (64, 16, 0, 2, 15)
    assert c["threads"]["torch"] == 1 and c["threads"]["onnxruntime_intra_op"] == 1
    assert "executorch_threadpool" not in c["threads"]  # only the benchmarked formats' runtimes are asked
    assert "ONNX Runtime intra-op 1" in bench.files["markdown"].read_text()
    assert [i["hr_size"] for i in c["data"]["images"]] == [[96, 80], [96, 80]]
    systems = {s["name"]: s for s in report["systems"]}
    assert set(systems) == EXPECTED
    for name, s in systems.items():
        assert s["status"] == "ok", (name, s["note"])
        staged = name.startswith("torch") or s["layout"] == "components"
        assert set(s["latency"]) == ({"e2e", *STAGES} if staged else {"e2e"}), name
        assert all(v["runs"] == 2 and len(v["runs_ms"]) == 2 for v in s["latency"].values())
        assert set(s["fidelity"]["mean"]) >= {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"}
        assert len(s["fidelity"]["images"]) == 2
        assert s["memory"]["method"] in ("inprocess-vmhwm", "inprocess-maxrss-delta")
    assert systems["onnx-fp32-components"]["size_bytes"] > 0 and systems["torch-student"]["size_bytes"] > 0
    bad = [(p, v) for p, v in _numbers(report) if not math.isfinite(v)]
    assert bad == []
    warnings = " ".join(report["warnings"])
    assert "smoke numbers" in warnings and "random weights" in warnings
    leftovers = [p.name for p in bench.files["json"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_stage_timings_and_ratios(bench):
    """Structure, not speed: 2 timed runs on a shared CPU cannot order systems reliably (speed claims are measured
    in benchmarks/, with >= 5 repeats). Stage times come from the same passes as end-to-end times, and every ratio
    is the quotient of the medians it names."""
    lat = {s.name: s.latency for s in bench.systems}
    for s in lat.values():  # stage times come from the same passes: they fit inside each pass's end-to-end time
        if "encoder" in s:
            for i, e2e in enumerate(s["e2e"]["runs_ms"]):
                assert sum(s[k]["runs_ms"][i] for k in STAGES) <= e2e + 0.01
        for v in s.values():
            assert min(v["runs_ms"]) == pytest.approx(v["min_ms"], abs=1e-3)
            assert v["median_ms"] == pytest.approx(float(np.median(v["runs_ms"])), abs=1e-3)
    r = bench.report["ratios"]
    st = r["student_vs_teacher"]
    assert (st["numerator"], st["denominator"]) == ("torch-student", "torch-teacher-T15")
    student, teacher = lat["torch-student"], lat["torch-teacher-T15"]
    for k, ratio in st["latency"].items():
        assert ratio == pytest.approx(student[k]["median_ms"] / teacher[k]["median_ms"], abs=2e-4), k
    assert st["speedup_e2e"] == pytest.approx(1 / st["latency"]["e2e"], rel=1e-2)
    assert {e["numerator"] for e in r["export_vs_eager"]} == {"onnx-fp32-fused", "onnx-fp32-components"}
    assert set(r["export_vs_eager"][1]["latency"]) | set(r["export_vs_eager"][0]["latency"]) == {"e2e", *STAGES}
    for e in r["export_vs_eager"]:
        assert e["latency"]["e2e"] == pytest.approx(
            lat[e["numerator"]]["e2e"]["median_ms"] / student["e2e"]["median_ms"], abs=2e-4)


def test_same_tiles_and_noise_for_every_system(bench):
    fid = {s.name: s.fidelity["mean"] for s in bench.systems}
    assert fid["torch-student"]["parity_psnr"] == 999.0  # the reference itself
    for name in ("onnx-fp32-fused", "onnx-fp32-components"):
        assert fid[name]["parity_psnr"] > 60, name  # same tiles, same noise: agreement to float rounding
        assert abs(fid[name]["psnr_y"] - fid["torch-student"]["psnr_y"]) < 0.05
    assert fid["torch-teacher-T15"]["parity_psnr"] < 60  # a different sampler


def test_markdown_plots_and_grid(bench):
    md = bench.files["markdown"].read_text()
    assert md.startswith("# tadsr bench") and "| system | layout |" in md and "Per stage" in md
    assert all(f"| {name} |" in md for name in EXPECTED)
    assert "torch-student / torch-teacher-T15" in md
    for kind in ("latency_psnr", "stage_latency", "grid"):
        with Image.open(bench.files[kind]) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 50
    with Image.open(bench.files["grid"]) as im:  # 5 columns (bicubic, teacher, student, artifact, HR) of 80x64 x2
        assert im.size[0] == 4 + 5 * (128 + 4)


def test_teacher_prior_noise_is_the_student_noise():
    big = tile_noise(3, 64, 0, (15 * 3, 64, 64))
    assert np.array_equal(big.reshape(15, 3, 64, 64)[0], tile_noise(3, 64, 0, (3, 64, 64)))


def _sr(name, kind, fmt, prec, layout, e2e, stages=None, psnr_y=None, size=None, sim=False):
    lat = {"e2e": {"median_ms": e2e}, **{k: {"median_ms": v} for k, v in (stages or {}).items()}}
    fid = {"mean": {"psnr_y": psnr_y, "parity_psnr": psnr_y}} if psnr_y is not None else {}
    return SystemResult(name, kind, fmt, prec, layout, latency=lat, fidelity=fid, size_bytes=size, simulator=sim)


def test_ratios():
    st = dict(encoder=10.0, denoiser=2.0, decoder=20.0)
    results = [
        _sr("torch-student", "torch", "torch", "fp32", "reference", 32.0, st, 25.0),
        _sr("torch-teacher-T15", "torch", "torch", "fp32", "reference", 60.0, dict(st, denoiser=30.0), 26.0),
        _sr("onnx-fp32-components", "artifact", "onnx", "fp32", "components", 16.0, dict(encoder=5.0, denoiser=1.0,
            decoder=10.0), 25.0, size=400),  # fmt: skip
        _sr("onnx-int8-components", "artifact", "onnx", "int8", "components", 8.0, dict(encoder=2.5, denoiser=0.5,
            decoder=5.0), 24.5, size=100),  # fmt: skip
        _sr("coreml-fp32-fused", "artifact", "coreml", "fp32", "fused", 0.0),
    ]
    results[-1].status = "needs macOS"
    r = compute_ratios(results)
    lat = r["student_vs_teacher"]["latency"]
    assert lat == {"e2e": round(32 / 60, 4), "encoder": 1.0, "denoiser": round(2 / 30, 4), "decoder": 1.0}
    assert r["student_vs_teacher"]["psnr_y_delta_db"] == -1.0
    (exp,) = r["export_vs_eager"]
    assert exp["numerator"] == "onnx-fp32-components" and exp["latency"]["e2e"] == 0.5
    (q,) = r["int8_vs_fp32"]
    assert (q["denominator"], q["latency"]["denoiser"], q["size"], q["psnr_y_delta_db"]) == (
        "onnx-fp32-components", 0.5, 0.25, -0.5)  # fmt: skip


def test_cli_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--artifacts", "a", "b", "--data", "d", "--preset", "tiny", "--init", "random",
                              "--threads", "2", "--teacher-steps", "4", "--out", str(tmp_path)])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.artifacts, cfg.threads, cfg.teacher_steps, cfg.repeats, cfg.memory) == (
        (Path("a"), Path("b")), 2, 4, 5, "subprocess")  # fmt: skip
    assert args.func.__name__ == "run_bench_cli"
    with pytest.raises(ConfigError, match="at least 5"):
        config_from_args(parser.parse_args(["bench", "--repeats", "3", "--out", str(tmp_path)]))
    assert config_from_args(parser.parse_args(["bench", "--repeats", "1", "--smoke", "--out", "x"])).repeats == 1
    with pytest.raises(ConfigError):
        BenchConfig(out_dir=tmp_path, memory="psutil")


def test_paired_lr_folder(tmp_path):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir(), lr_dir.mkdir()
    hr = np.random.default_rng(0).integers(0, 256, (80, 98, 3), dtype=np.uint8)  # 98: not a multiple of 4
    Image.fromarray(hr).save(hr_dir / "a.png")
    lr = np.clip(np.round(imresize(hr[:, :96].astype(np.float64) / 255, 0.25) * 255), 0, 255).astype(np.uint8)
    Image.fromarray(lr).save(lr_dir / "ax4.png")
    (paired,), info = load_images(hr_dir, lr_dir=lr_dir)
    (computed,), _ = load_images(hr_dir)
    assert paired.hr.shape == computed.hr.shape == (80, 96, 3) and paired.lr.shape == (1, 3, 20, 24)
    np.testing.assert_allclose(paired.lr, computed.lr, atol=1e-6)
    assert info["lr_source"] == "files"
    (cropped,), _ = load_images(hr_dir, lr_dir=lr_dir, hr_crop=40)
    assert cropped.hr.shape == (40, 40, 3) and cropped.lr.shape == (1, 3, 10, 10)
    Image.fromarray(lr[:10]).save(lr_dir / "ax4.png")
    with pytest.raises(InputError, match="HR / 4"):
        load_images(hr_dir, lr_dir=lr_dir)


def test_artifact_sets_and_coreml_listing(artifacts, tiny_models, tmp_path):
    from tadsr.bench.bench import _systems

    sets = {s.name: s for s in find_artifact_sets([artifacts])}
    assert set(sets) == {"onnx-fp32-fused", "onnx-fp32-components"}
    assert set(sets["onnx-fp32-components"].dirs) == set(STAGES) and sets["onnx-fp32-fused"].preset == "tiny"
    with pytest.raises(InputError, match="only the 'encoder' graph"):
        find_artifact_sets([sets["onnx-fp32-components"].dirs["encoder"]])
    man = {"preset": {"name": "tiny"}, "files": [{"bytes": 1234}], "sources": {}}
    coreml = ArtifactSet("coreml-fp32-fused", "coreml", "fp32", 64, "fused", {"pipeline": tmp_path}, {"pipeline": man})
    cfg = BenchConfig(out_dir=tmp_path, teacher_steps=0, coreml_sim=True)
    plan = {r.name: (sys_, r) for sys_, r in _systems(cfg, tiny_models, [coreml])}
    assert set(plan) >= {"bicubic", "torch-student"} and not any(n.startswith("torch-teacher") for n in plan)
    import sys

    if sys.platform != "darwin":
        sys_, rec = plan["coreml-fp32-fused"]
        assert sys_ is None and rec.status == "needs macOS" and rec.size_bytes == 1234
        sim, rec = plan["coreml-fp32-fused [coreml-sim]"]
        assert sim is not None and rec.simulator and "NOT latencies" in rec.note


def test_memory_probe_in_a_fresh_process(artifacts):
    out = probe_memory({"kind": "bicubic", "threads": 1, "seed": 0}, 64)
    assert "error" not in out, out
    assert out["method"] == "subprocess" and out["peak_rss_bytes"] >= 0.9 * out["rss_after_load_bytes"] > 0
    assert out["torch_imported"] is False
    assert out["peak_rss_lifetime_bytes"] < 250e6  # the child's own peak, not this (torch-laden) process's
    fused = next(s for s in find_artifact_sets([artifacts]) if s.layout == "fused")
    spec = {"kind": "artifact", "threads": 1, "seed": 0, "format": "onnx", "backend": None,
            "dirs": {k: str(v) for k, v in fused.dirs.items()}}  # fmt: skip
    out = probe_memory(spec, 64)
    assert "error" not in out, out
    assert out["torch_imported"] is False and out["peak_rss_lifetime_bytes"] >= out["peak_rss_bytes"] > 0


def test_cli_latency_only_run(tmp_path, tiny_models, capsys, monkeypatch):
    """No data: latency on a seeded tile, no fidelity plots or grid; the Markdown goes to stdout."""
    import tadsr.bench.bench

    real = tadsr.bench.bench.run_bench
    monkeypatch.setattr(tadsr.bench.bench, "run_bench", lambda cfg, **kw: real(cfg, models=tiny_models, **kw))
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--preset", "tiny", "--init", "random", "--teacher-steps", "0", "--threads", "1",
                              "--repeats", "1", "--smoke", "--warmup", "0", "--memory", "off", "--no-progress",
                              "--out", str(tmp_path / "rep")])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| torch-student | reference |" in out and "json:" in out
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [s["name"] for s in report["systems"]] == ["bicubic", "torch-student"]
    assert report["conditions"]["data"] is None and "seeded" in report["conditions"]["latency_input"]
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.json", "report.md", "stage_latency.png"]


def test_atomic_write_leaves_an_ordinary_file(tmp_path) -> None:
    import os
    import stat

    from tadsr.bench.report import atomic_write

    p = atomic_write(tmp_path / "report.json", b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert p.read_bytes() == b"{}"
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert [q.name for q in tmp_path.iterdir()] == ["report.json"]


def test_sanity_metrics_and_red_rows(bench):
    """LR consistency, colour error and the do-nothing baseline are measured; failing systems are red rows."""
    from tadsr.metrics import sanity_failures

    report = bench.report
    dn = report["baselines"]["do_nothing"]
    assert len(dn["images"]) == 2 and {"psnr_y", "lr_cons", "lr_cons_worst", "de00"} <= set(dn["mean"])
    md = bench.files["markdown"].read_text()
    assert "*do-nothing baseline*" in md
    for s in report["systems"]:
        f = s["fidelity"]
        assert {"lr_cons", "lr_cons_worst", "de00"} <= set(f["mean"]), s["name"]
        lr_cons = [p["lr_cons"] for p in f["images"]]
        assert f["mean"]["lr_cons_worst"] == pytest.approx(min(lr_cons), abs=1e-3)
        is_model = s["kind"] != "bicubic"
        expect = sanity_failures(lr_cons, f["mean"]["psnr_y"] if is_model else None,
                                 dn["mean"]["psnr_y"] if is_model else None)  # fmt: skip
        assert f["sanity"] == {"fail": bool(expect), "reasons": expect}, s["name"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {s['name']} |"))
        assert row.endswith("| ❌ FAIL |" if expect else "| ✅ pass |"), row
    # random weights: the student cannot explain its input
    student = next(s for s in report["systems"] if s["name"] == "torch-student")
    assert student["fidelity"]["sanity"]["fail"] and "❌ FAIL torch-student: " in md


def test_fidelity_passes_count_as_warm_up(data_dir, tiny_models, tmp_path, monkeypatch):
    """Each system's fidelity passes (same tile size, before its timed ones) stand in for its warm-up passes: with
    two images and ``warmup=3`` one untimed pass is left; without images all three run."""
    import tadsr.bench.bench as bench_mod

    seen: list[int] = []
    real = bench_mod.measure_latency

    def spy(*a, **kw):
        seen.append(kw["warmup"])
        return real(*a, **kw)

    monkeypatch.setattr(bench_mod, "measure_latency", spy)
    for data, want in ((data_dir, 1), (None, 3)):
        seen.clear()
        cfg = BenchConfig(out_dir=tmp_path / f"r{want}", data=data, artifacts=(), preset="tiny", init="random",
                          teacher_steps=0, threads=1, repeats=1, warmup=3, memory="off", grid_crop=64,
                          max_images=2, hr_crop=64)  # fmt: skip
        run_bench(cfg, models=tiny_models)
        assert seen and set(seen) == {want}, (data, seen)


def test_colour_fix_rows_are_the_reference_and_floor_of_fixed_artifacts(data_dir, tiny_models, tmp_path):
    """An artifact exported with ``--color-fix luma`` is compared with ``torch-student [luma]`` and must beat the
    do-nothing path with the same fix; both rows appear even though the bench was not asked for a fix."""
    from tadsr.export.api import export_model
    from tadsr.metrics import sanity_failures

    export_model(tiny_models, graphs=("pipeline",), tile=64, out_dir=tmp_path / "a", n_real=1, color_fix="luma",
                 backend_options={"onnx": {"optimize": False}})  # fmt: skip
    cfg = BenchConfig(out_dir=tmp_path / "r", data=data_dir, artifacts=(tmp_path / "a",), preset="tiny",
                      init="random", teacher_steps=0, threads=1, repeats=1, warmup=0, memory="off", grid_crop=64,
                      max_images=1)  # fmt: skip
    result = run_bench(cfg, models=tiny_models)
    report = result.report
    systems = {s["name"]: s for s in report["systems"]}
    assert set(systems) == {"bicubic", "torch-student", "torch-student [luma]", "onnx-fp32-fused"}
    art, fixed, plain = systems["onnx-fp32-fused"], systems["torch-student [luma]"], systems["torch-student"]
    assert art["color_fix"] == fixed["color_fix"] == "luma" and plain["color_fix"] == "none"
    assert art["fidelity"]["mean"]["parity_psnr"] > 60  # the same computation as its reference
    assert fixed["fidelity"]["mean"]["psnr_y"] != plain["fidelity"]["mean"]["psnr_y"]
    assert set(report["baselines"]) == {"do_nothing", "do_nothing [luma]"}
    floors = {k: b["mean"]["psnr_y"] for k, b in report["baselines"].items()}
    assert floors["do_nothing"] != floors["do_nothing [luma]"]
    for s, floor in ((art, floors["do_nothing [luma]"]), (fixed, floors["do_nothing [luma]"]),
                     (plain, floors["do_nothing"])):  # fmt: skip
        f = s["fidelity"]
        expect = sanity_failures([p["lr_cons"] for p in f["images"]], f["mean"]["psnr_y"], floor)
        assert f["sanity"]["reasons"] == expect, s["name"]
    assert "| *do-nothing baseline [luma]* |" in result.files["markdown"].read_text()
    with pytest.raises(ConfigError, match="wavelet"):
        BenchConfig(out_dir=tmp_path, color_fix="histogram")
