"""INT8 quantization on the tiny preset (random fill): ONNX per graph, determinism, ExecuTorch, Core ML, errors.

Every quantization here is calibrated on 4 real patches of the shipped set (the library warns below 32) and
judged on 2 held-out patches, with a 1-patch sensitivity sweep: the machinery is the production path, only the
sample sizes are small. Several tests check the INT8 artifacts of the tier's ``tadsr all --smoke`` run (the
bundled model, 8 calibration patches) instead of quantizing tiny graphs again: the ONNX graphs, their recipe
reuse, the ExecuTorch encoder and the Core ML W8A8 / W8 encoders.
"""

from __future__ import annotations

import logging

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tadsr.errors import ConfigError, InputError
from tadsr.parity.hops import load_floors
from tadsr.cli import quantize as qcli
from tadsr.formats import sensitivity as sens_mod
from tadsr.quantize.api import DEFAULT_HR_BUDGET_DB, HR_BUDGET_SHARE, quantize_artifact
from tadsr.quantize.calibration import noise_seed, sample_calibration
from tadsr.formats.sensitivity import (
    HRBudget,
    find_float_units,
    RECIPE_NAME,
    BackendRecipe,
    Recipe,
    default_target,
    load_recipe,
    search_exclusions,
    unit_of,
)
from tadsr.runtime.runner import load_runner, read_manifest

SMALL = {"num_patches": 4, "holdout_patches": 2, "sensitivity_patches": 1, "threads": 1}
# for the tests about lowering, conversion and search sharing rather than the HR budget (test_onnx_int8_graph and
# the HR tests cover it): a component's budget runs the rest of the fp32 chain at each held-out evaluation
SMALL_NO_HR = {**SMALL, "hr_budget_db": None}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scales(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_scale")}


# ------------------------------------------------------------------------------------------------- ONNX


def _smoke_int8(run, graph: str, fmt: str = "onnx") -> tuple[Path, Path]:
    """(INT8 artifact, its fp32 parent) of ``graph`` in the tier's ``tadsr all --smoke`` run folder."""
    return run.out / "int8" / f"{graph}-{fmt}-int8-t64", run.out / "artifacts" / f"{graph}-{fmt}-fp32-t64"


# the ONNX graphs as the tier's `tadsr all --smoke` quantized them (bundled model, 8 calibration patches, the HR
# budget on the decoder alone: cli/main_job.py's _SMOKE_HR_BUDGET). Not its encoder: at its 30 dB floor on 8
# patches the search keeps every block float (int8 fraction 0, session 18), nothing INT8 to check. The tiny
# preset's own INT8 runs below are the recipe reuse, the external-data parent and the HR-budget tests.
@pytest.mark.parametrize("graph", ["decoder", "denoiser", "pipeline"])
def test_onnx_int8_graph(graph, tiny_all):
    from tadsr.cli.main_job import _SMOKE_HR_BUDGET, _SMOKE_QUANTIZE, SMOKE_DEFAULTS

    art, parent_dir = _smoke_int8(tiny_all, graph)
    m = read_manifest(art)
    parent = read_manifest(parent_dir)
    preset = m["preset"]["name"]
    q = m["quantization"]
    # provenance: calibration set, recipe and parent are recorded
    assert m["precision"] == "int8" and m["parent"] == str(parent_dir.resolve())
    assert m["calibration"]["num_patches"] == SMOKE_DEFAULTS["num_patches"] and m["calibration"]["seed"] == 0
    assert len(m["calibration"]["content_hash"]) == 64 and m["calibration"]["shipped"]
    assert m["heldout"]["seed"] == 1 and not set(m["heldout"]["files"]) & set(m["calibration"]["files"])
    recipe = load_recipe(art / RECIPE_NAME).get(graph, "onnx")
    assert recipe is not None and recipe.float_units == q["float_units"]
    # fidelity: the recipe met its floor on held-out patches, and parity (numerics.json int8 floors) passed
    fid = next(iter(q["fidelity"].values()))
    print(f"{graph}: INT8 vs fp32 {fid['psnr']:.2f} dB (held-out worst), int8 weights {q['int8_fraction']:.0%}, "
          f"float blocks {q['float_units']}")  # fmt: skip
    assert recipe.target_psnr == default_target(graph) and recipe.psnr >= recipe.target_psnr
    # the HR budget, where the smoke sets it, is measured and recorded: a component holds its share of it, judged
    # through the rest of the fp32 chain (the encoder's and the denoiser's latents have no HR of their own)
    if ("onnx", graph) in _SMOKE_HR_BUDGET:
        assert recipe.hr_budget_db == pytest.approx(DEFAULT_HR_BUDGET_DB * HR_BUDGET_SHARE[graph], abs=1e-3)
        assert recipe.hr_loss_db is not None and recipe.hr_bound_db >= recipe.hr_loss_db
        assert recipe.hr_confidence == _SMOKE_QUANTIZE["hr_confidence"]
        assert recipe.hr_bound_db <= recipe.hr_budget_db or recipe.float_units, recipe.search
        assert all("hr_loss_db" in t and "hr_bound_db" in t for t in recipe.search)
    else:
        assert recipe.hr_budget_db is None
    assert fid["psnr"] >= recipe.target_psnr - 1e-6
    assert m["parity_passed"] and all(h["passed"] for h in m["parity"])
    floor = next(iter(load_floors("int8", graph, preset).values())).psnr
    assert fid["psnr"] >= floor
    # size: the quantized layers' weights (+ int32 biases, zero points) shrink to ~1/4; float blocks and
    # non-weight constants (the denoiser's baked Swin masks and biases) keep their fp32 size
    size = sum(f["bytes"] for f in m["files"])
    fp32 = sum(f["bytes"] for f in parent["files"])
    w = m["backend_info"]["quantized_weights"]
    floats = m["backend_info"]["initializer_bytes"].get("FLOAT", 0)
    if w["ratio"] is None:  # the recipe keeps every block's activations float: no QDQ node's weights to count
        assert q["int8_fraction"] == 0 and f"no node is INT8 in {graph}" in (tiny_all.out / "SUMMARY.md").read_text()
        print(f"{graph}: every block float by the recipe; file {size / fp32:.3f}x fp32")
    else:
        print(f"{graph}: file {size / fp32:.3f}x fp32, quantized weights {w['ratio']:.3f}x, float constants "
              f"{floats / 1e6:.2f} MB")  # fmt: skip
        assert w["ratio"] <= 0.3
    assert size <= 0.3 * fp32 + floats, (size / fp32, floats)
    if graph in ("encoder", "decoder") and q["int8_fraction"] >= 0.95:
        assert size <= 0.3 * fp32, size / fp32
    # the artifact runs through the standard runner
    runner = load_runner(art)
    out = runner.run({t.name: np.zeros(t.shape, np.float32) for t in runner.spec.inputs})
    assert all(np.isfinite(v).all() for v in out.values())


def test_onnx_int8_deterministic_and_recipe_reuse(tiny_all, tmp_path):
    """The smoke's ONNX decoder (bundled model, HR-budget search) quantized again from its fp32 parent with its
    recipe.json and the smoke's settings: no search, the same scales and the same file, byte for byte."""
    from tadsr.cli.main_job import _SMOKE_QUANTIZE, SMOKE_DEFAULTS

    first, parent = _smoke_int8(tiny_all, "decoder")
    kw = {**_SMOKE_QUANTIZE, "num_patches": SMOKE_DEFAULTS["num_patches"], "threads": 1}
    (again,) = quantize_artifact(parent, out_dir=tmp_path, recipe=first / RECIPE_NAME, **kw)
    a, b = first / "decoder.onnx", again / "decoder.onnx"
    sa, sb = _scales(a), _scales(b)
    assert sa and sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert _sha(a) == _sha(b)
    m1, m2 = read_manifest(first), read_manifest(again)
    assert m1["calibration"]["content_hash"] == m2["calibration"]["content_hash"]
    r1, r2 = load_recipe(first).get("decoder", "onnx"), load_recipe(again).get("decoder", "onnx")
    assert r1.source in ("auto", "all") and r2.source == "file" and r2.target_psnr is None
    assert r2.float_units == r1.float_units and r2.psnr == pytest.approx(r1.psnr, abs=1e-3)
    with pytest.raises(ConfigError, match="no entry for graph 'encoder'"):
        quantize_artifact(tiny_all.out / "artifacts" / "encoder-onnx-fp32-t64", out_dir=tmp_path,
                          recipe=first / RECIPE_NAME, **kw)  # fmt: skip


def test_onnx_int8_from_external_data_artifact(tiny_models, single_thread, tmp_path):
    """An fp32 artifact with its weights in ``.onnx.data`` (the official-size layout) quantizes, and an INT8
    file above the threshold keeps the same layout."""
    from tadsr.export.api import export_model

    (res,) = export_model(tiny_models, graphs=("encoder",), tile=64, out_dir=tmp_path / "fp32", n_real=0,
                          backend_options={"onnx": {"external_data_threshold": 0}})  # fmt: skip
    assert (res.path / "encoder.onnx.data").exists()
    (q,) = quantize_artifact(res.path, out_dir=tmp_path / "int8", **SMALL_NO_HR)
    assert [f["name"] for f in read_manifest(q)["files"]] == ["encoder.onnx"]  # INT8 file below 64 MiB: one file
    assert read_manifest(q)["parity_passed"] is True


def test_compress_add_constants():
    """Large Add-only float constants become INT8 + DequantizeLinear (mask values exact, bias within half a step);
    a conv weight and small constants are left alone; ORT output barely moves."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tadsr.formats.onnx.weights import compress_add_constants, weight_only_int8

    rng = np.random.default_rng(0)
    bias = rng.normal(0, 2, (2, 64, 64)).astype(np.float32)
    mask = np.where(rng.random((4, 1, 64, 64)) < 0.3, -100.0, 0.0).astype(np.float32)
    mask[1] = 0.0  # a row without masked pairs (scale would be 0)
    w = rng.normal(0, 0.1, (2, 2, 3, 3)).astype(np.float32)
    small = np.ones((2, 1, 1), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["a"]), helper.make_node("Add", ["a", "mask"], ["b"]),
         helper.make_node("Add", ["b", "small"], ["c"]),
         helper.make_node("Reshape", ["c", "shape"], ["c4"]),
         helper.make_node("Conv", ["c4", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2, 64, 64])],
        [numpy_helper.from_array(bias, "bias"), numpy_helper.from_array(mask, "mask"),
         numpy_helper.from_array(small, "small"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([4, 2, 64, 64], np.int64), "shape")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.normal(0, 1, (4, 2, 64, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    stats = compress_add_constants(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert stats["tensors"] == 2 and types["bias_int8"] == types["mask_int8"] == TensorProto.INT8
    assert "bias" not in types and "mask" not in types and types["w"] == types["small"] == TensorProto.FLOAT
    assert stats["max_abs_error"] <= np.abs(bias).max() / 254 + 1e-6
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.2 and stats["int8_bytes"] < stats["fp32_bytes"] / 3.9
    # weight-only INT8 of a float-kept conv: per output channel, the op stays float
    wstats = weight_only_int8(model, ["conv", "no-such-node"])
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert wstats["tensors"] == 1 and types["w_int8"] == TensorProto.INT8 and "w" not in types
    assert wstats["max_abs_error"] <= np.abs(w).max() / 254 + 1e-6
    onnx.checker.check_model(model, full_check=True)
    got_w = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got_w - got).max() < 0.01 * np.abs(got).max()  # inputs reach -100 (mask)


def _attention_model(keys: int) -> onnx.ModelProto:
    """x (1, keys, 8) -> q/k/v projections (MatMul with weights) -> scores -> scale -> softmax -> weighted sum ->
    output projection; shape-inferred, with named nodes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), n) for n in ("wq", "wk", "wv", "wo")}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Mul", ["s", "scale"], ["s2"], name="scale"),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="mix"),
             helper.make_node("MatMul", ["o", "wo"], ["y"], name="proj")]  # fmt: skip
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, keys, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, keys, 8])],
                              [*w.values(), numpy_helper.from_array(np.array(0.35, np.float32), "scale")])  # fmt: skip
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_long_attention_keeps_its_weightless_matmuls_float():
    """The scores and the weighted sum of an attention over >= 256 keys are pinned float (diffuse attention is not
    representable in UINT8); the projections are not, and a 64-key (Swin window) attention is not pinned."""
    from tadsr.formats.onnx.ptq import LONG_ATTENTION_KEYS, long_attention_nodes

    names = ["q", "k", "v", "scores", "mix", "proj"]
    long = long_attention_nodes(_attention_model(LONG_ATTENTION_KEYS), names)
    assert sorted(long) == ["mix", "scores"] and "256 keys" in long["mix"]
    assert long_attention_nodes(_attention_model(64), names) == {}
    # (the reason, for the reader: the calibrated range [0, max] comes from peaked rows of textured patches, e.g.
    # max 0.5 -> step 0.5/255 ~ 2e-3; a diffuse row's weights over 4096 keys, 2.4e-4 each, round to 0)


