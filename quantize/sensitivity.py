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

Default floor (``DEFAULT_TARGET_PSNR``): 30 dB vs fp32, worst held-out patch; see the constant's comment.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.errors import ConfigError, InputError
from tadsr.metrics import error_stats

__all__ = [
    "DEFAULT_TARGET_PSNR",
    "RECIPE_NAME",
    "RECIPE_SCHEMA",
    "UnitSensitivity",
    "SearchResult",
    "BackendRecipe",
    "Recipe",
    "unit_of",
    "worst_psnr",
    "rank_units",
    "search_exclusions",
    "find_float_units",
    "load_recipe",
]

logger = logging.getLogger(__name__)

RECIPE_NAME = "recipe.json"
RECIPE_SCHEMA = 1

# Default fidelity floor, PSNR vs the fp32 artifact on the worst held-out patch, per graph output.
# Measured on tiny (random fill) with Conv/Gemm/MatMul quantized (W8 per-channel, A8 per-tensor):
# encoder ~27-32 dB, denoiser ~28-33 dB, decoder ~18 dB, pipeline lower still; trained weights do better.
# 30 dB is 5 dB under Apple's fp16 gate (35 dB): INT8 has 3 fewer mantissa bits than fp16's 11, so a
# W8A8 graph cannot meet the fp16 gate without keeping most of it float; 30 dB is an RMS error of ~3% of
# the output range (images: ~2 grey levels of 255 on [0, 255]), invisible at 100% zoom on natural images,
# and it is above every int8 parity floor in tadsr/numerics.json (25-30 dB), so an artifact built to the
# recipe also passes the parity gate. The search then keeps the most sensitive blocks float until it holds.
DEFAULT_TARGET_PSNR = 30.0

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
    """PSNR of the graph output vs fp32 with only ``unit`` quantized, and the unit's size."""

    unit: str
    psnr: float
    layers: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "psnr": _db(self.psnr), "layers": self.layers, "params": self.params}


def _db(x: float) -> float:
    return 999.0 if math.isinf(x) else round(float(x), 3)


def rank_units(
    evaluate: Callable[[frozenset[str]], float],
    units: Mapping[str, tuple[int, int]],
    *,
    progress: bool = False,
) -> list[UnitSensitivity]:
    """Quantize one unit at a time (all others float) and rank by output PSNR, most sensitive first.

    Args:
        evaluate: ``excluded units -> PSNR`` on the sensitivity patches.
        units: unit -> (number of layers, number of weight parameters).
        progress: tqdm bar.
    """
    from tqdm.auto import tqdm

    names = sorted(units)
    out = []
    t0 = time.perf_counter()
    for u in tqdm(names, desc="sensitivity", unit="block", disable=not progress):
        out.append(UnitSensitivity(u, evaluate(frozenset(n for n in names if n != u)), *units[u]))
    out.sort(key=lambda s: (s.psnr, s.unit))
    logger.info("sensitivity of %d blocks in %.1fs; most sensitive: %s", len(out), time.perf_counter() - t0,
                ", ".join(f"{s.unit} {s.psnr:.1f} dB" for s in out[:3]))  # fmt: skip
    return out


