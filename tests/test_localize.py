"""Localisation machinery on a toy pipeline with the real graphs' structure (class names, glue ops, block lists).

The toy mirrors tadsr.formats.graphs: EncoderGraph(Encoder with ``down.N.block.K`` levels) -> prior sample in
PipelineGraph.forward -> DenoiserGraph (``x_t / input_scale``, ``unet.forward_with_embedding`` with input /
output block lists and skip concats) -> DecoderGraph (codebook argmin + embedding, Decoder with ``up.N``
levels run in reverse, clamp). It exports in about a second, so units, ONNX name matching, the weight check,
Core ML and ExecuTorch localisation are tested here in seconds; tests/test_parity.py runs the real tiny graphs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tadsr.formats.graphs import GraphSpec, TensorSpec
from torch import nn

from tadsr.formats.localize import (
    build_localization,
    check_onnx_weights,
    localize_chain,
    localize_onnx,
    make_units,
    onnx_output_scale,
    trace_graph,
    unit_of_tensor,
)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread, restored after


# ------------------------------------------------------------------------------------------------- the toy


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.conv(x))


def _level(c: int, n: int) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList([Block(c, c) for _ in range(n)])
    return level


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = _conv(3, 8)
        self.down = nn.ModuleList([_level(8, 2), _level(8, 1)])
        self.conv_out = _conv(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
        return self.conv_out(torch.relu(h))  # glue of the network root: joins the next unit


class EncoderGraph(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.quant_conv = nn.Conv2d(3, 3, 1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(lr))


class UNetModelSwin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([Block(6, 8), Block(8, 8)])
        self.middle_block = Block(8, 8)
        self.output_blocks = nn.ModuleList([Block(16, 8), Block(16, 8)])
        self.out = nn.Sequential(nn.GroupNorm(2, 8), _conv(8, 3))

    def forward_with_embedding(self, x: torch.Tensor, emb: None, lq: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, lq], dim=1)
        hs = []
        for b in self.input_blocks:
            h = b(h)
            hs.append(h)
        h = self.middle_block(h)
        for b in self.output_blocks:
            h = b(torch.cat([h, hs.pop()], dim=1))
        return self.out(h)


class DenoiserGraph(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unet = UNetModelSwin()
        self.register_buffer("input_scale", torch.tensor(2.2), persistent=False)

    def forward(self, x_t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        return self.unet.forward_with_embedding(x_t / self.input_scale, None, lr)


class Quantizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(16, 3)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        zf = z.permute(0, 2, 3, 1).reshape(-1, 3)
        d = (zf**2).sum(1, keepdim=True) + (self.embedding.weight**2).sum(1) - 2 * zf @ self.embedding.weight.t()
        return d.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = _conv(3, 8)
        self.up = nn.ModuleList([_level(8, 1), _level(8, 2)])
        self.conv_out = _conv(8, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
        return self.conv_out(h)


class DecoderGraph(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quantize = Quantizer()
        self.post_quant_conv = nn.Conv2d(3, 3, 1)
        self.decoder = Decoder()

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        zq = self.quantize.embedding(self.quantize.indices(x0)).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(zq)).clamp(-1.0, 1.0)


class PipelineGraph(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = EncoderGraph()
        self.denoiser = DenoiserGraph()
        self.decoder = DecoderGraph()
        self.register_buffer("noise_scale", torch.tensor(1.98), persistent=False)

    def forward(self, lr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x_t = self.encoder(lr) + self.noise_scale * noise
        return self.decoder(self.denoiser(x_t, lr))


T = 16
SPEC = GraphSpec(
    name="pipeline", tile=T, scale=1,
    inputs=(TensorSpec("lr", (1, 3, T, T), value_range=(-1.0, 1.0)), TensorSpec("noise", (1, 3, T, T))),
    outputs=(TensorSpec("sr", (1, 3, T, T), value_range=(-1.0, 1.0)),),
)  # fmt: skip
UNITS = [
    "encoder.conv_in", "encoder.down.0", "encoder.down.1", "encoder.conv_out", "quant_conv", "prior sample",
    "input scaling", "input_blocks.0", "input_blocks.1", "middle_block", "output_blocks.0", "output_blocks.1", "out",
    "quantize", "post_quant_conv", "decoder.conv_in", "decoder.up.1", "decoder.up.0", "decoder.conv_out", "clamp",
]  # fmt: skip
STAGES = {"prior sample": "prior sample", "input scaling": "input scaling", "quantize": "decoder", "clamp": "decoder"}


@pytest.fixture(scope="module")
def toy() -> PipelineGraph:
    torch.manual_seed(0)
    return PipelineGraph().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return {s.name: x.numpy() for s, x in zip(SPEC.inputs, SPEC.example_inputs(1), strict=True)}


@pytest.fixture(scope="module")
def onnx_trace(toy):
    return trace_graph(toy, SPEC, variant="onnx")


@pytest.fixture(scope="module")
def toy_onnx(toy, tmp_path_factory):
    from tadsr.formats.onnx.export import export_onnx

    out = tmp_path_factory.mktemp("toy_onnx")
    export_onnx(toy, SPEC, out)  # the production path: dynamo exporter, onnxsim, unshared initializers
    return out / "pipeline.onnx"


# ------------------------------------------------------------------------------------------------- units


def test_units_follow_blocks_and_schedule_steps(onnx_trace):
    units = onnx_trace.units
    assert [u.name for u in units] == UNITS
    for u in units:
        want = STAGES.get(u.name, u.name.split(".")[0] if u.name.startswith(("encoder", "decoder")) else None)
        if u.name in ("quant_conv",):
            want = "encoder"
        elif u.name in ("post_quant_conv",):
            want = "decoder"
        elif want is None:
            want = "denoiser"
        assert u.stage == want, u
        assert u.outputs, f"{u.name} has no output"
    # the skip concats of the UNet join the output block they feed; the input concat is part of input scaling
    assert any(n.startswith("cat") for n in units[UNITS.index("output_blocks.0")].nodes)
    assert any(n.startswith("div") for n in units[UNITS.index("input scaling")].nodes)
    assert units[UNITS.index("decoder.up.1")].path == "decoder.decoder.up.1"


def test_component_graph_units_are_named_like_the_fused_graph(toy):
    ep = torch.export.export(toy.decoder, (torch.zeros(1, 3, T, T),), strict=False)
    assert [u.name for u in make_units(ep.graph_module, "decoder")] == UNITS[UNITS.index("quantize") :]
    ep = torch.export.export(toy.denoiser, (torch.zeros(1, 3, T, T), torch.zeros(1, 3, T, T)), strict=False)
    names = [u.name for u in make_units(ep.graph_module, "denoiser")]
    assert names == UNITS[UNITS.index("input scaling") : UNITS.index("quantize")]


@pytest.mark.parametrize(
    ("tensor", "graph", "unit", "stage"),
    [
        ("unet.input_blocks.4.0.op.weight", "denoiser", "input_blocks.4", "denoiser"),
        ("denoiser.unet.output_blocks.2.1.blocks.0.attn.qkv.weight", "pipeline", "output_blocks.2", "denoiser"),
        ("decoder.up.1.block.0.conv1.weight", "decoder", "decoder.up.1", "decoder"),
        ("decoder.decoder.mid.attn_1.q.weight", "pipeline", "decoder.mid", "decoder"),
        ("encoder.encoder.down.0.downsample.conv.bias", "pipeline", "encoder.down.0", "encoder"),
        ("quantize.embedding.weight", "decoder", "quantize", "decoder"),
        ("noise_scale", "pipeline", "prior sample", "prior sample"),
        ("denoiser.input_scale", "pipeline", "input scaling", "input scaling"),
        ("input_scale", "denoiser", "input scaling", "input scaling"),
        ("quant_conv.weight", "encoder", "quant_conv", "encoder"),
    ],
)  # fmt: skip
def test_unit_of_tensor(tensor, graph, unit, stage):
    assert unit_of_tensor(tensor, graph) == (unit, stage)


# -------------------------------------------------------------------------------------------------- ONNX


def _scaled_copy(path, tmp_path, name, factor):
    m = onnx.load(str(path))
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * np.float32(factor)).astype(np.float32), name))
    out = tmp_path / f"tampered-{name}.onnx"
    onnx.save(m, str(out))
    return out


def test_onnx_clean_file_has_no_divergence(toy_onnx, onnx_trace, inputs):
    loc = localize_onnx(toy_onnx, onnx_trace, inputs, case="seeded", threshold_psnr=80)
    assert loc.first is None, loc.summary()
    # onnxsim folds a few tensors away; every unit must still be observable (its output or a tensor inside it)
    assert loc.observed == len(UNITS), [u.unit for u in loc.units if u.status == "n/a"]
    assert all(u.psnr > 100 for u in loc.units)


@pytest.mark.parametrize("threshold", [1024, 0])
def test_onnx_tap_of_a_file_with_external_weights(toy_onnx, inputs, tmp_path, monkeypatch, threshold):
    """A file whose weights are in a data file (official-size exports: tensors over 1 KB) is tapped without loading
    its weights into Python: ORT reads them from beside the file, wherever the caller's working directory is; with
    every tensor there (shape constants too, which ORT cannot read that way) they are loaded. The tapped and graph
    outputs are those of the same model stored inline."""
    from tadsr.formats.onnx.localize import OnnxTap

    m = onnx.load(str(toy_onnx))
    name = next(n.output[0] for n in m.graph.node if n.op_type == "Conv")
    folder = tmp_path / "art"
    folder.mkdir()
    onnx.save_model(m, str(folder / "pipeline.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="pipeline.onnx.data", size_threshold=threshold)  # fmt: skip
    stored = onnx.load(str(folder / "pipeline.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    monkeypatch.chdir(tmp_path)  # not the artifact's folder
    feeds = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
    loads = []
    real = onnx.load_external_data_for_model
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a: loads.append(1) or real(*a))
    inline, external = OnnxTap(toy_onnx, [name]).run(feeds), OnnxTap(folder / "pipeline.onnx", [name]).run(feeds)
    assert len(loads) == (threshold == 0)
    assert name in external and inline.keys() == external.keys()
    for k in inline:
        np.testing.assert_array_equal(external[k], inline[k], err_msg=k)


@pytest.mark.parametrize(
    ("initializer", "unit", "stage"),
    [
        ("decoder.decoder.up.1.block.0.conv.weight", "decoder.up.1", "decoder"),
        ("denoiser.unet.input_blocks.1.conv.weight", "input_blocks.1", "denoiser"),
        ("noise_scale", "prior sample", "prior sample"),
        ("denoiser.input_scale", "input scaling", "input scaling"),
    ],
)  # fmt: skip
def test_onnx_tampered_tensor_is_localised(toy, toy_onnx, onnx_trace, inputs, tmp_path, initializer, unit, stage):
    bad = _scaled_copy(toy_onnx, tmp_path, initializer, 1.7)
    loc = localize_onnx(bad, onnx_trace, inputs, case="seeded", threshold_psnr=80)
    assert loc.first is not None and loc.first.unit == unit and loc.first.stage == stage, loc.summary()
    assert f"first divergence at {unit}" in loc.summary()
    units_before = [u for u in loc.units[: loc.units.index(loc.first)] if u.status != "n/a"]
    assert units_before and all(u.status == "ok" for u in units_before)
    tensors = dict(toy.named_parameters()) | dict(toy.named_buffers())
    wc = check_onnx_weights(bad, tensors, precision="fp32")
    assert [m["tensor"] for m in wc.mismatches] == [initializer]
    assert unit_of_tensor(initializer, "pipeline") == (unit, stage)
    assert check_onnx_weights(toy_onnx, tensors, precision="fp32").passed


# ------------------------------------------------------------------------------------- quantization scales


def _qdq_model(scale: float, through_clip: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq" if through_clip else "y"])]  # fmt: skip
    if through_clip:
        inits += [
            numpy_helper.from_array(np.array(-1, np.float32), "lo"),
            numpy_helper.from_array(np.array(1, np.float32), "hi"),
        ]
        nodes.append(helper.make_node("Clip", ["dq", "lo", "hi"], ["y"]))
    g = helper.make_graph(nodes, "qdq", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("through_clip", [False, True])
def test_output_scale_from_qdq_graph(tmp_path, through_clip):
    path = tmp_path / "m.onnx"
    onnx.save(_qdq_model(0.0078125, through_clip), str(path))
    scale, where = onnx_output_scale(path, "y")
    assert scale == pytest.approx(0.0078125)
    assert "DequantizeLinear" in where and ("Clip" in where) == through_clip


def test_output_scale_unavailable_for_float_output(toy_onnx):
    scale, why = onnx_output_scale(toy_onnx, "sr")
    assert scale is None and "float output" in why


# ------------------------------------------------------------------------------------------- chain / report


def test_chain_names_first_stage_below_its_floor():
    ref = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    seen = []

    def stage(name, err):
        def compute():
            seen.append(name)
            return ref + err

        return (name, name, compute, ref, 80.0)

    loc = localize_chain(
        [stage("encoder", 0), stage("prior sample", 0.3), stage("denoiser", 0.5)], case="t", backend="x"
    )
    assert seen == ["encoder", "prior sample", "denoiser"]
    assert loc.first.unit == "prior sample" and loc.largest_drop.unit == "prior sample"
    assert "first divergence at prior sample" in loc.summary() and "encoder" in loc.summary()
    json.dumps(loc.to_dict(), allow_nan=False)


def test_unobservable_units_are_reported(onnx_trace):
    loc = build_localization(onnx_trace.units, {}, backend="x", method="m", case="c", threshold_psnr=80)
    assert loc.first is None and loc.observed == 0
    assert "not observable" in loc.notes[0] and "0/" in loc.summary()


# ------------------------------------------------------------------------------- Core ML / ExecuTorch (slow)


def test_coreml_file_with_a_wrong_weight_is_localised(toy, inputs, tmp_path):
    import copy

    from tadsr.formats.coreml.export import export_coreml, exported_program

    from tadsr.formats.localize import localize_coreml, trace_program

    bad = copy.deepcopy(toy)
    with torch.no_grad():
        bad.decoder.decoder.up[1].block[0].conv.weight.mul_(1.7)  # what a wrong weight in the file looks like
    export_coreml(bad, SPEC, tmp_path, precision="fp16")
    trace = trace_program(exported_program(toy, SPEC)[0], SPEC, "coreml export")
    loc = localize_coreml(tmp_path / "pipeline.mlpackage", trace, trace_graph(toy, SPEC, variant="none"), inputs,
                          case="seeded", threshold_psnr=40)  # fmt: skip
    assert loc.observed == len(UNITS), loc.notes
    assert loc.first is not None and loc.first.unit == "decoder.up.1", loc.summary()
    assert all(u.status == "ok" and u.psnr > 60 for u in loc.units[: loc.units.index(loc.first)])  # fp16 elsewhere


def test_executorch_relowering_checks_toolchain_and_flags_a_different_file(toy, inputs):
    from tadsr.formats.localize import localize_executorch

    ref = trace_graph(toy, SPEC, variant="none")
    with torch.no_grad():
        out = toy(*(torch.from_numpy(inputs[s.name]) for s in SPEC.inputs)).numpy()
    loc = localize_executorch(toy, SPEC, ref, inputs, case="seeded", threshold_psnr=80, backend="xnnpack",
                              artifact_output={"sr": out * 0.5})  # fmt: skip
    assert loc.observed == len(UNITS) and loc.first is None, loc.summary()
    assert "not edits of the file" in loc.notes[0]
    assert "does not compute what a fresh lowering" in loc.notes[1]


@pytest.mark.parametrize("graph", ["pipeline", "encoder", "decoder"])
def test_light_graphs_units_are_blocks_with_their_stages(graph: str) -> None:
    """The light autoencoder's graphs (tadsr.models.light_ae) are cut into blocks like the full ones: before session
    31 the light encoder graph raised KeyError, and in the light pipeline each whole light network was one unit of
    stage 'pipeline' (no 'quantize' / 'clamp' step), so a parity diagnosis could not name the block that diverged.
    Every light weight's unit (unit_of_tensor) is one of the graph's units."""
    from tadsr.formats.graphs import make_graph
    from tadsr.pipeline import load_models

    models = load_models(preset="tiny", init="random", light_autoencoder=True)
    module, spec = make_graph(models, graph, 64)
    ep = torch.export.export(module.eval(), tuple(torch.zeros(t.shape) for t in spec.inputs))
    units = make_units(ep.graph_module, graph)
    names = [u.name for u in units]
    stages = {u.name: u.stage for u in units}
    if graph in ("pipeline", "encoder"):
        assert names[:3] == ["encoder.conv_in", "encoder.blocks.0", "encoder.conv_out"], names
    if graph in ("pipeline", "decoder"):
        k = names.index("quantize")
        assert names[k : k + 3] == ["quantize", "decoder.conv_in", "decoder.blocks.0"] and names[-1] == "clamp", names
    assert set(stages.values()) <= {"encoder", "prior sample", "input scaling", "denoiser", "decoder"}, stages
    assert all(stages[n] == n.split(".")[0] for n in names if n.split(".")[0] in ("encoder", "decoder")), stages
    light = [n for n, _ in module.named_parameters() if n.split(".")[0] in ("encoder", "decoder", "quantize")]
    assert light
    for name in light:  # the light autoencoder's weights (the UNet's time embedding is folded, not a unit)
        unit, stage = unit_of_tensor(name, graph)
        assert stages.get(unit) == stage, (name, unit, stage, names)
