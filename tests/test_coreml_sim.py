"""tadsr.runtime.coreml_sim: tiny torch modules converted with coremltools, executed in numpy, compared to torch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
nn = torch.nn
F = torch.nn.functional

from tadsr.runtime import coreml_sim  # noqa: E402
from tadsr.runtime.coreml_sim import (  # noqa: E402
    SUPPORTED_OPS,
    OpTrace,
    UnsupportedOpError,
    fp16_report,
)
from tadsr.runtime.coreml_sim import load_mlpackage as _load_mlpackage  # noqa: E402
from tadsr.runtime.coreml_sim.kernels import KERNELS, Args  # noqa: E402
from tadsr.runtime.coreml_sim.kernels.resize import _grid  # noqa: E402
from tadsr.runtime.coreml_sim.reader import Const, Op  # noqa: E402

from tadsr.errors import ConfigError, InputSpecError  # noqa: E402

_TRACE: list[OpTrace | None] = [None]  # the running test's trace (set by the autouse fixture _record_ran)


def load_mlpackage(path, **kwargs):
    """The simulator's ``load_mlpackage``, recording the executed ops into the running test's OpTrace."""
    return _load_mlpackage(path, trace=_TRACE[0], **kwargs)


ATOL = 1e-5  # fp32 simulator vs torch (threads are limited in conftest.py)


def _convert(module, inputs, path: Path, *, precision: str = "fp32", target=None, n_out: int = 1):
    """torch.export -> coremltools ML program saved at ``path``; returns the MLModel."""
    ep = torch.export.export(module.eval(), tuple(inputs.values())).run_decompositions({})
    mlmodel = ct.convert(
        ep,
        convert_to="mlprogram",
        minimum_deployment_target=target or ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        inputs=[ct.TensorType(name=k, shape=v.shape) for k, v in inputs.items()],
        outputs=[ct.TensorType(name=f"y{i}") for i in range(n_out)],
        skip_model_load=True,
    )
    mlmodel.save(str(path))
    return mlmodel


def _torch_out(module, inputs) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(*inputs.values())
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _check_fp32(module, inputs, tmp_path: Path, ops: set[str], name: str = "m"):
    """Convert in fp32, run the simulator, compare each output with torch at ATOL; check the ops were emitted."""
    refs = _torch_out(module, inputs)
    path = tmp_path / f"{name}.mlpackage"
    _convert(module, inputs, path, n_out=len(refs))
    program = load_mlpackage(path)
    assert ops <= set(program.op_types), f"expected ops {ops - set(program.op_types)} not in {program.op_types}"
    got = program.predict({k: v.numpy() for k, v in inputs.items()}, precision="fp32")
    for i, ref in enumerate(refs):
        out = got[f"y{i}"]
        assert out.shape == ref.shape
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0, err_msg=f"output y{i}")
        else:
            np.testing.assert_array_equal(out, ref, err_msg=f"output y{i}")
    return program


def _seed(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return module


# ------------------------------------------------------------------------------------------------ op categories


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=(0, 1), dilation=(1, 2), groups=2)
        self.dw = nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False)
        self.c1d = nn.Conv1d(4, 3, 2, stride=2)
        self.ct = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        # wide enough (input channels x taps >= 64) for the simulator's im2col path
        self.up = nn.Conv2d(4, 16, 1)
        self.w1 = nn.Conv2d(16, 8, 3, padding=1)
        self.w2 = nn.Conv2d(16, 8, 3, stride=2, padding=(0, 1), dilation=(1, 2), groups=2)

    def forward(self, x):
        u = self.up(x)
        return (self.c1(x), self.c2(x), self.dw(x), self.c1d(x.flatten(2)), self.ct(x),
                F.max_pool2d(x, 2, 2, 0), F.avg_pool2d(x, 3, stride=2, padding=1), self.w1(u), self.w2(u))  # fmt: skip


def test_conv_and_pool(tmp_path: Path) -> None:
    x = torch.randn(1, 4, 9, 10)
    _check_fp32(_seed(_Convs()), {"x": x}, tmp_path, {"conv", "conv_transpose", "max_pool", "avg_pool"})


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, a, b):
        return self.fc(a), a @ b.transpose(-1, -2), torch.einsum("bij,bkj->bik", a, b), torch.bmm(a, b.mT)


def test_linear_matmul_einsum(tmp_path: Path) -> None:
    inputs = {"a": torch.randn(2, 3, 6), "b": torch.randn(2, 4, 6)}
    program = _check_fp32(_seed(_Linear()), inputs, tmp_path, {"linear", "matmul"})
    assert program.op_types["matmul"] >= 2


class _Elementwise(nn.Module):
    def forward(self, x, y):
        p = x.abs() + 0.5
        return (x + y, x - y, x * y, x / (y.abs() + 1), torch.pow(p, 1.7), torch.sqrt(p), torch.rsqrt(p),
                torch.exp(x), torch.log(p), torch.sin(x), torch.cos(x), torch.tanh(x), torch.sigmoid(x), F.silu(x),
                F.gelu(x), F.relu(x), F.leaky_relu(x, 0.1), F.elu(x), F.softplus(x), torch.clamp(x, -0.5, 0.7),
                torch.erf(x), torch.maximum(x, y), torch.floor(x * 3))  # fmt: skip


def test_elementwise_and_activations(tmp_path: Path) -> None:
    inputs = {"x": torch.randn(2, 3, 8) * 2, "y": torch.randn(2, 3, 8)}
    want = {"add", "sub", "mul", "real_div", "pow", "sqrt", "rsqrt", "exp", "log", "sin", "cos", "tanh", "sigmoid",
            "silu", "gelu", "relu", "clip"}  # fmt: skip
    _check_fp32(_Elementwise(), inputs, tmp_path, want)


class _Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.ln(x), self.gn(x), self.inorm(x), self.bn(x), torch.softmax(x, -1), torch.log_softmax(x, 1)


def test_normalization_and_softmax(tmp_path: Path) -> None:
    x = torch.randn(2, 4, 6, 8) * 3 + 1
    _check_fp32(_seed(_Norms()), {"x": x}, tmp_path, {"layer_norm", "instance_norm", "batch_norm", "softmax"})


class _Reductions(nn.Module):
    def forward(self, x):
        return (x.mean(dim=(2, 3), keepdim=True), x.sum(1), x.amax(-1), x.amin(1), x.argmax(-1).int(),
                x.argmin(1).int(), x.var(dim=-1))  # fmt: skip


def test_reductions(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 4, 5)
    want = {"reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_argmax", "reduce_argmin"}
    _check_fp32(_Reductions(), {"x": x}, tmp_path, want)


class _Shapes(nn.Module):
    def forward(self, x, idx):
        b, c, h, w = x.shape
        q, k = x.chunk(2, dim=1)
        windows = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(-1, 4, c)
        rolled = torch.roll(x, shifts=(-1, 2), dims=(2, 3))
        return (windows, torch.cat([k, q], 1), x[:, 1:3, ::2, 1:], x.unsqueeze(0).squeeze(1), q.repeat(1, 2, 1, 1),
                rolled, x.index_select(1, idx), torch.gather(x, 3, idx.view(1, 1, 1, -1).expand(b, c, h, -1)),
                F.pixel_shuffle(x, 2), torch.where(x > 0, x, 0.1 * x), (x == q.repeat(1, 2, 1, 1)).float(),
                x.flip(-1), x.transpose(1, 3).contiguous(), x.expand(2, c, h, w) * 1.0)  # fmt: skip


def test_shape_ops(tmp_path: Path) -> None:
    inputs = {"x": torch.randn(1, 4, 6, 8), "idx": torch.tensor([3, 0, 2], dtype=torch.int32)}
    want = {"reshape", "transpose", "split", "concat", "slice_by_index", "tile", "gather", "gather_along_axis",
            "select", "equal", "expand_dims", "squeeze"}  # fmt: skip
    _check_fp32(_Shapes(), inputs, tmp_path, want)


class _Resize(nn.Module):
    def forward(self, x):
        return (F.interpolate(x, scale_factor=2, mode="nearest"),
                F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
                F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
                F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
                F.pad(x, (1, 2, 0, 1)), F.pad(x, (2, 1, 1, 2), mode="reflect"),
                F.pad(x, (1, 1, 2, 0), mode="replicate"))  # fmt: skip


def test_resize_and_pad(tmp_path: Path) -> None:
    _check_fp32(_Resize(), {"x": torch.randn(1, 3, 5, 6)}, tmp_path, {"upsample_nearest_neighbor", "pad"})


def _mil_package(prog, path: Path) -> Path:
    """Save a MIL builder program as it is written (no optimization passes)."""
    mlmodel = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    mlmodel.save(str(path))
    return path


def test_mil_only_ops(tmp_path: Path) -> None:
    """Ops the torch.export path folds away or never emits, checked against numpy / torch formulas."""
    from coremltools.converters.mil import Builder as mb

    idx = np.array([[[2], [0], [1]], [[1], [1], [0]]], dtype=np.int32)
    spec = [mb.TensorSpec(shape=(2, 3, 4)), mb.TensorSpec(shape=(2, 3, 4)), mb.TensorSpec(shape=(1, 4, 3, 5))]

    @mb.program(input_specs=spec, opset_version=ct.target.iOS17)
    def prog(x, y, z):
        s = mb.shape(x=x, name="shape")
        n = mb.slice_by_index(x=s, begin=[2], end=[3], squeeze_mask=[True])
        q = mb.quantize(input=x, scale=np.float32(0.05), zero_point=np.int8(3), output_dtype="int8", name="q")
        x4 = mb.expand_dims(x=x, axes=[0], name="x4")
        return (s, mb.fill(shape=s, value=2.5, name="fill"), mb.range_1d(start=1, end=n, step=1, name="range"),
                mb.tile(x=x, reps=[1, 2, 1], name="tile"), mb.select(cond=mb.less(x=x, y=y), a=x, b=y, name="sel"),
                mb.gelu(x=x, mode="TANH_APPROXIMATION", name="gelu_tanh"), mb.gelu(x=x, mode="EXACT", name="gelu"),
                mb.slice_by_size(x=x, begin=[0, 1, 1], size=[-1, 2, 2], name="sbs"),
                mb.gather_along_axis(x=x, indices=idx, axis=2, name="gaa"),
                mb.expand_dims(x=x, axes=[0, -1], name="ed"),
                mb.squeeze(x=mb.reduce_mean(x=x, axes=[1], keep_dims=True), axes=[1], name="sq"),
                mb.cast(x=mb.mul(x=x, y=3.0), dtype="int32", name="cast"), q,
                mb.dequantize(input=q, scale=np.float32(0.05), zero_point=np.int8(3), name="dq"),
                mb.pad(x=x, pad=[1, 2, 0, 1], mode="replicate", name="pad"),
                mb.resize_bilinear(x=x, target_size_height=5, target_size_width=7, sampling_mode="UNALIGN_CORNERS",
                                   name="rb"),
                mb.einsum(values=(x4, z), equation="nchw,nwhu->nchu", name="es"),
                mb.clip(x=x, alpha=-0.2, beta=0.3, name="clip"))  # fmt: skip

    program = load_mlpackage(_mil_package(prog, tmp_path / "mil.mlpackage"))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 3, 4), dtype=np.float32), rng.standard_normal((2, 3, 4), dtype=np.float32)
    z = rng.standard_normal((1, 4, 3, 5), dtype=np.float32)
    out = program.predict({"x": x, "y": y, "z": z})
    xt = torch.from_numpy(x)
    np.testing.assert_array_equal(out["shape"], [2, 3, 4])
    np.testing.assert_array_equal(out["fill"], np.full((2, 3, 4), 2.5, np.float32))
    np.testing.assert_array_equal(out["range"], [1, 2, 3])
    np.testing.assert_array_equal(out["tile"], np.tile(x, (1, 2, 1)))
    np.testing.assert_array_equal(out["sel"], np.minimum(x, y))
    np.testing.assert_allclose(out["gelu_tanh"], F.gelu(xt, approximate="tanh").numpy(), atol=ATOL)
    np.testing.assert_allclose(out["gelu"], F.gelu(xt).numpy(), atol=ATOL)
    np.testing.assert_array_equal(out["sbs"], x[:, 1:3, 1:3])
    np.testing.assert_array_equal(out["gaa"], np.take_along_axis(x, idx, 2))
    assert out["ed"].shape == (1, 2, 3, 4, 1)
    np.testing.assert_allclose(out["sq"], x.mean(1), atol=ATOL)
    np.testing.assert_array_equal(out["cast"], (x * 3).astype(np.int32))
    q_ref = np.clip(np.rint(x / np.float32(0.05)) + 3, -128, 127)  # round half to even, as torch / Core ML
    np.testing.assert_array_equal(out["q"], q_ref)
    np.testing.assert_allclose(out["dq"], (q_ref - 3) * np.float32(0.05), atol=ATOL)
    np.testing.assert_array_equal(out["pad"], np.pad(x, [(0, 0), (1, 2), (0, 1)], mode="edge"))
    rb = F.interpolate(xt[None], size=(5, 7), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(out["rb"], rb.numpy(), atol=ATOL)
    np.testing.assert_allclose(out["es"], np.einsum("nchw,nwhu->nchu", x[None], z), atol=ATOL)
    np.testing.assert_array_equal(out["clip"], np.clip(x, -0.2, 0.3))


# ---------------------------------------------------------------------------------- a network like ours, fp16


class _TinySR(nn.Module):
    """conv + GroupNorm + single-head attention (softmax) + nearest upsample, as in the VQGAN decoder."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.GroupNorm(4, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.norm_up = nn.GroupNorm(4, c)
        self.conv_up = nn.Conv2d(c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=1)
        b, c, hh, ww = q.shape
        attn = torch.softmax(torch.bmm(q.reshape(b, c, -1).transpose(1, 2), k.reshape(b, c, -1)) * c**-0.5, dim=2)
        h = h + self.proj(torch.bmm(v.reshape(b, c, -1), attn.transpose(1, 2)).reshape(b, c, hh, ww))
        h = F.interpolate(F.silu(self.norm_up(h)), scale_factor=2, mode="nearest")
        return self.conv_out(F.silu(self.conv_up(h)))


