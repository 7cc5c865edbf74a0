"""INT8 recipes shipped with the bundled model: a search made once, reused on every run whose conditions match.

A recipe search (sensitivity sweep, then the smallest float set that meets the criteria) depends on the weights,
the graph, the calibration and held-out patches and the criteria, not on the run. The bundled model ships the
recipes its main job found (``tadsr/weights/int8_recipes.json``), one per (graph, backend), each with the
conditions it was searched under. A quantize call whose conditions are the same (:func:`conditions`: same weights
by sha256, tile, method, PSNR floor, HR budget and confidence, calibration and held-out patches by content hash)
starts from the shipped recipe instead of searching: it still builds the graph with it and measures it on the
held-out patches, and searches when the criteria are not met there (a toolkit change that moves the numerics).
The recipe's record says ``source: shipped``.

Regenerate after retraining the bundled model or changing the quantizers (from a finished main job)::

    python -m tadsr.quantize.shipped out/int8        # writes tadsr/weights/int8_recipes.json
    python -m tadsr.quantize.shipped --update et/int8  # replaces only the (graph, backend) entries found there

The ONNX graphs' calibration ranges ship the same way (``tadsr/weights/onnx_calibration_ranges.json``), keyed by
everything ORT's ranges are a function of (:func:`tadsr.formats.onnx.ptq.ranges_key`): a call with the same key
reads them instead of calibrating and writes the same file; any other model, feeds, method or ORT version
calibrates. Every ONNX INT8 folder records its ranges and key (``calibration_ranges.json``)::

    python -m tadsr.quantize.shipped --ranges out/int8   # writes tadsr/weights/onnx_calibration_ranges.json
    python -m tadsr.quantize.shipped --update --ranges out/int8  # adds this CPU's keys, keeps the others

A key holds the bytes of the pre-processed model and of the captured feeds, which come out of float kernels that
can differ between CPUs: the tables regenerated on an Intel Xeon (session 35) missed three of the four keys on
an AMD EPYC, whose ranges of the same graphs differ from them by about 1e-6. After retraining, regenerate on one
machine, then ``--update`` from a main job on each other CPU family.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib import resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tadsr import fileio
from tadsr.formats.sensitivity import BackendRecipe, HRLoss, SearchResult, UnitSensitivity

__all__ = ["RANGES_PATH", "SHIPPED_PATH", "collect", "collect_ranges", "conditions", "lookup", "lookup_ranges",
           "to_search"]

logger = logging.getLogger(__name__)

SHIPPED_PATH = Path(str(resources.files("tadsr") / "weights" / "int8_recipes.json"))  # beside the bundled weights
SCHEMA = 1
# ONNX Runtime's calibration ranges of the bundled model's ONNX graphs, by the key of everything they are a
# function of (tadsr.formats.onnx.ptq.ranges_key: the pre-processed model's bytes, the feeds' bytes, method, ORT
# version): a quantize call with the same key reads them instead of calibrating (the same ranges, so the same file)
RANGES_PATH = Path(str(resources.files("tadsr") / "weights" / "onnx_calibration_ranges.json"))


def conditions(*, graph: str, backend: str, preset: str, sources: Mapping[str, Any], tile: int, method: str,
               target: float | None, hr_budget: float | None, hr_confidence: float | None, calib_hash: str,
               calib_seed: int, hold_hash: str, hold_seed: int) -> dict[str, Any]:  # fmt: skip
    """What a search's outcome depends on, as one JSON-ready dict (equal dicts: the same search)."""
    return {"graph": graph, "backend": backend, "preset": preset, "tile": int(tile), "method": method,
            "sources": {k: (v.get("sha256") if isinstance(v, Mapping) else v) for k, v in sorted(sources.items())},
            "target_psnr": None if target is None else round(float(target), 3),
            "hr_budget_db": None if hr_budget is None else round(float(hr_budget), 4),
            "hr_confidence": None if hr_budget is None or hr_confidence is None else round(float(hr_confidence), 4),
            "calibration": [calib_hash, int(calib_seed)],
            "heldout": [hold_hash, int(hold_seed)]}  # fmt: skip