@dataclass
class SearchResult:
    """Outcome of :func:`search_exclusions`.

    Attributes:
        excluded: units kept float, most sensitive first.
        psnr: held-out PSNR with those units float.
        met: whether ``psnr >= target``.
        trace: every evaluated configuration ``{"float_units": k, "psnr": dB}``.
    """

    excluded: list[str]
    psnr: float
    met: bool
    trace: list[dict[str, Any]] = field(default_factory=list)


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
    progress: bool = False,
) -> tuple[SearchResult, list[UnitSensitivity]]:
    """The automatic recipe: measure everything quantized; below ``target``, rank blocks and search.

    Args:
        run: ``(float units, feeds) -> outputs`` of the quantized graph (pinned units are passed in too).
        units: searchable blocks -> (layers, params).
        pinned: blocks that are always float.
        sens_feeds, sens_refs: calibration patches and their fp32 outputs (sensitivity sweep).
        hold_feeds, hold_refs: held-out patches and their fp32 outputs (the floor is judged here).
        ranges: output value ranges (PSNR peak); None for latents.
        target: PSNR floor in dB.
        progress: tqdm bars.

    Returns:
        The search result (float units include ``pinned``) and the sensitivity table (empty when everything
        quantized already met the target).
    """
    pinned = list(pinned)

    def held(float_units: frozenset[str]) -> float:
        return worst_psnr(run(float_units, hold_feeds), hold_refs, ranges)

    first = held(frozenset(pinned))
    if first >= target or not units:
        trace = [{"float_units": len(pinned), "added": None, "psnr": _db(first)}]
        return SearchResult(pinned, first, first >= target, trace), []
    logger.info("all blocks INT8: %.2f dB < %.1f dB on held-out patches; measuring block sensitivity", first, target)
    ranking = rank_units(lambda ex: worst_psnr(run(ex | frozenset(pinned), sens_feeds), sens_refs, ranges), units,
                         progress=progress)  # fmt: skip
    result = search_exclusions(held, [r.unit for r in ranking], target, initial=pinned)
    logger.info("recipe: %d of %d blocks float -> %.2f dB on held-out patches (target %.1f dB, %s)",
                len(result.excluded), len(units) + len(pinned), result.psnr, target,
                "met" if result.met else "NOT met")  # fmt: skip
    return result, ranking


# ------------------------------------------------------------------------------------------------- recipe


@dataclass
class BackendRecipe:
    """How one graph is quantized for one backend.

    Attributes:
        op_types: quantized operator types (ONNX op types, or ``conv2d``/``linear``/``matmul`` for PT2E).
        float_units: blocks kept float (see :func:`unit_of`), most sensitive first; includes ``pinned``.
        float_nodes: backend node names kept float (derived from ``float_units`` plus any listed by hand).
        pinned: units that are always float, with the reason (e.g. the layer feeding the VQ argmin).
        method: calibration method (``minmax``, ``entropy``, ``percentile``).
        scheme: activation / weight quantization scheme, in words.
        target_psnr: the floor the search aimed at (None: recipe given, no search).
        psnr: measured worst-patch PSNR vs fp32 on the held-out patches.
        int8_fraction: share of the quantizable weight parameters stored as INT8.
        source: ``"auto"`` (searched here), ``"file"`` (from ``--recipe``) or ``"all"`` (nothing excluded).
        sensitivity: per-unit table (most sensitive first), when measured.
        search: the evaluated configurations.
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["psnr"] is not None:
            d["psnr"] = _db(d["psnr"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "recipe") -> BackendRecipe:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
        if not isinstance(d.get("op_types"), list) or not d["op_types"]:
            raise ConfigError(f"{where}: 'op_types' must be a non-empty list of operator types")
        for key in ("float_units", "float_nodes"):
            if not isinstance(d.get(key, []), list) or not all(isinstance(x, str) for x in d.get(key, [])):
                raise ConfigError(f"{where}: {key!r} must be a list of names")
        return cls(**dict(d))


@dataclass
class Recipe:
    """``recipe.json``: ``{"schema": 1, "graphs": {graph: {backend: BackendRecipe}}}`` plus free notes."""

    graphs: dict[str, dict[str, BackendRecipe]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def get(self, graph: str, backend: str) -> BackendRecipe | None:
        return self.graphs.get(graph, {}).get(backend)

    def set(self, graph: str, backend: str, entry: BackendRecipe) -> None:
        self.graphs.setdefault(graph, {})[backend] = entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RECIPE_SCHEMA,
            "graphs": {g: {b: e.to_dict() for b, e in sorted(per.items())} for g, per in sorted(self.graphs.items())},
            "notes": self.notes,
        }

    def save(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "recipe") -> Recipe:
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