@dataclass
class _Converted:
    model: nn.Module
    inputs: dict
    feeds: dict
    ref: np.ndarray
    fp32: Path
    fp16: Path
    fp32_mlmodel: object
    fp16_mlmodel: object


@pytest.fixture(scope="module")
def tiny_sr(tmp_path_factory) -> _Converted:
    """_TinySR converted once in fp32 and once in fp16, shared by the tests below."""
    torch.manual_seed(0)
    model = _TinySR().eval()
    x = torch.rand(1, 3, 12, 12) * 2 - 1
    inputs = {"x": x}
    root = tmp_path_factory.mktemp("tiny_sr")
    m32 = _convert(model, inputs, root / "fp32.mlpackage")
    m16 = _convert(model, inputs, root / "fp16.mlpackage", precision="fp16")
    ref = _torch_out(model, inputs)[0]
    return _Converted(model, inputs, {"x": x.numpy()}, ref, root / "fp32.mlpackage", root / "fp16.mlpackage", m32, m16)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_typical_network_fp32_and_fp16(tiny_sr: _Converted) -> None:
    feeds, ref = tiny_sr.feeds, tiny_sr.ref
    p32 = load_mlpackage(tiny_sr.fp32)
    assert {"conv", "softmax", "matmul", "upsample_nearest_neighbor", "reduce_mean"} <= set(p32.op_types)
    np.testing.assert_allclose(p32.predict(feeds)["y0"], ref, atol=ATOL, rtol=0)

    p16 = load_mlpackage(tiny_sr.fp16)
    as_written = p16.predict(feeds)["y0"]
    weights_only = p16.predict(feeds, precision="fp32")["y0"]
    assert as_written.dtype == np.float16 and weights_only.dtype == np.float32
    err16, err_w = _rel(as_written, ref), _rel(weights_only, ref)
    assert err16 < 5e-3, err16  # fp16 activations and weights: ~11-bit mantissa through ~30 ops
    assert err_w < 1e-3, err_w  # fp16 weights only
    assert np.abs(as_written.astype(np.float32) - ref).max() < 2e-2 * np.abs(ref).max()
    report = fp16_report(p16, feeds)
    assert report and max(r.severity for r in report) == 0
    assert all(r.max_abs < 1e3 and r.n_nan == r.n_inf == 0 for r in report)
    assert report[0].drift_rel_err == max(r.drift_rel_err for r in report)