def _manifest_conditions(manifest: Mapping[str, Any], backend: str, entry: BackendRecipe) -> dict[str, Any]:
    """The conditions an INT8 artifact's recipe was searched under, from its manifest."""
    return conditions(graph=manifest["graph"]["name"], backend=backend, preset=manifest["preset"]["name"],
                      sources=manifest["sources"], tile=manifest["graph"]["tile"], method=entry.method,
                      target=entry.target_psnr, hr_budget=entry.hr_budget_db, hr_confidence=entry.hr_confidence,
                      calib_hash=manifest["calibration"]["content_hash"], calib_seed=manifest["calibration"]["seed"],
                      hold_hash=manifest["heldout"]["content_hash"], hold_seed=manifest["heldout"]["seed"])  # fmt: skip


def collect(int8_dir: Path) -> list[dict[str, Any]]:
    """The searched recipes of every INT8 artifact folder under ``int8_dir`` (``source`` auto, shared, all or
    shipped) that met their criteria or found them out of reach (every block float misses them: a call under the
    same conditions then skips the search, :func:`tadsr.formats.sensitivity.takes_shipped`), with the conditions
    their manifests record; recipes taken from a ``--recipe`` file (no criteria held) are skipped."""
    from tadsr.formats.sensitivity import load_recipe

    out = []
    for folder in sorted(p for p in Path(int8_dir).iterdir() if (p / "recipe.json").is_file()):
        manifest = json.loads((folder / "manifest.json").read_text())
        for graph, backends in load_recipe(folder / "recipe.json").graphs.items():
            for backend, entry in backends.items():
                if entry.source not in ("auto", "shared", "all", "shipped") or not (_met(entry)
                                                                                    or _out_of_reach(entry)):
                    continue
                cond = _manifest_conditions(manifest, backend, entry)
                if cond["graph"] != graph:
                    continue
                out.append({"conditions": cond, "recipe": entry.to_dict(), "from": folder.name})
    return out


def _met(entry: BackendRecipe) -> bool:
    """Whether a searched recipe met its criteria (a search out of reach records its closest configuration)."""
    if entry.target_psnr is None or entry.psnr is None or entry.psnr < entry.target_psnr:
        return False
    # the record keeps the bound rounded to 3 decimals (BackendRecipe) while the budget is a component's exact third
    # (0.3 / 3 = 0.09999999999999999): compare on the record's grid, or a bound the search held at 0.0996 reads 0.1
    # and "misses" a 0.1 dB budget
    return entry.hr_budget_db is None or (entry.hr_bound_db is not None
                                          and entry.hr_bound_db <= round(entry.hr_budget_db, 3))


def _out_of_reach(entry: BackendRecipe) -> bool:
    """Whether a search ended out of reach: every block float, measured, still missing the criteria."""
    return not _met(entry) and entry.target_psnr is not None and any(t.get("added") == "all" for t in entry.search)


def _read(path: Path, what: str) -> dict[str, Any]:
    """A shipped JSON file of this schema ({} when there is none, it is unreadable or of another schema)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("ignoring the unreadable shipped %s %s (%s)", what, path, e)
        return {}
    return data if data.get("schema") == SCHEMA else {}


def _load(path: Path) -> list[dict[str, Any]]:
    return list(_read(path, "recipes").get("recipes", []))


def lookup(cond: Mapping[str, Any], path: Path | None = None) -> BackendRecipe | None:
    """The shipped recipe searched under exactly ``cond`` (None: none)."""
    for item in _load(SHIPPED_PATH if path is None else Path(path)):
        if item.get("conditions") == dict(cond):
            return BackendRecipe.from_dict(item["recipe"], where=f"shipped recipe {item.get('from')}")
    return None


def to_search(entry: BackendRecipe) -> tuple[SearchResult, list[UnitSensitivity]]:
    """A shipped recipe in the form of a search's outcome (float units and those of them dynamic, trace, ranking)."""
    loss = None if entry.hr_loss_db is None else HRLoss(float(entry.hr_loss_db), float(entry.hr_bound_db or 0.0))
    result = SearchResult(list(entry.float_units), float(entry.psnr or 0.0), _met(entry), list(entry.search), loss,
                          list(entry.dynamic_units))
    return result, [UnitSensitivity.from_dict(r) for r in entry.sensitivity]


