"""Core ML export: packages convert, save atomically, reload with the spec's interface and metadata; the fp16
layer decision keeps unsafe layers fp32; the runner picks coreml / coreml-sim.

Default tests convert the tiny encoder (fp32 + fp16) and a toy graph; the tiny denoiser, decoder and pipeline
packages are ``slow`` (about a minute of CPU each). Core ML itself cannot run here: numerics are checked through
``tadsr.runtime.coreml_sim``.
"""

from __future__ import annotations

import math
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools")

from tadsr.errors import BackendUnavailableError, ConfigError, InputSpecError
from tadsr.formats.coreml.export import (
    FP16_MAX,
    export_coreml,
    exported_program,
    measure_fp16,
    plan_fp16,
    validate_package,
)
from tadsr.formats.graphs import GraphSpec, TensorSpec, make_graphs
from tadsr.runtime.coreml_runner import CoreMLRunner

FLOAT32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread, restored after


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return make_graphs(tiny_models, 64, ("encoder",))["encoder"]


@pytest.fixture(scope="module")
def encoder_packages(encoder, tmp_path_factory):
    g, spec = encoder
    out = {}
    for prec in ("fp32", "fp16"):
        d = tmp_path_factory.mktemp(f"coreml-{prec}")
        out[prec] = (d, export_coreml(g, spec, d, precision=prec, metadata={"preset": "tiny", "sources": {"x": 1}}))
    return out