# ------------------------------------------------------------------------------------------ compressed weights


def _fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (coremltools linear_symmetric: scale = max|w| / 127)."""
    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def test_w8_weight_only_matches_fake_quant_torch(tiny_sr: _Converted, tmp_path: Path) -> None:
    import coremltools.optimize.coreml as cto

    model, inputs, ref, mlmodel = tiny_sr.model, tiny_sr.inputs, tiny_sr.ref, tiny_sr.fp32_mlmodel
    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)
    )
    cto.linear_quantize_weights(mlmodel, config).save(str(tmp_path / "w8.mlpackage"))
    program = load_mlpackage(tmp_path / "w8.mlpackage")
    out = program.predict({"x": inputs["x"].numpy()}, precision="fp32")["y0"]

    fq = _TinySR().eval()
    fq.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in fq.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(_fake_quant_int8(m.weight))
    fq_ref = _torch_out(fq, inputs)[0]
    np.testing.assert_allclose(out, fq_ref, atol=ATOL, rtol=0)  # same numbers as the fake-quant torch model
    assert 1e-4 < _rel(out, ref) < 1e-2  # and an INT8 weight error away from float torch


def test_decompression_matches_coremltools(tmp_path: Path) -> None:
    """constexpr ops (iOS16 affine + 4-bit LUT, iOS18 int4 blockwise + grouped 2-bit LUT): bit-exact decompression."""
    import coremltools.optimize.coreml as cto

    model = _seed(nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)))
    inputs = {"x": torch.randn(1, 8, 6, 6)}
    ref = _torch_out(model, inputs)[0]
    configs = {
        "ios17_w8": (ct.target.iOS17, cto.OpLinearQuantizerConfig(mode="linear", dtype="uint8", weight_threshold=0)),
        "ios17_lut4": (ct.target.iOS17, cto.OpPalettizerConfig(nbits=4, mode="uniform", weight_threshold=0)),
        "ios18_w4": (
            ct.target.iOS18,
            cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=4, weight_threshold=0
            ),
        ),
        "ios18_lut2": (
            ct.target.iOS18,
            cto.OpPalettizerConfig(
                nbits=2, mode="uniform", granularity="per_grouped_channel", group_size=4, weight_threshold=0
            ),
        ),
    }
    targets = {target for target, _ in configs.values()}
    bases = {t: _convert(model, inputs, tmp_path / f"{t.name}.mlpackage", target=t) for t in targets}
    bound = {"ios17_w8": 0.05, "ios17_lut4": 0.2, "ios18_w4": 0.3, "ios18_lut2": 1.0}  # lossy, coarser = worse
    seen = set()
    for name, (target, op_config) in configs.items():
        config = cto.OptimizationConfig(global_config=op_config)
        fn = cto.palettize_weights if "lut" in name else cto.linear_quantize_weights
        compressed = fn(bases[target], config)
        compressed.save(str(tmp_path / f"{name}.mlpackage"))
        program = load_mlpackage(tmp_path / f"{name}.mlpackage")
        for op in compressed._mil_program.functions["main"].operations:
            if op.op_type.startswith("constexpr_"):
                seen.add(op.op_type)
                expected = op.materialized_val_inference()
                np.testing.assert_array_equal(program.constant(op.outputs[0].name), expected, err_msg=name)
        assert _rel(program.predict({"x": inputs["x"].numpy()})["y0"], ref) < bound[name], name
    assert seen == {"constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}


def test_blob_values_match_libmilstorage(tiny_sr: _Converted) -> None:
    from coremltools.libmilstoragepython import _BlobStorageReader

    mlmodel = tiny_sr.fp16_mlmodel
    program = load_mlpackage(tiny_sr.fp16)
    reader = _BlobStorageReader(str(tiny_sr.fp16 / "Data/com.apple.CoreML/weights/weight.bin"))
    block = mlmodel.get_spec().mlProgram.functions["main"].block_specializations["CoreML7"]
    n = 0
    for op in block.operations:
        val = op.attributes["val"] if op.type == "const" else None
        if val is not None and val.WhichOneof("value") == "blobFileValue":
            expected = reader.read_fp16_data(val.blobFileValue.offset).view(np.float16)
            mine = program.constant(op.outputs[0].name)
            assert mine.dtype == np.float16
            np.testing.assert_array_equal(mine.ravel(), expected)
            n += 1
    assert n >= 5


# ------------------------------------------------------------------------------------------------ fp16 report


class _Unsafe(nn.Module):
    def forward(self, x):
        h = x * 1000.0  # |x| up to ~300 -> |h| up to 3e5 > 65504
        return (h - h.mean(dim=-1, keepdim=True)) * 1e-3


def test_overflow_is_flagged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    inputs = {"x": torch.randn(1, 4, 32) * 100}
    ref = _torch_out(_Unsafe(), inputs)[0]
    feeds = {"x": inputs["x"].numpy()}
    _convert(_Unsafe(), inputs, tmp_path / "u16.mlpackage", precision="fp16")
    program = load_mlpackage(tmp_path / "u16.mlpackage")

    out16 = program.predict(feeds)["y0"]
    assert not np.isfinite(out16).all()
    np.testing.assert_allclose(program.predict(feeds, precision="fp32")["y0"], ref, rtol=1e-3, atol=0.5)

    report = fp16_report(program, feeds)
    first = report[0]
    assert first.op_type == "mul" and first.overflow and first.severity == 4
    assert first.n_above_fp16_max > 0 and first.max_abs > 65504 and first.n_inf == first.n_above_fp16_max
    assert first.inputs_finite
    downstream = [r for r in report if r.index > first.index]
    assert downstream and all(r.severity == 2 for r in downstream)
    assert any(r.n_nan > 0 for r in downstream)  # +inf and -inf meet in the mean / subtraction

    _convert(_Unsafe(), inputs, tmp_path / "u32.mlpackage")
    risk = fp16_report(load_mlpackage(tmp_path / "u32.mlpackage"), feeds)
    assert risk[0].severity == 1 and risk[0].n_above_fp16_max > 0 and not risk[0].overflow


# ----------------------------------------------------------------------------------------------------- errors


def test_unknown_op_is_named(tmp_path: Path) -> None:
    from coremltools.proto import Model_pb2

    path = tmp_path / "u.mlpackage"
    _convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), {"x": torch.randn(2, 4)}, path)
    model_file = path / "Data/com.apple.CoreML/model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    block = spec.mlProgram.functions["main"].block_specializations["CoreML7"]
    (relu,) = [op for op in block.operations if op.type == "relu"]
    relu.type = "frobnicate"
    model_file.write_bytes(spec.SerializeToString())
    with pytest.raises(UnsupportedOpError, match=f"'frobnicate' \\(output '{relu.outputs[0].name}'\\)") as info:
        load_mlpackage(path)
    assert info.value.op_type == "frobnicate"


def test_input_validation(tiny_sr: _Converted) -> None:
    inputs = tiny_sr.inputs
    program = load_mlpackage(tiny_sr.fp32)
    assert program.input_specs == {"x": ((1, 3, 12, 12), "float32")} and program.output_names == ["y0"]
    with pytest.raises(InputSpecError, match="takes"):
        program.predict({"image": inputs["x"].numpy()})
    with pytest.raises(InputSpecError, match="shape"):
        program.predict({"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(ConfigError):
        program.predict({"x": inputs["x"].numpy()}, precision="fp8")  # type: ignore[arg-type]


def test_runtime_import_needs_no_torch(tiny_sr: _Converted, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", tiny_sr.feeds["x"])
    code = (
        "import sys, numpy as np\n"
        "from tadsr.runtime.coreml_sim import load_mlpackage\n"
        f"y = load_mlpackage({str(tiny_sr.fp32)!r}).predict({{'x': np.load({str(tmp_path / 'x.npy')!r})}})\n"
        "assert 'torch' not in sys.modules and 'coremltools' not in sys.modules, 'heavy import'\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y['y0'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny_sr.ref, atol=ATOL, rtol=0)


def test_supported_ops_listed() -> None:
    required = {"conv", "linear", "matmul", "softmax", "layer_norm", "instance_norm", "batch_norm", "reshape",
                "transpose", "split", "concat", "slice_by_index", "slice_by_size", "add", "sub", "mul", "real_div",
                "pow", "sqrt", "rsqrt", "exp", "log", "sin", "cos", "tanh", "sigmoid", "silu", "gelu", "relu",
                "reduce_mean", "reduce_sum", "reduce_max", "reduce_argmin", "reduce_argmax",
                "upsample_nearest_neighbor", "upsample_bilinear", "gather", "gather_along_axis", "cast", "const",
                "expand_dims", "squeeze", "tile",
                "pad", "select", "equal", "less", "greater", "clip", "fill", "shape", "range_1d", "einsum", "quantize",
                "dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
                "constexpr_lut_to_dense"}  # fmt: skip
    assert required <= set(SUPPORTED_OPS)
    assert list(SUPPORTED_OPS) == sorted(SUPPORTED_OPS)
    assert {"SUPPORTED_OPS", "SimProgram", "load_mlpackage", "fp16_report"} <= set(coreml_sim.__all__)
    assert all(hasattr(coreml_sim, name) for name in coreml_sim.__all__)


def _same_pads(size: int, k: int, s: int, lower: bool = False) -> tuple[int, int]:
    total = max(0, (-(-size // s) - 1) * s + k - size)
    return (total - total // 2, total // 2) if lower else (total // 2, total - total // 2)


def test_mil_conv_pool_resize_variants(tmp_path: Path) -> None:
    """pad_type same / same_lower, dilations, groups, conv_transpose, pools and resizes vs torch on padded input."""
    from coremltools.converters.mil import Builder as mb

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 5, 7), dtype=np.float32)
    w1, w2 = rng.standard_normal((4, 4, 3, 2), dtype=np.float32), rng.standard_normal((4, 8, 2, 2), dtype=np.float32)
    wt = rng.standard_normal((8, 3, 3, 2), dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x):
        return (mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same",
                            exclude_padding_from_average=True, name="avg"),
                mb.max_pool(x=x, kernel_sizes=[2, 3], strides=[2, 2], pad_type="same", name="max"),
                mb.conv(x=x, weight=w1, strides=[2, 2], pad_type="same", groups=2, name="conv_same"),
                mb.conv(x=x, weight=w2, pad_type="same_lower", dilations=[2, 1], name="conv_lower"),
                mb.conv_transpose(x=x, weight=wt, strides=[2, 1], pad_type="valid", dilations=[1, 2], name="conv_t"),
                mb.resize_nearest_neighbor(x=x, target_size_height=10, target_size_width=14, name="nearest"),
                mb.upsample_bilinear(x=x, scale_factor_height=2.0, scale_factor_width=3.0, align_corners=False,
                                     name="bilinear"),
                mb.space_to_depth(x=mb.depth_to_space(x=x, block_size=2), block_size=2, name="d2s_s2d"),
                mb.cumsum(x=x, axis=3, exclusive=True, reverse=True, name="cumsum"))  # fmt: skip

    out = load_mlpackage(_mil_package(prog, tmp_path / "v.mlpackage")).predict({"x": x})
    xt = torch.from_numpy(x)

    def pad(t, hw, fill=0.0):
        (t0, b0), (l0, r0) = hw
        return F.pad(t, (l0, r0, t0, b0), value=fill)

    ones = torch.ones_like(xt)
    hw = (_same_pads(5, 3, 2), _same_pads(7, 3, 2))
    refs = {
        "avg": F.avg_pool2d(pad(xt, hw), 3, 2) / F.avg_pool2d(pad(ones, hw), 3, 2),
        "max": F.max_pool2d(pad(xt, (_same_pads(5, 2, 2), _same_pads(7, 3, 2)), -np.inf), (2, 3), 2),
        "conv_same": F.conv2d(pad(xt, (_same_pads(5, 3, 2), _same_pads(7, 2, 2))), torch.from_numpy(w1), stride=2,
                              groups=2),
        "conv_lower": F.conv2d(pad(xt, (_same_pads(5, 3, 1, True), _same_pads(7, 2, 1, True))), torch.from_numpy(w2),
                               dilation=(2, 1)),
        "conv_t": F.conv_transpose2d(xt, torch.from_numpy(wt), stride=(2, 1), dilation=(1, 2)),
        "nearest": F.interpolate(xt, size=(10, 14), mode="nearest"),
        "bilinear": F.interpolate(xt, scale_factor=(2, 3), mode="bilinear", align_corners=False),
        "d2s_s2d": xt,
        "cumsum": torch.from_numpy(np.flip(np.cumsum(np.flip(x, 3), 3), 3) - x),
    }  # fmt: skip
    for name, ref in refs.items():
        np.testing.assert_allclose(out[name], ref.numpy(), atol=ATOL, rtol=0, err_msg=name)


def test_bilinear_grids_match_mil_docs() -> None:
    """Sampling grids of resize_bilinear's modes: the examples in the MIL op documentation (Xin = 2)."""
    docs = {
        ("UNALIGN_CORNERS", 5): [0.0, 0.1, 0.5, 0.9, 1.0],
        ("ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
        ("DEFAULT", 5): [0.0, 0.4, 0.8, 1.0, 1.0],
        ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
        ("UNALIGN_CORNERS", 6): [0.0, 0.0, 0.33, 0.67, 1.0, 1.0],
        ("STRICT_ALIGN_CORNERS", 6): [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        ("DEFAULT", 6): [0.0, 0.33, 0.67, 1.0, 1.0, 1.0],
        ("OFFSET_CORNERS", 6): [0.08, 0.25, 0.42, 0.58, 0.75, 0.92],
    }
    for (mode, n_out), want in docs.items():
        np.testing.assert_allclose(_grid(2, n_out, mode), want, atol=0.005, err_msg=mode)


# -------------------------------------------------------------------- MIL ops the torch.export path never emits


def _close(out: dict, refs: dict, rtol: float = 1e-6) -> None:
    for name, ref in refs.items():
        ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
        assert out[name].shape == ref.shape, name
        np.testing.assert_allclose(out[name], ref, atol=ATOL, rtol=rtol, err_msg=name)


def test_mil_unary_and_parametric_activations(tmp_path: Path) -> None:
    """Elementwise unary ops and alpha / beta activations vs torch, with the formulas of the MIL op docs."""
    from coremltools.converters.mil import Builder as mb

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 3, 4)) * 2).astype(np.float32)
    x.flat[:8] = [0.5, -0.5, 1.5, 2.5, -2.5, 0.0, 0.3, 7.0]  # round ties, sign(0), x == alpha, x > 6
    u = rng.uniform(-0.95, 0.95, (2, 3, 4)).astype(np.float32)  # domain of acos / asin / atanh
    p = rng.uniform(0.2, 2.0, (2, 3, 4)).astype(np.float32)
    alpha_c, beta_c = np.array([0.1, -0.2, 0.5], np.float32), np.array([1.0, 2.0, 0.5], np.float32)
    spec = [mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=u.shape), mb.TensorSpec(shape=p.shape)]

    @mb.program(input_specs=spec, opset_version=ct.target.iOS17)
    def prog(x, u, p):
        unary = [mb.acos(x=u, name="acos"), mb.asin(x=u, name="asin"), mb.atanh(x=u, name="atanh"),
                 mb.tan(x=u, name="tan")]  # fmt: skip
        for op in ("atan", "ceil", "cosh", "exp2", "round", "sign", "sinh", "identity", "relu6", "softsign"):
            unary.append(getattr(mb, op)(x=x, name=op))
        x4 = mb.reshape(x=x, shape=[2, 3, 2, 2])
        return (*unary, mb.inverse(x=p, name="inverse"), mb.inverse(x=p, epsilon=0.25, name="inverse_eps"),
                mb.threshold(x=x, alpha=0.3, name="threshold"),
                mb.thresholded_relu(x=x, alpha=0.3, name="thresholded_relu"),
                mb.clamped_relu(x=x, alpha=0.2, beta=1.5, name="clamped_relu"),
                mb.linear_activation(x=x, alpha=1.5, beta=-0.5, name="linear_activation"),
                mb.scaled_tanh(x=x, alpha=2.0, beta=0.5, name="scaled_tanh"),
                mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5, name="sigmoid_hard"),
                mb.prelu(x=x4, alpha=alpha_c, name="prelu"),
                mb.softplus_parametric(x=x4, alpha=alpha_c, beta=beta_c, name="softplus_parametric"))  # fmt: skip

    out = load_mlpackage(_mil_package(prog, tmp_path / "unary.mlpackage")).predict({"x": x, "u": u, "p": p})
    t, tu, tp = torch.from_numpy(x), torch.from_numpy(u), torch.from_numpy(p)
    a_c, b_c = torch.from_numpy(alpha_c)[:, None, None], torch.from_numpy(beta_c)[:, None, None]
    refs = {
        "acos": torch.acos(tu), "asin": torch.asin(tu), "atanh": torch.atanh(tu), "tan": torch.tan(tu),
        "atan": torch.atan(t), "ceil": torch.ceil(t), "cosh": torch.cosh(t), "exp2": torch.exp2(t),
        "round": torch.round(t), "sign": torch.sign(t), "sinh": torch.sinh(t), "identity": t, "relu6": F.relu6(t),
        "softsign": F.softsign(t), "inverse": 1 / (tp + 1e-4), "inverse_eps": 1 / (tp + 0.25),
        "threshold": torch.clamp(t, min=0.3), "thresholded_relu": torch.where(t >= 0.3, t, 0.0),
        "clamped_relu": torch.clamp(F.leaky_relu(t, 0.2), max=1.5), "linear_activation": 1.5 * t - 0.5,
        "scaled_tanh": 2 * torch.tanh(0.5 * t), "sigmoid_hard": F.hardsigmoid(t),
        "prelu": F.prelu(t.reshape(2, 3, 2, 2), a_c[:, 0, 0]),
        "softplus_parametric": a_c * F.softplus(b_c * t.reshape(2, 3, 2, 2)),
    }  # fmt: skip
    _close(out, refs)
    # the documented edge cases themselves: "0.5 is rounded to 0" (half to even), x == alpha kept, relu6 caps at 6
    np.testing.assert_array_equal(out["round"].flat[:5], [0, -0, 2, 2, -2])
    np.testing.assert_array_equal(out["sign"].flat[4:6], [-1, 0])
    assert out["thresholded_relu"].flat[6] == np.float32(0.3) and out["relu6"].flat[7] == 6


