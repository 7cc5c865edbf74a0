"""The PT2E recipe search's simulator: a calibrated prepared graph whose observers act as fake quantizers,
switchable per block, computing what ``convert_pt2e`` of the same recipe computes (:class:`FakeQuantSim`)."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tadsr.formats.executorch.ptq import _eager, _is_candidate, _module_path, cat_stays_int8
from tadsr.formats.executorch.ranges import _is_observer, observed_node, observer_groups
from tadsr.formats.sensitivity import unit_of

__all__ = ["FakeQuantSim"]


def _qparams(obs: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A calibrated observer's (scale, zero point) as flat float32 / int32 tensors."""
    scale, zp = obs.calculate_qparams()
    return scale.detach().float().reshape(-1), zp.detach().to(torch.int32).reshape(-1)


class _FakeQuant(nn.Module):
    """A calibrated observer replayed as quantize-dequantize (identity when disabled)."""

    def __init__(self, obs: nn.Module) -> None:
        """See the class docstring."""
        super().__init__()
        scale, zp = _qparams(obs)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        self.qmin, self.qmax = int(obs.quant_min), int(obs.quant_max)
        self.per_channel = obs.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.axis = int(getattr(obs, "ch_axis", 0))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin,
                                                          self.qmax)  # fmt: skip
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale[0]), int(self.zero_point[0]), self.qmin,
                                                     self.qmax)  # fmt: skip