def test_weight_bytes_counts_external_tensors(tmp_path):
    """Sizes by dtype come from shapes, so tensors kept in a .data file are counted (they were 0 before)."""
    from onnx import TensorProto, helper, numpy_helper

    from tadsr.formats.onnx.ptq import weight_bytes

    w = np.ones((2000,), np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2000])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(3, np.int8), "q")])  # fmt: skip
    model = helper.make_model(graph)
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert weight_bytes(lazy) == {"FLOAT": 8000, "INT8": 3}


# ------------------------------------------------------------------------------------------- ExecuTorch / Core ML


@pytest.fixture(scope="module")
def fp32_encoder(single_thread, tiny_models, tiny_executorch_encoder, tmp_path_factory):
    """encoder fp32 artifacts for ExecuTorch (the session's) and Core ML."""
    from tadsr.export.api import export_model

    out = tmp_path_factory.mktemp("fp32-coreml")
    (res,) = export_model(tiny_models, formats=("coreml",), graphs=("encoder",), tile=64, out_dir=out, n_real=1)
    return {"executorch": tiny_executorch_encoder, "coreml": res.path}


def test_executorch_int8_lowers_and_runs(tiny_all):
    """The ExecuTorch INT8 encoder of the tier's ``tadsr all --smoke`` (quantize_artifact with 8 calibration
    patches, no parity gate: its recorded verdict is checked here)."""
    art, parent = _smoke_int8(tiny_all, "encoder", "executorch")
    m = read_manifest(art)
    assert m["format"] == "executorch" and m["precision"] == "int8" and m["parent"] == str(parent.resolve())
    assert m["backend_info"]["delegates"] >= 1 and m["parity_passed"]
    hops = {h["hop"].split(" (")[0]: h for h in m["parity"]}
    fq = next(h for k, h in hops.items() if k.startswith("fake-quant"))
    assert "max_abs_steps" in fq  # runtime vs fake-quant torch, in quantization steps of the output scale
    size, fp32 = m["files"][0]["bytes"], read_manifest(parent)["files"][0]["bytes"]
    assert size <= 0.35 * fp32, size / fp32
    # measured here, not read from the manifest: INT8 vs the fp32 artifact on held-out photos
    worst = _worst_latent_psnr(load_runner(art), load_runner(parent))
    floor = next(iter(load_floors("int8", "encoder", m["preset"]["name"]).values())).psnr
    assert worst >= floor - SMALL_CALIB_MARGIN_DB, worst


def test_coreml_w8a8_and_w8(tiny_all):
    """The Core ML encoders of the tier's ``tadsr all --smoke`` (bundled model, 8 calibration patches): W8A8
    (``int8``: quantize / dequantize ops) and its weight-only twin (``w8``), from one quantize call."""
    import coremltools as ct

    parent = tiny_all.out / "artifacts" / "encoder-coreml-fp32-t64"
    w8a8, w8 = (tiny_all.out / "int8" / f"encoder-coreml-{p}-t64" for p in ("int8", "w8"))
    reference = load_runner(parent, backend="coreml-sim")
    for art, want in ((w8a8, ("quantize", "dequantize", "constexpr_affine_dequantize")), (w8, ())):
        m = read_manifest(art)
        assert m["parent"] == str(parent.resolve()) and m["precision"] == art.name.split("-")[2]
        pkg = art / m["files"][0]["name"]
        spec = ct.utils.load_spec(str(pkg))  # the spec loads (no Core ML runtime needed)
        assert spec.WhichOneof("Type") == "mlProgram"
        assert not (pkg / "executorch_debug_handle_mapping.json").exists()  # debug map not shipped
        ops = m["backend_info"]["mil_ops"]
        assert all(ops.get(o, 0) > 0 for o in want), ops
        if not want:  # weight-only: activations stay float
            assert not ops.get("quantize", 0) and ops.get("constexpr_affine_dequantize", 0) > 0, ops
        assert m["parity_passed"], m["parity"]
        floor = next(iter(load_floors(m["precision"], "encoder", m["preset"]["name"]).values())).psnr
        fid = next(iter(m["quantization"]["fidelity"].values()))
        assert fid["psnr"] >= floor, (art.name, fid)
        # measured here through the simulator, not read from the manifest
        worst = _worst_latent_psnr(load_runner(art, backend="coreml-sim"), reference)
        assert worst >= floor - SMALL_CALIB_MARGIN_DB, (art.name, worst)


def test_pt2e_search_is_shared_between_executorch_and_core_ml(fp32_encoder, tmp_path):
    """ExecuTorch and Core ML quantize the same PT2E graph: with one shared store (``tadsr all``'s lanes), the
    second format converts the first one's searched recipe and measures it itself instead of searching again."""
    from tadsr.quantize.calibration import CaptureCache

    cache = CaptureCache(tmp_path / "cache")
    kw = {**SMALL_NO_HR, "target_psnr": 99.0, "parity_gate": False, "captures": cache}  # 99 dB: forces a search
    (et,) = quantize_artifact(fp32_encoder["executorch"], out_dir=tmp_path / "et", **kw)
    assert len(list((tmp_path / "cache" / "searches").glob("*.json"))) == 1
    (cm,) = quantize_artifact(fp32_encoder["coreml"], out_dir=tmp_path / "cm", weight_only=False, **kw)
    r_et = load_recipe(et / RECIPE_NAME).get("encoder", "executorch")
    r_cm = load_recipe(cm / RECIPE_NAME).get("encoder", "coreml")
    assert (r_et.source, r_cm.source) == ("auto", "shared")
    assert r_cm.float_units == r_et.float_units and r_cm.sensitivity == r_et.sensitivity
    assert r_cm.psnr is not None and r_cm.int8_fraction == r_et.int8_fraction  # measured on its own graph


# The int8 floors of numerics.json assume >= 32 calibration crops; SMALL calibrates on 4 and the smoke on 8. On the
# three held-out photos below the tiny encoder then measured 29.5 dB (ExecuTorch INT8) and 29.1 dB (Core ML W8A8)
# vs fp32 (floor 30), while its manifest (2 held-out patches) passed; the independent check allows the floor minus
# this margin.
SMALL_CALIB_MARGIN_DB = 3.0


def _held_out_lr_tiles() -> list[np.ndarray]:
    """(1, 3, 64, 64) LR tiles from the shipped benchmark photos (never calibration images), MATLAB-bicubic / 4."""
    from tadsr.imresize import imresize
    from tadsr.runtime.imageio import read_image, to_model

    photos = sorted((Path(__file__).resolve().parents[1] / "tadsr" / "data" / "bench").glob("*.png"))[:3]
    assert len(photos) == 3
    return [to_model(np.clip(imresize(read_image(f).rgb, 1 / 4), 0, 1)) for f in photos]


def _worst_latent_psnr(int8, fp32) -> float:
    """Worst PSNR (over the fp32 latent's peak-to-peak, as numerics.json) of ``int8`` vs ``fp32`` on held-out tiles."""
    from tadsr.metrics import psnr

    worst = np.inf
    for lr in _held_out_lr_tiles():
        ref, got = fp32.run({"lr": lr})["z_y"], int8.run({"lr": lr})["z_y"]
        worst = min(worst, psnr(got, ref, data_range=float(ref.max() - ref.min())))
    return worst


# ------------------------------------------------------------------------------------------------- errors


def _fake_artifact(folder: Path) -> Path:
    """A valid-looking fp32 encoder artifact: enough for the checks that run before any model work."""
    from tadsr.config import get_preset
    from tadsr.formats.artifact import BackendResult, build_manifest, write_manifest

    folder.mkdir()
    (folder / "encoder.onnx").write_bytes(b"not used")
    lr = {"name": "lr", "shape": [1, 3, 64, 64], "dtype": "float32", "value_range": [-1, 1], "description": ""}
    z = {"name": "z_y", "shape": [1, 3, 64, 64], "dtype": "float32", "value_range": None, "description": ""}
    spec = {"name": "encoder", "tile": 64, "scale": 4, "inputs": [lr], "outputs": [z], "constants": {}}
    sources = {p: {"path": "random-fill", "sha256": ""} for p in ("student", "autoencoder")}
    backend = BackendResult(files=["encoder.onnx"], format="onnx", precision="fp32")
    write_manifest(folder, build_manifest(folder=folder, graph_spec=spec, backend=backend,
                                          preset=get_preset("tiny").to_dict(), sources=sources))  # fmt: skip
    return folder