def test_mil_binary_comparison_and_logical_ops(tmp_path: Path) -> None:
    """minimum, floor_div / mod on negative fp32 and int32 operands (floor semantics), comparisons, logic."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 4)) * 5).astype(np.float32)
    y = (rng.uniform(0.5, 3, (2, 3, 4)) * rng.choice([-1, 1], (2, 3, 4))).astype(np.float32)
    y.flat[:4] = x.flat[:4]  # equal elements for less_equal / not_equal
    xi = rng.integers(-20, 20, (2, 3, 4)).astype(np.int32)
    yi = (rng.integers(1, 7, (2, 3, 4)) * rng.choice([-1, 1], (2, 3, 4))).astype(np.int32)
    dtypes = {np.dtype(np.int32): types.int32, np.dtype(np.float32): types.fp32}
    spec = [mb.TensorSpec(shape=v.shape, dtype=dtypes[v.dtype]) for v in (x, y, xi, yi)]

    @mb.program(input_specs=spec, opset_version=ct.target.iOS17)
    def prog(x, y, xi, yi):
        le, ne = mb.less_equal(x=x, y=y, name="less_equal"), mb.not_equal(x=x, y=y, name="not_equal")
        return (le, ne, mb.less_equal(x=xi, y=yi, name="le_i"), mb.not_equal(x=xi, y=3, name="ne_i"),
                mb.minimum(x=x, y=y, name="minimum"), mb.minimum(x=xi, y=yi, name="min_i"),
                mb.floor_div(x=x, y=y, name="floor_div"), mb.floor_div(x=xi, y=yi, name="floor_div_i"),
                mb.mod(x=x, y=y, name="mod"), mb.mod(x=xi, y=yi, name="mod_i"), mb.mod(x=xi, y=-3, name="mod_neg"),
                mb.logical_and(x=le, y=ne, name="logical_and"), mb.logical_or(x=le, y=ne, name="logical_or"),
                mb.logical_xor(x=le, y=ne, name="logical_xor"), mb.logical_not(x=le, name="logical_not"))  # fmt: skip

    program = load_mlpackage(_mil_package(prog, tmp_path / "binary.mlpackage"))
    out = program.predict({"x": x, "y": y, "xi": xi, "yi": yi})
    t, u, ti, ui = (torch.from_numpy(v) for v in (x, y, xi, yi))
    le, ne = t <= u, t != u
    exact = {
        "less_equal": le, "not_equal": ne, "le_i": ti <= ui, "ne_i": ti != 3, "minimum": torch.minimum(t, u),
        "min_i": torch.minimum(ti, ui), "floor_div_i": torch.div(ti, ui, rounding_mode="floor"),
        "mod_i": torch.remainder(ti, ui), "mod_neg": torch.remainder(ti, -3), "logical_and": le & ne,
        "logical_or": le | ne, "logical_xor": le ^ ne, "logical_not": ~le,
    }  # fmt: skip
    for name, ref in exact.items():  # bool program outputs come back as fp32 (a cast the converter adds)
        np.testing.assert_array_equal(out[name], ref.numpy(), err_msg=name)
    # "rounded towards negative infinity"; x % y takes the sign of y (python / torch.remainder, MIL value inference)
    _close(out, {"floor_div": torch.div(t, u, rounding_mode="floor"), "mod": torch.remainder(t, u)}, rtol=1e-5)
    assert ((out["mod"] == 0) | (np.sign(out["mod"]) == np.sign(y))).all()
    np.testing.assert_array_equal(out["floor_div_i"] * yi + out["mod_i"], xi)


def test_mil_reductions_l2_norm_and_l2_pool(tmp_path: Path) -> None:
    """reduce_* variants with axes / keep_dims, l2_norm over the last three dims, l2_pool with strides and pads."""
    from coremltools.converters.mil import Builder as mb

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    p = rng.uniform(0.5, 1.5, (2, 3, 4, 5)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=p.shape)], opset_version=ct.target.iOS17)
    def prog(x, p):
        return (mb.reduce_l1_norm(x=x, axes=[1, 3], keep_dims=True, name="l1"),
                mb.reduce_l2_norm(x=x, axes=[-1], name="l2"), mb.reduce_sum_square(x=x, axes=[0, 2], name="sumsq"),
                mb.reduce_log_sum(x=p, axes=[2], name="logsum"), mb.reduce_prod(x=p, axes=[3], name="prod"),
                mb.reduce_prod(x=x, axes=[1], keep_dims=True, name="prod_keep"),
                mb.reduce_log_sum_exp(x=mb.mul(x=x, y=60.0), axes=[1, 2], keep_dims=True, name="lse"),
                mb.l2_norm(x=x, epsilon=1e-3, name="l2_norm4"),
                mb.l2_norm(x=mb.reshape(x=x, shape=[6, 4, 5]), name="l2_norm3"),
                mb.l2_pool(x=x, kernel_sizes=[2, 3], strides=[2, 1], pad_type="valid", name="l2_pool"),
                mb.l2_pool(x=x, kernel_sizes=[3, 2], strides=[2, 2], pad_type="custom", pad=[1, 0, 1, 1],
                           name="l2_pool_pad"),
                mb.l2_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same", name="l2_pool_same"))  # fmt: skip

    out = load_mlpackage(_mil_package(prog, tmp_path / "reduce.mlpackage")).predict({"x": x, "p": p})
    t, tp = torch.from_numpy(x), torch.from_numpy(p)
    norm = torch.linalg.vector_norm

    def l2_pool(k, s, pads):  # pads (top, bottom, left, right): zeros add nothing to the sum of squares
        return F.lp_pool2d(F.pad(t, (pads[2], pads[3], pads[0], pads[1])), 2, k, s)

    same = (*_same_pads(4, 3, 2), *_same_pads(5, 3, 2))
    refs = {
        "l1": norm(t, 1, dim=(1, 3), keepdim=True), "l2": norm(t, 2, dim=-1), "sumsq": (t * t).sum((0, 2)),
        "logsum": torch.log(tp.sum(2)), "prod": torch.prod(tp, 3), "prod_keep": torch.prod(t, 1, keepdim=True),
        "lse": torch.logsumexp(t * 60, (1, 2), keepdim=True),  # exp(60 x) overflows fp32: needs the max shift
        "l2_norm4": t / torch.sqrt((t * t).sum((1, 2, 3), keepdim=True) + 1e-3),
        "l2_norm3": t.reshape(6, 4, 5) / torch.sqrt((t * t).sum() + 1e-6),
        "l2_pool": l2_pool((2, 3), (2, 1), (0, 0, 0, 0)), "l2_pool_pad": l2_pool((3, 2), (2, 2), (1, 0, 1, 1)),
        "l2_pool_same": l2_pool(3, 2, same),
    }  # fmt: skip
    _close(out, refs, rtol=1e-5)
    assert np.isfinite(out["lse"]).all()


def test_mil_sort_gather_and_layout_ops(tmp_path: Path) -> None:
    """topk / argsort (k, axis, ascending, values only, uint8), band_part, gather_nd with batch_dims,
    flatten2d (the docs' examples), stack, pixel_unshuffle and constexpr_cast fp16 -> fp32."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(5)
    x = rng.permutation(24).reshape(2, 3, 4).astype(np.float32) - 11.5  # distinct: indices are well defined
    n = rng.permutation(256)[:10].reshape(2, 5).astype(np.int32)
    n[0, 0] = 0  # -uint8(0) == 0 would sort 0 first in a descending sort
    v = np.array([1.0, 3.0, 2.0], np.float32)
    img = rng.standard_normal((1, 2, 4, 6)).astype(np.float32)
    idx0 = np.array([[1, 2], [0, 0], [1, 1], [0, 2]], np.int32)  # into x[:2, :3] -> [4, 4]
    idx1 = np.array([[[2, 3], [0, 1], [1, 0]], [[0, 0], [2, 2], [1, 3]]], np.int32)  # batch_dims=1 -> [2, 3]
    half = np.array([0.1, -2.7, 1000.3, 3e-5], np.float16)
    spec = [mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=n.shape, dtype=types.int32), mb.TensorSpec(shape=(3,)),
            mb.TensorSpec(shape=img.shape)]  # fmt: skip

    @mb.program(input_specs=spec, opset_version=ct.target.iOS17)
    def prog(x, n, v, img):
        u8 = mb.cast(x=n, dtype="uint8")
        return (*mb.topk(x=x, k=2, name="topk"), *mb.topk(x=x, k=2, axis=0, ascending=True, name="topk_asc"),
                mb.topk(x=x, k=3, axis=1, return_indices=False, name="topk_vals"), *mb.topk(x=u8, k=3, name="topk_u8"),
                mb.argsort(x=x, name="argsort"), mb.argsort(x=x, axis=1, ascending=True, name="argsort_asc"),
                mb.band_part(x=x, lower=1, upper=0, name="band_1_0"), mb.band_part(x=x, name="band_all"),
                mb.band_part(x=x, lower=-1, upper=2, name="band_m1_2"),
                mb.band_part(x=x, lower=0, upper=0, name="band_0_0"),
                mb.band_part(x=x, lower=2, upper=-1, name="band_2_m1"),
                mb.gather_nd(x=x, indices=idx0, name="gather_nd"),
                mb.gather_nd(x=x, indices=idx1, batch_dims=1, name="gather_nd_b1"),
                mb.flatten2d(x=v, axis=-1, name="flat_v_m1"), mb.flatten2d(x=v, axis=1, name="flat_v_1"),
                mb.flatten2d(x=x, axis=-1, name="flat_x_m1"), mb.flatten2d(x=x, name="flat_x"),
                mb.flatten2d(x=x, axis=0, name="flat_x_0"), mb.stack(values=[v, v], axis=-1, name="stack_m1"),
                mb.stack(values=[x, mb.mul(x=x, y=2.0)], axis=1, name="stack"),
                mb.pixel_unshuffle(x=img, downscale_factor=np.uint32(2), name="pixel_unshuffle"),
                mb.mul(x=x, y=mb.constexpr_cast(source_val=half, output_dtype="fp32"), name="cast16"))  # fmt: skip

    program = load_mlpackage(_mil_package(prog, tmp_path / "sort.mlpackage"))
    assert "constexpr_cast" not in program.op_types  # decompressed once at load time, as a constant
    out = program.predict({"x": x, "n": n, "v": v, "img": img})
    t, tn = torch.from_numpy(x), torch.from_numpy(n).long()

    def band(lower, upper):  # keep (lower < 0 or m - n <= lower) and (upper < 0 or n - m <= upper)
        r = torch.tril(t, upper) if upper >= 0 else t
        return torch.triu(r, -lower) if lower >= 0 else r

    top, top_asc, top_u8 = torch.topk(t, 2), torch.topk(t, 2, dim=0, largest=False), torch.topk(tn, 3)
    refs = {
        "topk_0": top.values, "topk_1": top.indices, "topk_asc_0": top_asc.values, "topk_asc_1": top_asc.indices,
        "topk_vals": torch.topk(t, 3, dim=1).values, "topk_u8_0": top_u8.values, "topk_u8_1": top_u8.indices,
        "argsort": torch.argsort(t, descending=True), "argsort_asc": torch.argsort(t, dim=1),
        "band_1_0": band(1, 0), "band_all": t, "band_m1_2": band(-1, 2), "band_0_0": band(0, 0),
        "band_2_m1": band(2, -1),
        "gather_nd": x[idx0[:, 0], idx0[:, 1]],  # x[indices[i]]: a [4] slice for each index pair
        "gather_nd_b1": np.stack([x[b][idx1[b, :, 0], idx1[b, :, 1]] for b in range(2)]),
        "flat_v_m1": v.reshape(1, 3), "flat_v_1": v.reshape(3, 1), "flat_x_m1": x.reshape(6, 4),
        "flat_x": x.reshape(2, 12), "flat_x_0": x.reshape(1, 24), "stack": torch.stack([t, t * 2], 1),
        "stack_m1": np.stack([v, v], -1), "pixel_unshuffle": F.pixel_unshuffle(torch.from_numpy(img), 2),
        "cast16": x * half.astype(np.float32),
    }  # fmt: skip
    for name, ref in refs.items():
        ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
        assert out[name].shape == ref.shape, name
        np.testing.assert_array_equal(out[name], ref, err_msg=name)
    assert out["topk_1"].dtype == out["argsort"].dtype == np.int32
    # k = -1 (iOS17: "select all elements") is not buildable with coremltools 9 (it infers a -1 dim): kernel directly
    op = Op("topk", (), {"x": (Const(x),), "k": (Const(np.int32(-1)),)}, 0)
    values, indices = KERNELS["topk"](Args(op, lambda b: b.value, round_fp16=False))
    np.testing.assert_array_equal(values, torch.sort(t, descending=True).values.numpy())
    np.testing.assert_array_equal(indices, torch.argsort(t, descending=True).numpy())


