"""The runtime leaves the process as it found it: no thread settings changed, no module-level bookkeeping, and
an INT8 ExecuTorch program runs in a fresh process that only imports tadsr.runtime.

(That importing every runtime module loads no torch is tests/test_layers.py::test_importing_the_runtime_loads_no_torch.)
Costs: building the INT8 toy program ~10 s, each fresh interpreter ~5 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_IO = {
    "name": "toy", "tile": 64, "scale": 1,
    "inputs": [{"name": "x", "shape": [1, 3, 64, 64], "dtype": "float32"}],
    "outputs": [{"name": "y", "shape": [1, 4, 64, 64], "dtype": "float32"}],
}  # fmt: skip


class _ToyAddConstant(torch.nn.Module):
    """conv + a (1, 4, 64, 64) constant only ``add`` reads: it goes INT8 + dequantize_per_channel, which ExecuTorch
    runs outside the XNNPACK delegate (a kernel of executorch.kernels.quantized)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("big", torch.randn(1, 4, 64, 64, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.big


def _fresh(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def int8_pte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An INT8 .pte with a quantized_decomposed op outside its delegate, plus x.npy / y.npy (torch's answer)."""
    pytest.importorskip("executorch")
    from tadsr.formats.executorch.ptq import int8_add_constants, quantize_executorch

    out = tmp_path_factory.mktemp("int8_pte")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gm = torch.export.export(_ToyAddConstant().eval(), (x,)).module()
        assert int8_add_constants(gm)["tensors"] == 1
        want = gm(x)
    res = quantize_executorch(gm, (x,), out, name="toy", output_names=["y"])
    assert any("dequantize_per_channel" in k for k in res.info["ops_outside_delegates"]), res.info
    np.save(out / "x.npy", x.numpy())
    np.save(out / "y.npy", want.numpy())
    return out / "toy.pte"


def test_int8_executorch_runs_in_a_fresh_process(int8_pte: Path) -> None:
    """The runner registers the quantized kernels itself (it used to fail: 'ExecuTorch cannot load')."""
    code = """
        import json, sys
        import numpy as np
        from tadsr.runtime.executorch_runner import ExecuTorchRunner
        pte, spec = sys.argv[1], json.loads(sys.argv[2])
        y = ExecuTorchRunner(pte, spec).run({"x": np.load(sys.argv[3])})["y"]
        print(json.dumps({"err": float(np.abs(y - np.load(sys.argv[4])).max())}))
    """
    d = int8_pte.parent
    res = _fresh(code, str(int8_pte), json.dumps(_IO), str(d / "x.npy"), str(d / "y.npy"))
    assert res["err"] < 1e-4


def test_executorch_runner_leaves_thread_settings_alone(int8_pte: Path) -> None:
    """Building and running a runner with another ``threads`` changes neither the ExecuTorch pool nor torch's
    threads: it warns and reports the pool size it uses."""
    code = """
        import json, sys, warnings
        import numpy as np
        import torch
        from executorch.extension.pybindings import portable_lib
        from tadsr.runtime.executorch_runner import ExecuTorchRunner
        pool, torch_threads = portable_lib._threadpool_get_thread_count(), torch.get_num_threads()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = ExecuTorchRunner(sys.argv[1], json.loads(sys.argv[2]), threads=pool + 3)
            runner.run({"x": np.load(sys.argv[3])})
            quiet = ExecuTorchRunner(sys.argv[1], json.loads(sys.argv[2]), threads=pool)
        print(json.dumps({
            "pool": [pool, portable_lib._threadpool_get_thread_count()],
            "torch": [torch_threads, torch.get_num_threads()],
            "runner_threads": [runner.threads, quiet.threads],
            "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        }))
    """
    res = _fresh(code, str(int8_pte), json.dumps(_IO), str(int8_pte.parent / "x.npy"))
    pool = res["pool"][0]
    assert res["pool"] == [pool, pool] and res["torch"][0] == res["torch"][1]
    assert res["runner_threads"] == [pool, pool]
    assert len(res["warnings"]) == 1 and "process-wide" in res["warnings"][0], res["warnings"]


def _module_state() -> dict[str, str]:
    """repr of every mutable container at module level in tadsr.runtime.coreml_sim's modules."""
    state = {}
    for name, module in sorted(sys.modules.items()):
        if name.startswith("tadsr.runtime.coreml_sim"):
            for key, value in vars(module).items():
                if isinstance(value, dict | list | set | bytearray):
                    state[f"{name}.{key}"] = repr(value)
    return state


def test_coreml_sim_keeps_no_module_state(tmp_path: Path) -> None:
    """Two loads and runs leave every module-level container as it was; an OpTrace fills only where passed."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    from tadsr.runtime import coreml_sim

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.relu(x=mb.add(x=x, y=np.float32(1.0)), name="y")

    path = tmp_path / "p.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
               compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
               skip_model_load=True).save(str(path))  # fmt: skip
    x = {"x": np.array([[-2.0, -0.5, 0.0, 3.0]], np.float32)}
    before = _module_state()
    assert before, "no module-level tables found: the check would be vacuous"
    plain = coreml_sim.load_mlpackage(path)
    trace = coreml_sim.OpTrace()
    traced = coreml_sim.load_mlpackage(path, trace=trace)
    for _ in range(2):
        np.testing.assert_array_equal(plain.predict(x)["y"], [[0.0, 0.5, 1.0, 4.0]])
        traced.predict(x)
    assert plain.trace is None
    assert trace.counts == {"add": 2, "relu": 2}
    assert _module_state() == before
    assert not hasattr(coreml_sim, "EXECUTED_OPS")