def _png(path: Path, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(size)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _calib_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp / "empty"
    empty.mkdir()
    broken = tmp / "broken"
    broken.mkdir()
    _png(broken / "a.png", 300)
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    few = tmp / "few"
    few.mkdir()
    _png(few / "only.png", 256)  # exactly one 256 px HR patch
    small = tmp / "small"
    small.mkdir()
    _png(small / "tiny.png", 100)
    return {
        "empty": (empty, "no images"),
        "unreadable": (broken, "bad image files"),
        "too few": (few, "only 1 distinct"),
        "too small": (small, "smaller than the 256x256 HR patch"),
        "missing": (tmp / "nope", "does not exist"),
    }


def test_calibration_folder_errors(tmp_path):
    art = _fake_artifact(tmp_path / "encoder-onnx-fp32-t64")
    for name, (folder, msg) in _calib_cases(tmp_path).items():
        with pytest.raises(InputError, match=msg):
            quantize_artifact(art, calib=folder, num_patches=4, out_dir=tmp_path / "out")
        assert not list((tmp_path / "out").glob("encoder-*")), name


def test_cli_exit_code_2(tmp_path, monkeypatch, capsys):
    import tadsr.cli as main_cli

    registered = main_cli._verbs()
    if qcli.add_quantize_parser not in registered:  # until tadsr.cli registers the verb
        monkeypatch.setattr(main_cli, "_verbs", lambda: [*registered, qcli.add_quantize_parser])
    art = _fake_artifact(tmp_path / "encoder-onnx-fp32-t64")
    cases = _calib_cases(tmp_path)
    for folder, _ in (cases["empty"], cases["too small"], cases["too few"]):
        argv = ["quantize", str(art), "--calib", str(folder), "--num-patches", "4", "--out", str(tmp_path / "o")]
        assert main_cli.main(argv) == 2
    assert main_cli.main(["quantize", str(tmp_path / "no-artifact"), "--out", str(tmp_path / "o")]) == 2
    bad = tmp_path / "bad-recipe.json"
    bad.write_text("{}")
    assert main_cli.main(["quantize", str(art), "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_default_calibration_count_and_hash():
    """Shipped set: the default takes all 48 distinct patches (not 64 with repeats); same seed, same hash."""
    a, info = sample_calibration(None, tile=64, seed=0)
    b, _ = sample_calibration(None, tile=64, seed=0)
    assert len(a) == 48 and info["num_patches"] == 48 and len(set(info["files"])) == 48
    assert a.content_hash == b.content_hash and np.array_equal(a.lr, b.lr)
    assert noise_seed(0, 5) != noise_seed(1, 5) and noise_seed(0, 5) == noise_seed(0, 5)


def test_capture_cache_is_owned_by_the_caller(monkeypatch, tmp_path):
    """One CaptureCache captures once per model and patch set; no process-wide cache remains in the module."""
    from types import SimpleNamespace

    import tadsr.quantize.api as qapi
    from tadsr.quantize import calibration as cal

    calls = []
    monkeypatch.setattr(cal, "capture_both", lambda models, c, h, progress, workers: calls.extend("ch") or ("calib", "hold"))
    manifest = {"preset": {"name": "tiny"}, "sources": {"student": {"sha256": "a"}}}
    calib = (SimpleNamespace(content_hash="x"), {"seed": 0})
    hold = (SimpleNamespace(content_hash="y"), {"seed": 1})
    cache = cal.CaptureCache()
    assert cache.get(manifest, None, calib, hold) == ("calib", "hold")
    assert cache.get(manifest, None, calib, hold) == ("calib", "hold") and calls == ["c", "h"]
    other = {**manifest, "sources": {"student": {"sha256": "b"}}}
    cache.get(other, None, calib, hold)
    assert calls == ["c", "h", "c", "h"]
    cal.CaptureCache().get(manifest, None, calib, hold)  # a new cache knows nothing
    assert len(calls) == 6
    sampled: list[int] = []
    assert cache.patches(("a", 1), lambda: sampled.append(1) or "p") == "p"
    assert cache.patches(("a", 1), lambda: sampled.append(1) or "q") == "p" and sampled == [1]  # sampled once
    assert cache.patches(("a", 2), lambda: "other args") == "other args"
    assert cal.CaptureCache().patches(("a", 1), lambda: "new cache") == "new cache"
    assert not hasattr(qapi, "_CAPTURES")


def test_capture_shared_between_processes_gives_the_same_arrays(tiny_models):
    """capture(workers=2) splits the patches between this process and a spawned one (each on its one thread, the
    noise by the patch's index in the whole set): bit-identical to capturing them all here."""
    from tadsr.quantize.calibration import capture

    lr = np.random.default_rng(0).uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32)
    one = capture(tiny_models, lr, seed=5)
    two = capture(tiny_models, lr, seed=5, workers=2)
    for k in ("lr", "noise", "z_y", "x_t", "x0", "sr"):
        np.testing.assert_array_equal(getattr(two, k), getattr(one, k), err_msg=k)


def test_capture_sets_share_one_pool_and_give_each_sets_arrays(tiny_models, monkeypatch):
    """The calibration and held-out captures of a CaptureCache go through one process pool (one start for both
    sets), each set split as capture() splits it alone: the same arrays."""
    import concurrent.futures

    from tadsr.quantize.calibration import capture, capture_sets

    pools = []
    real = concurrent.futures.ProcessPoolExecutor

    class Counting(real):
        def __init__(self, *a, **k):
            pools.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Counting)
    rng = np.random.default_rng(3)
    a, b = (rng.uniform(-1, 1, (n, 3, 64, 64)).astype(np.float32) for n in (3, 2))
    got = capture_sets(tiny_models, [(a, 5, False), (b, 7, True)], workers=2)
    assert len(pools) == 1
    for arrays, (lr, seed, decode) in zip(got, [(a, 5, False), (b, 7, True)], strict=True):
        alone = capture(tiny_models, lr, seed=seed, decode=decode)
        for k in ("lr", "noise", "z_y", "x_t", "x0", "sr"):
            np.testing.assert_array_equal(arrays[k], getattr(alone, k), err_msg=k)


def test_calibration_capture_skips_the_decoder_and_feeds_the_same_inputs(tiny_models, monkeypatch):
    """Calibration captures only feed graphs: ``decode=False`` never runs the decoder, gives the same graph inputs
    (also split across two processes) and an empty ``sr`` that no parity case can be built from."""
    from tadsr.pipeline import OneStepPipeline
    from tadsr.quantize.calibration import capture

    lr = np.random.default_rng(1).uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32)
    full = capture(tiny_models, lr, seed=2)
    two = capture(tiny_models, lr, seed=2, workers=2, decode=False)
    decoded: list[int] = []
    real_decode = OneStepPipeline.decode
    monkeypatch.setattr(OneStepPipeline, "decode", lambda self, *a: decoded.append(1) or real_decode(self, *a))
    lean = capture(tiny_models, lr, seed=2, decode=False)
    assert not decoded
    for runs in (lean, two):
        for k in ("lr", "noise", "z_y", "x_t", "x0"):
            np.testing.assert_array_equal(getattr(runs, k), getattr(full, k), err_msg=k)
        assert runs.sr.shape == (3, 0)
        assert runs.case("denoiser", 1).reference["x0"].shape == full.x0[1:2].shape
        for graph in ("decoder", "pipeline"):
            with pytest.raises(ValueError, match="without the decoder"):
                runs.case(graph, 0)


def test_holdout_overlap_check_sees_a_changed_file(tmp_path):
    """The image hash memo lives for one comparison: rewriting a file changes its key next time."""
    from tadsr.quantize.calibration import _file_key

    f = tmp_path / "a.png"
    f.write_bytes(b"one")
    memo: dict = {}
    first = _file_key(f, memo)
    f.write_bytes(b"two")
    assert _file_key(f, memo) == first  # same comparison: memoised
    assert _file_key(f, {}) != first  # next comparison: read again


def test_default_holdout_has_smooth_sky_patches_away_from_calibration():
    """Without the photo set's validation split, the default held-out set adds the shipped dusk-sky crop to the
    textured scikit-image samples: its patches are drawn, they are smoother than the samples', and none is a
    calibration patch (the check runs across the two folders)."""
    pytest.importorskip("skimage")
    from tadsr.patches import default_calibration_dir, sample_patches, shipped_holdout_dir
    from tadsr.quantize import calibration as cal

    src = cal.default_holdout_source()
    if isinstance(src, Path):
        pytest.skip("the source checkout has data/photos/val")
    shipped = [p.hr for p in src.images if p.hr.parent == shipped_holdout_dir()]
    assert [p.name for p in shipped] == ["skimage_rocket_right.png"]
    calib = sample_patches(default_calibration_dir(), num_patches=48, tile=64, seed=0)
    ps, info = cal.sample_holdout(seed=0, calibration=calib)
    assert "skimage_rocket_right.png" in info["files"] and len(info["files"]) == 6
    sky = [i for i, o in enumerate(ps.origins) if o.path == shipped[0]]
    assert sky
    # smoothness: mean absolute difference of neighbouring LR pixels
    grad = [float(np.abs(np.diff(lr, axis=-1)).mean()) for lr in ps.lr]
    assert max(grad[i] for i in sky) < np.median([g for i, g in enumerate(grad) if i not in sky])


# ------------------------------------------------------------------------------------------ recipe helpers


def test_unit_of():
    assert unit_of("unet.input_blocks.1.0.in_layers.2") == "unet.input_blocks.1.0"
    assert unit_of("unet.input_blocks.1.1.blocks.0.attn.qkv") == "unet.input_blocks.1.1.blocks.0"
    assert unit_of("denoiser.unet.input_blocks.1.1.patch_embed.proj") == "denoiser.unet.input_blocks.1.1"
    assert unit_of("encoder.mid.attn_1.q") == "encoder.mid.attn_1"
    assert unit_of("decoder.up.2.upsample.conv") == "decoder.up.2"
    assert unit_of("quant_conv") == "quant_conv"


def test_search_exclusions_smallest_passing_prefix():
    gains = {"a": 6.0, "b": 3.0, "c": 1.0, "d": 0.5, "e": 0.1}
    calls = []

    def evaluate(floats: frozenset[str]) -> float:
        calls.append(floats)
        return 20.0 + sum(gains[u] for u in floats)

    res = search_exclusions(evaluate, list(gains), 29.5)
    assert res.met and res.excluded == ["a", "b", "c"] and res.psnr == 30.0
    assert len(calls) == 5  # 0, 1, 2, 4 float blocks, then bisection (3)
    none = search_exclusions(evaluate, list(gains), 40.0)
    assert not none.met and none.excluded == list(gains)
    pinned = search_exclusions(evaluate, ["b", "c"], 26.0, initial=["a"])
    assert pinned.excluded == ["a"] and pinned.met


def test_hr_budget_keeps_blocks_float_the_psnr_floor_alone_would_quantize(caplog):
    """A configuration must meet the PSNR floor and the HR budget; the result and the trace carry the real PSNR
    and the HR loss of what was measured."""
    gains = {"a": 0.5, "b": 0.2, "c": 0.05}  # PSNR vs fp32 already above the floor with everything INT8
    loss = {"a": 0.6, "b": 0.3, "c": 0.0}  # HR dB lost because of each quantized block

    def run(floats: frozenset[str], feeds):
        quantized = [u for u in gains if u not in floats]
        return [{"y": np.array([40.0 - sum(gains[u] for u in quantized), sum(loss[u] for u in quantized)])}]

    def worst(outs):
        return float(outs[0]["y"][0])

    kw = dict(sens_feeds=[{}], sens_refs=[{}], hold_feeds=[{}], hold_refs=[{}], ranges={}, target=30.0)
    with pytest.MonkeyPatch.context() as mp:  # PSNR "vs fp32" is the first output value of the fake graph
        mp.setattr(sens_mod, "worst_psnr", lambda outs, refs, ranges: worst(outs))
        plain, ranking = find_float_units(run, {u: (1, 1) for u in gains}, [], **kw)
        assert plain.excluded == [] and plain.met and plain.hr_loss is None and ranking == []
        hr = HRBudget(0.25, lambda outs: [float(outs[0]["y"][1])])
        with caplog.at_level(logging.INFO, logger=sens_mod.__name__):
            res, _ = find_float_units(run, {u: (1, 1) for u in gains}, [], hr=hr, **kw)
    # the log reports the all-INT8 evaluation, not the every-block-float one measured after it
    assert "all blocks INT8: 39.25 dB" in caplog.text, caplog.text
    assert res.met and res.hr_loss.bound <= 0.25 and set(res.excluded) == {"a", "b"}, res
    assert res.psnr == pytest.approx(40.0 - 0.05)  # the real PSNR vs fp32, not the search's score
    assert res.trace[0]["hr_loss_db"] == pytest.approx(0.9) and all("hr_loss_db" in t for t in res.trace)


def test_hr_budget_out_of_reach_stops_at_every_block_float_without_a_sweep():
    """When every block float still loses more than the budget, the search measures that once and stops there
    (not met), with no sensitivity sweep; a budget in reach still searches (one evaluation more)."""
    loss = {"a": 0.3, "b": 0.1}  # HR dB lost because of each quantized block, on top of a floor that float keeps
    calls = {"sens": 0, "hold": 0}
    sens, hold = [{"s": 1}], [{"h": 1}]

    def run(floats: frozenset[str], feeds):
        calls["sens" if feeds is sens else "hold"] += 1
        return [{"y": np.array([40.0, 0.2 + sum(v for u, v in loss.items() if u not in floats)])}]

    kw = dict(sens_feeds=sens, sens_refs=[{}], hold_feeds=hold, hold_refs=[{}], ranges={}, target=30.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sens_mod, "worst_psnr", lambda outs, refs, ranges: float(outs[0]["y"][0]))
        res, ranking = find_float_units(run, {u: (1, 1) for u in loss}, ["p"],
                                        hr=HRBudget(0.1, lambda outs: [float(outs[0]["y"][1])]), **kw)  # fmt: skip
        assert not res.met and res.excluded == ["p", "a", "b"] and ranking == [] and calls["sens"] == 0
        assert calls["hold"] == 2 and res.hr_loss.mean == pytest.approx(0.2)
        assert [t["float_units"] for t in res.trace] == [1, 3] and res.trace[1]["hr_loss_db"] == pytest.approx(0.2)
        res, ranking = find_float_units(run, {u: (1, 1) for u in loss}, ["p"],
                                        hr=HRBudget(0.35, lambda outs: [float(outs[0]["y"][1])]), **kw)  # fmt: skip
    assert res.met and res.excluded == ["p", "a"] and ranking and calls["sens"] > 0


