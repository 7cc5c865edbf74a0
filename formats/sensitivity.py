"""Which layers stay float: per-block sensitivity, the automatic recipe search, and ``recipe.json``.

Units. A quantizable layer (Conv, Linear/Gemm, activation MatMul) belongs to the module path it was exported
from (``unet.input_blocks.1.1.blocks.0.attn.qkv``). Layers are grouped into *blocks* by :func:`unit_of`: the
nearest enclosing module that is an element of a list (``...blocks.0``, ``...input_blocks.3.0``,
``encoder.down.1``) or a numbered child (``mid.block_1``, ``mid.attn_1``); a layer with no such ancestor is
its own unit (``quant_conv``, ``unet.out.2``). The same names work for ONNX nodes (named after their weights)
and for PT2E modules, so a recipe reads the same for every backend.

Measurement (:func:`rank_units`): quantize one unit at a time, everything else float, and take the PSNR of
the graph output against fp32 on a few calibration patches; the lower, the more sensitive.

Search (:func:`search_exclusions`): start with every unit quantized and measure PSNR vs fp32 on HELD-OUT
patches (worst patch). Below the target, keep the most sensitive units in float, growing the float set
1, 2, 4, ... units and then bisecting to the smallest prefix of the ranking that meets the target.

Recipe (:class:`Recipe`): per graph, per backend, the quantized op types, the float units and nodes, the
calibration method, the measured PSNR and the sensitivity table. ``recipe.json`` is written into every INT8
artifact and can be passed back with ``--recipe FILE`` to skip the search.

Default floors (:func:`default_target`): 30 dB vs fp32 on the worst held-out patch for a component, 25 dB for
the fused pipeline (whose error is dominated by VQ code flips).
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tadsr.errors import ConfigError, InputError
from tadsr.metrics import error_stats

__all__ = [
    "DEFAULT_TARGET_PSNR",
    "default_target",
    "RECIPE_NAME",
    "RECIPE_SCHEMA",
    "UnitSensitivity",
    "SearchResult",
    "BackendRecipe",
    "Recipe",
    "unit_of",
    "worst_psnr",
    "shipped_trace",
    "rank_units",
    "search_exclusions",
    "find_float_units",
    "HRBudget",
    "load_recipe",
]

logger = logging.getLogger(__name__)

RECIPE_NAME = "recipe.json"
RECIPE_SCHEMA = 1

# Default fidelity floors: PSNR vs the fp32 artifact on the worst held-out patch, per graph output (images over
# [-1, 1], i.e. the usual 8-bit PSNR; latents over their fp32 range). See default_target() for the reasoning.
DEFAULT_TARGET_PSNR: dict[str, float] = {"encoder": 30.0, "denoiser": 30.0, "decoder": 30.0, "pipeline": 25.0}


def default_target(graph: str) -> float:
    """The default recipe floor of ``graph`` (dB): 30 for the components, 25 for the fused pipeline.

    Measured with every Conv/Gemm/MatMul INT8 (W8 per-channel, A8 per-tensor, minmax), tile 64, worst of 8
    held-out patches vs fp32 (ONNX Runtime):

    ==========  =========================  ===========================================================
    graph       bundled (trained weights)  tiny (random fill)
    ==========  =========================  ===========================================================
    encoder     35.1 dB                    27-31 dB (the first conv after the bicubic is the weak one)
    denoiser    34.3 dB (x0 conv pinned)   38 dB (x0 conv pinned)
    decoder     29.4 dB (31.1 dB with its  18-19 dB: the VQ decoder's mid-attention MatMuls (every other
                conv_out float)            block alone costs 37-41 dB)
    pipeline    28.9 dB (x0 conv pinned)   15 dB (code flips, see below)
    ==========  =========================  ===========================================================

    Why 30 dB for a component: the trained model meets it with >= 99.9% of the weights INT8 (one float
    conv in the decoder), where Apple's fp16 gate (35 dB) would keep whole blocks float for differences
    nobody sees; 30 dB is an RMS error of 8 grey levels of 255 (a good JPEG), below the texture an x4 SR
    model invents (its outputs differ from ground truth by 25-30 dB); and it is at or above the int8 parity
    floors of tadsr/numerics.json (encoder 30, decoder 28, denoiser 25), so an artifact built to the recipe
    passes the parity gate on the same held-out patches.

    Why 25 dB for the fused pipeline: its PSNR vs fp32 is dominated by VQ code flips, not by quantization
    noise: a latent within INT8 noise of a tie between two codebook entries decodes to the other entry's
    patch (chaining INT8 component artifacts meets the same flips). The trained model reaches 28.9 dB all
    INT8; on random weights any single encoder or denoiser block costs 20-27 dB at the image, so 30 dB would
    keep ~95% of the pipeline float. 25 dB is numerics.json's int8 pipeline floor ("where SR artefacts start
    to be visible at 100% zoom").
    """
    return DEFAULT_TARGET_PSNR.get(graph, 30.0)


_NUMBERED = re.compile(r"^(\d+|\w+_\d+)$")


def unit_of(module_path: str) -> str:
    """The block a layer belongs to: its nearest ancestor whose last name part is an index or ``name_<k>``.

    Examples: ``unet.input_blocks.1.0.in_layers.2`` -> ``unet.input_blocks.1.0``;
    ``encoder.mid.attn_1.q`` -> ``encoder.mid.attn_1``; ``quant_conv`` -> ``quant_conv``.
    """
    parts = module_path.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if _NUMBERED.match(parts[k - 1]):
            return ".".join(parts[:k])
    return module_path


def worst_psnr(outputs: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]],
               ranges: Mapping[str, tuple[float, float] | None]) -> float:  # fmt: skip
    """Lowest PSNR over patches and outputs (images over their value range, latents over the reference's range)."""
    worst = math.inf
    for out, ref in zip(outputs, refs, strict=True):
        for name, r in ref.items():
            vr = ranges.get(name)
            worst = min(worst, error_stats(out[name], r, (vr[1] - vr[0]) if vr else None).psnr)
    return worst


@dataclass(frozen=True)
class UnitSensitivity:
    """PSNR of the graph output vs fp32 with only ``unit`` (a block, or a group of blocks) quantized.

    Attributes:
        unit: block name, or a module-path prefix standing for all blocks under it.
        psnr: dB, only this group INT8, everything else float.
        layers, params: candidate layers and weight parameters in the group.
        members: the blocks of the group.
    """

    unit: str
    psnr: float
    layers: int
    params: int
    members: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (members only when the group is more than the unit itself)."""
        d: dict[str, Any] = {"unit": self.unit, "psnr": _db(self.psnr), "layers": self.layers, "params": self.params}
        if self.members != (self.unit,):
            d["members"] = list(self.members)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitSensitivity:
        """The inverse of :meth:`to_dict` (a group without ``members`` is the unit itself)."""
        members = tuple(d.get("members", [d["unit"]]))
        return cls(d["unit"], float(d["psnr"]), int(d["layers"]), int(d["params"]), members)


def _db(x: float) -> float:
    return 999.0 if math.isinf(x) else round(float(x), 3)


def _parts(unit: str) -> list[str]:
    return unit.split(".")


def _children(prefix: tuple[str, ...], members: Sequence[str]) -> dict[tuple[str, ...], list[str]]:
    """Members grouped by the path component after ``prefix``; single-child chains are collapsed."""
    while True:
        groups: dict[tuple[str, ...], list[str]] = {}
        for u in members:
            parts = _parts(u)
            key = tuple(parts[: len(prefix) + 1]) if len(parts) > len(prefix) else tuple(parts)
            groups.setdefault(key, []).append(u)
        if len(groups) != 1 or len(members) == 1:
            return groups
        (only,) = groups
        if only == prefix:  # cannot go deeper
            return groups
        prefix = only


def rank_units(
    evaluate: Callable[[frozenset[str]], float],
    units: Mapping[str, tuple[int, int]],
    *,
    target: float,
    margin: float = 10.0,
    budget: int = 48,
    progress: bool = False,
) -> list[UnitSensitivity]:
    """Coarse-to-fine sensitivity: quantize one group at a time (all else float), split the sensitive ones.

    Groups start at the top of the module tree (``encoder``, ``denoiser``, ``decoder`` ... or the graph's
    first level). A group whose PSNR alone is below ``target + margin`` is split into its children (next
    module-path component) and those are measured, down to single blocks; a group above it is harmless as a
    whole and ranked as one. On a graph with many blocks this measures the sensitive ones one by one at a
    fraction of the cost of a flat sweep.

    Args:
        evaluate: ``float units -> PSNR`` on the sensitivity patches.
        units: block -> (layers, weight parameters).
        target: the recipe floor (dB).
        margin: groups at least this far above ``target`` are not split.
        budget: most evaluations; when it is spent, the groups not yet split stay whole (coarser recipe,
            bounded time: a big graph whose every block matters, like the fused pipeline, would otherwise
            cost one evaluation per block and more).
        progress: tqdm bar (evaluations).

    Returns:
        The final groups, most sensitive first.
    """
    from tqdm.auto import tqdm

    names = sorted(units)
    t0 = time.perf_counter()
    bar = tqdm(desc="sensitivity", unit="eval", disable=not progress)
    count = [0]

    def measure(key: tuple[str, ...], members: list[str]) -> UnitSensitivity:
        inside = set(members)
        psnr = evaluate(frozenset(n for n in names if n not in inside))
        bar.update(1)
        count[0] += 1
        layers = sum(units[m][0] for m in members)
        params = sum(units[m][1] for m in members)
        return UnitSensitivity(".".join(key), psnr, layers, params, tuple(sorted(members)))

    frontier = [measure(k, m) for k, m in _children((), names).items()]
    split: set[str] = set()
    while True:
        todo = [g for g in frontier if len(g.members) > 1 and g.unit not in split and g.psnr < target + margin]
        if not todo:
            break
        if count[0] >= budget:
            logger.info("sensitivity budget of %d evaluations spent; %d groups stay whole", budget, len(todo))
            break
        worst = min(todo, key=lambda g: g.psnr)
        split.add(worst.unit)
        kids = _children(tuple(_parts(worst.unit)), list(worst.members))
        if len(kids) == 1:
            continue
        frontier.remove(worst)
        frontier += [measure(k, m) for k, m in kids.items()]
    bar.close()
    frontier.sort(key=lambda s: (s.psnr, s.unit))
    logger.info("sensitivity: %d evaluations for %d blocks in %.1fs; most sensitive: %s", count[0], len(names),
                time.perf_counter() - t0, ", ".join(f"{s.unit} {s.psnr:.1f} dB" for s in frontier[:3]))  # fmt: skip
    return frontier


@dataclass
class SearchResult:
    """Outcome of :func:`search_exclusions`.

    Attributes:
        excluded: units kept float, most sensitive first.
        psnr: held-out PSNR with those units float.
        met: whether ``psnr >= target`` (and, with an HR budget, the loss within it).
        trace: every evaluated configuration ``{"float_units": k, "psnr": dB}`` (+ ``hr_loss_db`` and
            ``hr_bound_db``).
        hr_loss: PSNR-Y vs HR lost against fp32 with those units float (None: no HR budget).
        dynamic: those of ``excluded`` that run with dynamic INT8 activations (a shipped recipe's
            :attr:`BackendRecipe.dynamic_units`; a search leaves it empty).
    """

    excluded: list[str]
    psnr: float
    met: bool
    trace: list[dict[str, Any]] = field(default_factory=list)
    hr_loss: HRLoss | None = None
    dynamic: list[str] = field(default_factory=list)


def search_exclusions(
    evaluate: Callable[[frozenset[str]], float],
    ranking: Sequence[str],
    target: float,
    *,
    initial: Iterable[str] = (),
) -> SearchResult:
    """Smallest prefix of ``ranking`` to keep float so that ``evaluate(float set) >= target``.

    Grows the prefix 1, 2, 4, ... until the target is met, then bisects between the last failing and the
    first passing length (PSNR is close to monotone in the float set; the returned set is always one that
    was measured to pass, or the whole ranking if none passed).

    Args:
        evaluate: ``float units -> held-out PSNR``.
        ranking: units, most sensitive first.
        target: PSNR floor in dB.
        initial: units that are float in every configuration (pinned).
    """
    pinned = list(dict.fromkeys(initial))
    order = [u for u in ranking if u not in pinned]
    cache: dict[int, float] = {}
    trace: list[dict[str, Any]] = []

    def at(k: int) -> float:
        if k not in cache:
            cache[k] = evaluate(frozenset(pinned + order[:k]))
            trace.append({"float_units": len(pinned) + k, "added": order[k - 1] if k else None, "psnr": _db(cache[k])})
            logger.debug("float units %d -> %.2f dB", len(pinned) + k, cache[k])
        return cache[k]

    if at(0) >= target or not order:
        return SearchResult(pinned, cache[0], cache[0] >= target, trace)
    lo, hi = 0, 1
    while at(hi) < target:
        if hi == len(order):
            return SearchResult(pinned + order, cache[hi], False, trace)
        lo, hi = hi, min(2 * hi, len(order))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return SearchResult(pinned + order[:hi], cache[hi], True, trace)


Feeds = Sequence[Mapping[str, np.ndarray]]
Outputs = Sequence[Mapping[str, np.ndarray]]


class HRLoss(NamedTuple):
    """PSNR-Y vs HR lost against fp32 over the held-out patches (positive: INT8 is worse; a patch that INT8 happens
    to improve counts as 0, see :class:`HRBudget`)."""

    mean: float  # dB, mean over patches of the loss (gains as 0): what the recipe records
    bound: float  # one-sided upper confidence bound of that mean: what the budget is held to


HR_CONFIDENCE = 0.95  # default confidence of the HR budget's bound


@dataclass(frozen=True)
class HRBudget:
    """What the user loses, as a second criterion of the search (graphs whose output is the SR image).

    The mean loss over a few held-out patches is noisy: a configuration that just meets the budget on the patches'
    noise draw can miss it on the next one, and the search, which stops at the first configuration that passes,
    favours such lucky ones. So the budget holds the mean's one-sided upper confidence bound, ``mean + z * s /
    sqrt(n)`` (``s``: sample standard deviation of the per-patch losses, ``z``: normal quantile of ``confidence``;
    0.5 holds the mean itself).

    A patch where INT8 comes closer to HR than fp32 counts as 0 dB lost, not as a gain: INT8 error that by chance
    moves a model's output towards HR on some content (session 14, bundled encoder: 1 dB closer on every patch of
    the dark Hubble photo) must not pay for what it loses on other content (up to 0.7 dB on smooth retina patches,
    2.5 dB on a smooth dusk sky). With gains netted, the all-INT8 bundled encoder passed its share of the budget on the
    held-out patches (mean -0.11 dB) and cost 0.50 dB on the benchmark photos.

    Attributes:
        budget_db: most PSNR-Y vs HR the INT8 graph may lose against the fp32 artifact.
        losses: ``held-out outputs -> dB lost per patch`` (positive: INT8 is worse than fp32 against HR).
        confidence: confidence of the bound, in [0.5, 1).
    """

    budget_db: float
    losses: Callable[[Outputs], Sequence[float]]
    confidence: float = HR_CONFIDENCE

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"the HR budget's confidence must be in [0.5, 1), got {self.confidence!r}")

    def measure(self, outputs: Outputs) -> HRLoss:
        """Mean loss over the patches (a patch's gain counts as 0) and its upper confidence bound."""
        d = np.maximum(np.asarray(self.losses(outputs), dtype=np.float64), 0.0)
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
        z = statistics.NormalDist().inv_cdf(self.confidence)
        return HRLoss(float(d.mean()), float(d.mean() + z * se))

    def score(self, psnr: float, outputs: Outputs, target: float) -> tuple[float, HRLoss]:
        """``(score, loss)``: the score is ``psnr`` while the loss's bound is within the budget, else below
        ``target`` by the excess (so that one number orders the search: it meets ``target`` only when both
        criteria hold)."""
        loss = self.measure(outputs)
        over = loss.bound - self.budget_db
        return (psnr if over <= 0 else min(psnr, target - over)), loss


def find_float_units(
    run: Callable[[frozenset[str], Feeds], Outputs],
    units: Mapping[str, tuple[int, int]],
    pinned: Iterable[str],
    *,
    sens_feeds: Feeds,
    sens_refs: Outputs,
    hold_feeds: Feeds,
    hold_refs: Outputs,
    ranges: Mapping[str, tuple[float, float] | None],
    target: float,
    budget: int = 48,
    progress: bool = False,
    hr: HRBudget | None = None,
) -> tuple[SearchResult, list[UnitSensitivity]]:
    """The automatic recipe: measure everything quantized; below ``target`` (or over the HR budget), rank blocks
    and search.

    Args:
        run: ``(float units, feeds) -> outputs`` of the quantized graph (pinned units are passed in too).
        units: searchable blocks -> (layers, params).
        pinned: blocks that are always float.
        sens_feeds: calibration patches for the sensitivity sweep.
        sens_refs: their fp32 outputs.
        hold_feeds: held-out patches (the floor is judged here).
        hold_refs: their fp32 outputs.
        ranges: output value ranges (PSNR peak); None for latents.
        target: PSNR floor in dB.
        budget: most sensitivity evaluations (:func:`rank_units`).
        progress: tqdm bars.
        hr: the HR budget a configuration must also hold (None: the PSNR floor alone). The ranking stays by PSNR
            vs fp32 on the sensitivity patches. With a budget, every block float is measured before the sweep:
            when even that misses the criteria, the search stops there (every block float, not met) instead of
            ranking and walking to it (session 13: the ONNX denoiser, whose float blocks keep INT8 weights).

    Returns:
        The search result (float units include ``pinned``; its ``psnr`` is the real PSNR vs fp32 and each trace
        entry adds ``hr_loss_db`` and ``hr_bound_db`` with ``hr``) and the sensitivity table (empty when everything
        quantized already met the criteria).
    """
    pinned = list(pinned)
    measured: list[tuple[float, HRLoss | None]] = []  # (PSNR vs fp32, HR loss) per held-out evaluation, in order

    def held(float_units: frozenset[str]) -> float:
        outs = run(float_units, hold_feeds)
        psnr = worst_psnr(outs, hold_refs, ranges)
        score, loss = hr.score(psnr, outs, target) if hr is not None else (psnr, None)
        measured.append((psnr, loss))
        return score

    first = held(frozenset(pinned))
    if first >= target or not units:
        trace = [{"float_units": len(pinned), "added": None, "psnr": _db(first)}]
        _annotate(trace, measured[-1:])
        return SearchResult(pinned, measured[-1][0], first >= target, trace, measured[-1][1]), []
    psnr0, loss0 = measured[-1]
    if hr is not None:  # every block float is the most the search can do: one evaluation says if it is enough
        every = frozenset(pinned) | frozenset(units)
        if held(every) < target:
            psnr, loss = measured[-1]
            logger.warning("out of reach: with all %d blocks float the held-out patches lose %.2f dB vs HR (bound "
                           "%.2f, budget %.2f dB; PSNR %.2f dB, floor %.1f dB); keeping every block float, the "
                           "closest to it, without the sensitivity sweep", len(every), loss.mean, loss.bound,
                           hr.budget_db, psnr, target)  # fmt: skip
            trace = [{"float_units": len(pinned), "added": None}, {"float_units": len(every), "added": "all"}]
            _annotate(trace, measured)
            return SearchResult(pinned + sorted(every - set(pinned)), psnr, False, trace, loss), []
    logger.info("all blocks INT8: %.2f dB (floor %.1f dB)%s on held-out patches; measuring block sensitivity",
                psnr0, target, "" if hr is None else f", {loss0.mean:.2f} dB lost vs HR (bound "
                f"{loss0.bound:.2f}, budget {hr.budget_db:.2f} dB)")  # fmt: skip
    ranking = rank_units(lambda ex: worst_psnr(run(ex | frozenset(pinned), sens_feeds), sens_refs, ranges), units,
                         target=target, budget=budget, progress=progress)  # fmt: skip
    groups = {r.unit: r.members for r in ranking}

    def held_groups(float_groups: frozenset[str]) -> float:
        return held(frozenset(u for g in float_groups for u in groups.get(g, (g,))))

    n_before = len(measured)
    result = search_exclusions(held_groups, [r.unit for r in ranking], target, initial=pinned)
    runs = measured[n_before:]
    _annotate(result.trace, runs)
    result.psnr, result.hr_loss = next(m for t, m in zip(result.trace, runs, strict=True)
                                       if t["float_units"] == len(result.excluded))  # fmt: skip
    result.excluded = list(dict.fromkeys(u for g in result.excluded for u in groups.get(g, (g,))))
    logger.info("recipe: %d of %d blocks float -> %.2f dB on held-out patches (target %.1f dB%s, %s)",
                len(result.excluded), len(units) + len(pinned), result.psnr, target,
                "" if hr is None else f"; {result.hr_loss.mean:.2f} dB lost vs HR (bound "
                f"{result.hr_loss.bound:.2f}, budget {hr.budget_db:.2f})",
                "met" if result.met else "NOT met")  # fmt: skip
    return result, ranking


def _annotate(trace: list[dict[str, Any]], runs: Sequence[tuple[float, HRLoss | None]]) -> None:
    """Write each evaluation's real PSNR vs fp32 (the search saw a score) and its HR loss into the trace."""
    for entry, (psnr, loss) in zip(trace, runs, strict=True):
        entry["psnr"] = _db(psnr)
        entry.update(hr_trace(loss))


def hr_trace(loss: HRLoss | None) -> dict[str, float]:
    """A trace entry's HR fields: ``hr_loss_db`` (mean) and ``hr_bound_db`` (what the budget held); none without
    a budget."""
    return {} if loss is None else {"hr_loss_db": round(loss.mean, 3), "hr_bound_db": round(loss.bound, 3)}


def takes_shipped(shipped: SearchResult, met: bool, where: str) -> bool:
    """Whether a shipped recipe measured here is taken as the search's outcome: when it meets the criteria, or when
    its search found them out of reach (every block float) and it misses them here too, which is what a search would
    conclude again under the same conditions (its first, all-INT8 measurement missed there; every block float is
    the closest it gets)."""
    if not met and not shipped.met:
        logger.warning("%s: out of reach here as where the shipped recipe was searched (every block float misses "
                       "the criteria); keeping it without searching again", where)  # fmt: skip
    return met or not shipped.met


def shipped_trace(shipped: SearchResult, psnr: float, loss: HRLoss | None, **extra: Any) -> list[dict[str, Any]]:
    """The search trace of a shipped recipe measured here: its own trace, then the measurement (``"added":
    "shipped"``), as both PTQ drivers record it."""
    return [*shipped.trace, {"float_units": len(shipped.excluded), "added": "shipped", "psnr": round(psnr, 3),
                             **hr_trace(loss), **extra}]  # fmt: skip


# ------------------------------------------------------------------------------------------------- recipe


@dataclass
class BackendRecipe:
    """How one graph is quantized for one backend.

    Attributes:
        op_types: quantized operator types (ONNX op types, or ``conv2d``/``linear``/``matmul`` for PT2E).
        float_units: blocks kept float (see :func:`unit_of`), most sensitive first; includes ``pinned``.
        dynamic_units: those of ``float_units`` whose convolutions and linears still store INT8 weights and run
            INT8 with activation ranges taken from each input at run time (ExecuTorch/XNNPACK ``qd8``): float
            activations between layers, a quarter of the float weights' size.
        float_nodes: backend node names kept float (derived from ``float_units`` plus any listed by hand).
        pinned: units that are always float, with the reason (e.g. the layer feeding the VQ argmin).
        method: calibration method (``minmax``, ``entropy``, ``percentile``).
        scheme: activation / weight quantization scheme, in words.
        target_psnr: the floor the search aimed at (None: recipe given, no search).
        psnr: measured worst-patch PSNR vs fp32 on the held-out patches.
        int8_fraction: share of the quantizable weight parameters stored as INT8.
        source: ``"auto"`` (searched here), ``"shared"`` (searched by another format's quantize call of the same
            run on the same PT2E graph, patches and criteria; measured here), ``"shipped"`` (searched under the same
            weights, patches and criteria by the bundled model's main job, :mod:`tadsr.quantize.shipped`; measured
            here), ``"file"`` (from ``--recipe``) or ``"all"`` (nothing excluded).
        sensitivity: per-unit table (most sensitive first), when measured.
        search: the evaluated configurations.
        hr_budget_db: the budget the search also held (PSNR-Y vs HR lost against the fp32 artifact, mean over the
            held-out patches); None: none (latent outputs, or ``--hr-budget`` off).
        hr_loss_db: that loss as measured for the chosen recipe (None: not measured).
        hr_bound_db: the upper confidence bound of ``hr_loss_db`` that the budget held (see :class:`HRBudget`).
        hr_confidence: the bound's confidence.
    """

    op_types: list[str]
    float_units: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)
    method: str = "minmax"
    scheme: str = ""
    target_psnr: float | None = None
    psnr: float | None = None
    int8_fraction: float | None = None
    source: str = "auto"
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    search: list[dict[str, Any]] = field(default_factory=list)
    hr_budget_db: float | None = None
    hr_loss_db: float | None = None
    hr_bound_db: float | None = None
    hr_confidence: float | None = None
    dynamic_units: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("hr_loss_db", "hr_bound_db"):
            if getattr(self, key) is not None:
                setattr(self, key, round(float(getattr(self, key)), 3))

    def set_hr(self, budget: HRBudget | None, loss: HRLoss | None) -> BackendRecipe:
        """Record the HR budget and the chosen recipe's loss (no budget: only the loss, when measured)."""
        self.hr_budget_db = None if budget is None else budget.budget_db
        self.hr_confidence = None if budget is None else budget.confidence
        self.hr_loss_db, self.hr_bound_db = (None, None) if loss is None else loss
        self.__post_init__()  # the one rounding rule
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        if d["psnr"] is not None:
            d["psnr"] = _db(d["psnr"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "recipe") -> BackendRecipe:
        """Validate and build an entry; ``where`` names it in errors (ConfigError)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
        if not isinstance(d.get("op_types"), list) or not d["op_types"]:
            raise ConfigError(f"{where}: 'op_types' must be a non-empty list of operator types")
        for key in ("float_units", "float_nodes", "dynamic_units"):
            if not isinstance(d.get(key, []), list) or not all(isinstance(x, str) for x in d.get(key, [])):
                raise ConfigError(f"{where}: {key!r} must be a list of names")
        stray = [u for u in d.get("dynamic_units", []) if u not in d.get("float_units", []) or u in d.get("pinned", {})]
        if stray:
            raise ConfigError(f"{where}: dynamic_units {stray} must be float units that are not pinned")
        return cls(**dict(d))


@dataclass
class Recipe:
    """``recipe.json``: ``{"schema": 1, "graphs": {graph: {backend: BackendRecipe}}}`` plus free notes."""

    graphs: dict[str, dict[str, BackendRecipe]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def get(self, graph: str, backend: str) -> BackendRecipe | None:
        """The entry of ``graph`` for ``backend``, or None."""
        return self.graphs.get(graph, {}).get(backend)

    def set(self, graph: str, backend: str, entry: BackendRecipe) -> None:
        """Add or replace the entry of ``graph`` for ``backend``."""
        self.graphs.setdefault(graph, {})[backend] = entry

    def to_dict(self) -> dict[str, Any]:
        """``{"schema", "graphs", "notes"}``, JSON-ready."""
        return {
            "schema": RECIPE_SCHEMA,
            "graphs": {g: {b: e.to_dict() for b, e in sorted(per.items())} for g, per in sorted(self.graphs.items())},
            "notes": self.notes,
        }

    def save(self, path: Path) -> Path:
        """Write the recipe as JSON (sorted keys, strict: no NaN) and return the path."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """Validate and build a recipe; ``where`` names it in errors (ConfigError)."""
        if not isinstance(d, Mapping) or d.get("schema") != RECIPE_SCHEMA or not isinstance(d.get("graphs"), Mapping):
            raise ConfigError(f"{where} is not a tadsr recipe (expected {{'schema': {RECIPE_SCHEMA}, 'graphs': ...}})")
        graphs = {
            g: {b: BackendRecipe.from_dict(e, f"{where}: graphs.{g}.{b}") for b, e in per.items()}
            for g, per in d["graphs"].items()
        }
        return cls(graphs=graphs, notes=dict(d.get("notes", {})))


def load_recipe(path: Path) -> Recipe:
    """Read a ``recipe.json`` (or an INT8 artifact folder holding one).

    Raises:
        InputError: missing or unreadable file.
        ConfigError: not a recipe, or malformed entries.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"recipe {path} does not exist; pass a recipe.json written by tadsr quantize") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"recipe {path} is not readable JSON ({e})") from e
    return Recipe.from_dict(data, str(path))
