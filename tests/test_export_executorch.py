"""ExecuTorch export (XNNPACK): the fused pipeline lowers to at most two partitions, the denoiser inside one, and
keeps only the int64 VQ lookup outside; the runner checks its inputs.

The real pipeline and component artifacts are those of the default tier's ``tadsr all --smoke`` run (session
fixture ``tiny_all`` of tests/conftest.py, shared with tests/test_every_format.py, whose parity verdicts compare
them with torch); the cheap encoder lowering is ``tiny_executorch_encoder``. The full-size UNet is ``slow``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from tadsr.errors import ConfigError, InputError, InputSpecError
from tadsr.formats.executorch.export import export_executorch
from tadsr.formats.graphs import make_graphs
from tadsr.runtime.executorch_runner import ExecuTorchRunner
from tadsr.runtime.runner import load_runner, read_manifest

pytest.importorskip("executorch")

# Achieved with tadsr.formats.rewrites (upstream-shaped graph: 123 partitions, 400+ ops outside).
DENOISER_MAX_PARTITIONS = 1
PIPELINE_MAX_PARTITIONS = 2  # encoder + denoiser + VQ distances | argmin, view, embedding | decoder
VQ_LOOKUP_OPS = {"argmin.default", "view_copy.default", "embedding.default"}
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread, restored after


@pytest.fixture(scope="module")
def denoiser(tiny_models):
    return make_graphs(tiny_models, 64, ("denoiser",))["denoiser"]


def _feeds(spec, seed):
    return {s.name: x.numpy() for s, x in zip(spec.inputs, spec.example_inputs(seed), strict=True)}


def test_denoiser_is_one_xnnpack_partition(tiny_all):
    """The smoke lowers the fused pipeline (not the denoiser alone: cli/main_job._SMOKE_GRAPHS): with at most two
    partitions and only the VQ lookup outside them, the denoiser's 2,400+ ops are delegated inside the first one,
    rewritten (18 baked window attentions, GroupNorms decomposed)."""
    folder = tiny_all.out / "artifacts" / "pipeline-executorch-fp32-t64"
    manifest = read_manifest(folder)
    info = manifest["backend_info"]
    assert [f["name"] for f in manifest["files"]] == ["pipeline.pte"] and manifest["precision"] == "fp32"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "pipeline.pte"]  # no temp file left
    assert info["partitions"] <= PIPELINE_MAX_PARTITIONS and set(info["ops_outside"]) <= VQ_LOOKUP_OPS
    assert info["delegated_ops"] == sum(info["delegated_ops_per_partition"])
    assert info["delegated_ops_per_partition"][0] > 2400  # encoder + denoiser + VQ distances
    assert info["rewrites"]["bake_window_attention"] == 18 and info["rewrites"]["decompose_group_norm"] >= 65
    assert info["rewrite_max_abs"] < 1e-4


def test_encoder_artifact_and_runner_checks(tiny_models, tiny_executorch_encoder):
    manifest = read_manifest(tiny_executorch_encoder)
    info = manifest["backend_info"]
    assert manifest["format"] == "executorch" and manifest["parity_passed"]
    assert info["partitions"] == 1 and info["ops_outside"] == {}
    gspec = manifest["graph"]
    (f,) = manifest["files"]
    pte = tiny_executorch_encoder / f["name"]
    assert info["bytes"] == f["bytes"] == pte.stat().st_size
    g, spec = make_graphs(tiny_models, 64, ("encoder",))["encoder"]
    runner = ExecuTorchRunner(pte, gspec, threads=1)
    with torch.no_grad():
        ref = g(*spec.example_inputs(4)).numpy()
    assert np.abs(runner.run(_feeds(spec, 4))["z_y"] - ref).max() < ATOL
    feeds = {i["name"]: np.zeros(i["shape"], np.float32) for i in gspec["inputs"]}
    with pytest.raises(InputSpecError, match="missing"):
        runner.run({})
    with pytest.raises(InputSpecError, match="shape"):
        runner.run({**feeds, "lr": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(InputSpecError, match="dtype"):
        runner.run({**feeds, "lr": feeds["lr"].astype(np.float64)})
    with pytest.raises(InputError, match="does not exist"):
        ExecuTorchRunner(tiny_executorch_encoder / "nope.pte", gspec)
    with pytest.raises(InputError, match="GraphSpec"):
        ExecuTorchRunner(pte, {"name": "encoder"})


def test_pipeline_artifact(tiny_all):
    folder = tiny_all.out / "artifacts" / "pipeline-executorch-fp32-t64"
    manifest = read_manifest(folder)
    info = manifest["backend_info"]
    assert manifest["format"] == "executorch" and manifest["parity_passed"]
    assert info["partitions"] <= PIPELINE_MAX_PARTITIONS
    assert set(info["ops_outside"]) <= VQ_LOOKUP_OPS
    assert info["rewrites"]["bake_window_attention"] == 18 and info["rewrite_max_abs"] < 1e-4
    (f,) = manifest["files"]
    assert info["bytes"] == f["bytes"] == (folder / f["name"]).stat().st_size
    assert load_runner(folder).backend == "executorch"


def test_decomposed_group_norm_keeps_precision_in_xnnpack():
    """XNNPACK sums a mean sequentially in float32: one mean over a whole group (65536 values here) with a large
    offset (real photos) lost ~1e-4; the staged means of DecomposedGroupNorm stay near float rounding."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from tadsr.formats.executorch.export import _partitioner
    from tadsr.formats.rewrites import DecomposedGroupNorm

    gn = torch.nn.GroupNorm(8, 32, eps=1e-6)
    x = 30 + torch.randn(1, 32, 128, 128, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(DecomposedGroupNorm(gn).eval(), (x,), strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[_partitioner("xnnpack", "fp32")])
    program = Runtime.get().load_program(edge.to_executorch().buffer)  # keep it alive while the method runs
    out = program.load_method("forward").execute([x])[0]
    ref = torch.nn.functional.group_norm(x.double(), 8, gn.weight.double(), gn.bias.double(), 1e-6)
    assert (out.double() - ref).abs().max() < 2e-5


def test_bad_arguments(denoiser, tmp_path):
    g, spec = denoiser
    with pytest.raises(ConfigError, match="fp16"):
        export_executorch(g, spec, tmp_path, precision="fp16")
    with pytest.raises(ConfigError, match="backend"):
        export_executorch(g, spec, tmp_path, backend="vulkan")
    assert list(tmp_path.iterdir()) == []


def test_coreml_delegate_lowers_but_runs_only_on_apple(tmp_path):
    """backend="coreml": ExecuTorch's Core ML delegate (lowering works on Linux; its runtime is Apple-only)."""
    pytest.importorskip("executorch.backends.apple.coreml.partition")
    from torch import nn

    from tadsr.errors import BackendUnavailableError
    from tadsr.formats.graphs import GraphSpec, TensorSpec

    toy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)).eval()
    spec = GraphSpec("toy", 8, 1, (TensorSpec("x", (1, 3, 8, 8)),), (TensorSpec("y", (1, 8, 8, 8)),))
    res = export_executorch(toy, spec, tmp_path, backend="coreml", precision="fp16")
    assert res.info["backend"] == "coreml" and res.info["partitions"] == 1 and res.info["n_ops_outside"] == 0
    from executorch.runtime import Runtime

    if "CoreMLBackend" not in Runtime.get().backend_registry.registered_backend_names:
        with pytest.raises(BackendUnavailableError, match="Core ML delegate"):
            ExecuTorchRunner(tmp_path / res.files[0], spec.to_dict())