def test_component_hr_budget_judges_the_rest_of_the_fp32_chain(tiny_models):
    """A component's held-out outputs reach HR through the rest of the fp32 chain: fed the reference's own latents,
    the tail gives the reference pipeline's image (5 patches: one full batch of the tail and a remainder)."""
    from types import SimpleNamespace

    from tadsr.quantize.hr_tail import HR_TAIL_BATCH, sr_tail
    from tadsr.quantize.calibration import capture

    lr = np.random.default_rng(0).uniform(-1, 1, (HR_TAIL_BATCH + 1, 3, 64, 64)).astype(np.float32)
    runs = capture(tiny_models, lr, seed=3)
    hold = SimpleNamespace(runs=runs)
    n = len(lr)
    for graph, key in (("encoder", "z_y"), ("denoiser", "x0")):
        got = sr_tail(tiny_models, graph, hold, 64)([{key: getattr(runs, key)[i : i + 1]} for i in range(n)])
        assert len(got) == n
        for i, o in enumerate(got):
            np.testing.assert_allclose(o["sr"], runs.sr[i : i + 1], atol=1e-4, err_msg=f"{graph} patch {i}")
        if graph == "denoiser":  # its own codes: every patch but the checked first is the captured image
            assert np.array_equal(got[1]["sr"], runs.sr[1:2])
    # the shares of the three components add up to the whole budget
    assert sum(HR_BUDGET_SHARE[g] for g in ("encoder", "denoiser", "decoder")) == pytest.approx(1.0)
    assert HR_BUDGET_SHARE["pipeline"] == 1.0


def test_hr_tail_reuses_the_captured_image_only_for_the_references_own_codes(tiny_models):
    """The HR baseline of a component's fp32 parent costs no decoder run where its codes are the reference's: the
    captured image stands in, after one decode has shown that the tail's decoder reproduces it. Other codes are
    decoded, and a capture the decoder does not reproduce (another decoder) is never reused."""
    from types import SimpleNamespace

    from tadsr.quantize.hr_tail import sr_tail
    from tadsr.quantize.calibration import capture

    lr = np.random.default_rng(1).uniform(-1, 1, (4, 3, 64, 64)).astype(np.float32)
    runs = capture(tiny_models, lr, seed=5)
    outs = [{"x0": runs.x0[i : i + 1]} for i in range(4)]
    tail = sr_tail(tiny_models, "denoiser", SimpleNamespace(runs=runs), 64)
    got = tail(outs)
    assert tail.reference_images.verified and tail.reference_images.reused == 3
    for i in range(4):
        np.testing.assert_allclose(got[i]["sr"], runs.sr[i : i + 1], atol=1e-4)
    # far-off latents: other codes, decoded (not the captured images)
    far = [{"x0": runs.x0[i : i + 1] + 0.5} for i in range(4)]
    before = tail.reference_images.reused
    moved = tail(far)
    assert tail.reference_images.reused == before
    assert all(not np.allclose(m["sr"], runs.sr[i : i + 1], atol=1e-3) for i, m in enumerate(moved))
    # captured images that are not this decoder's: the check fails and every patch is decoded
    wrong = dataclasses.replace(runs, sr=runs.sr + 0.01)
    tail2 = sr_tail(tiny_models, "denoiser", SimpleNamespace(runs=wrong), 64)
    got2 = tail2(outs)
    assert tail2.reference_images.verified is False and tail2.reference_images.reused == 0
    for i in range(4):
        np.testing.assert_allclose(got2[i]["sr"], runs.sr[i : i + 1], atol=1e-4)


def test_hr_budget_holds_an_upper_confidence_bound_of_the_mean_loss():
    """A mean loss just under the budget, from patches that disagree, does not pass: the budget holds the mean's
    one-sided upper confidence bound (confidence 0.5: the mean itself)."""
    spread = [0.0, 0.5, 0.1, 0.4, 0.2, 0.3]  # mean 0.25, sample sd 0.187 -> se 0.0764
    outs = [{"y": np.array(spread)}]
    loss = HRBudget(0.3, lambda o: o[0]["y"]).measure(outs)
    assert loss.mean == pytest.approx(0.25)
    assert loss.bound == pytest.approx(0.25 + 1.6449 * 0.18708 / 6**0.5, abs=1e-4)  # 95 %: 0.376
    assert HRBudget(0.3, lambda o: o[0]["y"]).score(40.0, outs, 30.0)[0] < 30.0  # bound over the budget: fails
    assert HRBudget(0.3, lambda o: o[0]["y"], confidence=0.5).score(40.0, outs, 30.0)[0] == 40.0
    assert HRBudget(0.4, lambda o: o[0]["y"]).score(40.0, outs, 30.0)[0] == 40.0
    even = HRBudget(0.3, lambda o: [0.25] * 6).measure(outs)  # patches that agree: no margin
    assert even.bound == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="confidence"):
        HRBudget(0.3, lambda o: [0.0], confidence=0.3)


def test_hr_budget_counts_a_patch_that_int8_improves_as_no_loss():
    """Gains on some patches do not pay for losses on others: losses (1.0, 0.2) with a gain of 1.5 on a third
    patch are a mean loss of 0.4, not -0.1 (the all-INT8 bundled encoder passed its budget that way)."""
    outs = [{"y": np.array([1.0, -1.5, 0.2])}]
    loss = HRBudget(0.3, lambda o: o[0]["y"]).measure(outs)
    assert loss.mean == pytest.approx(0.4)
    assert loss.bound == pytest.approx(0.4 + 1.6449 * np.std([1.0, 0.0, 0.2], ddof=1) / 3**0.5, abs=1e-4)
    assert HRBudget(0.3, lambda o: o[0]["y"], confidence=0.5).score(40.0, outs, 30.0)[0] < 30.0
    assert HRBudget(0.3, lambda o: [-0.5, -0.2], confidence=0.5).measure(outs) == (0.0, 0.0)


def test_unit_sensitivity_round_trips_through_its_dict():
    """A ranking stored in a recipe or a shared search reads back as it was: a group keeps its members, a single
    block (stored without them) is its own member."""
    from tadsr.formats.sensitivity import UnitSensitivity

    for u in (UnitSensitivity("blocks", 31.25, 2, 8, ("blocks.1", "blocks.0")), UnitSensitivity("head", 30.5, 1, 4, ("head",))):
        assert UnitSensitivity.from_dict(json.loads(json.dumps(u.to_dict()))) == u


def test_recipe_round_trip_and_errors(tmp_path):
    r = Recipe()
    r.set("encoder", "onnx", BackendRecipe(op_types=["Conv"], float_units=["encoder.conv_in"], psnr=31.25))
    path = r.save(tmp_path / "r.json")
    back = load_recipe(path)
    assert back.get("encoder", "onnx").float_units == ["encoder.conv_in"] and back.get("encoder", "coreml") is None
    data = json.loads(path.read_text())
    data["graphs"]["encoder"]["onnx"]["bogus"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unknown keys"):
        load_recipe(path)
    with pytest.raises(InputError, match="does not exist"):
        load_recipe(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------- PT2E simulator


class _Toy(torch.nn.Module):
    """Two numbered conv blocks and a head: three units for the PT2E machinery, milliseconds to run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(4 if i else 3, 4, 3, padding=1), torch.nn.SiLU()) for i in range(2)
        )
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x) if x.shape[1] == 4 else b(x)
        return self.head(x)


class _Mix(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 4, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([torch.nn.functional.silu(a), torch.nn.functional.silu(b)], dim=1))


class _CatInBlock(torch.nn.Module):
    """Two blocks whose outputs a third block concatenates, as the fused pipeline's ``denoiser`` block holds the
    UNet's skip concatenations (XNNPACK's cat annotator ignores the filter function that keeps a block float)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(3, 4, 3, padding=1) for _ in range(2))
        self.mix = _Mix()
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.blocks[0](x), self.blocks[1](x)))


class _MixFed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 3, 1)

    def forward(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([a, self.b(x)], dim=1))


class _CatFedByInt8(torch.nn.Module):
    """A block ``mix`` that concatenates another block's conv output with its own conv's (``mix.b``): kept
    float, its cat still takes the INT8 input, so the converted graph rounds ``mix.b``'s output to the cat's
    shared scale (XNNPACK has no float cat of INT8 tensors). ``head`` also reads ``blocks.0``'s output, whose
    range is a quarter of ``mix.b``'s: with the cat float, that edge is rounded on its own range."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3, padding=1)])
        self.mix = _MixFed()
        with torch.no_grad():
            self.mix.b.weight.mul_(4.0)
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.blocks[0](x)
        return self.mix(a, x) + self.head(a)


class _ConvBN(torch.nn.Module):
    """A conv + batch norm + relu: the one pattern the conv-bn annotators exist for."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("toy", [_Toy, _ConvBN])
def test_pt2e_quantizer_skips_conv_bn_patterns_only_without_batch_norm(monkeypatch, toy):
    """Without a batch_norm in the graph the conv-bn annotators (a torch.export of their pattern per call) are
    skipped; the annotation is the stock quantizer's either way."""
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as xqu
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    from tadsr.formats.executorch.ptq import PT2E_OP_TYPES, PT2EQuant

    pq = PT2EQuant(toy().eval(), (torch.zeros(1, 3, 8, 8),), output_names=["y"], rewrites="none")
    has_bn = any("batch_norm" in str(n.target) for n in pq.exported.graph.nodes)
    assert has_bn == (toy is _ConvBN)

    def annotations(quantizer) -> dict[str, tuple]:
        gm = quantizer.annotate(copy.deepcopy(pq.exported))
        return {n.name: (sorted(a.name for a in n.meta[Q_ANNOTATION_KEY].input_qspec_map),
                         n.meta[Q_ANNOTATION_KEY].output_qspec is not None)
                for n in gm.graph.nodes if Q_ANNOTATION_KEY in n.meta}  # fmt: skip

    stock = XNNPACKQuantizer()
    for t in pq.op_types:
        for overload in PT2E_OP_TYPES[t]:
            stock.set_operator_type(overload, pq.config)
    want = annotations(stock)
    exports = []
    pattern = xqu._get_aten_graph_module_for_pattern
    monkeypatch.setattr(xqu, "_get_aten_graph_module_for_pattern", lambda *a, **k: exports.append(1) or pattern(*a, **k))
    got = annotations(pq.quantizer([]))
    assert got == want and want
    assert (len(exports) > 0) == has_bn


@pytest.mark.parametrize(("toy", "method"), [(_Toy, "percentile"), (_CatInBlock, "percentile"),
                                             (_CatFedByInt8, "minmax")])  # fmt: skip
def test_pt2e_simulator_matches_convert(toy, method):
    """The switchable fake-quant simulator equals prepare/convert_pt2e with the same blocks float, and a float
    block is float in the converted graph: no INT8 rounding around its concatenation, unless an INT8 tensor
    feeds it (then its float inputs are rounded too, and the simulator rounds them); a tensor that an INT8 and
    a float block both read is rounded on the INT8 block's edge only, and a float cat's tensors on their own
    ranges (min/max calibration, the default: the range table has them; a histogram method keeps the shared one).
    "percentile" is the observer tadsr adds; minmax / entropy are torchao's."""
    from tadsr.formats.executorch.ptq import PT2EQuant

    g = torch.Generator().manual_seed(0)
    feeds = [{"x": torch.randn(1, 3, 8, 8, generator=g).numpy()} for _ in range(3)]
    pq = PT2EQuant(toy().eval(), (torch.zeros(1, 3, 8, 8),), output_names=["y"], rewrites="none", method=method)
    blocks = {_Toy: ["blocks.0", "blocks.1", "head"], _CatInBlock: ["blocks.0", "blocks.1", "head", "mix", "mix.conv"],
              _CatFedByInt8: ["blocks.0", "head", "mix", "mix.b", "mix.conv"]}[toy]  # fmt: skip
    assert sorted(pq.units()) == blocks
    sim = pq.simulator(feeds)
    # the cat is the block mix's own layer; {config: whether the converted cat is INT8}
    configs = {
        _Toy: {(): None, ("blocks.1",): None},
        # x feeds both blocks through one observer: with blocks.1 float, only blocks.0's edge is rounded
        _CatInBlock: {(): True, ("blocks.1",): True, ("blocks.0", "blocks.1"): True, ("mix", "mix.conv"): False},
        _CatFedByInt8: {(): True, ("mix", "mix.b"): True, ("blocks.0", "mix"): True, ("blocks.0", "mix", "mix.b"): False,
                        ("blocks.0", "mix", "mix.b", "mix.conv"): False},  # fmt: skip
    }[toy]
    for floats, int8_cat in configs.items():
        converted = pq.convert(list(floats), feeds)
        (cat,) = [n for n in converted.graph.nodes if n.target == torch.ops.aten.cat.default] or [None]
        assert (cat is None) == (int8_cat is None)
        if cat is not None:
            rounded = [a for a in cat.args[0] if "dequantize_per_tensor" in str(a.target)]
            assert bool(rounded) == int8_cat, (floats, rounded)
        with torch.no_grad():
            want = [converted(torch.from_numpy(f["x"])).numpy() for f in feeds]
        got = [o["y"] for o in sim.run(frozenset(floats), feeds)]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"{method} float {floats}")
    assert pq.int8_fraction(["head"]) < 1.0 == pq.int8_fraction([])


