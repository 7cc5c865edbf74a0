"""Calibration and held-out data for INT8: the inputs each graph really sees, captured from the fp32 reference.

Each graph is calibrated on what it receives inside the reference :class:`~tadsr.pipeline.OneStepPipeline`
when that pipeline runs on real LR patches (:func:`tadsr.patches.sample_patches`):

=========  =====================================================================
graph      calibration inputs (per patch ``i``)
=========  =====================================================================
encoder    ``lr``: the LR patch in [-1, 1]
denoiser   ``x_t = z_y + kappa sqrt(eta_T) noise_i`` and ``lr``
decoder    ``x0``: the reference denoiser's output
pipeline   ``lr`` and ``noise_i``
=========  =====================================================================

``noise_i`` is ``make_noise(latent, noise_seed(seed, i))``: the same folder, patch count and seed always give
bit-identical inputs. Never random tensors.

Held-out data (:func:`load_holdout`) is what recipes and parity are judged on: patches from *other images*
than the calibration set (by default the validation photos of the photo set, which the shipped calibration
set never saw) with another seed; :func:`load_holdout` refuses patches identical to calibration patches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tadsr import fileio
from tadsr.errors import InputError
from tadsr.parity.hops import RUN_ARRAYS, ParityCase, ReferenceRuns
from tadsr.pipeline import Models, OneStepPipeline, make_noise
from tadsr.threads import fixed_threads
from tadsr.patches import (
    ImageFolder,
    ImagePair,
    PatchSet,
    default_calibration_dir,
    shipped_holdout_dir,
    sample_patches,
)

__all__ = [
    "DEFAULT_NUM_PATCHES",
    "MIN_PATCHES",
    "DEFAULT_HOLDOUT_PATCHES",
    "GRAPH_IO",
    "CalibrationSet",
    "CaptureCache",
    "noise_seed",
    "capture",
    "capture_sets",
    "capture_both",
    "sample_calibration",
    "sample_holdout",
    "load_calibration",
    "load_holdout",
    "default_holdout_source",
]

logger = logging.getLogger(__name__)

DEFAULT_NUM_PATCHES = 64
MIN_PATCHES = 32  # house style: calibrate on at least 32 real LR crops
DEFAULT_HOLDOUT_PATCHES = 16
HOLDOUT_SEED_OFFSET = 1  # held-out patches use seed + 1 (and other images)
HOLDOUT_MIN_STD = 0.04  # same flat-patch rejection as the shipped calibration set
# one patch per reference call: the autoencoder's attention over 4096 positions is memory-bound, and batching
# only slows it (bundled, 1 thread, per patch: decode 1.09 s at batch 1, 1.44 s at 8; encode 0.45 vs 0.62 s)
_CAPTURE_BATCH = 1

# graph -> (input names, output names), as in tadsr.formats.graphs
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("lr",), ("z_y",)),
    "denoiser": (("x_t", "lr"), ("x0",)),
    "decoder": (("x0",), ("sr",)),
    "pipeline": (("lr", "noise"), ("sr",)),
}
# skimage sample photos that are not in the photo set's train split (grass is in its val split); used for
# held-out patches when the repository's data/photos/val is not available (installed wheel)
_SKIMAGE_HOLDOUT = ("grass.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "retina.jpg")


def noise_seed(seed: int, index: int) -> int:
    """Seed of the prior noise of patch ``index`` in a set sampled with ``seed`` (distinct for index < 1e6)."""
    return 1_000_003 * int(seed) + int(index)


@dataclass(frozen=True)
class CalibrationSet:
    """Reference-pipeline stages on a set of real LR patches, and where the patches came from.

    Attributes:
        runs: batch-first float32 arrays ``lr``, ``noise``, ``z_y``, ``x_t``, ``x0``, ``sr`` (index = patch).
        info: JSON-ready description for manifests: ``source`` (folder), ``shipped`` (bool), ``content_hash``,
            ``num_patches``, ``seed``, ``tile``, ``scale``, ``files`` (relative paths used), ``noise``.
        patches: the sampled patches (with HR, origins).
    """

    runs: ReferenceRuns
    info: dict[str, Any]
    patches: PatchSet = field(repr=False)

    def __len__(self) -> int:
        """Number of patches."""
        return int(self.runs.lr.shape[0])

    def feeds(self, graph: str) -> list[dict[str, np.ndarray]]:
        """The inputs of ``graph`` per patch: ``[{input name: (1, ...) float32 array}]``."""
        names = _io(graph)[0]
        return [{n: np.ascontiguousarray(getattr(self.runs, n)[i : i + 1]) for n in names} for i in range(len(self))]

    def iter_feeds(self, graph: str) -> Iterator[dict[str, np.ndarray]]:
        """Like :meth:`feeds`, one patch at a time."""
        yield from self.feeds(graph)

    def cases(self, graph: str) -> list[ParityCase]:
        """Parity cases (kind ``"real"``) for :func:`tadsr.parity.hops.compare`."""
        return [self.runs.case(graph, i) for i in range(len(self))]


def _io(graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if graph not in GRAPH_IO:
        raise InputError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPH_IO)}")
    return GRAPH_IO[graph]


def capture(models: Models, lr: np.ndarray, *, seed: int, source: str = "", progress: bool = False,
            workers: int = 1, decode: bool = True) -> ReferenceRuns:  # fmt: skip
    """Run the fp32 reference pipeline stage by stage on LR patches and keep every graph's inputs.

    Args:
        models: the loaded networks.
        lr: ``(N, 3, t, t)`` float32 LR patches in [-1, 1] (``t`` a multiple of 64: no padding happens).
        seed: noise seed; patch ``i`` gets ``make_noise(.., noise_seed(seed, i))``.
        source: description stored in the result.
        progress: tqdm bar over batches.
        workers: processes sharing the patches (this one and ``workers - 1`` spawned ones), each on the one
            thread every capture runs on: the same arrays, in about ``1 / workers`` of the time on idle CPUs.
        decode: also run the decoder (``sr``). False: ``sr`` is empty (``(N, 0)``), for captures that feed graphs
            and are never compared with the image (calibration: the decoder is ~60 % of a reference run).

    Returns:
        :class:`~tadsr.parity.hops.ReferenceRuns` with ``lr, noise, z_y, x_t, x0, sr``.
    """
    return ReferenceRuns(**capture_sets(models, [(lr, seed, decode)], progress=progress, workers=workers)[0],
                         source=source)  # fmt: skip


def capture_sets(models: Models, sets: Sequence[tuple[np.ndarray, int, bool]], *, progress: bool = False,
                 workers: int = 1) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """:func:`capture`'s arrays of several patch sets ``(lr, seed, decode)`` at once: each set is shared between
    ``workers`` processes as :func:`capture` shares one, and the spawned processes start once for all the sets
    (a start imports torch and unpickles the networks: ~2 s on the 2-core machine)."""
    for lr, _, _ in sets:
        if lr.shape[2] % models.preset.pad_multiple:
            raise InputError(f"tile {lr.shape[2]} is not a multiple of {models.preset.pad_multiple}")
    bounds = [np.linspace(0, len(lr), min(max(workers, 1), len(lr)) + 1).astype(int) if len(lr) else np.array([0, 0])
              for lr, _, _ in sets]  # fmt: skip
    extra = max((len(b) - 2 for b in bounds), default=0)
    if extra <= 0:
        return [_capture_rows(models, lr, seed, 0, progress, decode) for lr, seed, decode in sets]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # the networks as plain pickle bytes: multiprocessing's pickler hands tensors over in shared memory once
    # torch.multiprocessing is imported, and a child read NaN weights that way under pytest
    blob = pickle.dumps(models)
    with ProcessPoolExecutor(extra, mp_context=multiprocessing.get_context("spawn")) as pool:
        others = [[pool.submit(_capture_part, blob, lr[a:b], seed, int(a), decode)
                   for a, b in zip(bd[1:-1], bd[2:], strict=True)]
                  for (lr, seed, decode), bd in zip(sets, bounds, strict=True)]  # fmt: skip
        firsts = [_capture_rows(models, lr[: bd[1]], seed, 0, progress, decode)
                  for (lr, seed, decode), bd in zip(sets, bounds, strict=True)]  # fmt: skip
        parts = [[first, *(f.result() for f in fs)] for first, fs in zip(firsts, others, strict=True)]
    return [{k: np.concatenate([p[k] for p in ps]) for k in RUN_ARRAYS} for ps in parts]


def _capture_part(models: bytes, lr: np.ndarray, seed: int, start: int, decode: bool) -> dict[str, np.ndarray]:
    return _capture_rows(pickle.loads(models), lr, seed, start, False, decode)


@torch.no_grad()
def _capture_rows(models: Models, lr: np.ndarray, seed: int, start: int, progress: bool,
                  decode: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """:func:`capture`'s arrays for patches ``start ..`` of a set (``lr`` holds them; noise by set index)."""
    pipe = OneStepPipeline(models)
    n, _, t, _ = lr.shape
    latent = (1, models.preset.vq.embed_dim, t, t)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in RUN_ARRAYS}
    starts = range(0, n, _CAPTURE_BATCH)
    with fixed_threads():  # the captures set the INT8 scales: the same on every run of this machine
        for s in tqdm(starts, desc="capture", unit="batch", disable=not progress):
            x = torch.from_numpy(np.ascontiguousarray(lr[s : s + _CAPTURE_BATCH], dtype=np.float32))
            noise = torch.cat([make_noise(latent, noise_seed(seed, start + i)) for i in range(s, s + x.shape[0])])
            lr_p, hw = pipe.prepare(x)
            z_y = pipe.encode(lr_p)
            x0 = pipe.denoise(z_y, noise, lr_p)
            vals = {"lr": lr_p, "noise": noise, "z_y": z_y, "x_t": pipe.schedule.prior_sample(z_y, noise), "x0": x0,
                    "sr": pipe.decode(x0, hw) if decode else x0.new_zeros((x0.shape[0], 0))}  # fmt: skip
            for k, v in vals.items():
                rows[k].append(v.detach().cpu().numpy().astype(np.float32))
    return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in rows.items()}


