"""ONNX export: every graph of the tiny preset through export_model, ORT vs torch, file properties, helpers.

The four real exports happen once: the session fixture ``tiny_onnx_artifacts`` of tests/conftest.py when it
exists (shared with the runtime tests), else a module fixture here (~40 s of CPU). The helper tests use a toy
module or hand-built ONNX models and take milliseconds to a few seconds.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tadsr.errors import ConfigError
from tadsr.formats.onnx import export as onnx_export
from tadsr.export.api import export_model
from tadsr.formats.graphs import GRAPH_NAMES, GraphSpec, TensorSpec, make_graphs
from tadsr.formats.onnx.export import export_onnx, unshare_initializers
from tadsr.parity.hops import HOP_REFERENCE, end_to_end_hop, load_floors, real_lr_patches, runtime_hop
from tadsr.metrics import psnr
from tadsr.pipeline import OneStepPipeline, make_noise
from tadsr.runtime.runner import load_runner, read_manifest




@pytest.fixture(scope="module")
def models(single_thread, tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def exported(request, models, tmp_path_factory):
    """graph -> artifact folder of the tiny fp32 ONNX exports (pipeline + components, tile 64)."""
    try:
        out = request.getfixturevalue("tiny_onnx_artifacts")  # shared session export, if conftest has it
    except pytest.FixtureLookupError:
        out = tmp_path_factory.mktemp("onnx-artifacts")
        # without the onnxscript optimizer (a third of the export time; the default path is covered by the
        # toy tests here and the encoder export in test_artifact.py)
        export_model(models, graphs=("pipeline", "components"), tile=64, out_dir=out, n_real=1,
                     backend_options={"onnx": {"optimize": False}})  # fmt: skip
    return {name: Path(out) / f"{name}-onnx-fp32-t64" for name in GRAPH_NAMES}


@pytest.fixture(scope="module")
def runners(exported):
    return {name: load_runner(path) for name, path in exported.items()}


@pytest.fixture(scope="module")
def graphs(models):
    return make_graphs(models, 64)


def test_every_graph_is_exported_with_passing_parity(exported):
    for name, path in exported.items():
        m = read_manifest(path)
        assert m["parity_passed"] is True, [h for h in m["parity"] if not h["passed"]]
        assert [f["name"] for f in m["files"]] == [f"{name}.onnx"]
        assert sorted(p.name for p in path.iterdir()) == sorted([f"{name}.onnx", "manifest.json"])
    leftovers = [p.name for p in exported["pipeline"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_ort_matches_torch_graph(runners, graphs, name):
    graph, spec = graphs[name]
    inputs = spec.example_inputs(seed=7)  # not the seed parity used
    with torch.no_grad():
        want = graph(*inputs).numpy()
    got = runners[name].run({s.name: x.numpy() for s, x in zip(spec.inputs, inputs, strict=True)})[spec.outputs[0].name]
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4


def test_pipeline_psnr_vs_reference_pipeline(runners, models):
    lr = real_lr_patches(64, 4, 2)[0][1:2]  # a real patch parity did not use
    noise = make_noise((1, 3, 64, 64), seed=99)
    ref = OneStepPipeline(models)(torch.from_numpy(lr), noise=noise).numpy()
    got = runners["pipeline"].run({"lr": lr, "noise": noise.numpy()})["sr"]
    assert psnr(got, ref, data_range=2.0) >= 80.0


def test_recorded_parity_hops(exported):
    for name, path in exported.items():
        hops = read_manifest(path)["parity"]
        assert {h["hop"] for h in hops} == {HOP_REFERENCE, runtime_hop("onnx"), end_to_end_hop("onnx")}
        assert {h["inputs"] for h in hops} == {"seeded", "real"}
        assert all(h["passed"] for h in hops)
        (floor,) = load_floors("fp32", name, "tiny").values()
        for h in hops:
            assert h["floor"]["max_abs"] == floor.max_abs and h["floor"]["psnr"] == floor.psnr
            if name in ("encoder", "denoiser"):
                assert h["max_abs"] <= 1e-4  # ORT agrees far better than the cross-backend floor
            else:
                assert h["psnr"] >= 80.0


def test_onnx_file_properties(exported, graphs):
    for name, path in exported.items():
        spec = graphs[name][1]
        m = onnx.load(str(path / f"{name}.onnx"))
        onnx.checker.check_model(m, full_check=True)
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18

        def io(values):
            return [(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]

        assert io(m.graph.input) == [(s.name, s.shape) for s in spec.inputs]
        assert io(m.graph.output) == [(s.name, s.shape) for s in spec.outputs]
        props = {p.key: p.value for p in m.metadata_props}
        assert props["tadsr.graph"] == name and props["tadsr.tile"] == "64" and props["tadsr.preset"] == "tiny"
        assert json.loads(props["tadsr.constants"]) == json.loads(json.dumps(spec.constants))
        assert json.loads(props["tadsr.sources"])["student"]["path"] == "random-fill"
        assert "torch" in json.loads(props["tadsr.tool_versions"])
        assert unshare_initializers(m) == 0  # every consumer already has its own initializer
        info = read_manifest(path)["backend_info"]
        assert info["opset"] == 18 and info["external_data"] is False and info["simplified"] is True


# ------------------------------------------------------------------------------------------- helpers (fast)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)) + x


_TOY_SPEC = GraphSpec(name="toy", tile=8, scale=1, inputs=(TensorSpec("x", (1, 3, 8, 8)),),
                      outputs=(TensorSpec("y", (1, 3, 8, 8)),))  # fmt: skip


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return _Toy().eval().requires_grad_(False)


def _ort(model: onnx.ModelProto | str, feeds: dict) -> list[np.ndarray]:
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_export_onnx_toy_single_file(tmp_path, single_thread):
    res = export_onnx(_toy(), _TOY_SPEC, tmp_path, metadata={"preset": "toy-preset", "sources": {"a": 1}})
    assert res.files == ["toy.onnx"] and res.format == "onnx" and res.precision == "fp32"
    assert res.info["simplified"] is True and res.warnings == []
    x = _TOY_SPEC.example_inputs()[0]
    got = _ort(str(tmp_path / "toy.onnx"), {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, _toy()(x).numpy(), atol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "toy.onnx")).metadata_props}
    assert props["tadsr.preset"] == "toy-preset" and json.loads(props["tadsr.sources"]) == {"a": 1}


class _WideToy(_Toy):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 7, padding=3)  # 441 weights: above onnx's 1 KB inline threshold


def test_export_onnx_external_data_and_fp16(tmp_path, single_thread):
    (tmp_path / "ext").mkdir()
    torch.manual_seed(0)
    wide = _WideToy().eval().requires_grad_(False)
    res = export_onnx(wide, _TOY_SPEC, tmp_path / "ext", external_data_threshold=0)
    assert res.files == ["toy.onnx", "toy.onnx.data"] and res.info["external_data"] is True
    # onnx creates the data file 0600; the artifact's files share one mode (readable where the .onnx is)
    modes = {stat.S_IMODE((tmp_path / "ext" / f).stat().st_mode) for f in res.files}
    assert len(modes) == 1, modes
    x = _TOY_SPEC.example_inputs()[0].numpy()
    np.testing.assert_allclose(_ort(str(tmp_path / "ext" / "toy.onnx"), {"x": x})[0],
                               wide(torch.from_numpy(x)).numpy(), atol=1e-5)  # fmt: skip
    want = _toy()(torch.from_numpy(x)).numpy()
    (tmp_path / "half").mkdir()
    half = export_onnx(_toy(), _TOY_SPEC, tmp_path / "half", precision="fp16")
    m = onnx.load(str(tmp_path / "half" / half.files[0]))
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 I/O kept
    assert any(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)
    got = _ort(m, {"x": x})[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 2e-2


def test_save_model_threshold_and_stale_data_file(tmp_path):
    """save_model: weights beside the graph above the threshold, inline below it; a re-save inline removes the
    data file an earlier external save left (onnx appends to it, and readers take its presence as external)."""
    w = numpy_helper.from_array(np.arange(600, dtype=np.float32).reshape(600, 1), "w")  # 2.4 KB: above 1 KB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [w])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    assert onnx_export.save_model(model, path, threshold=0) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size == 2400
    x = np.ones((1, 600), np.float32)
    assert _ort(str(path), {"x": x})[0].item() == pytest.approx(599 * 600 / 2)
    assert numpy_helper.to_array(model.graph.initializer[0]).sum() == 599 * 600 / 2  # the caller's model is whole
    assert onnx_export.save_model(model, path, threshold=0) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size == 2400  # rewritten, not appended to
    assert onnx_export.save_model(model, path, threshold=onnx_export.PROTOBUF_LIMIT) == ["m.onnx"]
    assert not (tmp_path / "m.onnx.data").exists()
    assert _ort(str(path), {"x": x})[0].item() == pytest.approx(599 * 600 / 2)


def test_export_onnx_rejects_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(_toy(), _TOY_SPEC, tmp_path, opset=17)
    with pytest.raises(ConfigError, match="precision"):
        export_onnx(_toy(), _TOY_SPEC, tmp_path, precision="int8")


def test_simplify_failure_keeps_plain_model(tmp_path, monkeypatch, single_thread):
    import onnxsim

    def boom(*a, **k):
        raise RuntimeError("simulated onnxsim crash")

    monkeypatch.setattr(onnxsim, "simplify", boom)
    res = export_onnx(_toy(), _TOY_SPEC, tmp_path)
    assert res.info["simplified"] is False and "simulated onnxsim crash" in res.info["simplify_note"]
    assert len(res.warnings) == 1 and "not simplified" in res.warnings[0]
    onnx.checker.check_model(str(tmp_path / "toy.onnx"))


def _shared_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["b"]),
        helper.make_node("Add", ["w", "w"], ["c"]),
        helper.make_node("Add", ["b", "c"], ["y"]),
    ]
    g = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [w])  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_unshare_initializers():
    m = _shared_model()
    x = {"x": np.ones((2, 2), np.float32)}
    before = _ort(m, x)[0]
    assert unshare_initializers(m) == 3
    names = [i for n in m.graph.node for i in n.input if i not in ("x", "a", "b", "c")]
    assert len(names) == len(set(names)) == 4
    onnx.checker.check_model(m)
    np.testing.assert_array_equal(_ort(m, x)[0], before)
    assert unshare_initializers(m) == 0


def test_simplify_that_changes_outputs_is_rejected(monkeypatch):
    import onnxsim

    plain = _shared_model()

    def wrong(model, **kwargs):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((2, 2), np.float32), "w"))
        return bad, True

    monkeypatch.setattr(onnxsim, "simplify", wrong)
    kept, simplified, note = onnx_export._simplify(plain, {"x": np.ones((2, 2), np.float32)})
    assert kept is plain and simplified is False and "changed outputs" in note


class _Rewritable(_Toy):
    """The toy plus transpose and reshape pairs: graphs where the exporter's rewrite rules fire."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return y.reshape(1, -1).reshape(1, 3, 8, 8) * 2