class _Den(torch.nn.Module):
    """A block with a layer of its own (a functional conv: its module path is ``den`` itself) and numbered
    sub-blocks ``den.blocks.<k>``, like the fused pipeline's denoiser graph around its UNet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.conv2d(x, self.weight, padding=1)
        for b in self.blocks:
            x = x + b(x)
        return x


class _Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.den = _Den()
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.den(x))


def test_pt2e_float_block_is_its_own_layers_not_every_block_under_its_name():
    """A float block keeps its own layers float, not the blocks whose names it prefixes; the recipe's INT8 share
    is what the converted graph stores (session 12's fused pipelines kept the whole UNet float for the block
    ``denoiser`` while reporting 96 % of the weights INT8)."""
    from tadsr.formats.executorch.ptq import PT2EQuant

    g = torch.Generator().manual_seed(0)
    feeds = [{"x": torch.randn(1, 3, 8, 8, generator=g).numpy()} for _ in range(3)]
    pq = PT2EQuant(_Outer().eval(), (torch.zeros(1, 3, 8, 8),), output_names=["y"], rewrites="none")
    assert set(pq.units()) == {"den", "den.blocks.0", "den.blocks.1", "head"}
    converted = pq.convert(["den"], feeds)
    convs = [n for n in converted.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default]
    int8 = [n for n in convs if n.args[1].op == "call_function"]  # the weight read through a dequantize node
    assert len(convs) == 4 and len(int8) == 3, [(n.name, n.args[1].op) for n in convs]

    def params(n: torch.fx.Node) -> int:
        w = n.args[1] if n.args[1].op == "get_attr" else n.args[1].args[0]
        return int(functools.reduce(getattr, w.target.split("."), converted).numel())

    share = sum(params(n) for n in int8) / sum(params(n) for n in convs)
    assert pq.int8_fraction(["den"]) == pytest.approx(share, abs=1e-4)


class _Cat(torch.nn.Module):
    """Two blocks whose outputs meet in a cat (its inputs share one observer) and a float-able head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(3, 4, 3, padding=1) for _ in range(2))
        with torch.no_grad():
            self.blocks[0].weight.mul_(0.1)  # the cat's first input spans less than the second
        self.head = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.nn.functional.silu(b(x)) for b in self.blocks], dim=1))