@pytest.mark.slow
def test_official_denoiser_partitions(tmp_path):
    """Full-size UNet (random weights, tile 64): still one partition (several minutes of CPU)."""
    import tadsr

    models = tadsr.load_models(preset="official-x4", init="random")
    g, spec = make_graphs(models, 64, ("denoiser",))["denoiser"]
    res = export_executorch(g, spec, tmp_path)
    assert res.info["partitions"] <= DENOISER_MAX_PARTITIONS and res.info["n_ops_outside"] == 0
    with torch.no_grad():
        ref = g(*spec.example_inputs(0)).numpy()
    got = ExecuTorchRunner(tmp_path / res.files[0], spec.to_dict()).run(_feeds(spec, 0))["x0"]
    assert np.abs(got - ref).max() < 1e-3


def test_shared_node_sources_same_program_and_restored(tmp_path, monkeypatch):
    """Inside ``shared_node_sources`` fx provenance is shared instead of deep-copied (nesting restores the outer
    state); a toy lowers to the same .pte bytes with it and the exporter's lean XNNPACK pass list as without
    both."""
    import copy

    from torch import nn
    from torch.fx.traceback import NodeSource

    from tadsr.formats.fx_meta import shared_node_sources
    from tadsr.formats.graphs import GraphSpec, TensorSpec

    src = [NodeSource(None, "p")]
    assert copy.deepcopy(src)[0] is not src[0]
    with shared_node_sources():
        with shared_node_sources():
            assert copy.deepcopy(src)[0] is src[0]
        assert copy.deepcopy(src)[0] is src[0]
    assert copy.deepcopy(src)[0] is not src[0] and "__deepcopy__" not in NodeSource.__dict__

    torch.manual_seed(0)
    toy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 3, 1)).eval()
    spec = GraphSpec("toy", 8, 1, (TensorSpec("x", (1, 3, 8, 8)),), (TensorSpec("y", (1, 3, 8, 8)),))
    (tmp_path / "plain").mkdir()
    (tmp_path / "shared").mkdir()
    import tadsr.formats.executorch.export as et_export

    entered = []
    lean = et_export.lean_xnnpack_passes
    monkeypatch.setattr(et_export, "lean_xnnpack_passes", lambda: entered.append(1) or contextlib.nullcontext())
    plain = export_executorch(toy, spec, tmp_path / "plain")
    monkeypatch.setattr(et_export, "lean_xnnpack_passes", lambda: entered.append(2) or lean())
    with shared_node_sources():
        shared = export_executorch(toy, spec, tmp_path / "shared")
    assert entered == [1, 2]  # the exporter lowers inside it
    assert (tmp_path / "plain" / plain.files[0]).read_bytes() == (tmp_path / "shared" / shared.files[0]).read_bytes()