def _feeds(spec: GraphSpec, seed: int) -> dict[str, np.ndarray]:
    return {s.name: x.numpy() for s, x in zip(spec.inputs, spec.example_inputs(seed), strict=True)}


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_encoder_package_interface_and_metadata(encoder, encoder_packages, prec):
    _, spec = encoder
    d, res = encoder_packages[prec]
    assert res.files == ["encoder.mlpackage"] and res.format == "coreml" and res.precision == prec
    assert [p.name for p in d.iterdir()] == ["encoder.mlpackage"]  # no temp folders left
    assert not (d / res.files[0] / "executorch_debug_handle_mapping.json").exists()  # debug map not shipped
    m = ct.models.MLModel(str(d / res.files[0]), skip_model_load=True)
    desc = m.get_spec().description
    got = [(f.name, tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in desc.input]
    assert got == [(s.name, s.shape, FLOAT32) for s in spec.inputs]
    got = [(f.name, tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in desc.output]
    assert got == [(s.name, s.shape, FLOAT32) for s in spec.outputs]
    assert all(f.shortDescription for f in (*desc.input, *desc.output))
    assert "[-1, 1]" in desc.input[0].shortDescription
    assert m.author == "tadsr-mobile" and "S-Lab" in m.license and m.version
    meta = m.user_defined_metadata
    assert meta["tadsr.preset"] == "tiny" and meta["tadsr.tile"] == "64" and meta["tadsr.precision"] == prec
    assert float(meta["tadsr.schedule.kappa"]) == spec.constants["kappa"]
    assert meta["tadsr.sources"] == '{"x": 1}'
    assert validate_package(d / res.files[0], spec)["metadata"]["tadsr.graph"] == "encoder"


def test_encoder_fp16_is_mostly_fp16_and_smaller(encoder_packages):
    (_, r32), (_, r16) = encoder_packages["fp32"], encoder_packages["fp16"]
    assert r32.info["census"]["ops"]["fp16"] == 0
    c16 = r16.info["census"]["ops"]
    assert c16["fp16"] > 0.9 * (c16["fp16"] + c16["fp32"])
    assert "conv" in r16.info["census"]["fp16_op_types"]
    assert r16.info["bytes"] < 0.6 * r32.info["bytes"]
    fp16 = r16.info["fp16"]
    assert fp16["policy"]["headroom"] > 1 and fp16["ranges"] and fp16["max_abs"] < FP16_MAX
    assert "fp16_measure" in r16.info["seconds"]


def _duplicate_constants(package: Path) -> dict:
    from tadsr.runtime.coreml_sim import _parse_program

    _, _, _, consts = _parse_program(next(package.rglob("model.mlmodel")), "main")
    seen = Counter(
        (str(v.dtype), v.shape, v.tobytes())
        for v in consts.values()
        if isinstance(v, np.ndarray) and v.dtype.kind in "fiu"  # coremltools never shares bool / string consts
    )
    return {k: n for k, n in seen.items() if n > 1}


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_encoder_package_shares_identical_constants(encoder_packages, prec):
    """const_deduplication extended to small constants: no two numeric const ops of the program hold the same value
    (before: every reshape's shape vector and scalar of the same value had its own const op)."""
    d, res = encoder_packages[prec]
    assert _duplicate_constants(d / res.files[0]) == {}


def test_encoder_packages_in_the_simulator(encoder, encoder_packages):
    g, spec = encoder
    feeds = _feeds(spec, 7)
    with torch.no_grad():
        ref = g(*spec.example_inputs(7)).numpy()
    for prec, tol in (("fp32", 2e-4), ("fp16", 3e-2)):
        d, res = encoder_packages[prec]
        r = CoreMLRunner(d / res.files[0], spec.to_dict(), backend="coreml-sim")
        assert r.backend == "coreml-sim"
        out = r.run(feeds)["z_y"]
        assert out.dtype == np.float32 and np.isfinite(out).all()
        assert np.abs(out - ref).max() < tol, prec


# --------------------------------------------------------------------------------------------- fp16 decision
class _Scores(nn.Module):
    """Global self-attention over pixels with an additive logit offset (a large bias, as a position bias or
    mask can be): softmax ignores it in exact arithmetic, but fp16 logits near 1500 keep only ~0.5 of resolution."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = x.reshape(b, c, h * w)
        t = k.transpose(1, 2)  # (b, hw, c)
        a = torch.softmax(torch.bmm(t, k) * 0.1 + self.offset, dim=-1)
        return torch.bmm(a, t).transpose(1, 2).reshape(b, c, h, w)


class _Toy(nn.Module):
    """conv -> x gain -> GroupNorm -> attention -> conv; ``gain`` drives the GN variance past 65504."""

    def __init__(self, gain: float, logit_offset: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(3, 32, 3, padding=1)
        self.gain = gain
        self.norm = nn.GroupNorm(8, 32)
        self.attn = _Scores(logit_offset)
        self.conv_out = nn.Conv2d(32, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(self.norm(self.conv_in(x) * self.gain)))


TOY_SPEC = GraphSpec(
    name="toy",
    tile=8,
    scale=1,
    inputs=(TensorSpec("x", (1, 3, 8, 8), value_range=(-1.0, 1.0), description="toy input"),),
    outputs=(TensorSpec("y", (1, 3, 8, 8), description="toy output"),),
)


def _plan(gain: float, logit_offset: float, **kw):
    ep, _ = exported_program(_Toy(gain, logit_offset).eval(), TOY_SPEC)
    stats = measure_fp16(ep, [TOY_SPEC.example_inputs(0), TOY_SPEC.example_inputs(1)])
    return plan_fp16(ep, stats, **kw), stats


def test_fp16_plan_keeps_nothing_when_safe():
    plan, stats = _plan(gain=1.0, logit_offset=0.0)
    assert plan.kept_layers == {} and not plan.kept_ops
    assert max(s.max_abs_out for s in stats.values()) < 100
    assert set(plan.layers) == {"", "conv_in", "norm", "attn", "conv_out"}


def test_fp16_plan_detects_groupnorm_variance_overflow():
    plan, stats = _plan(gain=400.0, logit_offset=0.0)
    # the normalised activations fit fp16 easily; the variance (x - mean)^2 does not
    sq = [s for s in stats.values() if s.module == "norm" and s.op == "mul" and s.max_abs_out > FP16_MAX]
    assert sq, "the GN variance product should exceed 65504"
    assert plan.kept_layers["norm"].startswith("overflow")
    assert "conv_in" not in plan.kept_layers and "conv_out" not in plan.kept_layers
    assert {s.name for s in stats.values() if s.module == "norm"} <= plan.kept_ops


def test_fp16_plan_detects_softmax_precision_loss():
    plan, stats = _plan(gain=1.0, logit_offset=1500.0)
    assert plan.kept_layers["attn"].startswith("fp16 error")
    worst = max((s for s in stats.values() if s.module == "attn"), key=lambda s: s.rel_err)
    assert worst.rel_err > 3e-3 and worst.max_abs_out < FP16_MAX / 2  # accuracy, not overflow
    assert "norm" not in plan.kept_layers


def test_fp16_plan_requested_patterns():
    plan, _ = _plan(gain=1.0, logit_offset=0.0, keep_fp32=["conv_*", "softmax"])
    assert plan.kept_layers == {"conv_in": "requested (conv_*)", "conv_out": "requested (conv_*)"}
    assert plan.kept_op_types == {"softmax"}


def test_fp16_package_keeps_unsafe_layers_fp32(tmp_path):
    toy = _Toy(gain=400.0, logit_offset=1500.0).eval()
    res = export_coreml(toy, TOY_SPEC, tmp_path, precision="fp16")
    census = res.info["census"]
    assert {"softmax", "reduce_mean", "rsqrt"} <= set(census["fp32_op_types"])
    assert "conv" in census["fp16_op_types"] and "conv" not in census["fp32_op_types"]
    assert set(res.info["fp16"]["kept_layers"]) == {"norm", "attn"}
    assert res.warnings and "fp32" in res.warnings[0]
    json_ok = all(isinstance(v, (str, int, float)) for r in res.info["fp16"]["ranges"].values() for v in r.values())
    assert json_ok
    x = TOY_SPEC.example_inputs(2)
    with torch.no_grad():
        ref = toy(*x).numpy()
    mixed = CoreMLRunner(tmp_path / "toy.mlpackage", TOY_SPEC.to_dict(), backend="coreml-sim").run({"x": x[0].numpy()})
    rel = np.linalg.norm(mixed["y"] - ref) / np.linalg.norm(ref)
    assert np.isfinite(mixed["y"]).all() and rel < 1e-2
    # the same graph all-fp16 (no selector) breaks: proof that the kept layers matter
    allfp16 = export_coreml(toy, TOY_SPEC, tmp_path / "all", precision="fp16", rel_tol=math.inf, headroom=0.0,
                            calib_inputs=[x])  # fmt: skip
    assert allfp16.info["fp16"]["kept_layers"]  # inf from the variance still counts as overflow
    forced = export_coreml(toy, TOY_SPEC, tmp_path / "forced", precision="fp32")
    assert forced.info["census"]["ops"]["fp16"] == 0


def test_fp16_all_fp16_toy_is_broken_in_the_simulator(tmp_path):
    """Without the selector the toy's GroupNorm variance overflows in fp16 (what the plan prevents)."""
    toy = _Toy(gain=400.0, logit_offset=0.0).eval()
    ep, _ = exported_program(toy, TOY_SPEC)
    m = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                   inputs=[ct.TensorType(name="x", shape=(1, 3, 8, 8), dtype=np.float32)],
                   outputs=[ct.TensorType(name="y", dtype=np.float32)],
                   compute_precision=ct.precision.FLOAT16, skip_model_load=True)  # fmt: skip
    m.save(str(tmp_path / "toy.mlpackage"))
    x = TOY_SPEC.example_inputs(2)[0].numpy()
    out = CoreMLRunner(tmp_path / "toy.mlpackage", TOY_SPEC.to_dict(), backend="coreml-sim").run({"x": x})["y"]
    with torch.no_grad():
        ref = toy(torch.from_numpy(x)).numpy()
    assert not np.isfinite(out).all() or np.abs(out - ref).max() > 0.1


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments(encoder, tmp_path):
    g, spec = encoder
    with pytest.raises(ConfigError, match="precision"):
        export_coreml(g, spec, tmp_path, precision="int8")
    with pytest.raises(ConfigError, match="calibration input shapes"):
        export_coreml(g, spec, tmp_path, precision="fp16", calib_inputs=[(torch.zeros(1, 3, 8, 8),)])


def test_runner_backends_and_input_checks(encoder, encoder_packages):
    _, spec = encoder
    d, res = encoder_packages["fp32"]
    path = d / res.files[0]
    with pytest.raises(ConfigError, match="backend"):
        CoreMLRunner(path, spec.to_dict(), backend="tflite")
    if platform.system() != "Darwin":
        with pytest.raises(BackendUnavailableError, match="only on macOS"):
            CoreMLRunner(path, spec.to_dict(), backend="coreml")
        assert CoreMLRunner(path, spec.to_dict()).backend == "coreml-sim"  # auto
    r = CoreMLRunner(path, spec.to_dict(), backend="coreml-sim")
    with pytest.raises(InputSpecError, match="shape"):
        r.run({"lr": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(InputSpecError, match="dtype"):
        r.run({"lr": np.zeros((1, 3, 64, 64), np.float64)})


# ------------------------------------------------------------------------------------------------- tiny graphs
# fp16 only: the fp32 packages of every graph come from tests/test_every_format.py (`tadsr all --smoke`); the fused
# pipeline's fp16 package is its components' census together (the full `tadsr all` exports it).
@pytest.mark.parametrize("name", ["denoiser", "decoder"])
def test_tiny_graph_fp16_packages(tiny_models, tmp_path, name):
    g, spec = make_graphs(tiny_models, 64, (name,))[name]
    res = export_coreml(g, spec, tmp_path, precision="fp16")
    validate_package(tmp_path / res.files[0], spec)
    c = res.info["census"]["ops"]
    assert c["fp16"] > 0.8 * (c["fp16"] + c["fp32"])
    if name == "decoder":  # the VQ search stays fp32 (discrete choice)
        assert any(r.startswith("discrete") for r in res.info["fp16"]["kept_layers"].values())


def test_conversion_validates_the_converted_program_once(monkeypatch):
    """``convert_validated_once``: coremltools' per-pass ``Program.validate`` is off during the conversion and runs
    once on the converted program (a broken result still fails); the package is the one a stock conversion writes,
    and the method is restored afterwards."""
    from coremltools.converters.mil.mil.program import Program

    from tadsr.formats.coreml.export import convert_validated_once

    class Toy(nn.Module):
        def forward(self, x):
            return torch.relu(nn.functional.conv2d(x, torch.ones(2, 3, 3, 3), padding=1)) * 2 + 1

    x = torch.rand(1, 3, 8, 8)
    ep = torch.export.export(Toy(), (x,)).run_decompositions({})
    kw = {"convert_to": "mlprogram", "minimum_deployment_target": ct.target.iOS17, "skip_model_load": True,
          "inputs": [ct.TensorType(name="x", shape=tuple(x.shape))], "compute_precision": ct.precision.FLOAT32}
    stock = Program.validate
    seen: list[int] = []
    monkeypatch.setattr(Program, "validate", lambda self, check_essential_scope=False: seen.append(id(self)))
    ml = ct.convert(ep, **kw)
    assert len(seen) > 5  # the stock conversion validates after every pass
    seen.clear()
    mine = convert_validated_once(ep, **kw)
    assert seen == [id(mine._mil_program)]
    assert mine.get_spec().SerializeToString() == ml.get_spec().SerializeToString()
    assert Program.validate is not stock  # our counting stand-in came back, not the no-op
    monkeypatch.setattr(Program, "validate", lambda self, check_essential_scope=False: (_ for _ in ()).throw(
        ValueError("Var x not visible")))  # fmt: skip
    with pytest.raises(ValueError, match="not visible"):
        convert_validated_once(ep, **kw)
