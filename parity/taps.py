"""The artifact side of the flip-aware hops: an ONNX file re-run with its VQ lookup's latent and codes tapped as
extra outputs (:func:`artifact_view`), and its outputs and that view from one run per case where the tapped run
stands in for the plain one (:func:`run_cases_viewed`). Other formats expose neither (:mod:`tadsr.parity.vq`
recovers their codes from the image)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.parity.hops import VQ_GRAPHS, ParityCase, run_cases
from tadsr.parity.vq import VQView

__all__ = ["TapPlan", "artifact_view", "run_cases_viewed", "tap_plan", "view_of_tapped_runs"]

logger = logging.getLogger(__name__)

# how a view from the INT8 search's tapped run names itself in reports (the file reproduced that run's outputs)
SEARCH_RUN = "the INT8 search's run of the same model (the file reproduces its outputs)"


def _onnx_codes_tensor(model: Any, n_embed: int, dim: int) -> tuple[str | None, list[str]]:
    """The code map the ONNX graph's embedding lookup reads (Gather on the codebook), else its ArgMin outputs."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type != "Gather":
            continue
        src = n.input[0]
        while src not in shapes and src in producer and producer[src].op_type in ("Cast", "Identity",
                                                                                 "DequantizeLinear"):  # fmt: skip
            src = producer[src].input[0]
        if shapes.get(src) == (n_embed, dim):
            return n.input[1], []
    return None, [n.output[0] for n in model.graph.node if n.op_type == "ArgMin"]


@dataclass
class TapPlan:
    """The tensors of an ONNX graph's VQ lookup to fetch as extra outputs (:func:`tap_plan`)."""

    graph: str
    lat_name: str | None
    codes_name: str | None
    argmins: list[str]
    hw: tuple[int, int]

    @property
    def names(self) -> list[str]:
        return [x for x in (self.lat_name, self.codes_name, *self.argmins) if x]


@dataclass
class _Tapped:
    """Every case's run of an ONNX file (or of the same model) with its VQ lookup's tensors fetched too."""

    runs: list[dict[str, np.ndarray]]
    plan: TapPlan


def tap_plan(model: Any, manifest: Mapping[str, Any]) -> TapPlan | str | None:
    """What to tap in the ONNX ``model`` (a ``ModelProto``, its weights may stay in a data file) of an artifact
    with this ``manifest``'s graph and preset: the latent its codebook search reads and its code map. None for
    graphs without the lookup; a string saying why nothing can be tapped (no lookup found)."""
    from tadsr.formats.onnx.localize import onnx_codebook_input, structure_only

    graph = str(manifest["graph"]["name"])
    if graph not in VQ_GRAPHS:
        return None
    model = structure_only(model)  # names and shapes only: an official-size model's weights are not copied
    latent_shape = next(tuple(t["shape"]) for t in manifest["graph"]["inputs"] if t["name"] in ("noise", "x0"))
    ne = int((manifest.get("preset") or {}).get("vq", {}).get("n_embed", 0) or 0)
    codes_name, argmins = _onnx_codes_tensor(model, ne, int(latent_shape[1])) if ne else (None, [])
    if codes_name is None and not ne:
        argmins = [nd.output[0] for nd in model.graph.node if nd.op_type == "ArgMin"]
    lat_name = onnx_codebook_input(model, latent_shape)  # decoder: its input as the lookup reads it, if cast
    plan = TapPlan(graph, lat_name, codes_name, list(argmins), (int(latent_shape[-2]), int(latent_shape[-1])))
    return plan if plan.names else "onnx graph: no codebook lookup found to tap"


def _tap_runs(path: Path, manifest: Mapping[str, Any], cases: Sequence[ParityCase],
              threads: int | None) -> _Tapped | VQView | None:  # fmt: skip
    """The file run on every case with its latent and codes tapped (ONNX); a :class:`VQView` saying why nothing
    is exposed (other formats, no lookup found); None for graphs without the lookup."""
    if str(manifest["graph"]["name"]) not in VQ_GRAPHS:
        return None
    n = len(cases)
    fmt = str(manifest.get("format"))
    if fmt != "onnx":
        return VQView.unexposed(n, f"{fmt} program exposes no latent or codes")
    import onnx

    from tadsr.formats.localize import OnnxTap

    file = Path(path) / manifest["files"][0]["name"]
    plan = tap_plan(onnx.load(str(file), load_external_data=False), manifest)
    if not isinstance(plan, TapPlan):
        return None if plan is None else VQView.unexposed(n, plan)
    tap = OnnxTap(file, plan.names, threads=threads)
    return _Tapped([tap.run(c.inputs) for c in cases], plan)