def test_exporter_optimizer_without_the_skipped_rules_gives_the_same_model(single_thread):
    """The rules ``_to_onnx`` leaves out of the exporter's optimizer exist (so leaving them out does something),
    and only they are left out: where other rules fire, the model is byte for byte the ``optimize=True`` one.
    (That the skipped rules change none of our graphs was checked on every tiny, light and bundled graph, session
    18; the tiny denoiser alone takes a minute to export twice.)"""
    from onnxscript import rewriter

    def rule_names() -> set:
        return {getattr(r, "name", None) for r in rewriter._DEFAULT_REWRITE_RULES}

    names = rule_names()
    assert onnx_export.SKIPPED_REWRITE_RULES <= names
    with onnx_export._rewrite_rules_without(onnx_export.SKIPPED_REWRITE_RULES):
        assert rule_names() == names - onnx_export.SKIPPED_REWRITE_RULES
    assert rule_names() == names  # restored

    torch.manual_seed(0)
    graph = _Rewritable().eval().requires_grad_(False)
    args = _TOY_SPEC.example_inputs()

    def export(optimize: bool) -> onnx.ModelProto:
        with torch.no_grad():
            return torch.onnx.export(torch.export.export(graph, args, strict=False), args, dynamo=True,
                                     opset_version=onnx_export.MIN_OPSET, input_names=["x"], output_names=["y"],
                                     optimize=optimize, verbose=False).model_proto  # fmt: skip

    stock, plain = export(True), export(False)
    ours = onnx_export._to_onnx(graph, _TOY_SPEC, onnx_export.MIN_OPSET, optimize=True)
    assert len(stock.graph.node) < len(plain.graph.node)  # the rules had work to do
    assert ours.SerializeToString() == stock.SerializeToString()