def _distinct(patches: PatchSet) -> int:
    return len({(str(o.path), o.y, o.x) for o in patches.origins})


def _describe(patches: PatchSet, root: Path, shipped: bool, seed: int, tile: int) -> dict[str, Any]:
    files = sorted({_relpath(o.path, root) for o in patches.origins})
    return {
        "source": "shipped" if shipped else str(root),
        "shipped": shipped,
        "content_hash": patches.content_hash,
        "num_patches": len(patches),
        "seed": seed,
        "tile": tile,
        "scale": patches.scale,
        "lr_source": patches.lr_source,
        "min_std": patches.params.get("min_std"),
        "num_files": len(files),
        "files": files,
        "noise": "make_noise(latent, 1000003 * seed + i) per patch i",
    }


def _relpath(p: Path, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(p).name


def sample_calibration(
    source: Path | None = None,
    *,
    num_patches: int | None = None,
    tile: int = 64,
    scale: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> tuple[PatchSet, dict[str, Any]]:
    """Sample the calibration patches (no model needed, so bad folders fail fast).

    Args:
        source: image folder (DIV2K layout detected) or None for the shipped set
            (:func:`~tadsr.patches.default_calibration_dir`).
        num_patches: number of distinct patches; None = 64, or every distinct patch of a smaller source
            (the shipped set holds 48 at tile 64), but at least 32.
        tile: LR patch side (the graph's tile).
        scale: SR factor.
        seed: sampling seed.
        progress: progress bar.

    Returns:
        The patches and their description for manifests.

    Raises:
        InputError: empty / missing / unreadable folder, images smaller than an HR patch, or fewer distinct
            patches than requested (the message says how many the folder can give).
    """
    shipped = source is None
    root = default_calibration_dir() if shipped else Path(source)  # type: ignore[arg-type]
    want = DEFAULT_NUM_PATCHES if num_patches is None else num_patches
    patches = sample_patches(root, num_patches=want, tile=tile, scale=scale, seed=seed, progress=progress)
    distinct = _distinct(patches)
    if distinct < want and num_patches is None and distinct >= MIN_PATCHES:
        logger.info("%s holds %d distinct %dx%d patches; calibrating on all of them", root, distinct, tile, tile)
        patches = sample_patches(root, num_patches=distinct, tile=tile, scale=scale, seed=seed)
        distinct, want = _distinct(patches), distinct
    if distinct < want:
        n_images = len({o.path for o in patches.origins})
        raise InputError(
            f"the calibration folder {root} gives only {distinct} distinct {tile * scale}x{tile * scale} HR patches "
            f"from {n_images} usable images, fewer than the {want} requested"
            f"{'' if num_patches is not None else f' (at least {MIN_PATCHES} are needed)'}; add images or "
            "larger images, or lower --num-patches"
        )
    if want < MIN_PATCHES:
        logger.warning("calibrating on %d patches; at least %d real patches are recommended", want, MIN_PATCHES)
    return patches, _describe(patches, root, shipped, seed, tile)


def load_calibration(
    models: Models,
    source: Path | None = None,
    *,
    num_patches: int | None = None,
    tile: int = 64,
    seed: int = 0,
    patches: tuple[PatchSet, dict[str, Any]] | None = None,
    progress: bool = False,
    workers: int = 1,
) -> CalibrationSet:
    """Sample calibration patches (:func:`sample_calibration`) and capture every graph's inputs.

    Args:
        models: the fp32 networks whose reference pipeline produces the graph inputs.
        source: see :func:`sample_calibration`.
        num_patches: see :func:`sample_calibration`.
        tile: see :func:`sample_calibration`.
        seed: sampling seed; also seeds the noise.
        patches: already sampled patches and description (then ``source``/``num_patches`` are unused).
        progress: progress bars.
        workers: processes sharing the capture (:func:`capture`).

    Raises:
        InputError: see :func:`sample_calibration`.
    """
    t0 = time.perf_counter()
    if patches is None:
        patches = sample_calibration(source, num_patches=num_patches, tile=tile, scale=models.preset.scale, seed=seed,
                                     progress=progress)  # fmt: skip
    ps, info = patches
    # the graphs' inputs only: no calibration image is ever compared, so the decoder's last run is skipped
    runs = capture(models, ps.lr, seed=info["seed"], source=f"calibration {info['source']}", progress=progress,
                   workers=workers, decode=False)  # fmt: skip
    logger.info("calibration: %d patches from %s (hash %s), graph inputs captured in %.1fs", len(ps),
                info["source"], ps.content_hash[:12], time.perf_counter() - t0)  # fmt: skip
    return CalibrationSet(runs=runs, info=info, patches=ps)


def default_holdout_source() -> ImageFolder | Path:
    """Images never used by the shipped calibration set.

    The photo set's validation split (``data/photos/val`` of a source checkout) when present, else the
    scikit-image sample photos that are not in its train split and the shipped supplement
    (``tadsr/data/holdout``: a smooth dusk sky, outside the calibration crops of its photo). The samples are all
    textured; a recipe judged on them alone lost 0.05 dB there and 1.6 dB on a smooth benchmark photo.

    Raises:
        InputError: neither is available.
    """
    repo_val = Path(__file__).resolve().parents[1] / "data" / "photos" / "val"
    if repo_val.is_dir() and any(repo_val.iterdir()):
        return repo_val
    try:
        import skimage
    except ImportError as e:
        raise InputError("no held-out images: pass a folder with --holdout DIR (scikit-image is not installed "
                         "and the source checkout's data/photos/val is absent)") from e  # fmt: skip
    data = Path(skimage.__file__).resolve().parent / "data"
    files = [data / f for f in _SKIMAGE_HOLDOUT if (data / f).is_file()]
    files += sorted(shipped_holdout_dir().glob("*.png"))
    if not files:
        raise InputError(f"no held-out images found in {data}; pass a folder with --holdout DIR")
    return ImageFolder(root=data, layout="folder", images=tuple(ImagePair(p) for p in files))


def sample_holdout(
    source: Path | None = None,
    *,
    num_patches: int = DEFAULT_HOLDOUT_PATCHES,
    tile: int = 64,
    scale: int = 4,
    seed: int = 0,
    calibration: PatchSet | None = None,
    progress: bool = False,
) -> tuple[PatchSet, dict[str, Any]]:
    """Held-out patches: other images (:func:`default_holdout_source`), seed ``seed + 1``.

    Raises:
        InputError: unusable folder, or a held-out patch identical to a calibration patch.
    """
    src = default_holdout_source() if source is None else Path(source)
    hseed = seed + HOLDOUT_SEED_OFFSET
    patches = sample_patches(src, num_patches=num_patches, tile=tile, scale=scale, seed=hseed,
                             min_std=HOLDOUT_MIN_STD, progress=progress)  # fmt: skip
    if calibration is not None:
        hashes: dict[Path, str] = {}  # this call's own memo: each image file read once, never stale
        calib_keys = {(_file_key(o.path, hashes), o.y, o.x) for o in calibration.origins}
        same = [o for o in patches.origins if (_file_key(o.path, hashes), o.y, o.x) in calib_keys]
        same_lr = any(np.array_equal(a, b) for a in patches.lr for b in calibration.lr)
        if same or same_lr:
            raise InputError(f"{len(same) or 'some'} held-out patches are also calibration patches; pass a "
                             "held-out folder with other images (--holdout DIR)")  # fmt: skip
    root = src.root if isinstance(src, ImageFolder) else src
    info = _describe(patches, root, False, hseed, tile)
    info["source"] = str(root)
    return patches, info


def load_holdout(
    models: Models,
    source: Path | None = None,
    *,
    num_patches: int = DEFAULT_HOLDOUT_PATCHES,
    tile: int = 64,
    seed: int = 0,
    calibration: CalibrationSet | None = None,
    patches: tuple[PatchSet, dict[str, Any]] | None = None,
    progress: bool = False,
    workers: int = 1,
) -> CalibrationSet:
    """Held-out patches (:func:`sample_holdout`) with every graph's reference inputs and outputs.

    Args:
        models: the fp32 networks.
        source: see :func:`sample_holdout`.
        num_patches: see :func:`sample_holdout`.
        tile: see :func:`sample_holdout`.
        seed: the calibration seed; held-out patches use ``seed + 1`` for positions and noise.
        calibration: the calibration set; a held-out patch identical to one of its patches is an error.
        patches: already sampled held-out patches and description.
        progress: progress bars.
        workers: processes sharing the capture (:func:`capture`).

    Raises:
        InputError: unusable folder, or overlap with the calibration patches.
    """
    if patches is None:
        calib = calibration.patches if calibration else None
        patches = sample_holdout(source, num_patches=num_patches, tile=tile, scale=models.preset.scale, seed=seed,
                                 calibration=calib, progress=progress)  # fmt: skip
    ps, info = patches
    runs = capture(models, ps.lr, seed=info["seed"], source=f"held-out {info['source']}", progress=progress,
                   workers=workers)  # fmt: skip
    return CalibrationSet(runs=runs, info=info, patches=ps)


def capture_both(models: Models, calib: tuple, hold: tuple, *, progress: bool = False,
                 workers: int = 1) -> tuple[CalibrationSet, CalibrationSet]:  # fmt: skip
    """The calibration and held-out sets of sampled patches ``(PatchSet, info)`` captured together
    (:func:`capture_sets`: one process pool for both): the calibration runs feed graphs only (no decode), the
    held-out ones are compared with the image (every stage)."""
    t0 = time.perf_counter()
    (cp, ci), (hp, hi) = calib, hold
    c_arrays, h_arrays = capture_sets(models, [(cp.lr, ci["seed"], False), (hp.lr, hi["seed"], True)],
                                      progress=progress, workers=workers)  # fmt: skip
    logger.info("captures: %d calibration patches (graph inputs) and %d held-out patches (every stage) in %.1fs",
                len(cp), len(hp), time.perf_counter() - t0)  # fmt: skip
    return (CalibrationSet(ReferenceRuns(**c_arrays, source=f"calibration {ci['source']}"), ci, cp),
            CalibrationSet(ReferenceRuns(**h_arrays, source=f"held-out {hi['source']}"), hi, hp))  # fmt: skip


class CaptureCache:
    """Calibration and held-out captures, reused by a caller that quantizes several artifacts of one model.

    Every graph of one model is calibrated from the same reference pipeline run, so quantizing the pipeline and
    its components (or several formats) with one cache captures once. The caller creates it and passes it to
    each :func:`tadsr.quantize.api.quantize_artifact` call; it holds one model's captures at a time (those of an
    official-size model are large).

    With ``folder``, captures are also kept on disk (``<folder>/<key digest>.npz``, written atomically) and shared
    between processes: a process that needs captures another one is computing waits for them (a file lock per
    key) instead of computing them again. ``tadsr all`` gives its format lanes one folder in its output and, as
    ``salt``, the digest of the tadsr sources (an edited toolkit captures anew).
    """

    def __init__(self, folder: Path | None = None, salt: str = "") -> None:
        self._key: str | None = None
        self._sets: tuple[CalibrationSet, CalibrationSet] | None = None
        self.folder = None if folder is None else Path(folder)
        self.salt = salt  # mixed into the file names: the caller's code version, so that an edit captures anew
        self._patches: dict[Any, tuple] = {}

    def patches(self, key: Any, sample: Callable[[], tuple]) -> tuple:
        """The sampled patches of ``key`` (the sampling arguments), sampled once per cache: the quantize calls of
        one job sample the same calibration and held-out patches (~1 s each time for the shipped sets). A cache
        lives for one job; a folder changed on disk needs a new cache."""
        if key not in self._patches:
            self._patches[key] = sample()
        return self._patches[key]

    def get(self, manifest: Mapping[str, Any], models: Models, calib: tuple, hold: tuple,
            progress: bool = False, workers: int = 1) -> tuple[CalibrationSet, CalibrationSet]:  # fmt: skip
        """The captures for these weights (the artifact's ``manifest``) and sampled patches, captured if new.

        Args:
            manifest: the fp32 artifact's manifest (its ``preset`` and ``sources`` name the weights).
            models: the rebuilt networks.
            calib, hold: ``(PatchSet, info)`` from :func:`sample_calibration` / :func:`sample_holdout`.
            progress: progress bars.
            workers: processes sharing a capture that has to be made (:func:`capture`).
        """
        key = self._key_of(manifest, calib, hold)
        if key == self._key and self._sets is not None:
            logger.info("reusing the calibration and held-out captures of this model")
            return self._sets
        self._key, self._sets = None, None  # drop the previous model's captures before capturing

        def compute() -> tuple[CalibrationSet, CalibrationSet]:
            return capture_both(models, calib, hold, progress=progress, workers=workers)

        self._sets = compute() if self.folder is None else self._shared(key, calib, hold, compute)
        self._key = key
        return self._sets

    @staticmethod
    def _key_of(manifest: Mapping[str, Any], calib: tuple, hold: tuple) -> str:
        return json.dumps([manifest["preset"], manifest["sources"], calib[0].content_hash, calib[1]["seed"],
                           hold[0].content_hash, hold[1]["seed"]], sort_keys=True)  # fmt: skip

    def file_for(self, manifest: Mapping[str, Any], calib: tuple, hold: tuple) -> Path | None:
        """The file :meth:`get`'s captures of these arguments are shared in (None: no folder)."""
        if self.folder is None:
            return None
        digest = hashlib.sha256((self._key_of(manifest, calib, hold) + self.salt).encode()).hexdigest()[:32]
        return self.folder / f"{digest}.npz"

    def _shared(self, key: str, calib: tuple, hold: tuple, compute: Callable[[], tuple]) -> tuple:
        import fcntl

        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256((key + self.salt).encode()).hexdigest()[:32]
        path = self.folder / f"{digest}.npz"
        with open(self.folder / f"{digest}.lock", "a+") as lock:
            t0 = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process capturing the same key: wait for it
            waited = time.perf_counter() - t0
            if path.is_file():
                try:
                    with np.load(path, allow_pickle=False) as z:
                        sets = (_read_runs(z, "calib", *calib), _read_runs(z, "hold", *hold))
                    logger.info("captures of this model read from %s (waited %.1f s for another process)", path,
                                waited)  # fmt: skip
                    return sets
                except (OSError, KeyError, ValueError) as e:
                    logger.warning("ignoring the unreadable capture file %s (%s); capturing again", path, e)
            sets = compute()
            arrays = {**_run_arrays("calib", sets[0].runs), **_run_arrays("hold", sets[1].runs)}
            fileio.write_with(path, lambda f: np.savez(f, **arrays))
            return sets


    # shared recipe searches: formats whose INT8 graphs are the same PT2E graph (ExecuTorch and Core ML) search once
    def load_search(self, key: str) -> dict[str, Any] | None:
        """A recipe search another quantize call of this run stored under ``key`` (None: none, or no folder)."""
        return self.load_shared("searches", key)

    def save_search(self, key: str, search: Mapping[str, Any]) -> None:
        """Store a recipe search under ``key`` for the other quantize calls of this run (atomic; no folder: no-op)."""
        self.save_shared("searches", key, search)

    def load_shared(self, kind: str, key: str) -> dict[str, Any] | None:
        """What another quantize call of this run stored as ``kind`` under ``key`` (None: nothing, or no folder)."""
        path = self._shared_path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            logger.warning("ignoring the unreadable shared %s %s (%s)", kind, path, e)
            return None

    def save_shared(self, kind: str, key: str, data: Mapping[str, Any]) -> None:
        """Store ``data`` as ``kind`` under ``key`` for the other quantize calls of this run (atomic, JSON; no
        folder: no-op)."""
        path = self._shared_path(kind, key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fileio.write_with(path, lambda f: f.write(json.dumps(data, sort_keys=True).encode()))

    def _shared_path(self, kind: str, key: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / kind / f"{hashlib.sha256((key + self.salt).encode()).hexdigest()[:32]}.json"


def _run_arrays(tag: str, runs: ReferenceRuns) -> dict[str, np.ndarray]:
    """``runs`` as named arrays for an ``.npz`` (``<tag>/<array>``, ``<tag>/source``)."""
    return {**{f"{tag}/{k}": getattr(runs, k) for k in RUN_ARRAYS}, f"{tag}/source": np.array(runs.source)}


def _read_runs(z: Any, tag: str, patches: PatchSet, info: dict[str, Any]) -> CalibrationSet:
    """The :class:`CalibrationSet` of ``patches`` whose captures :func:`_run_arrays` stored under ``tag``."""
    runs = ReferenceRuns(**{k: z[f"{tag}/{k}"] for k in RUN_ARRAYS}, source=str(z[f"{tag}/source"]))
    return CalibrationSet(runs=runs, info=info, patches=patches)


def _file_key(p: Path, memo: dict[Path, str]) -> str:
    """sha256 of a file's bytes (the same image under two paths is the same image), memoised in ``memo``, which
    the caller owns for one comparison (no process-wide cache that a changed file could make stale)."""
    p = Path(p)
    if p not in memo:
        memo[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return memo[p]