# ------------------------------------------------------------------------------------------------ op coverage
_RAN: set[str] = set()
_COVERED: set[str] = set()  # ops executed by tests that passed


@pytest.fixture(autouse=True)
def _record_ran(request: pytest.FixtureRequest):
    """Attribute the ops each test executes (its own OpTrace) to it; they count for coverage only if it passed."""
    trace = _TRACE[0] = OpTrace()
    yield
    _TRACE[0] = None
    _RAN.add(request.node.originalname)
    report = getattr(request.node, "rep_call", None)  # set by conftest.pytest_runtest_makereport
    if report is not None and report.passed:
        _COVERED.update(trace.op_types)


def test_zz_every_supported_op_is_executed_by_a_test(request: pytest.FixtureRequest) -> None:
    """Every op of SUPPORTED_OPS ran in this module's tests (each of which compares against torch / coremltools).

    Only meaningful when the whole module ran (the op tests above fill their ``OpTrace``); skipped
    under a selection (-k / single test).
    """
    mine = {i.originalname for i in request.session.items if i.module is request.module} - {request.node.originalname}
    if not mine <= _RAN:
        pytest.skip(f"needs the whole module ({len(mine - _RAN)} op tests not run)")
    missing = sorted(set(SUPPORTED_OPS) - _COVERED - {"const"})
    assert not missing, f"kernels without a passing test: {missing}"


