"""PyTorch eager as a runner: an export-ready graph behind the same numpy interface as the exported files.

Used as the "export-ready torch" side of parity hops and as the eager baseline of benchmarks, so every
backend is measured through the same input checks and conversions. It wraps an ``nn.Module`` that the
caller built (``tadsr.formats.graphs.make_graphs``); this module imports no model code itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tadsr.runtime.runner import RunnerSpec, check_inputs

__all__ = ["TorchRunner"]


class TorchRunner:
    """Run ``module(*inputs)`` in eager mode (inference mode, float32, CPU unless the module is elsewhere).

    Args:
        module: the graph (eval mode).
        spec: its interface; see :meth:`from_graph` to build it from a ``GraphSpec``.
        threads: if given, ``torch.set_num_threads(threads)`` for each run (process-wide; the previous value is
            restored after the run).
    """

    backend = "torch"

    def __init__(self, module: nn.Module, spec: RunnerSpec, *, threads: int | None = None) -> None:
        self.module = module.eval()
        self.spec = spec
        self.threads = threads
        params = list(module.parameters()) + list(module.buffers())
        self.device = params[0].device if params else torch.device("cpu")

    @classmethod
    def from_graph(cls, module: nn.Module, graph_spec: Any, *, threads: int | None = None) -> TorchRunner:
        """From an export graph and its ``GraphSpec`` (anything with ``to_dict()`` in the manifest's layout)."""
        spec = RunnerSpec.from_manifest({"graph": graph_spec.to_dict(), "format": "torch", "precision": "fp32"})
        return cls(module, spec, threads=threads)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs`` against the spec, run the module, return ``{output name: float32 array}``."""
        feeds = check_inputs(self.spec, inputs)
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.module(*(torch.from_numpy(feeds[n]).to(self.device) for n in self.spec.input_names))
        finally:
            if self.threads is not None:
                torch.set_num_threads(before)  # the setting is process-wide: give it back
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(self.spec.output_names, outs, strict=True)}