class FakeQuantSim:
    """A calibrated PT2E-prepared graph whose observers act as fake quantizers, switchable per block.

    An observer is active when any quantized layer next to it (its producer for an output observer, its
    consumers for an input or weight observer) belongs to a block that is not float: what ``prepare_pt2e``
    with ``set_module_name(block, None)`` would have annotated. A ``cat`` of a float block that an INT8 tensor
    feeds counts as quantized, as :func:`_filtered_xnnpack_quantizer` keeps it (one shared INT8 scale for its
    inputs and output, float inputs included): without that, the simulator left those float inputs unrounded
    while the converted graph rounded them (session 19: the fused ExecuTorch pipeline 0.364 dB HR bound against
    the simulator's 0.241 for the same recipe).
    """

    def __init__(self, prepared: torch.fx.GraphModule, targets: set[Any], output_names: Sequence[str],
                 ranges: Mapping[str, tuple[float, float]] | None = None) -> None:  # fmt: skip
        """See the class docstring. ``ranges``: the calibration range of every observed tensor
        (:class:`~tadsr.formats.executorch.ranges.RangeTable`), to give a cat's tensors their own scales in the
        recipes that leave it float (:meth:`_cat_scales`); without it they keep the cat's shared scale."""
        self.gm = prepared
        self.output_names = list(output_names)
        _split_observer_edges(prepared)
        self.owners: dict[str, set[str]] = {}
        self.cat_owners: dict[str, set[str]] = {}  # observer -> the cats next to it (node names)
        # cat node name -> (its block, the quantized layers that feed it: (node name, block, is a cat))
        self.cats: dict[str, tuple[str, list[tuple[str, str, bool]]]] = {}
        cat = torch.ops.aten.cat.default
        for n in prepared.graph.nodes:
            if n.op == "call_function" and n.target == cat and (path := _module_path(n)):
                feeders = [_upstream_candidate(prepared, a, targets) for a in n.all_input_nodes]
                self.cats[n.name] = (unit_of(path), [(f.name, unit_of(_module_path(f)), f.target == cat)
                                                     for f in feeders if f is not None])  # fmt: skip
            if n.op != "call_module" or not _is_observer(getattr(prepared, str(n.target))):
                continue
            near = [_upstream_candidate(prepared, n.args[0], targets)] + list(n.users)
            units = {unit_of(p) for m in near if isinstance(m, torch.fx.Node) and _is_candidate(m, targets)
                     and (p := _module_path(m))}  # fmt: skip
            self.owners[str(n.target)] = self.owners.get(str(n.target), set()) | units  # shared observers
            cats = {m.name for m in near if isinstance(m, torch.fx.Node) and m.op == "call_function"
                    and m.target == cat}  # fmt: skip
            self.cat_owners[str(n.target)] = self.cat_owners.get(str(n.target), set()) | cats
        self._groups = _cat_groups(prepared, self.cats, ranges) if ranges is not None else []
        for name in self.owners:  # after the walk above, which recognises observers by type
            setattr(prepared, name, _FakeQuant(getattr(prepared, name)))

    def run(
        self, float_units: frozenset[str], feeds: Sequence[Mapping[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        """Outputs ``{name: array}`` per feed with ``float_units`` float."""
        kept = self.int8_cats(float_units)
        self._cat_scales(kept)
        for name, units in self.owners.items():
            on = bool(units - float_units or self.cat_owners[name] & kept)
            getattr(self.gm, name).enabled = on if units else True
        return _eager(self.gm, self.output_names)(feeds)

    def _cat_scales(self, kept: set[str]) -> None:
        """Set the scale of every observer of a cat's shared group for the cats ``kept`` INT8.

        With every block annotated (the prepared graph here), a cat's inputs and output share one observer and
        so one range. When the cat stays float, the converted graph observes each of those tensors on its own (a
        float skip tensor that an INT8 conv also reads gets the range of that tensor alone): the tiny denoiser's
        simulated x0 was 0.28 (of 4.1) from the converted one's for such a recipe, and equal with this.
        """
        for group in self._groups:
            parent = {t: t for t in group.tensors}

            def root(t: str) -> str:
                while parent[t] != t:
                    parent[t] = parent[parent[t]]
                    t = parent[t]
                return t

            for links in [group.links] + [ts for c, ts in group.cats.items() if c in kept]:
                for a, b in links:
                    parent[root(a)] = root(b)
            span: dict[str, tuple[float, float]] = {}
            for t in group.tensors:
                lo, hi = group.ranges[t]
                r = root(t)
                span[r] = (min(lo, span[r][0]), max(hi, span[r][1])) if r in span else (lo, hi)
            for name, t in group.observers.items():
                fq = getattr(self.gm, name)
                scale, zp = group.qparams(span[root(t)])
                fq.scale.copy_(scale)
                fq.zero_point.copy_(zp)

    def int8_cats(self, float_units: Collection[str]) -> set[str]:
        """The ``cat`` nodes that stay INT8 with ``float_units`` float (:func:`cat_stays_int8`, the converted
        graph's rule)."""
        kept: set[str] = set()
        for name, (unit, feeders) in self.cats.items():  # graph order: a cat's feeders are decided before it
            if cat_stays_int8(unit in float_units, (f in kept if is_cat else u not in float_units
                                                    for f, u, is_cat in feeders)):  # fmt: skip
                kept.add(name)
        return kept


class _CatGroup:
    """An observer group of the all-annotated graph that concatenations tie together (see
    :meth:`FakeQuantSim._cat_scales`): its observer nodes and the tensor each watches, what links the tensors
    whatever the recipe (a reshape / permute ... and its input), and per cat the links it adds when INT8."""

    def __init__(self, template: nn.Module, ranges: Mapping[str, tuple[float, float]]) -> None:
        """See the class docstring."""
        self.template = copy.deepcopy(template)
        self.ranges = ranges
        self.observers: dict[str, str] = {}  # observer node target -> watched tensor (node name)
        self.tensors: set[str] = set()
        self.links: list[tuple[str, str]] = []
        self.cats: dict[str, list[tuple[str, str]]] = {}
        self._cache: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def qparams(self, span: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) the group's observer computes after seeing ``span``."""
        if span not in self._cache:
            obs = copy.deepcopy(self.template)
            obs.reset_min_max_vals()
            with torch.no_grad():
                obs(torch.tensor(span, dtype=torch.float32))
            self._cache[span] = _qparams(obs)
        return self._cache[span]


def _cat_groups(gm: torch.fx.GraphModule, cats: Collection[str],
                ranges: Mapping[str, tuple[float, float]]) -> list[_CatGroup]:  # fmt: skip
    """The observer groups of ``gm`` (prepared, all annotated) that hold a cat's input or output, when the table
    has every tensor they watch and their observer is a per-tensor min/max one."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import _is_share_obs_or_fq_op
    from torchao.quantization.pt2e.observer import MinMaxObserver

    nodes_of: dict[int, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and _is_observer(mod := getattr(gm, str(n.target), None)):
            nodes_of.setdefault(id(mod), []).append(n)
    out = []
    for mod, watched in observer_groups(gm):
        names = {w.name for w in watched}
        if type(mod) is not MinMaxObserver or not (names & set(cats)) or not names <= set(ranges):
            continue
        group = _CatGroup(mod, ranges)
        group.tensors = names
        for n in nodes_of[id(mod)]:
            group.observers[str(n.target)] = observed_node(gm, n).name
        for w in watched:
            if w.name in cats:
                ins = [observed_node(gm, a) if a.op == "call_module" else a for a in w.all_input_nodes]
                group.cats[w.name] = [(a.name, w.name) for a in ins if a.name in names]
            elif w.op == "call_function" and _is_share_obs_or_fq_op(w.target) and w.args:
                src = w.args[0]
                if isinstance(src, torch.fx.Node) and src.op == "call_module":
                    src = observed_node(gm, src)
                if isinstance(src, torch.fx.Node) and src.name in names:
                    group.links.append((src.name, w.name))
        out.append(group)
    return out


def _split_observer_edges(gm: torch.fx.GraphModule) -> int:
    """Give every consumer of an observer its own observer node (the same observer object, a new name), in place.

    ``prepare_pt2e`` puts one observer after a tensor that several layers read. When its producer is float and
    only some of its consumers are INT8, the converted graph rounds the tensor on the INT8 consumers' edges
    alone: one switch per edge models that, one per tensor rounded the float consumers' input too. Returns the
    number of observer nodes added.
    """
    added = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not _is_observer(getattr(gm, str(n.target), None)) or len(n.users) < 2:
            continue
        for i, user in enumerate(list(n.users)[1:], 1):
            name = f"{n.target}_edge{i}"
            setattr(gm, name, getattr(gm, str(n.target)))
            with gm.graph.inserting_after(n):
                edge = gm.graph.call_module(name, n.args, n.kwargs)
            edge.meta = dict(n.meta)
            user.replace_input_with(n, edge)
            added += 1
    if added:
        gm.graph.lint()
        gm.recompile()
    return added


def _upstream_candidate(gm: torch.fx.GraphModule, node: Any, targets: set[Any]) -> torch.fx.Node | None:
    """The quantized layer whose output annotation reaches ``node`` through shared-spec ops, if any.

    ``propagate_annotation`` lets reshape / permute / slice / mean ... share their input's observer, so an
    observer after such a chain exists exactly when the layer at its start is quantized.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import _is_share_obs_or_fq_op

    while isinstance(node, torch.fx.Node):
        if node.op == "call_module" and _is_observer(getattr(gm, str(node.target), None)):
            node = node.args[0]
        elif _is_candidate(node, targets):
            return node
        elif node.op == "call_function" and _is_share_obs_or_fq_op(node.target) and node.args:
            node = node.args[0]
        else:
            return None
    return None