def test_lean_xnnpack_passes_drop_only_passes_without_their_ops(monkeypatch):
    """Inside ``lean_xnnpack_passes`` XNNPACK's delegate runs its pass list without the passes whose ops the
    partition lacks (batch norm, 1-d convolution, PReLU, the ops of the SDPA and bilinear patterns, a cat of more
    than 5 tensors, a constant to fold, dim-order ops) and with the others, which re-trace the program only when
    it changed (fewer re-traces than the dropped passes alone save); the .pte bytes do not change, an
    explicit pass list is left alone, and the pass manager is restored."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch import nn

    from tadsr.formats.executorch.passes import lean_xnnpack_passes

    from executorch.exir.pass_base import ExportPass

    ran: list[set[str]] = []
    traces = [0]  # whole-program re-traces by the XNNPACK passes
    transform, retrace = XNNPACKPassManager.transform, ExportPass.call
    monkeypatch.setattr(XNNPACKPassManager, "transform", lambda self: ran.append({p.__name__ for p in self.passes})
                        or transform(self))  # fmt: skip

    def counted(self, graph_module):
        traces[0] += 1
        return retrace(self, graph_module)

    def lower(module: nn.Module, shape: tuple[int, ...], lean: bool) -> tuple[bytes, set[str], int]:
        torch.manual_seed(0)
        ep = torch.export.export(module.eval(), (torch.randn(shape),), strict=False)
        ran.clear()
        with lean_xnnpack_passes() if lean else contextlib.nullcontext():
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        buffer = edge.to_executorch().buffer
        assert ran, "no XNNPACK partition was lowered"
        return buffer, set().union(*ran), traces[0]

    class Attention(nn.Module):
        """A bilinear upsample (its pass runs); sdpa and a 6-way cat, which the partitioner splits so that no
        partition holds the whole SDPA pattern or the cat (their passes have nothing to do)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x.flatten(2).transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(x.shape)
            up = torch.nn.functional.interpolate(a, scale_factor=2, mode="bilinear", align_corners=False)
            return torch.cat([up] * 6, dim=1)

    four = {"FuseBatchNormPass", "DecomposeBatchNorm", "Conv1dUnsqueezePass", "PReLUReshapePass"}
    patterns = {"DecomposeConcatenate", "ConvertToSDPAPass", "ConvertToUpsampleBilinear2d"}
    retraces = {"ConstPropPass", "DimOrderOpsRevertPass"}  # none of these graphs has a constant to fold, a dim order
    seven = four | patterns | retraces
    cases = [(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU()), (1, 3, 8, 8), seven),
             (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.PReLU()), (1, 3, 8, 8),
              {"Conv1dUnsqueezePass"} | patterns | retraces),
             (nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU()), (1, 3, 8), seven - {"Conv1dUnsqueezePass"}),
             (Attention(), (1, 8, 4, 4), four | retraces | {"DecomposeConcatenate", "ConvertToSDPAPass"})]  # fmt: skip
    monkeypatch.setattr(ExportPass, "call", counted)
    for module, shape, skipped in cases:
        traces[0] = 0
        stock_bytes, stock, stock_traces = lower(module, shape, lean=False)
        traces[0] = 0
        lean_bytes, lean, lean_traces = lower(module, shape, lean=True)
        assert seven <= stock and stock - lean == skipped and lean <= stock, (module, stock - lean)
        assert lean_bytes == stock_bytes, module
        # every dropped pass re-traced once; of the others, those that found nothing to change did not re-trace
        assert lean_traces < stock_traces - len(skipped), (module, stock_traces, lean_traces, len(skipped))
    init = XNNPACKPassManager.__init__
    with lean_xnnpack_passes(), lean_xnnpack_passes():
        assert XNNPACKPassManager(ep := torch.export.export(nn.Conv2d(3, 3, 1), (torch.randn(1, 3, 4, 4),)),
                                  passes=[nn.Module]).passes == [nn.Module]  # fmt: skip (an explicit list: as given)
    assert XNNPACKPassManager.__init__ is init and four <= {p.__name__ for p in XNNPACKPassManager(ep).passes}



@pytest.mark.parametrize("second_scale, float_input, mixed", [(0.1, False, False), (0.3, False, True), (0.3, True, False)])
def test_xnnpack_partitioner_keeps_a_mixed_scale_cat_float(second_scale, float_input, mixed):
    """dequantize -> cat -> quantize on more than one scale is kept out of XNNPACK's QS8 concatenation (which
    needs one scale and fails to load otherwise); equal scales, or a float input, keep the stock partitioning."""
    import torch.fx as fx
    import torchao.quantization.pt2e  # noqa: F401 (registers the quantized_decomposed ops)

    from tadsr.formats.executorch.passes import mixed_scale_cat

    dq, q = (torch.ops.quantized_decomposed.dequantize_per_tensor.default,
             torch.ops.quantized_decomposed.quantize_per_tensor.default)  # fmt: skip
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    da = g.call_function(dq, (a, 0.1, 0, -128, 127, torch.int8))
    db = b if float_input else g.call_function(dq, (b, second_scale, 0, -128, 127, torch.int8))
    cat = g.call_function(torch.ops.aten.cat.default, ([da, db], 1))
    g.output(g.call_function(q, (cat, 0.1, 0, -128, 127, torch.int8)))
    assert mixed_scale_cat(cat) is mixed