@pytest.mark.parametrize("groups, strides, dil", [(1, [1, 1], [1, 1]), (2, [2, 1], [1, 2])])
def test_conv_paths_agree(groups: int, strides: list[int], dil: list[int]) -> None:
    """The three conv paths (torch when the process has it, numpy im2col, numpy per tap) give one result."""
    from tadsr.runtime.coreml_sim.kernels.linear import _conv2d_im2col, _conv_per_tap, _conv_torch

    rng = np.random.default_rng(0)
    xp, w = rng.normal(size=(1, 16, 11, 12)).astype(np.float32), rng.normal(size=(8, 16 // groups, 3, 3))
    w = w.astype(np.float32)
    eff = [2 * d + 1 for d in dil]
    out_sz = [(p - e) // s + 1 for p, e, s in zip(xp.shape[2:], eff, strides, strict=True)]
    ref = F.conv2d(torch.from_numpy(xp), torch.from_numpy(w), stride=strides, dilation=dil, groups=groups).numpy()
    for path in (_conv2d_im2col, _conv_per_tap):
        np.testing.assert_allclose(path(xp, w, groups, strides, dil, out_sz), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_conv_torch(xp, w, groups, strides, dil), ref, atol=1e-5, rtol=0)


def test_half_conversions_through_torch_are_bit_identical_to_numpy() -> None:
    """The simulator's fp16 <-> fp32 conversions go through torch when the process has it: the same bits as
    numpy's (NaN payloads aside), for normal, subnormal, overflowing, halfway, NaN and inf values."""
    from tadsr.runtime.coreml_sim.kernels.base import _TORCH_CAST_MIN, as_dtype

    rng = np.random.default_rng(0)
    halfway = (np.arange(1, 2049, dtype=np.float32) + 0.5) * 2.0**-10  # exact ties between fp16 neighbours
    specials = np.array([0.0, -0.0, 6e-8, 3e-8, -6e-5, 65504.0, 65519.0, 65520.0, 1e9, -1e9, np.inf, -np.inf,
                         np.nan], np.float32)  # fmt: skip
    x = np.concatenate([rng.normal(scale=s, size=2048).astype(np.float32) for s in (1e-6, 1e-3, 1, 1e3, 1e5)]
                       + [halfway, specials])  # fmt: skip
    assert x.size >= _TORCH_CAST_MIN
    x.setflags(write=False)
    h = as_dtype(x, np.float16)
    assert h.dtype == np.float16 and h.view(np.uint16).tobytes() == x.astype(np.float16).view(np.uint16).tobytes()
    back = as_dtype(h, np.float32)
    ref = h.astype(np.float32)
    nan = np.isnan(ref)  # NaN stays NaN; only its payload bits may differ
    assert back.dtype == np.float32 and np.array_equal(np.isnan(back), nan)
    assert back[~nan].tobytes() == ref[~nan].tobytes()
    assert as_dtype(back, np.float32) is back  # no copy of a value that has the type already


def test_predict_holds_only_the_live_activations(tmp_path: Path) -> None:
    """predict drops each activation after its last reader (outputs kept, same values as keeping all): a chain
    of 24 ops on a 16 MB tensor peaks near a few tensors, not 24 (official-size Core ML checks held every
    activation of a tile at once). intermediates=True still returns every one."""
    from coremltools.converters.mil import Builder as mb

    from tadsr import memory

    n = 24

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 16, 512, 512))], opset_version=ct.target.iOS17)
    def prog(x):
        for i in range(n):
            x = mb.add(x=x, y=np.float32(1.0), name=f"a{i}")
        return x

    program = load_mlpackage(_mil_package(prog, tmp_path / "chain.mlpackage"))
    x = np.zeros((1, 16, 512, 512), np.float32)
    if not memory.reset_peak():
        pytest.skip("no resettable RSS high-water mark here (Linux /proc/self/clear_refs)")
    base = memory.rss_bytes()
    out = program.predict({"x": x})
    live = memory.peak_since_reset() - base
    everything = program.predict({"x": x}, intermediates=True)
    assert set(out) == {f"a{n - 1}"} and np.array_equal(out[f"a{n - 1}"], everything[f"a{n - 1}"])
    assert np.all(out[f"a{n - 1}"] == n) and len(everything) == n + 1
    assert live < 6 * x.nbytes, f"peak {live / 2**20:.0f} MB for a {x.nbytes / 2**20:.0f} MB tensor"
    some = program.predict({"x": x}, intermediates=lambda name: name in ("a3", "a7"))  # localisation keeps a few
    assert sorted(some) == ["a23", "a3", "a7"] and np.all(some["a3"] == 4) and np.all(some["a7"] == 8)
