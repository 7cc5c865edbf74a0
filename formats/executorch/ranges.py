"""One calibration pass for every PT2E recipe of a graph: the observed tensors' ranges, recorded once.

PT2E calibration runs the prepared graph in float: an observer passes its input through and only records it.
So what a min/max observer ends up holding depends on which tensors it observes, never on which other blocks
are annotated. :class:`RangeTable` records the range of every tensor that some observer of the all-INT8
annotation watches, in one pass over the calibration patches. :meth:`RangeTable.fill` then calibrates the
observers of a graph prepared for any recipe (a subset of that annotation) without running it: each observer
is fed the recorded ``[min, max]`` of the tensors it watches (weights: the constants themselves), which leaves it
in exactly the state a calibration pass over the same patches would (a min/max of mins and maxes). An observer of
another kind that watches one tensor (the per-channel observer of a weight the graph computes, e.g. a folded
one) is kept as calibrated, and a graph prepared for another recipe gets a copy of it.

The recipe search converts the fused pipeline up to five times (all INT8, the searched recipe, three repair
rounds); each conversion used to run the 48 calibration patches through the whole graph again. The ExecuTorch and
Core ML INT8 drivers quantize the same PT2E graph: in ``tadsr all`` the second format's call restores the table
the first one recorded (:meth:`RangeTable.restored`, through the run's captures folder) instead of its own pass.

Histogram observers (``entropy``, ``percentile``) cannot be rebuilt from a range: :meth:`RangeTable.fill`
declines and the caller calibrates as before.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["RangeTable", "observed_node", "observer_groups"]

logger = logging.getLogger(__name__)


def _is_observer(m: Any) -> bool:
    from torchao.quantization.pt2e.observer import ObserverBase

    return isinstance(m, ObserverBase)


def _attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def observed_node(gm: torch.fx.GraphModule, n: torch.fx.Node) -> torch.fx.Node:
    """The graph node whose value observer node ``n`` watches (through observers chained after observers)."""
    src = n.args[0]
    while (isinstance(src, torch.fx.Node) and src.op == "call_module"
           and _is_observer(_attr(gm, str(src.target)))):  # fmt: skip
        src = src.args[0]
    if not isinstance(src, torch.fx.Node):
        raise TypeError(f"observer node {n.name} watches a non-node argument {src!r}")
    return src


def observer_groups(gm: torch.fx.GraphModule) -> list[tuple[nn.Module, list[torch.fx.Node]]]:
    """Each observer module of a prepared graph (shared ones once) with the nodes it watches."""
    groups: dict[int, tuple[nn.Module, list[torch.fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and _is_observer(mod := _attr(gm, str(n.target))):
            src = observed_node(gm, n)
            watched = groups.setdefault(id(mod), (mod, []))[1]
            if src not in watched:
                watched.append(src)
    return list(groups.values())


class _Range(nn.Module):
    """Records the running min and max of what passes through (the state of a per-tensor MinMaxObserver)."""

    def __init__(self) -> None:
        """See the class docstring."""
        super().__init__()
        self.lo, self.hi = math.inf, -math.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            lo, hi = torch.aminmax(x.detach().float())
            self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        return x


class RangeTable:
    """The range of every tensor an all-annotated prepared graph observes, over one set of calibration feeds.

    Args:
        prepared: a graph prepared with every candidate annotated (it is consumed: its observers are replaced by
            range recorders).
        feeds: calibration feeds ``{input name: array}``.
        run: ``(graph, feeds) -> None``, the calibration loop (progress bar, no grad).
    """

    def __init__(self, prepared: torch.fx.GraphModule, feeds: Sequence[Mapping[str, np.ndarray]],
                 run: Callable[[torch.fx.GraphModule, Sequence[Mapping[str, np.ndarray]]], None]) -> None:  # fmt: skip
        """See the class docstring."""
        from torchao.quantization.pt2e.observer import MinMaxObserver

        self.feeds = feeds  # identity is the key: fill() is valid for these very feeds
        self._states: dict[str, Any] = {}  # a restored table's kept observers, as saved (see restored())
        recorders: dict[str, _Range] = {}
        self.observers: dict[str, nn.Module] = {}  # a watched node -> its calibrated observer (not per-tensor min/max)
        for mod, nodes in observer_groups(prepared):
            if type(mod) is not MinMaxObserver and len(nodes) == 1 and nodes[0].op != "get_attr":
                self.observers[nodes[0].name] = mod  # e.g. a per-channel observer of a weight the graph computes
        for i, n in enumerate(list(prepared.graph.nodes)):
            if n.op == "call_module" and _is_observer(mod := _attr(prepared, str(n.target))):
                src = observed_node(prepared, n)
                if src.op == "get_attr" or self.observers.get(src.name) is mod:
                    continue  # a constant (fill() reads it from the graph it fills) or an observer kept as it is
                rec = recorders.setdefault(src.name, _Range())
                name = f"_tadsr_range_{i}"
                setattr(prepared, name, rec)
                n.target = name
        prepared.recompile()
        run(prepared, feeds)
        self.ranges = {k: (r.lo, r.hi) for k, r in recorders.items() if r.lo <= r.hi}

    @classmethod
    def restored(cls, feeds: Sequence[Mapping[str, np.ndarray]], saved: Mapping[str, Any]) -> RangeTable:
        """A table recorded elsewhere (another process's pass over the same graph and ``feeds``), from
        :meth:`to_saved`; its kept observers are rebuilt in :meth:`fill` from their saved state."""
        table = cls.__new__(cls)
        table.feeds, table.observers = feeds, {}
        table.ranges = {k: (float(v[0]), float(v[1])) for k, v in saved["ranges"].items()}
        table._states = dict(saved.get("observers", {}))
        return table

    def to_saved(self) -> dict[str, Any]:
        """The table as JSON-able data for :meth:`restored`: the ranges, and each kept observer's type and state."""
        states = {name: {"type": type(m).__name__, "config": [str(c) for c in _config(m)],
                         "state": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                                       "values": v.detach().flatten().tolist()} for k, v in m.state_dict().items()
                                   if k in _SEEN}}
                  for name, m in self.observers.items()}  # fmt: skip
        return {"ranges": {k: list(v) for k, v in self.ranges.items()}, "observers": states}

    def names(self) -> set[str]:
        """The graph nodes the table knows."""
        return set(self.ranges) | set(self.observers) | set(self._states)

    def _twin(self, name: str, mod: nn.Module) -> nn.Module | None:
        """The calibrated observer of node ``name`` for ``mod``: kept here, or rebuilt from a restored state."""
        twin = self.observers.get(name)
        state = self._states.get(name)
        if (twin is None and state is not None and state["type"] == type(mod).__name__
                and state.get("config") == [str(c) for c in _config(mod)]):  # fmt: skip
            twin = copy.deepcopy(mod)  # its configuration; what it has seen is the recorded state
            for k, v in state["state"].items():
                if k in _SEEN:
                    setattr(twin, k, torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"]))
            self.observers[name] = twin
        return twin

    def fill(self, prepared: torch.fx.GraphModule) -> bool:
        """Calibrate the observers of ``prepared`` from the table; False (nothing changed) when one of them is not
        a per-tensor min/max observer of recorded tensors or of constants, and the caller must calibrate. Dynamic
        activations' placeholders (a recipe's dynamic units) need nothing."""
        from torchao.quantization.pt2e.observer import MinMaxObserver

        plan: list[tuple[nn.Module, list[torch.Tensor]]] = []
        swap: dict[int, nn.Module] = {}  # id(observer) -> the table's calibrated twin
        for mod, nodes in observer_groups(prepared):
            if getattr(mod, "is_dynamic", False):
                continue  # a dynamic activation's placeholder: its range is taken from each input at run time
            twin = self._twin(nodes[0].name, mod) if len(nodes) == 1 else None
            if twin is not None and type(twin) is type(mod) and _config(twin) == _config(mod):
                swap[id(mod)] = twin
                continue
            xs: list[torch.Tensor] = []
            for src in nodes:
                if src.op == "get_attr":
                    xs.append(_attr(prepared, str(src.target)).detach())
                elif type(mod) is MinMaxObserver and src.name in self.ranges:
                    xs.append(torch.tensor(self.ranges[src.name], dtype=torch.float32))
                else:
                    logger.info("range table: a %s of %s cannot be filled; calibrating", type(mod).__name__, src.name)
                    return False
            plan.append((mod, xs))
        with torch.no_grad():
            for mod, xs in plan:
                for x in xs:
                    mod(x)
        copies: dict[int, nn.Module] = {}
        for n in prepared.graph.nodes:
            if n.op == "call_module" and (key := id(_attr(prepared, str(n.target)))) in swap:
                setattr(prepared, str(n.target), copies.setdefault(key, copy.deepcopy(swap[key])))
        return True


_SEEN = ("min_val", "max_val")  # the state a min/max observer (per tensor or per channel) accumulates


def _config(m: nn.Module) -> tuple[Any, ...]:
    """What an observer's quantization parameters depend on besides what it has seen."""
    values = (getattr(m, k, None) for k in ("dtype", "qscheme", "quant_min", "quant_max", "ch_axis", "eps",
                                             "reduce_range", "is_dynamic"))  # fmt: skip
    return tuple(v.tolist() if isinstance(v, torch.Tensor) else v for v in values)