def write(items: list[dict[str, Any]], path: Path | None = None) -> Path:
    path = SHIPPED_PATH if path is None else Path(path)
    doc = {"schema": SCHEMA, "doc": "INT8 recipes searched by the bundled model's main job (tadsr.quantize.shipped)",
           "recipes": items}  # fmt: skip
    fileio.write_with(path, lambda f: f.write((json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()))
    return path


def collect_ranges(int8_dir: Path) -> dict[str, Any]:
    """Key -> ORT calibration cache of every ONNX INT8 artifact folder under ``int8_dir`` that calibrated."""
    from tadsr.formats.onnx.ptq import RANGES_NAME

    out = {}
    for path in sorted(Path(int8_dir).glob(f"*/{RANGES_NAME}")):
        item = json.loads(path.read_text())
        out[item["key"]] = {"from": path.parent.name, "ort_cache": item["ort_cache"]}
    return out


def lookup_ranges(key: str, path: Path | None = None) -> dict[str, Any] | None:
    """The ORT calibration cache shipped for ``key`` (None: none)."""
    found = _load_ranges(RANGES_PATH if path is None else Path(path)).get(key)
    return None if found is None else dict(found["ort_cache"])


def _load_ranges(path: Path) -> dict[str, Any]:
    """The range tables a shipped ranges file holds, by key ({} when there is none or it is unreadable)."""
    return dict(_read(path, "calibration ranges").get("ranges", {}))


def write_ranges(items: Mapping[str, Any], path: Path | None = None) -> Path:
    path = RANGES_PATH if path is None else Path(path)
    doc = {"schema": SCHEMA, "doc": "ONNX Runtime calibration ranges of the bundled model's main job, by key "
           "(tadsr.quantize.shipped)", "ranges": dict(items)}  # fmt: skip
    fileio.write_with(path, lambda f: f.write((json.dumps(doc, sort_keys=True) + "\n").encode()))
    return path


def merged(items: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` plus the entries of ``old`` for the (graph, backend) pairs ``items`` does not have (e.g. one
    format's INT8 folder re-run after a quantizer change: the other formats' recipes stay)."""
    def pair(item: Mapping[str, Any]) -> tuple[Any, Any]:
        return item["conditions"]["graph"], item["conditions"]["backend"]

    new = {pair(it) for it in items}
    kept = [it for it in old if pair(it) not in new]
    return sorted(kept + items, key=lambda it: (it["conditions"]["graph"], it["conditions"]["backend"]))


USAGE = "usage: python -m tadsr.quantize.shipped [--update] [--ranges] INT8_DIR [OUT_JSON]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + "\n\nCollects the met INT8 recipes (or, with --ranges, the ONNX calibration ranges) of a main "
              "job's INT8 folder into the shipped JSON (--update: merged with what it holds).")  # fmt: skip
        return 0
    dirs = [a for a in args if not a.startswith("--")][:1]
    if dirs and not Path(dirs[0]).is_dir():
        print(f"error: {dirs[0]} is not a folder (the INT8 folder of a main job, e.g. out/int8)", file=sys.stderr)
        return 2
    update = bool(args) and args[0] == "--update"
    args = args[1:] if update else args
    if args and args[0] == "--ranges":  # the ONNX calibration ranges only (e.g. from the quick path's folder)
        if len(args) not in (2, 3):
            print("usage: python -m tadsr.quantize.shipped [--update] --ranges INT8_DIR [OUT_JSON]", file=sys.stderr)
            return 2
        out = Path(args[2]) if len(args) == 3 else RANGES_PATH
        ranges = collect_ranges(Path(args[1]))
        # --update keeps the tables of other keys: the same model's on another CPU (its float kernels give other
        # bits for the folded constants, the captures and the ranges, so other keys) stays served
        kept = {k: v for k, v in _load_ranges(out).items() if k not in ranges} if update else {}
        print(f"wrote {len(ranges)} range tables ({len(kept)} kept) to {write_ranges({**kept, **ranges}, out)}")
        return 0
    if len(args) not in (1, 2):
        print(USAGE, file=sys.stderr)
        return 2
    items = collect(Path(args[0]))
    out = Path(args[1]) if len(args) == 2 else SHIPPED_PATH
    if update:
        items = merged(items, _load(out))
    path = write(items, out)
    for it in items:
        c = it["conditions"]
        print(f"{c['graph']}/{c['backend']}: {len(it['recipe']['float_units'])} float units ({it['from']})")
    print(f"wrote {len(items)} recipes to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
