"""``tadsr parity`` on the tiny preset's real ONNX artifacts: verdicts, diagnoses, reports, exit codes.

Uses the session's tiny ONNX export (``tiny_onnx_artifacts`` in conftest: pipeline + encoder/denoiser/decoder,
exported once for all test modules) and copies what it corrupts:

* clean artifacts pass, each output with max abs, mean abs, PSNR and SSIM, and so do whole images;
* one component set with two corruptions, checked in one call: a decoder with a conv weight of
  ``decoder.up.1`` scaled inside the ONNX file (manifest sha256 fixed, so the file is accepted) -> named
  ``decoder.up.1``; a denoiser whose manifest states a wrong ``prior_noise_scale`` -> the component set fails
  on whole images and the stage chain names ``prior sample``;
* (slow) a fused pipeline with its ``noise_scale`` constant changed inside the ONNX file -> ``prior sample``
  (tests/test_localize.py checks the same on a toy pipeline in a second);
* a file modified without fixing its manifest fails the integrity check and is still diagnosed;
* the CLI: exit 0 / 1 / 2, Markdown on stdout, parity.json + parity.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tadsr.runtime.runner import sha256_path

from tadsr.errors import ConfigError, InputError
from tadsr.parity.check import ParityOptions, ReferenceSpec, check_parity, render_markdown
from tadsr.cli.parity import main
from tadsr.parity.hops import load_floors

FAST = {"patches": 1, "whole_images": 1, "max_side": 64, "threads": 1}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread, restored after


def _copy(src: Path, dst: Path, graph: str) -> Path:
    d = dst / f"{graph}-onnx-fp32-t64"
    shutil.copytree(src / d.name, d)
    return d


def _fix_sha(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    for f in m["files"]:
        f["sha256"], f["bytes"] = sha256_path(d / f["name"])
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def _scale_initializer(d: Path, graph: str, name: str, factor: float, *, fix_sha: bool = True) -> None:
    path = d / f"{graph}.onnx"
    m = onnx.load(str(path))
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * np.float32(factor)).astype(np.float32), name))
    onnx.save(m, str(path))
    if fix_sha:
        _fix_sha(d)


@pytest.fixture(scope="module")
def clean_run(tiny_onnx_artifacts):
    """The clean check, and how many whole-image reference upscales it ran."""
    import tadsr.runtime.tiling as tiling

    calls: list[str] = []
    real = tiling.upscale_tiled

    def counting(lr, run_tiles, **kw):
        calls.append(getattr(run_tiles, "__name__", ""))
        return real(lr, run_tiles, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiling, "upscale_tiled", counting)
        result = check_parity(tiny_onnx_artifacts, options=ParityOptions(**FAST))
    return result, calls.count("ref_tiles")


@pytest.fixture(scope="module")
def clean(clean_run):
    return clean_run[0]


@pytest.fixture(scope="module")
def corrupted(tiny_onnx_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupted")
    for g in ("encoder", "denoiser", "decoder"):
        _copy(tiny_onnx_artifacts, root, g)
    _scale_initializer(root / "decoder-onnx-fp32-t64", "decoder", "decoder.up.1.block.0.conv1.weight", 1.5)
    m = root / "denoiser-onnx-fp32-t64" / "manifest.json"
    d = json.loads(m.read_text())
    d["graph"]["constants"]["prior_noise_scale"] *= 0.5  # what the host uses between encoder and denoiser
    m.write_text(json.dumps(d, indent=2))
    return check_parity(root, options=ParityOptions(**FAST))


def _artifact(result, graph):
    return next(a for a in result.artifacts if a.graph == graph)


def _set(result, kind):
    return next(s for s in result.sets if s.kind == kind)


def test_clean_export_passes(clean):
    assert clean.passed and clean.exit_code == 0, render_markdown(clean)
    assert sorted(a.graph for a in clean.artifacts) == ["decoder", "denoiser", "encoder", "pipeline"]
    assert sorted(s.kind for s in clean.sets) == ["components", "pipeline"]
    for a in clean.artifacts:
        assert [c.name for c in a.checks] == ["integrity", "interface", "constants"]
        assert {(o.hop.split(" -> ")[1], o.inputs) for o in a.outputs} >= {
            ("onnx runtime", "seeded"),
            ("onnx runtime", "real"),
        }
        for o in a.outputs:
            assert o.psnr > 90 and o.ssim > 0.9999 and o.max_abs < 1e-3 and o.qsteps is None
            assert o.floor.why and o.floor.source.startswith("floors.fp32")
        assert a.diagnosis is None  # nothing to diagnose without --diagnose
    for s in clean.sets:
        (img,) = s.images
        assert img.passed and s.floor.source == "floors.fp32.pipeline"
        if img.psnr < 80:  # a VQ code flipped on a near-tie: accepted only when explained (see check_set)
            assert img.code_flips.flipped and img.code_flips.all_explained and img.same_codes_psnr > 80, img.note
    doc = json.loads(json.dumps(clean.to_dict(), allow_nan=False))
    assert doc["passed"] and doc["artifacts"][0]["outputs"][0]["ssim"] is not None


def test_tampered_weight_is_localised_to_its_block(corrupted):
    a = _artifact(corrupted, "decoder")
    assert not a.passed and a.checks[0].passed  # the sha256 was fixed: only numerics can tell
    assert any(not o.passed for o in a.outputs if "runtime" in o.hop)
    loc = a.diagnosis.localizations[0]
    assert loc.backend == "onnx" and loc.first.unit == "decoder.up.1" and loc.first.stage == "decoder"
    before = [u for u in loc.units[: loc.units.index(loc.first)]]
    assert [u.unit for u in before] == ["quantize", "post_quant_conv", "decoder.conv_in", "decoder.mid", "decoder.up.2"]
    assert all(u.status == "ok" and u.psnr > 100 for u in before)
    assert "first divergence at decoder.up.1" in a.diagnosis.summary
    (m,) = a.diagnosis.weights.mismatches
    assert (m["tensor"], m["unit"]) == ("decoder.up.1.block.0.conv1.weight", "decoder.up.1")


def test_wrong_noise_scale_in_the_pipeline_graph_names_the_prior_sample(tiny_onnx_artifacts, tmp_path):
    d = _copy(tiny_onnx_artifacts, tmp_path, "pipeline")
    _scale_initializer(d, "pipeline", "noise_scale", 0.5)
    res = check_parity(d, options=ParityOptions(**FAST))
    a = _artifact(res, "pipeline")
    assert not a.passed and res.exit_code == 1
    loc = a.diagnosis.localizations[0]
    assert loc.first.unit == "prior sample" and loc.first.stage == "prior sample", loc.summary()
    encoder_units = loc.units[: loc.units.index(loc.first)]
    assert (
        encoder_units
        and {u.stage for u in encoder_units} == {"encoder"}
        and all(u.status == "ok" for u in encoder_units)
    )
    assert {u.stage for u in loc.units} == {"encoder", "prior sample", "input scaling", "denoiser", "decoder"}
    assert a.diagnosis.weights.mismatches[0]["stage"] == "prior sample"
    assert not _set(res, "pipeline").passed


def test_wrong_manifest_noise_scale_of_a_component_set_names_the_prior_sample(corrupted):
    den = _artifact(corrupted, "denoiser")
    assert not den.passed and all(o.passed for o in den.outputs)  # the graph itself is right
    bad = [c for c in den.checks if not c.passed]
    assert [(c.name, c.stage) for c in bad] == [("constant prior_noise_scale", "prior sample")]
    assert "prior sample" in den.diagnosis.summary
    comp = _set(corrupted, "components")
    assert not comp.passed and comp.images[0].psnr < 40
    (loc,) = comp.diagnosis.localizations
    assert [u.unit for u in loc.units] == ["encoder", "prior sample", "denoiser", "decoder"]
    assert loc.first.unit == "prior sample" and loc.units[0].status == "ok"
    assert _artifact(corrupted, "encoder").passed
    assert corrupted.exit_code == 1


def test_modified_file_fails_integrity_and_is_still_diagnosed(tiny_onnx_artifacts, tmp_path, capsys):
    d = _copy(tiny_onnx_artifacts, tmp_path, "encoder")
    _scale_initializer(d, "encoder", "encoder.down.1.block.0.conv2.weight", 1.5, fix_sha=False)
    report = tmp_path / "report"
    code = main([str(d), "--patches", "1", "--threads", "1", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    assert (
        out.startswith("# tadsr parity: FAIL")
        and "integrity: **FAIL**" in out
        and "first divergence at encoder.down.1" in out
    )
    doc = json.loads((report / "parity.json").read_text())
    (a,) = doc["artifacts"]
    assert a["checks"][0]["name"] == "integrity" and not a["checks"][0]["passed"]
    assert a["diagnosis"]["localizations"][0]["first"] == "encoder.down.1"
    assert (report / "parity.md").read_text() == out


def test_cli_exit_codes(tiny_onnx_artifacts, tmp_path, capsys):
    enc = tiny_onnx_artifacts / "encoder-onnx-fp32-t64"
    assert main([str(enc), "--patches", "0", "--threads", "1"]) == 0
    assert "# tadsr parity: PASS" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2  # InputError
    assert main([str(enc), "--patches", "-1"]) == 2  # ConfigError
    assert main([str(enc), "--preset", "no-such-preset"]) == 2
    with pytest.raises(SystemExit) as e:
        main([str(enc), "--init", "zeros"])  # argparse
    assert e.value.code == 2


def test_reference_from_arguments_and_bad_sources(tiny_onnx_artifacts, tmp_path):
    enc = _copy(tiny_onnx_artifacts, tmp_path, "encoder")
    ok = check_parity(enc, ReferenceSpec(preset="tiny", init="random"), ParityOptions(patches=0, threads=1))
    assert ok.passed and ok.options["reference"]["from"] == "arguments"
    m = json.loads((enc / "manifest.json").read_text())
    m["sources"]["autoencoder"] = {"path": str(tmp_path / "gone.pth"), "sha256": "0" * 64}
    (enc / "manifest.json").write_text(json.dumps(m))
    res = check_parity(enc, options=ParityOptions(patches=0))
    assert res.exit_code == 2 and "--autoencoder" in res.artifacts[0].error
    with pytest.raises(InputError):
        check_parity(tmp_path / "nothing-here")
    with pytest.raises(ConfigError):
        ParityOptions(patches=-1)


def test_every_precision_the_tools_write_has_floors() -> None:
    """fp32/fp16 (export), int8 (W8A8) and w8 (Core ML weight-only, via precision_aliases) all resolve to floors."""
    from tadsr.parity.hops import load_floors

    for precision in ("fp32", "fp16", "int8", "w8"):
        for graph in ("encoder", "denoiser", "decoder", "pipeline"):
            assert load_floors(precision, graph, "bundled"), (precision, graph)
    assert load_floors("w8", "pipeline") == load_floors("int8", "pipeline")
    with pytest.raises(ConfigError, match="no parity floors for precision 'w4'"):
        load_floors("w4", "pipeline")


def test_whole_image_reference_is_computed_once_per_image_for_all_sets(clean_run) -> None:
    """The fused pipeline and the component set of one model are compared with one reference upscale per image
    (the reference is the same; only the artifacts' runs differ): counted in the ``clean`` run itself."""
    result, ref_upscales = clean_run
    assert len(result.sets) == 2 and all(len(s.images) == 1 for s in result.sets)
    assert ref_upscales == 1  # was one per set
    assert all(s.passed for s in result.sets)


def test_whole_image_reference_is_shared_between_calls_through_the_trace_cache(tiny_onnx_artifacts, monkeypatch):
    """``tadsr all`` checks its fp32 and its INT8 folders in two calls with one :class:`TraceCache`: the second call
    compares with the whole-image reference of the first (the same weights and image) instead of upscaling again;
    calls without a shared cache each compute their own."""
    import tadsr.runtime.tiling as tiling
    from tadsr.parity.session import TraceCache

    calls: list[str] = []
    real = tiling.upscale_tiled
    monkeypatch.setattr(tiling, "upscale_tiled", lambda lr, run_tiles, **kw: calls.append(
        getattr(run_tiles, "__name__", "")) or real(lr, run_tiles, **kw))  # fmt: skip
    pipe = ["pipeline-onnx-fp32-t64"]
    opts = ParityOptions(**{**FAST, "patches": 0})
    traces = TraceCache()
    first = check_parity(tiny_onnx_artifacts, options=opts, traces=traces, select=pipe)
    again = check_parity(tiny_onnx_artifacts, options=opts, traces=traces, select=pipe)
    assert calls.count("ref_tiles") == 1 and first.passed and again.passed
    assert again.sets[0].images[0].psnr == first.sets[0].images[0].psnr
    check_parity(tiny_onnx_artifacts, options=opts, select=pipe)
    assert calls.count("ref_tiles") == 2


def test_whole_image_reference_is_shared_between_processes_through_a_folder(tiny_onnx_artifacts, tmp_path,
                                                                             monkeypatch) -> None:
    """``tadsr all``'s lanes are processes: a :class:`TraceCache` with ``refs_folder`` finds the reference another
    one stored there (same image, tiles, noise and latents) instead of upscaling again; another salt (another
    toolkit version) or an unreadable file computes anew."""
    import tadsr.runtime.tiling as tiling
    from tadsr.parity.session import TraceCache

    calls: list[str] = []
    real = tiling.upscale_tiled
    monkeypatch.setattr(tiling, "upscale_tiled", lambda lr, run_tiles, **kw: calls.append(
        getattr(run_tiles, "__name__", "")) or real(lr, run_tiles, **kw))  # fmt: skip
    pipe, opts = ["pipeline-onnx-fp32-t64"], ParityOptions(**{**FAST, "patches": 0})
    folder = tmp_path / "refs"
    first = check_parity(tiny_onnx_artifacts, options=opts, traces=TraceCache(refs_folder=folder, salt="a"), select=pipe)
    (stored,) = folder.glob("*.npz")
    again = check_parity(tiny_onnx_artifacts, options=opts, traces=TraceCache(refs_folder=folder, salt="a"), select=pipe)
    assert calls.count("ref_tiles") == 1 and again.passed
    assert again.sets[0].images[0].psnr == first.sets[0].images[0].psnr
    check_parity(tiny_onnx_artifacts, options=opts, traces=TraceCache(refs_folder=folder, salt="b"), select=pipe)
    assert calls.count("ref_tiles") == 2
    stored.write_bytes(b"not an npz")
    assert check_parity(tiny_onnx_artifacts, options=opts, traces=TraceCache(refs_folder=folder, salt="a"),
                        select=pipe).passed and calls.count("ref_tiles") == 3  # fmt: skip


def test_gate_tiles_are_the_write_gates_hops_only_where_that_gate_ran_this_check(tiny_onnx_artifacts, tmp_path,
                                                                                  monkeypatch) -> None:
    """``gate_tiles`` (``tadsr all``): an artifact whose write-time gate ran this check's cases, reference and
    floors on these files gets that gate's hops from its manifest, without running a tile; other cases, another
    floor or a modified file are run again."""
    import tadsr.parity.artifact as artifact

    ran: list[int] = []
    real = artifact.run_cases_vq
    monkeypatch.setattr(artifact, "run_cases_vq", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    opts = {**FAST, "whole_images": 0, "gate_tiles": True}
    res = check_parity(tiny_onnx_artifacts, options=ParityOptions(**opts))
    assert res.passed and not ran
    for a in res.artifacts:
        manifest = json.loads((a.path / "manifest.json").read_text())
        assert [c.name for c in a.checks] == ["integrity", "interface", "constants", "tiles"]
        assert [o.to_dict() for o in a.outputs] == manifest["parity"]
        assert a.real_source == manifest["parity_inputs"]["real"]
    assert len(res.artifacts[0].outputs) == 6  # 3 hops x seeded / real, as a check that runs them reports
    # two real patches: not the cases the gate ran
    res = check_parity(tiny_onnx_artifacts, options=ParityOptions(**{**opts, "patches": 2}),
                       select=["encoder-onnx-fp32-t64"])  # fmt: skip
    assert res.passed and len(ran) == 1 and [c.name for c in res.artifacts[0].checks][-1] == "constants"
    # a floor that is not today's numerics.json
    d = _copy(tiny_onnx_artifacts, tmp_path, "encoder")
    m = json.loads((d / "manifest.json").read_text())
    m["parity"][-1]["floor"]["psnr"] = 10.0
    (d / "manifest.json").write_text(json.dumps(m))
    assert check_parity(d, options=ParityOptions(**opts)).passed and len(ran) == 2
    # a modified file: integrity fails and the tiles are run (and diagnosed)
    d = _copy(tiny_onnx_artifacts, tmp_path / "mod", "decoder")
    _scale_initializer(d, "decoder", "decoder.up.1.block.0.conv1.weight", 1.5, fix_sha=False)
    res = check_parity(d, options=ParityOptions(**opts))
    assert not res.passed and len(ran) == 3 and not res.artifacts[0].checks[0].passed


def _only_pipeline(src: Path, dst: Path) -> Path:
    root = dst / "fused"
    root.mkdir()
    _copy(src, root, "pipeline")
    return root


@pytest.mark.parametrize("far", [False, True])
def test_unexposed_fused_program_whole_image_flips_are_recovered_from_its_tiles(
    tiny_models, tiny_onnx_artifacts, tmp_path, monkeypatch, far: bool
) -> None:
    """A fused program whose latent cannot be tapped (ExecuTorch, Core ML; here an ONNX graph with the tap made
    impossible) and whose first tile picks another code at a few near-tie positions: the whole image falls below the
    fp32 floor, and passes because that tile's codes are recovered from its own image among near-tie candidates
    (session 31: official Core ML fp32 whole images failed at 58-66 dB, "code flips not checked"). The same
    positions flipped to the code farthest from the latent still fails."""
    import tadsr.parity.sets as sets
    import tadsr.runtime.pipeline as rp
    from tadsr.parity.hops import reference_codes, vq_judge
    from tadsr.pipeline import OneStepPipeline

    judge = vq_judge(tiny_models, "pipeline", "fp32")
    lat_floor = load_floors("fp32", "pipeline", tiny_models.preset.name)["sr"]
    pipe = OneStepPipeline(tiny_models)
    flipped: list[int] = []

    class Flipping:  # the program's tile 0 decoded with one code changed
        def __init__(self, inner):
            self.inner, self.spec, self.n = inner, inner.spec, 0

        def run(self, inputs):
            out = self.inner.run(inputs)
            self.n += 1
            if self.n != 1:
                return out
            with torch.no_grad():
                lr_p, _ = pipe.prepare(torch.from_numpy(inputs["lr"]))
                z = pipe.denoise(pipe.encode(lr_p), torch.from_numpy(inputs["noise"]), lr_p).numpy()
            c = reference_codes(tiny_models, z)
            e = judge.codebook.astype(np.float64)
            zr = z.reshape(z.shape[1], -1).T.astype(np.float64)
            mag = (np.sqrt((zr * zr).sum(1)) + np.sqrt((e[c.reshape(-1)] ** 2).sum(1))) ** 2
            delta = judge._budget(z) * np.sqrt(e.shape[1])
            pos, alt = judge._alternatives(e, zr, c, delta, lat_floor.flips.rounding_rel * mag)
            assert pos.size, "no near-tie candidate in tile 0"
            flat = c.reshape(-1).copy()
            for p, b in list(zip(pos.tolist(), alt.tolist()))[:8]:  # a few, so that the blended image shows them
                flat[p] = int(((e - zr[p]) ** 2).sum(1).argmax()) if far else b
                flipped.append(p)
            return {**out, "sr": judge.decode(flat.reshape(c.shape))}

    class Pipeline(rp.MobileSRPipeline):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.runners["pipeline"] = Flipping(self.runners["pipeline"])

    monkeypatch.setattr(rp, "MobileSRPipeline", Pipeline)
    monkeypatch.setattr(sets, "onnx_codebook_input", lambda *a, **k: None)
    root = _only_pipeline(tiny_onnx_artifacts, tmp_path)
    result = check_parity(root, options=ParityOptions(**{**FAST, "gate_tiles": True}))
    (s,) = result.sets
    (img,) = s.images
    assert flipped and img.psnr < 80, img  # the flip is visible against the plain reference
    assert "recovered from the program's tile images" in img.note, img.note
    if far:
        assert not img.passed and not result.passed, img.note
    else:
        assert img.passed and result.passed, img.note
        assert 1 <= img.code_flips.flipped == img.code_flips.explained <= len(flipped), img.note
        assert img.same_codes_psnr >= 80, img.note


def test_int8_tiles_come_from_the_write_gates_held_out_hops(tiny_all, tmp_path, monkeypatch) -> None:
    """``tadsr all`` takes an INT8 artifact's tile verdict from its write's parity gate, which judged 16 held-out
    tiles against the fp32 artifact and the reference at the INT8 floors (session 31: the parity stage ran the
    seeded and real tiles again, 19 s for the fused ONNX pipeline of the quick path). Every INT8 artifact of the
    smoke run was judged that way; a hop recorded under another floor is run again."""
    import tadsr.parity.artifact as artifact

    report = json.loads((tiny_all.out / "parity" / "int8" / "parity.json").read_text())
    int8 = [a for a in report["artifacts"] if a["precision"] == "int8"]  # (Core ML W8 weight-only: its own floors)
    assert len(int8) >= 4, [a["path"] for a in report["artifacts"]]
    for a in int8:
        tiles = [c for c in a["checks"] if c["name"] == "tiles"]
        assert tiles and "held-out tiles" in tiles[0]["detail"], (a["path"], a["checks"])
        assert {o["hop"].split(" -> ")[0].split()[0] for o in a["outputs"]} == {"fp32", "reference"}, a["outputs"]
    ran: list[int] = []
    real = artifact.run_cases_vq
    monkeypatch.setattr(artifact, "run_cases_vq", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    d = tmp_path / "encoder-onnx-int8-t64"
    shutil.copytree(tiny_all.out / "int8" / d.name, d)
    opts = ParityOptions(**{**FAST, "whole_images": 0, "gate_tiles": True})
    res = check_parity(d, options=opts)
    assert res.passed and not ran and res.artifacts[0].checks[-1].name == "tiles"
    m = json.loads((d / "manifest.json").read_text())
    first = next(h for h in m["parity"] if h["hop"].startswith("fp32 "))
    first["floor"]["psnr"] = 10.0  # not today's INT8 floor
    (d / "manifest.json").write_text(json.dumps(m))
    res = check_parity(d, options=opts)
    assert res.passed and ran and res.artifacts[0].checks[-1].name == "constants"


def test_main_job_whole_image_is_a_padded_strip_of_three_tiles():
    """The main job's whole image: 57 x 121 LR (a partial tile on both axes, padded to 64 x 128), three tiles of 64
    in a row at overlap 16; ``max_rows`` caps the rows only, and the parity verb's default stays a 153 x 160 grid."""
    from tadsr.cli.main_job import _FULL_PARITY
    from tadsr.parity.sets import whole_images

    [(_, img)] = whole_images(ParityOptions(**_FULL_PARITY), 1)
    assert img.shape == (1, 3, 57, 121)
    [(_, img)] = whole_images(ParityOptions(whole_images=1), 1)
    assert img.shape == (1, 3, 153, 160)
    with pytest.raises(ConfigError, match="max_rows"):
        ParityOptions(max_rows=0)