def view_of_tapped_runs(path: Path, manifest: Mapping[str, Any], cases: Sequence[ParityCase],
                        outputs: Sequence[Mapping[str, np.ndarray]],
                        taps: Sequence[Mapping[str, np.ndarray]]) -> VQView | None:  # fmt: skip
    """:func:`artifact_view` from tensors another run already tapped (``taps``, per case) on a model identical to
    the ONNX file but for its metadata, whose outputs are ``outputs`` (the INT8 search's last variant, which the
    written file reproduced): the same view without running the file again. None when ``taps`` lack a tensor the
    file's lookup would be tapped at (the caller then runs :func:`artifact_view`)."""
    import onnx

    if str(manifest.get("format")) != "onnx" or len(taps) != len(cases):
        return None
    file = Path(path) / manifest["files"][0]["name"]
    plan = tap_plan(onnx.load(str(file), load_external_data=False), manifest)
    if not isinstance(plan, TapPlan) or any(n not in t for t in taps for n in plan.names):
        return None
    runs = [{**{n: t[n] for n in plan.names}, **o} for t, o in zip(taps, outputs, strict=True)]
    return _view(_Tapped(runs, plan), cases, outputs, SEARCH_RUN)


def _view(t: _Tapped, cases: Sequence[ParityCase], outputs: Sequence[Mapping[str, np.ndarray]],
          run: str = "onnx file re-run") -> VQView:  # fmt: skip
    """The latents and codes of tapped runs; a case's codes only where its tapped run reproduced ``outputs``."""
    lats: list[np.ndarray | None] = []
    codes: list[np.ndarray | None] = []
    mismatch = 0
    p = t.plan
    h, w = p.hw
    for c, out, r in zip(cases, outputs, t.runs, strict=True):
        lat = np.asarray(r[p.lat_name], np.float32) if p.lat_name and p.lat_name in r else None
        if lat is not None and p.graph == "decoder":  # the decoder's own input as its lookup reads it, or nothing
            x0 = np.asarray(c.inputs["x0"], np.float32)
            lat = lat if np.abs(lat - x0).max() <= 0.05 * max(float(np.ptp(x0)), 1e-6) else None
        lats.append(lat)
        if p.codes_name and p.codes_name in r:
            cm = np.asarray(r[p.codes_name]).astype(np.int64)
        elif p.argmins and all(a in r for a in p.argmins):
            cm = np.concatenate([np.asarray(r[a]).reshape(-1) for a in p.argmins]).astype(np.int64)
        else:
            cm = None
        if cm is not None and cm.size == h * w and _reproduces(r, out):
            codes.append(cm.reshape(1, h, w))
        else:
            mismatch += cm is not None
            codes.append(None)
    what = " and ".join(x for x in (("latent" if p.lat_name else ""), ("codes" if p.codes_name or p.argmins else ""))
                        if x)  # fmt: skip
    src = f"{run} with its {what} tapped as extra outputs"
    if mismatch:
        src += f" (in {mismatch} case(s) the tapped run did not reproduce the artifact's output: codes not used)"
    return VQView(lats, codes, src)


def _reproduces(tapped: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> bool:
    """Whether a tapped run's outputs are bit for bit the plain run's ``out``."""
    return all(k in tapped and np.array_equal(np.asarray(tapped[k], np.float32), np.asarray(v, np.float32))
               for k, v in out.items())  # fmt: skip


def artifact_view(
    path: Path, manifest: Mapping[str, Any], cases: Sequence[ParityCase], outputs: Sequence[Mapping[str, np.ndarray]],
    *, threads: int | None = 1,
) -> VQView | None:  # fmt: skip
    """The artifact's latent and codes at its VQ lookup, per case (None for graphs without the lookup).

    ONNX: the tensor the codebook search reads (fused graphs) and the code map the embedding lookup reads are
    added as graph outputs in memory and the file is run again (the file itself is not changed); the codes are
    used only where that run reproduces the artifact's own output exactly, else they are recovered from the
    image. ExecuTorch (delegated) and Core ML programs expose neither: their codes are recovered from the image
    among the near-tie alternatives that the latent floor allows (:mod:`tadsr.parity.vq`).
    """
    t = _tap_runs(path, manifest, cases, threads)
    return _view(t, cases, outputs) if isinstance(t, _Tapped) else t


def run_cases_viewed(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], path: Path, manifest: Mapping[str, Any],
    cases: Sequence[ParityCase], *, threads: int | None = 1,
) -> tuple[list[dict[str, np.ndarray]], VQView | None]:  # fmt: skip
    """``(run_cases(run, cases), artifact_view(...))`` of the file ``run`` runs, with one run of it per case where
    its tapped run can stand in for the plain one: the plain run goes on the first case only, and when the tapped
    run reproduces it bit for bit, the tapped runs' outputs are the file's on the other cases too (the same graph,
    so the same kernels for every input); else every case runs plain as well."""
    t = _tap_runs(path, manifest, cases, threads)
    if not isinstance(t, _Tapped) or not cases:
        return run_cases(run, cases), t
    first = run_cases(run, cases[:1])[0]
    if _reproduces(t.runs[0], first):
        outs = [first, *({k: np.asarray(r[k]).astype(v.dtype, copy=False) for k, v in first.items()}
                         for r in t.runs[1:])]  # fmt: skip
    else:
        logger.info("%s: the tapped run does not reproduce the file's output; running every case plain too",
                    Path(path).name)  # fmt: skip
        outs = [first, *run_cases(run, cases[1:])]
    return outs, _view(t, cases, outs)