class _Folded(torch.nn.Module):
    """A conv whose weight the graph computes (a scale folded in, as the mobile rewrites do): a per-channel
    observer watches a computed node, not a constant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.scale = torch.nn.Parameter(torch.rand(4, 1, 1, 1) + 0.5)
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.conv2d(x, self.weight * self.scale, padding=1))


@pytest.mark.parametrize("toy", [_Toy, _Cat, _Folded])
def test_pt2e_one_calibration_pass_for_every_recipe(monkeypatch, toy):
    """The patches run once per feeds list: every later convert and the simulator fill their observers from the
    recorded ranges, and give bit for bit what a calibration pass would (other patches: a new pass)."""
    from tadsr.formats.executorch.ptq import PT2EQuant

    g = torch.Generator().manual_seed(1)
    feeds = [{"x": torch.randn(1, 3, 8, 8, generator=g).numpy()} for _ in range(3)]
    make = lambda: PT2EQuant(toy().eval(), (torch.zeros(1, 3, 8, 8),), output_names=["y"], rewrites="none")  # noqa: E731
    reference = make()
    fresh = reference.simulator(feeds)
    passes = []
    calibrate = PT2EQuant._calibrate
    monkeypatch.setattr(PT2EQuant, "_calibrate", staticmethod(lambda *a: passes.append(1) or calibrate(*a)))
    pq = make()
    pq.convert(sorted(pq.pinned), feeds)
    sim = pq.simulator(feeds)
    units = sorted(pq.units())
    for floats in ([], units[:1], units[1:]):
        got = pq.convert(floats, feeds)
        prepared = reference._prepare(floats)  # the old way: run the patches through this recipe's graph
        calibrate(prepared, feeds, False)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        want = convert_pt2e(prepared)
        x = torch.from_numpy(feeds[0]["x"])
        with torch.no_grad():
            np.testing.assert_array_equal(got(x).numpy(), want(x).numpy(), err_msg=f"float {floats}")
        for a, b in zip(sim.run(frozenset(floats), feeds), fresh.run(frozenset(floats), feeds), strict=True):
            np.testing.assert_array_equal(a["y"], b["y"])
    assert len(passes) == 1
    pq.simulator(list(feeds))  # not the list the table was recorded on
    assert len(passes) == 2


class _ToyJob:
    """The QuantizeJob surface pt2e_recipe uses, on :class:`_Toy` with ``n`` random 8x8 feeds (calibration and
    held-out alike), a 200 dB floor and no HR budget; a test overrides the recipe lookups it is about."""

    name, method, progress, ranges, target = "toy", "minmax", False, {}, 200.0

    def __init__(self, seed: int, n: int) -> None:
        from types import SimpleNamespace

        g = torch.Generator().manual_seed(seed)
        feeds = [{"x": torch.randn(1, 3, 8, 8, generator=g).numpy()} for _ in range(n)]
        self.graph = _Toy().eval()
        with torch.no_grad():
            self.parent_outputs = [{"y": self.graph(torch.from_numpy(f["x"])).numpy()} for f in feeds]
        self.spec = SimpleNamespace(example_inputs=lambda: (torch.zeros(1, 3, 8, 8),),
                                    outputs=[SimpleNamespace(name="y")])  # fmt: skip
        self.calib = SimpleNamespace(feeds=lambda name: feeds)
        self.hold = SimpleNamespace(cases=lambda name: [SimpleNamespace(inputs=f) for f in feeds])

    def entry(self, backend):
        return None

    def hr(self):
        return None

    def meets(self, psnr, outs):
        return psnr >= self.target, None

    def shipped_search(self, backend_key, units, pinned):
        return None

    def shared_search(self, units, pinned, share):
        return None

    def shared_ranges(self, share, method):
        return None

    def save_ranges(self, share, method, ranges):
        pass


class _ComputedWeight(torch.nn.Module):
    """A convolution whose weight the graph computes (weight x gain, as a folded norm): its per-channel weight
    observer is calibrated by running the graph, and a range table keeps it as an observer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.gain = torch.nn.Parameter(torch.rand(3, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, self.conv.weight * self.gain, self.conv.bias, padding=1)


@pytest.mark.parametrize("computed", [False, True])
def test_pt2e_range_table_is_recorded_once_for_the_formats_that_share_the_graph(monkeypatch, computed):
    """The second format's PT2E call on the same graph and patches restores the calibration range table the first
    one stored (as JSON, as between the lanes' processes; with a computed weight, its observer's state too)
    instead of running the patches, and converts to the same graph; a table naming nodes the graph lacks is
    ignored."""
    import tadsr.formats.executorch.ptq as ptq

    store: dict = {}
    passes = []
    calibrate = ptq.PT2EQuant._calibrate  # every pass of the patches through a prepared graph
    monkeypatch.setattr(ptq.PT2EQuant, "_calibrate", staticmethod(lambda *a: passes.append(1) or calibrate(*a)))

    class Job(_ToyJob):
        target = 0.0  # all INT8 meets it: one conversion per call

        def __init__(self, seed: int, n: int) -> None:
            super().__init__(seed, n)
            if computed:
                self.graph = _ComputedWeight().eval()

        def shared_ranges(self, share, method):
            return store.get((tuple(share), method))

        def save_ranges(self, share, method, ranges):
            store[(tuple(share), method)] = json.loads(json.dumps(ranges))

    first, _, _ = ptq.pt2e_recipe(Job(seed=5, n=3), "executorch", "none")
    assert len(passes) == 1 and len(store) == 1
    assert bool(next(iter(store.values()))["observers"]) == computed
    second, _, _ = ptq.pt2e_recipe(Job(seed=5, n=3), "coreml", "none")
    assert len(passes) == 1, "the second format ran the calibration patches again"
    x = torch.from_numpy(Job(seed=5, n=3).calib.feeds("toy")[0]["x"])
    with torch.no_grad():
        np.testing.assert_array_equal(first(x).numpy(), second(x).numpy())
    (key,) = store
    store[key] = {**store[key], "ranges": {**store[key]["ranges"], "not_a_node": [0.0, 1.0]}}
    ptq.pt2e_recipe(Job(seed=5, n=3), "coreml", "none")
    assert len(passes) == 2


def test_pt2e_recipe_converts_a_shared_search_and_repairs_it_on_the_converted_graph():
    """A PT2E recipe taken from another format's search is converted and judged on the converted graph; when it
    misses the criteria there, the next most sensitive blocks go float (1, then 2) until it meets them."""
    from tadsr.formats.executorch.ptq import pt2e_recipe
    from tadsr.formats.sensitivity import SearchResult, UnitSensitivity

    # the ranking's groups list their blocks (a group left whole, "blocks", is its members, in their order)
    ranking = [UnitSensitivity("head", 30.0, 1, 1, ("head",)), UnitSensitivity("blocks", 31.0, 2, 2, ("blocks.1", "blocks.0"))]
    searched = SearchResult([], 99.0, True, [{"float_units": 0, "added": None, "psnr": 99.0}])

    class Job(_ToyJob):
        def shared_search(self, units, pinned, share):
            assert set(units) == {"head", "blocks.0", "blocks.1"} and share[0] == "pt2e"
            return searched, ranking

        def search(self, *a, **k):
            raise AssertionError("a shared search is not searched again")

    _, entry, _ = pt2e_recipe(Job(seed=2, n=4), "coreml", "none")
    assert entry.source == "shared"
    # 200 dB: only the float graph meets it, so every block goes float, in ranking order, 1 then up to 2 at a time
    assert entry.float_units == ["head", "blocks.1", "blocks.0"], entry.float_units
    assert [t.get("added") for t in entry.search[1:]] == [["head"], ["blocks.1", "blocks.0"]]
    assert all(t["graph"] == "converted" for t in entry.search[1:]) and entry.psnr >= 200.0


def test_shipped_update_replaces_only_the_pairs_it_brings_and_carries_dynamic_units(tmp_path):
    """``--update``: a re-run format's recipes replace that format's entries, the others stay; a shipped entry's
    dynamic units come back with it as a search's outcome."""
    from tadsr.quantize import shipped

    def item(graph, backend, **recipe):
        cond = {"graph": graph, "backend": backend, "tile": 64}
        return {"conditions": cond, "recipe": BackendRecipe(op_types=["conv2d"], **recipe).to_dict(), "from": "x"}

    path = shipped.write([item("pipeline", "executorch", float_units=["a"]), item("pipeline", "onnx", float_units=["b"]),
                          item("decoder", "executorch", float_units=[])], tmp_path / "r.json")  # fmt: skip
    new = [item("pipeline", "executorch", float_units=["a", "c"], dynamic_units=["c"])]
    shipped.write(shipped.merged(new, shipped._load(path)), path)
    got = {(it["conditions"]["graph"], it["conditions"]["backend"]): it for it in shipped._load(path)}
    assert sorted(got) == [("decoder", "executorch"), ("pipeline", "executorch"), ("pipeline", "onnx")]
    assert got[("pipeline", "onnx")]["recipe"]["float_units"] == ["b"]
    entry = shipped.lookup(got[("pipeline", "executorch")]["conditions"], path)
    result, _ = shipped.to_search(entry)
    assert result.excluded == ["a", "c"] and result.dynamic == ["c"]
    with pytest.raises(ConfigError, match="dynamic_units"):
        BackendRecipe.from_dict({"op_types": ["conv2d"], "float_units": ["a"], "dynamic_units": ["z"]})


@pytest.mark.parametrize(("bound", "met"), [(0.0996, True), (0.1, True), (0.1006, False)])
def test_a_component_recipe_at_its_third_of_the_budget_is_collected(bound, met):
    """A component holds a third of the 0.3 dB budget (0.09999999999999999 dB); its record keeps the bound rounded
    to 3 decimals, so a bound the search held at 0.0996 reads 0.1. Session 33's main job lost the ExecuTorch
    denoiser's recipe from the shipped file that way. Judged on the record's grid it is met; 0.1006 is not."""
    from tadsr.quantize import shipped

    entry = BackendRecipe(op_types=["conv2d"], float_units=["a"], psnr=47.7, target_psnr=30.0, hr_bound_db=bound,
                          hr_loss_db=0.06, hr_budget_db=0.3 / 3, hr_confidence=0.95)  # fmt: skip
    assert shipped._met(entry) is met
    assert shipped.to_search(entry)[0].met is met


@pytest.mark.parametrize("meets", [True, False])
def test_pt2e_recipe_starts_from_a_shipped_recipe_and_searches_when_it_misses(meets):
    """A recipe shipped for the same conditions is converted and judged on the converted graph: when it meets the
    criteria it is the recipe (no search, not shared); when it misses them, the search runs as without it."""
    from tadsr.formats.executorch.ptq import pt2e_recipe
    from tadsr.formats.sensitivity import SearchResult, UnitSensitivity

    # every block float is the fp32 graph (meets 200 dB); with the blocks INT8 the converted graph misses it
    units = ["head", "blocks.1", "blocks.0"] if meets else ["head"]
    shipped = SearchResult(units, 99.0, True, [{"float_units": len(units), "psnr": 99.0}])
    ranking = [UnitSensitivity("head", 30.0, 1, 1, ("head",))]
    searched = []

    class Job(_ToyJob):
        def shipped_search(self, backend_key, units, pinned):
            assert backend_key == "executorch" and set(units) == {"head", "blocks.0", "blocks.1"}
            return shipped, ranking

        def shared_search(self, units, pinned, share):
            assert not meets, "a shipped recipe that meets the criteria is not looked up elsewhere"
            return None

        def search(self, run, units, pinned, fp32_run, share=None):
            searched.append(units)
            return SearchResult(["head"], 10.0, False, [{"float_units": 1, "psnr": 10.0}]), ranking

    _, entry, _ = pt2e_recipe(Job(seed=3, n=3), "executorch", "none")
    if meets:
        assert entry.source == "shipped" and not searched
        assert entry.float_units == ["head", "blocks.1", "blocks.0"] and entry.psnr >= 200.0
        assert entry.search[:-1] == shipped.trace and entry.search[-1] == {
            "float_units": 3, "added": "shipped", "psnr": round(entry.psnr, 3), "graph": "converted"}
    else:
        assert searched and entry.source == "auto" and entry.psnr < 200.0


@pytest.mark.parametrize("reach", ["out of reach", "met there"])
def test_a_shipped_out_of_reach_outcome_is_kept_without_a_search_when_it_misses_here_too(reach):
    """A recipe shipped from a search that found the criteria out of reach (every block float, not met) and that
    misses them here too is the search's outcome (source shipped, not met, no search); a shipped recipe that met
    them there and misses here still searches. ``collect`` ships the out-of-reach outcome, with its verdict."""
    from tadsr.formats.executorch.ptq import pt2e_recipe
    from tadsr.formats.sensitivity import SearchResult
    from tadsr.quantize import shipped as shipped_mod

    units = ["head", "blocks.1", "blocks.0"]
    met_there = reach == "met there"
    trace = [{"float_units": 0, "added": None, "psnr": 20.0}, {"float_units": 3, "added": "all", "psnr": 50.0}]
    searched = []

    class Job(_ToyJob):
        def meets(self, psnr, outs):
            return False, None  # nothing meets the criteria here

        def shipped_search(self, backend_key, known, pinned):
            return SearchResult(list(units), 50.0, met_there, trace), []

        def search(self, run, units_, pinned, fp32_run, share=None):
            searched.append(1)
            return SearchResult(list(units), 50.0, False, trace), []

    _, entry, _ = pt2e_recipe(Job(seed=5, n=2), "executorch", "none")
    assert bool(searched) == met_there
    if not met_there:
        assert entry.source == "shipped" and entry.float_units == units and entry.search[-1]["added"] == "shipped"
    recipe = BackendRecipe(op_types=["conv2d"], float_units=units, source="all", target_psnr=60.0, psnr=50.0,
                           search=trace)  # fmt: skip
    assert shipped_mod._out_of_reach(recipe) and not shipped_mod._met(recipe)
    assert shipped_mod.to_search(recipe)[0].met is False
    assert not shipped_mod._out_of_reach(BackendRecipe(op_types=["conv2d"], float_units=[], source="all",
                                                       target_psnr=60.0, psnr=50.0, search=trace[:1]))  # fmt: skip


@pytest.mark.parametrize("target", [20.0, 200.0])
def test_pt2e_recipe_runs_float_blocks_dynamic_int8_when_that_still_meets_the_criteria(target):
    """ExecuTorch: once a float set meets the criteria, its blocks' layers run dynamic INT8 (INT8 weights, each
    activation's range taken from the tensor at run time) in one more conversion, kept only when that graph
    still meets them, else the less sensitive half and quarter are tried; Core ML (no dynamic activations) never
    tries."""
    from tadsr.formats.executorch.ptq import pt2e_recipe
    from tadsr.formats.sensitivity import SearchResult

    units = ["head", "blocks.1", "blocks.0"]  # every block float: the fp32 graph, which meets any floor

    class Job(_ToyJob):
        def shipped_search(self, backend_key, known, pinned):
            return SearchResult(list(units), 99.0, True, [{"float_units": 3, "psnr": 99.0}]), []

    job = Job(seed=4, n=3)
    job.target = target
    converted, entry, _ = pt2e_recipe(job, "executorch", "none", dynamic=True)
    dynamic_nodes = [n for n in converted.graph.nodes if "choose_qparams" in str(n.target)]
    trials = [t for t in entry.search if "dynamic" in t]
    assert all(t["graph"] == "converted" for t in trials)
    if target == 20.0:  # dynamic INT8 of the toy is ~40 dB from fp32
        assert [t["dynamic"] for t in trials] == [units]
        assert entry.dynamic_units == units and len(dynamic_nodes) == 3 and entry.int8_fraction == 1.0
        assert 20.0 <= entry.psnr < 200.0 and trials[0]["psnr"] == round(entry.psnr, 3)
    else:  # only the float graph meets 200 dB: all, the less sensitive half, quarter tried; the blocks stay float
        assert [t["dynamic"] for t in trials] == [units, units[1:], units[2:]]
        assert entry.dynamic_units == [] and not dynamic_nodes and entry.int8_fraction == 0.0
        assert entry.psnr >= 200.0 > max(t["psnr"] for t in trials)
    _, core, _ = pt2e_recipe(job, "coreml", "none")
    assert core.dynamic_units == [] and not any("dynamic" in t for t in core.search)
    if target == 200.0:  # shipped with that trace (tried, none kept): measured, not tried again
        outcome = SearchResult(list(units), entry.psnr, True, list(entry.search))
        job.shipped_search = lambda backend_key, known, pinned: (outcome, [])
        _, again, _ = pt2e_recipe(job, "executorch", "none", dynamic=True)
        assert again.source == "shipped" and again.dynamic_units == []
        assert again.search[:-1] == entry.search and "dynamic" not in again.search[-1]


class _Reshaped(torch.nn.Module):
    """Three convolutions, the middle one reading a reshaped and scaled tensor (as after a GroupNorm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Conv2d(i, o, 3, padding=1) for i, o in ((3, 32), (32, 32), (32, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.silu(self.a(x))
        y = (y.reshape(1, 2, 16, 16 * 16) * 0.5).reshape(1, 32, 16, 16)
        return self.c(torch.nn.functional.silu(self.b(y)))


def test_executorch_lowers_dynamic_int8_blocks_into_xnnpack_smaller_than_float(tmp_path, monkeypatch):
    """A recipe's dynamic units lower into the XNNPACK delegate (no layer left outside it), store INT8 weights
    (a smaller file than with the blocks float) and run in the ExecuTorch runtime as the converted graph does,
    also where a reshape and a scalar multiply precede a layer (executorch 1.5's channels-last pass alone gives a
    program that fails on execute there). Their conversion needs no calibration pass of its own."""
    from executorch.runtime import Runtime

    from tadsr.formats.executorch.ptq import PT2EQuant, quantize_executorch

    graph = _Reshaped().eval()
    example = (torch.zeros(1, 3, 16, 16),)
    g = torch.Generator().manual_seed(0)
    feeds = [{"x": torch.randn(1, 3, 16, 16, generator=g).numpy()} for _ in range(2)]
    pq = PT2EQuant(graph, example, output_names=["y"], rewrites="none")
    passes = []
    calibrate = PT2EQuant._calibrate
    monkeypatch.setattr(PT2EQuant, "_calibrate", staticmethod(lambda *a: passes.append(1) or calibrate(*a)))
    units = sorted(pq.units())
    sizes = {}
    for name, dyn in (("float", []), ("dynamic", units)):
        gm = pq.convert(units, feeds, dynamic_units=dyn)
        res = quantize_executorch(gm, example, tmp_path, name=name, output_names=["y"])
        sizes[name] = (tmp_path / f"{name}.pte").stat().st_size
        assert not [op for op in res.info["ops_outside_delegates"] if "conv" in op], res.info
        x = torch.from_numpy(feeds[0]["x"])
        method = Runtime.get().load_program(tmp_path / f"{name}.pte").load_method("forward")
        got = method.execute([x])[0].numpy()
        with torch.no_grad():
            want, fp32 = gm(x).numpy(), graph(x).numpy()
        np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())
        if dyn:
            assert 0 < np.abs(got - fp32).max() < 0.1 * np.abs(fp32).max()
    assert sizes["dynamic"] < sizes["float"] - 3 * 32 * 9 * 32, sizes  # 3x the middle conv's weight bytes saved
    assert len(passes) == 1  # the range table's one pass


def test_pt2e_fake_quant_hop_reuses_the_held_out_outputs_and_judges_with_fixed_threads():
    """The fake-quant run pt2e_recipe returns answers the held-out patches (asked again as new arrays, as the
    write's hop does) from the outputs that judged the converted graph, without a second pass; other feeds run.
    The graph runs with the reproducible thread count whatever the caller's, so a recipe's judgement (and a
    shipped recipe's) does not depend on ``--threads``."""
    from tadsr.formats.executorch.ptq import pt2e_recipe
    from tadsr.threads import REPRODUCIBLE_THREADS

    job = _ToyJob(seed=4, n=3)
    job.target = 0.0  # all blocks INT8 meet it: no search
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        converted, _, (fq, _, _) = pt2e_recipe(job, "executorch", "none")
        threads: list[int] = []
        converted.register_forward_pre_hook(lambda m, a: threads.append(torch.get_num_threads()))
        feeds = [{"x": c.inputs["x"].copy()} for c in job.hold.cases("toy")]
        again = fq(feeds)
        assert threads == [], "the held-out patches ran through the converted graph a second time"
        with torch.no_grad():
            want = [converted(torch.from_numpy(f["x"])).numpy() for f in feeds]
        for got, w in zip(again, want, strict=True):
            np.testing.assert_array_equal(got["y"], w)
        threads.clear()
        other = fq([{"x": feeds[0]["x"] + 1.0}])
        assert threads == [REPRODUCIBLE_THREADS]
        with torch.no_grad():
            np.testing.assert_array_equal(other[0]["y"], converted(torch.from_numpy(feeds[0]["x"] + 1.0)).numpy())
    finally:
        torch.set_num_threads(before)


def test_onnx_int8_starts_from_the_shipped_recipe_of_the_same_conditions(tiny_onnx_artifacts, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """A recipe collected from an INT8 folder (``python -m tadsr.quantize.shipped``) is used by a quantize call
    under the same conditions without a search, and the same file results; other conditions (another PSNR floor)
    or ``shipped_recipes=False`` search."""
    import tadsr.quantize.shipped as shipped
    from tadsr.formats import sensitivity
    from tadsr.quantize.calibration import CaptureCache

    parent = tiny_onnx_artifacts / "encoder-onnx-fp32-t64"
    kw = {**SMALL_NO_HR, "target_psnr": 40.0, "parity_gate": False,  # 40 dB: the tiny encoder searches
          "captures": CaptureCache()}  # fmt: skip
    (first,) = quantize_artifact(parent, out_dir=tmp_path / "a", **kw)
    r1 = load_recipe(first).get("encoder", "onnx")
    assert r1.source == "auto" and r1.psnr >= 40.0, r1
    store = tmp_path / "shipped.json"
    assert shipped.main([str(tmp_path / "a"), str(store)]) == 0
    monkeypatch.setattr(shipped, "SHIPPED_PATH", store)
    calls = []
    real = sensitivity.find_float_units
    monkeypatch.setattr("tadsr.quantize.api.find_float_units", lambda *a, **k: calls.append(1) or real(*a, **k))
    (again,) = quantize_artifact(parent, out_dir=tmp_path / "b", **kw)
    r2 = load_recipe(again).get("encoder", "onnx")
    assert not calls and r2.source == "shipped" and r2.float_units == r1.float_units, r2
    assert r2.target_psnr == 40.0 and r2.psnr == pytest.approx(r1.psnr, abs=1e-3)
    assert _sha(first / "encoder.onnx") == _sha(again / "encoder.onnx")

    class Searched(Exception):
        pass

    def search(*a, **k):
        raise Searched

    monkeypatch.setattr("tadsr.quantize.api.find_float_units", search)
    with pytest.raises(Searched):  # another floor: not the shipped recipe's conditions
        quantize_artifact(parent, out_dir=tmp_path / "c", **{**kw, "target_psnr": 39.0})
    with pytest.raises(Searched):
        quantize_artifact(parent, out_dir=tmp_path / "d", shipped_recipes=False, **kw)
    doc = json.loads(store.read_text())  # a block this graph does not have (a renamed module): searched, no error
    doc["recipes"][0]["recipe"]["float_units"].append("encoder.no_such_block")
    store.write_text(json.dumps(doc))
    with pytest.raises(Searched):
        quantize_artifact(parent, out_dir=tmp_path / "e", **kw)


def test_onnx_calibration_ranges_shipped_for_the_same_model_and_feeds_give_the_same_file(tiny_onnx_artifacts,
                                                                                          tmp_path, monkeypatch):  # fmt: skip
    """The ranges an ONNX INT8 folder records (``calibration_ranges.json``, collected by ``python -m
    tadsr.quantize.shipped --ranges``) replace ORT's calibration in a call with the same key (model, feeds,
    method, ORT version): no calibration run, the same bytes. Other feeds (another seed) calibrate; so does
    ``shipped_recipes=False``."""
    import tadsr.quantize.shipped as shipped
    from tadsr.formats.onnx import ptq
    from tadsr.quantize.calibration import CaptureCache

    parent = tiny_onnx_artifacts / "encoder-onnx-fp32-t64"
    kw = {**SMALL_NO_HR, "parity_gate": False, "captures": CaptureCache()}
    (first,) = quantize_artifact(parent, out_dir=tmp_path / "a", **kw)
    recorded = json.loads((first / ptq.RANGES_NAME).read_text())
    assert recorded["source"] == "calibrated" and recorded["ort_cache"]
    store = tmp_path / "ranges.json"
    assert shipped.main(["--ranges", str(tmp_path / "a"), str(store)]) == 0
    monkeypatch.setattr(shipped, "RANGES_PATH", store)
    calibrations = []
    real = ptq.OnnxPTQ._calibrate
    monkeypatch.setattr(ptq.OnnxPTQ, "_calibrate",
                        lambda self, reader, opset: calibrations.append(True) or real(self, reader, opset))  # fmt: skip
    (again,) = quantize_artifact(parent, out_dir=tmp_path / "b", **kw)
    assert not any(calibrations), "calibrated although the ranges were shipped for this key"
    assert json.loads((again / ptq.RANGES_NAME).read_text())["source"] == "shipped"
    assert read_manifest(again)["backend_info"]["calibration_ranges"]["source"] == "shipped"
    assert _sha(first / "encoder.onnx") == _sha(again / "encoder.onnx")
    for other in ({"seed": 1}, {"shipped_recipes": False}):
        calibrations.clear()
        quantize_artifact(parent, out_dir=tmp_path / f"c{len(other)}{list(other)[0]}", **{**kw, **other})
        assert any(calibrations), other


def test_shipped_ranges_update_keeps_the_other_keys(tmp_path):
    """``--ranges`` writes the INT8 folder's tables alone; ``--update --ranges`` adds them to what the file holds
    (another CPU's keys stay) and replaces a table of the same key."""
    import tadsr.quantize.shipped as shipped
    from tadsr.formats.onnx.ptq import RANGES_NAME

    def int8_dir(name: str, tables: dict[str, str]) -> Path:
        for key, graph in tables.items():
            folder = tmp_path / name / f"{graph}-onnx-int8-t64"
            folder.mkdir(parents=True)
            (folder / RANGES_NAME).write_text(json.dumps({"key": key, "ort_cache": {"data": f"{graph}@{name}"}}))
        return tmp_path / name

    store = tmp_path / "ranges.json"
    held = lambda: {k: v["ort_cache"]["data"] for k, v in json.loads(store.read_text())["ranges"].items()}  # noqa: E731
    assert shipped.main(["--ranges", str(int8_dir("intel", {"k1": "encoder", "k2": "denoiser"})), str(store)]) == 0
    assert held() == {"k1": "encoder@intel", "k2": "denoiser@intel"}
    amd = int8_dir("amd", {"k1": "encoder", "k3": "denoiser"})
    assert shipped.main(["--update", "--ranges", str(amd), str(store)]) == 0
    assert held() == {"k1": "encoder@amd", "k2": "denoiser@intel", "k3": "denoiser@amd"}
    assert shipped.lookup_ranges("k2", store) == {"data": "denoiser@intel"}
    assert shipped.main(["--ranges", str(amd), str(store)]) == 0
    assert held() == {"k1": "encoder@amd", "k3": "denoiser@amd"}
    store.write_text("{not json")  # unreadable: nothing is served, and --update starts it again
    assert shipped.lookup_ranges("k1", store) is None
    assert shipped.main(["--update", "--ranges", str(amd), str(store)]) == 0
    assert held() == {"k1": "encoder@amd", "k3": "denoiser@amd"}


@pytest.mark.parametrize("graph", ["encoder", "pipeline"])
def test_onnx_calibration_computes_the_ranges_quantize_static_computes(tiny_onnx_artifacts, tmp_path, graph):
    """OnnxPTQ calibrates with ORT's calibrator alone (not a whole quantize_static call, which also built an INT8
    model and held more copies of the graph): the same range table, entry for entry."""
    from tadsr.formats.onnx import ptq

    rng = np.random.default_rng(0)
    folder = tiny_onnx_artifacts / f"{graph}-onnx-fp32-t64"
    specs = read_manifest(folder)["graph"]["inputs"]
    feeds = [{t["name"]: rng.uniform(-1, 1, t["shape"]).astype(np.float32) for t in specs} for _ in range(4)]
    lean = ptq.OnnxPTQ(folder / f"{graph}.onnx", tmp_path / "lean", feeds)
    mine = json.loads(lean.calib_cache.read_text())
    lean.calib_cache = tmp_path / "static-ranges.json"  # no cache file: quantize_static calibrates itself
    lean._quantize(tmp_path / "static.onnx", [], ptq._Feeds(feeds))
    theirs = json.loads(lean.calib_cache.read_text())
    assert mine == theirs and len(json.dumps(mine)) > 100


def test_onnx_int8_build_hands_over_the_outputs_its_last_variant_measured(tiny_onnx_artifacts, tmp_path):
    """The file built for the float set the search ran last is that variant's model (bytes equal but for the
    metadata written later): the build hands the variant's held-out outputs over, and the file reproduces them
    bit for bit. Another float set or other feeds: nothing handed over."""
    from tadsr.formats.onnx import ptq

    rng = np.random.default_rng(0)
    folder = tiny_onnx_artifacts / "encoder-onnx-fp32-t64"
    specs = read_manifest(folder)["graph"]["inputs"]
    feeds = [{t["name"]: rng.uniform(-1, 1, t["shape"]).astype(np.float32) for t in specs} for _ in range(3)]
    q = ptq.OnnxPTQ(folder / "encoder.onnx", tmp_path / "w", feeds)
    units = sorted(q.units())[:2]
    outs = q.run_variant(frozenset(units), feeds)
    q.release()
    built = q.build(units, tmp_path / "a.onnx", feeds=feeds)
    assert q.built_measured is outs
    for got, want in zip(q.run(built, feeds), outs, strict=True):
        assert all(np.array_equal(got[k], want[k]) for k in want)
    q.build(units, tmp_path / "b.onnx", feeds=feeds[:2])
    assert q.built_measured is None
    q.build(units[:1], tmp_path / "c.onnx", feeds=feeds)
    assert q.built_measured is None


def test_int8_write_runs_one_case_when_it_reproduces_the_measured_outputs():
    """The write runs the held-out cases the search already measured on the same model only when the file's own
    first run differs from it; otherwise one case."""
    from types import SimpleNamespace

    from tadsr.quantize.api import _held_out_outputs

    cases = [SimpleNamespace(inputs={"x": np.full((1, 2), float(i), np.float32)}) for i in range(4)]
    calls = []

    def run(inputs):
        calls.append(1)
        return {"y": inputs["x"] * 2}

    measured = [{"y": c.inputs["x"] * 2} for c in cases]
    got, searched = _held_out_outputs(run, cases, measured, "t")
    assert len(calls) == 1 and all(np.array_equal(g["y"], m["y"]) for g, m in zip(got, measured, strict=True))
    assert searched  # the search's outputs (and whatever its run tapped) stand for the file's
    calls.clear()
    off = [{"y": m["y"] + (i == 0)} for i, m in enumerate(measured)]
    got, searched = _held_out_outputs(run, cases, off, "t")
    assert len(calls) == 1 + len(cases) and np.array_equal(got[0]["y"], measured[0]["y"]) and not searched
    calls.clear()
    assert not _held_out_outputs(run, cases, None, "t")[1]
    assert len(calls) == len(cases)


def test_float_block_weights_stored_int8_for_core_ml(tmp_path):
    """A block the recipe keeps float keeps float activations but stores its weights INT8 + dequantize (Core ML:
    constexpr_affine_dequantize): one more INT8 weight in the package, output within the weights' rounding, the
    quantized blocks untouched."""
    from tadsr.formats.coreml.ptq import coreml_w8a8
    from tadsr.formats.executorch.ptq import PT2EQuant, int8_float_weights
    from tadsr.runtime.coreml_sim import load_mlpackage

    g = torch.Generator().manual_seed(0)
    feeds = [{"x": torch.randn(1, 3, 8, 8, generator=g).numpy()} for _ in range(3)]
    example = (torch.zeros(1, 3, 8, 8),)
    pq = PT2EQuant(_Toy().eval(), example, output_names=["y"], rewrites="none")
    plain = pq.convert(["blocks.1"], feeds)
    converted = pq.convert(["blocks.1"], feeds)
    stats = int8_float_weights(converted, ["blocks.1"], pq.targets)
    assert stats["tensors"] == 1 and stats["int8_bytes"] < stats["fp32_bytes"] / 2, stats  # blocks.1's conv only
    x = torch.from_numpy(feeds[0]["x"])
    with torch.no_grad():
        before, after = plain(x).numpy(), converted(x).numpy()
    assert 0 < np.abs(after - before).max() < 0.05
    counts = []
    for i, gm in enumerate((plain, converted)):
        res = coreml_w8a8(gm, example, tmp_path, name=f"toy{i}", input_names=["x"], output_names=["y"])
        counts.append(res.info["mil_ops"].get("constexpr_affine_dequantize", 0))
    assert counts[1] == counts[0] + 1, counts
    got = load_mlpackage(tmp_path / "toy1.mlpackage").predict({"x": feeds[0]["x"]})["y"]
    np.testing.assert_allclose(got, after, atol=1e-4)  # the package computes what the measured graph computes


class _ToyAddConstants(torch.nn.Module):
    """conv -> + a (1, 4, 64, 64) map (large, read only by add: goes INT8) + a (1, 1, 64, 64) map (64 values per
    scale along its first non-unit axis: stays float) -> * a (1, 4, 64, 64) map (read by mul: stays float)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("big", torch.randn(1, 4, 64, 64, generator=g) * torch.tensor([1.0, 3, 0.1, 0])[:, None, None])
        self.register_buffer("thin", torch.randn(1, 1, 64, 64, generator=g))
        self.register_buffer("gain", torch.rand(1, 4, 64, 64, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + self.big + self.thin) * self.gain


def test_int8_add_constants_graph_executorch_coreml(tmp_path):
    """Large add-only constants become INT8 + dequantize_per_channel (per index of the first non-unit axis,
    an all-zero channel included); the graph's output moves by at most the stored error; the fp32 original is
    dropped; ExecuTorch lowers it (the dequantize runs outside XNNPACK) and Core ML stores it as
    constexpr_affine_dequantize; both run and agree with the rewritten graph."""
    from tadsr.formats.coreml.ptq import coreml_w8a8
    from tadsr.formats.executorch.ptq import int8_add_constants, quantize_executorch
    from tadsr.runtime.coreml_sim import load_mlpackage

    toy = _ToyAddConstants().eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gm = torch.export.export(toy, (x,)).module()
        want = gm(x)
        stats = int8_add_constants(gm)
        got = gm(x)
    big = toy.big
    assert stats["tensors"] == 1 and stats["fp32_bytes"] == big.numel() * 4
    assert stats["int8_bytes"] == big.numel() + 4 * 12
    step = big.abs().amax(dim=(0, 2, 3)) / 127  # per channel; channel 3 is all zero
    assert 0 < stats["max_abs_error"] <= float(step.max()) / 2 + 1e-6
    gain = toy.gain.abs().max().item()
    assert 0 < (got - want).abs().max().item() <= stats["max_abs_error"] * gain + 1e-5
    state = gm.state_dict()
    assert "big" not in state and "thin" in state and "gain" in state
    q = [t for k, t in state.items() if t.dtype == torch.int8]
    assert len(q) == 1 and q[0].shape == big.shape and int(q[0][0, 3].abs().max()) == 0
    dq = [n for n in gm.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(dq) == 1 and dq[0].args[3] == 1  # axis 1: per channel
    assert int8_add_constants(gm)["tensors"] == 0  # idempotent: nothing float and large is left

    pte = quantize_executorch(gm, (x,), tmp_path, name="toy", output_names=["y"])
    assert any("dequantize_per_channel" in k for k in pte.info["ops_outside_delegates"]), pte.info
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    y = _load_for_executorch(str(tmp_path / "toy.pte")).forward([x])[0]
    np.testing.assert_allclose(y.numpy(), got.numpy(), atol=1e-4)

    ml = coreml_w8a8(gm, (x,), tmp_path, name="toy_ml", input_names=["x"], output_names=["y"])
    assert ml.info["mil_ops"].get("constexpr_affine_dequantize", 0) >= 1, ml.info["mil_ops"]
    sim = load_mlpackage(tmp_path / "toy_ml.mlpackage")
    np.testing.assert_allclose(sim.predict({"x": x.numpy()})["y"], got.numpy(), atol=1e-4)


def test_pt2e_simulator_stores_add_constants_int8_as_convert_does():
    """The recipe search's simulator computes what the converted graph ships: its large add-only constants INT8
    (the tiny denoiser's x0 was 0.44 of 3.9 apart with every block INT8 before, session 20)."""
    from tadsr.formats.executorch.ptq import PT2EQuant

    g = torch.Generator().manual_seed(2)
    feeds = [{"x": torch.randn(1, 3, 64, 64, generator=g).numpy()} for _ in range(2)]
    pq = PT2EQuant(_ToyAddConstants().eval(), (torch.zeros(1, 3, 64, 64),), output_names=["y"], rewrites="none")
    converted = pq.convert([], feeds)
    assert pq.constants["tensors"] == 1
    got = pq.simulator(feeds).run(frozenset(), feeds)
    with torch.no_grad():
        for f, o in zip(feeds, got, strict=True):
            np.testing.assert_array_equal(o["y"], converted(torch.from_numpy(f["x"])).numpy())


def test_rank_units_coarse_to_fine():
    """Sensitive blocks are isolated; harmless subtrees are measured as a whole (fewer evaluations than blocks)."""
    from tadsr.formats.sensitivity import rank_units

    names = [f"enc.down.{i}.block.{j}" for i in range(4) for j in range(2)] + [
        "enc.mid.attn_1",
        "enc.mid.attn_1/matmul",
    ]
    names += [f"dec.up.{i}" for i in range(6)] + ["quant_conv"]
    cost = {"enc.mid.attn_1/matmul": 12.0, "dec.up.3": 11.0}  # dB lost when quantized
    evals = []

    def evaluate(floats: frozenset[str]) -> float:
        evals.append(floats)
        lost = sum(cost.get(n, 0.05) for n in names if n not in floats)
        return 50.0 - lost

    ranking = rank_units(evaluate, {n: (1, 10) for n in names}, target=30.0)
    assert [r.unit for r in ranking[:2]] == ["enc.mid.attn_1/matmul", "dec.up.3"]
    assert ranking[0].members == ("enc.mid.attn_1/matmul",)
    assert sorted(m for r in ranking for m in r.members) == sorted(names)
    assert len(evals) < len(names)


def test_unwritable_output_folder_fails_before_any_work(tiny_onnx_artifacts: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="cannot write to the output folder"):
        quantize_artifact(tiny_onnx_artifacts / "encoder-onnx-fp32-t64", out_dir=blocker / "int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_capture_cache_on_disk_is_shared_and_waited_for(monkeypatch, tmp_path):
    """Two caches over one folder (two lanes of ``tadsr all``): the second waits for the first one's captures
    (file lock) and reads them back bit for bit instead of capturing again; another model or an edited tadsr
    captures anew."""
    import threading
    import time
    from types import SimpleNamespace

    import numpy as np

    from tadsr.parity.hops import RUN_ARRAYS, ReferenceRuns
    from tadsr.quantize import calibration as cal

    calls = []

    def fake(kind):
        def load(models, patches, progress, workers=1):
            calls.append(kind)
            time.sleep(0.5)  # long enough for the other thread to reach the lock
            rng = np.random.default_rng(len(calls))
            arr = {k: rng.standard_normal((2, 3, 4, 4)).astype(np.float32) for k in RUN_ARRAYS}
            return cal.CalibrationSet(runs=ReferenceRuns(**arr, source=f"{kind} src"), info=patches[1],
                                      patches=patches[0])  # fmt: skip
        return load

    monkeypatch.setattr(cal, "capture_both", lambda models, c, h, progress, workers: (
        fake("c")(models, c, progress, workers), fake("h")(models, h, progress, workers)))  # fmt: skip
    manifest = {"preset": {"name": "tiny"}, "sources": {"student": {"sha256": "a"}}}
    calib = (SimpleNamespace(content_hash="x"), {"seed": 0})
    hold = (SimpleNamespace(content_hash="y"), {"seed": 1})
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, cal.CaptureCache(tmp_path).get(
        manifest, None, calib, hold))) for i in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["c", "h"]  # captured once
    for a, b in zip(got[0], got[1], strict=True):
        assert a.runs.source == b.runs.source and a.info is not None
        assert all(np.array_equal(getattr(a.runs, k), getattr(b.runs, k)) for k in RUN_ARRAYS)
    cal.CaptureCache(tmp_path).get({**manifest, "sources": {"student": {"sha256": "b"}}}, None, calib, hold)
    assert len(calls) == 4
    cal.CaptureCache(tmp_path, salt="edited tadsr").get(manifest, None, calib, hold)
    assert len(calls) == 6


class _CatBetweenInt8(torch.nn.Module):
    """Two INT8 convs concatenated straight into a third (a UNet skip concatenation): with the ``cat``'s block
    float, XNNPACK sees dequantize -> cat -> quantize with two input scales and one output scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(3, 4, 3, padding=1) for _ in range(2))
        with torch.no_grad():
            self.blocks[1].weight.mul_(4.0)  # the second input spans more than the first: other scale
        self.mix = _CatConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.blocks[0](x), self.blocks[1](x))


class _CatConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 3, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([a, b], dim=1))


def test_float_cat_between_int8_blocks_lowers_and_loads(tmp_path):
    """A recipe that keeps a ``cat``'s block float between INT8 convs lowers to a .pte that ExecuTorch loads and
    that computes the converted graph (the main job's fused ExecuTorch pipeline failed to load here, session 19:
    "Failed to create cat2 node ... xnn_status_invalid_parameter"); the partitioner keeps a mixed-scale
    dequantize -> cat -> quantize in float (test_xnnpack_partitioner_keeps_a_mixed_scale_cat_float)."""
    from tadsr.formats.executorch.ptq import PT2EQuant, quantize_executorch
    from tadsr.formats.graphs import GraphSpec, TensorSpec
    from tadsr.runtime.executorch_runner import ExecuTorchRunner

    g = torch.Generator().manual_seed(0)
    feeds = [{"x": torch.randn(1, 3, 8, 8, generator=g).numpy()} for _ in range(3)]
    pq = PT2EQuant(_CatBetweenInt8().eval(), (torch.zeros(1, 3, 8, 8),), output_names=["y"], rewrites="none")
    converted = pq.convert(["mix"], feeds)
    (cat,) = [n for n in converted.graph.nodes if n.target == torch.ops.aten.cat.default]
    # its inputs are INT8: the float block's cat stays INT8 on one scale (XNNPACK has no float cat of INT8 inputs)
    scales = {float(a.args[1]) for a in [*cat.args[0], *cat.users]}
    assert len(scales) == 1 and all("dequantize" in str(a.target) for a in cat.args[0]), scales
    res = quantize_executorch(converted, (torch.zeros(1, 3, 8, 8),), tmp_path, name="toy", output_names=["y"])
    spec = GraphSpec("toy", 8, 1, (TensorSpec("x", (1, 3, 8, 8)),), (TensorSpec("y", (1, 3, 8, 8)),)).to_dict()
    runner = ExecuTorchRunner(tmp_path / res.files[0], spec, threads=1)
    for f in feeds:
        with torch.no_grad():
            want = converted(torch.from_numpy(f["x"])).numpy()
        np.testing.assert_allclose(runner.run(f)["y"], want, atol=0.05)


def test_onnx_int8_write_takes_the_vq_view_from_the_search_run(tiny_onnx_artifacts, tmp_path, monkeypatch):
    """The INT8 decoder's write judges flips with the latent and codes its search's run of the same model tapped
    (the file is not run again on every held-out case), and the verdicts are those of the file re-run tapped."""
    import tadsr.parity.taps as taps
    from tadsr.quantize import api

    parent = tiny_onnx_artifacts / "decoder-onnx-fp32-t64"
    kw = {**SMALL_NO_HR, "holdout_patches": 3, "parity_gate": False, "target_psnr": 10.0}  # no search: one variant
    reruns = []
    real = api.artifact_view
    monkeypatch.setattr(api, "artifact_view", lambda path, *a, **k: reruns.append(Path(path).name) or real(path, *a, **k))
    (tapped,) = quantize_artifact(parent, out_dir=tmp_path / "a", **kw)
    assert not reruns, reruns  # neither the file (the search's run tapped it) nor the parent (its export view)
    monkeypatch.setattr(api._Ctx, "vq_taps", lambda self: None)
    (rerun,) = quantize_artifact(parent, out_dir=tmp_path / "b", **kw)
    assert len(reruns) == 1, reruns  # no taps: the written file runs again
    text_a, text_b = ((d / "manifest.json").read_text() for d in (tapped, rerun))
    assert taps.SEARCH_RUN in text_a and taps.SEARCH_RUN not in text_b
    hops_a, hops_b = (json.loads(t.replace(taps.SEARCH_RUN, "onnx file re-run"))["parity"] for t in (text_a, text_b))
    assert hops_a == hops_b


def test_shipped_cli_help_and_a_missing_folder_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tadsr.quantize.shipped as shipped

    store = tmp_path / "shipped.json"
    assert shipped.main(["--help"]) == 0 and "usage:" in capsys.readouterr().out
    for args in ([str(tmp_path / "nope")], ["--ranges", str(tmp_path / "nope")], ["--update", str(tmp_path / "nope")]):
        assert shipped.main([*args, str(store)]) == 2
        assert "is not a folder" in capsys.readouterr().err
    assert not store.exists()  # nothing written
