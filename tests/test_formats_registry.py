"""The format registry: one FormatSpec per slice, the only list of formats, reached by export and quantize."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tadsr.errors import ConfigError, ExportError
from tadsr.formats import registry
from tadsr.formats.registry import FORMAT_NAMES, all_formats, get_format
from tadsr.formats.spec import FormatSpec

HOOKS = ("export", "quantize", "localize")


def test_unknown_format_lists_the_known_names():
    with pytest.raises(ConfigError, match="unknown format 'tflite'") as e:
        get_format("tflite")
    for name in FORMAT_NAMES:
        assert name in str(e.value)


def test_names_and_specs_agree():
    assert FORMAT_NAMES == ("onnx", "executorch", "coreml")
    assert [f.name for f in all_formats()] == list(FORMAT_NAMES)
    for name in FORMAT_NAMES:
        spec = get_format(name)
        assert isinstance(spec, FormatSpec) and spec.name == name
        assert spec.suffix.startswith(".") and spec.title


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_format_has_every_hook(name):
    spec = get_format(name)
    for which in HOOKS:
        assert callable(spec.hook(which)), which
    if spec.output_scale:
        assert callable(spec.hook("output_scale"))
    opts, record = spec.runner_options(4)
    assert ("threads" in opts) == spec.threads and record
    assert spec.runner_options(None)[0] == {}
    assert "fp32" in spec.job_precisions and "pipeline" in spec.job_graphs
    assert spec.simulator is not None or not spec.needs_macos


def test_hooks_are_the_slices_functions():
    from tadsr.formats.coreml.export import export_coreml
    from tadsr.formats.executorch.ptq import quantize_job as et_job
    from tadsr.formats.onnx.export import export_onnx
    from tadsr.formats.onnx.localize import onnx_output_scale

    assert get_format("onnx").hook("export") is export_onnx
    assert get_format("coreml").hook("export") is export_coreml
    assert get_format("executorch").hook("quantize") is et_job
    assert get_format("onnx").hook("output_scale") is onnx_output_scale


def test_missing_hook_and_missing_module():
    with pytest.raises(ConfigError, match="no output_scale step"):
        get_format("coreml").hook("output_scale")
    with pytest.raises(ConfigError, match="no bogus step"):
        get_format("onnx").hook("bogus")
    broken = replace(get_format("onnx"), export="tadsr.formats.onnx.no_such_module:export_onnx")
    with pytest.raises(ExportError, match="not part of this installation"):
        broken.hook("export")
    lacking = replace(get_format("onnx"), export="tadsr.formats.onnx.export:no_such_function")
    with pytest.raises(ExportError, match="does not define no_such_function"):
        lacking.hook("export")


def test_localize_names_stay_importable_from_the_generic_module():
    import tadsr.formats.localize as generic
    from tadsr.formats.coreml.localize import localize_coreml
    from tadsr.formats.executorch.localize import localize_executorch
    from tadsr.formats.onnx.localize import OnnxTap, localize_onnx

    assert generic.localize_onnx is localize_onnx and generic.OnnxTap is OnnxTap
    assert generic.localize_coreml is localize_coreml and generic.localize_executorch is localize_executorch
    with pytest.raises(AttributeError):
        generic.no_such_name  # noqa: B018


def _with(monkeypatch, name: str, **changes) -> None:
    specs = dict(registry._SPECS)
    specs[name] = replace(specs[name], **changes)
    monkeypatch.setattr(registry, "_SPECS", specs)


def test_export_dispatches_through_the_registry(monkeypatch):
    from tadsr.export import api

    _with(monkeypatch, "onnx", export=f"{__name__}:_fake_exporter")
    assert api.get_exporter("onnx") is _fake_exporter
    with pytest.raises(ConfigError, match="unknown format"):
        api.get_exporter("tflite")


def _fake_exporter(*args, **kwargs):
    return "fake export"


def _fake_quantize_job(job):
    _fake_quantize_job.seen.append(job)
    return [job.work / "made-by-the-fake-slice"]


_fake_quantize_job.seen = []


def test_quantize_dispatches_through_the_registry(monkeypatch, tmp_path):
    from tadsr.quantize import api

    _with(monkeypatch, "executorch", quantize=f"{__name__}:_fake_quantize_job")
    parent = api._Parent(tmp_path, {"graph": {}}, "encoder", "executorch", 64, tmp_path / "encoder.pte")
    ctx = api._Ctx(parent, None, None, None, None, None, "minmax", 30.0, None, 1, 1, None, False, True, tmp_path)
    ctx.work = tmp_path / "work"
    (path,) = api.get_format(parent.fmt).hook("quantize")(ctx)
    assert _fake_quantize_job.seen[-1] is ctx and path.name == "made-by-the-fake-slice"
    assert ctx.parent_file == parent.model_file


def test_quantize_formats_come_from_the_registry():
    from tadsr.quantize.api import FORMATS

    assert FORMATS == tuple(f.name for f in all_formats() if f.quantize)


def test_importing_the_registry_loads_no_toolchain():
    code = ("import sys, tadsr.formats.registry as r; r.get_format('coreml').runner_options(2); "
            "print(sorted(m for m in ('torch', 'coremltools', 'executorch', 'onnx', 'onnxruntime') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------------------------ shared slice helpers


def test_torch_runner_restores_the_thread_count():
    import numpy as np
    import torch

    from tadsr.formats.graphs import GraphSpec, TensorSpec
    from tadsr.formats.torch_ref import TorchRunner

    spec = GraphSpec("decoder", 64, 4, [TensorSpec("x", (1, 3, 4, 4))], [TensorSpec("y", (1, 3, 4, 4))])
    before = torch.get_num_threads()
    runner = TorchRunner.from_graph(torch.nn.Identity().eval(), spec, threads=max(1, before % 2 + 1))
    out = runner.run({"x": np.ones((1, 3, 4, 4), np.float32)})
    assert out["y"].shape == (1, 3, 4, 4)
    assert torch.get_num_threads() == before
