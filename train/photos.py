"""License-clean photographs for training and calibration, gathered from locally installed packages.

Sources (all installed locally, nothing is downloaded):

* Debian ``plasma-workspace-wallpapers``: the photographic wallpapers only (illustrations and renders are left
  out), licence from ``/usr/share/doc/plasma-workspace-wallpapers/copyright`` plus the upstream licence and
  author from each wallpaper's ``metadata.json``.
* Debian ``mate-backgrounds``: the ``nature/`` photographs, licence and author from the per-file stanzas of
  ``/usr/share/doc/mate-backgrounds/copyright``.
* scikit-image's bundled sample photographs (``skimage/data``), licence as stated in the ``skimage.data``
  docstrings of the installed version.

Each photo is converted to RGB, downscaled with PIL's LANCZOS so its long side is at most ``max_side`` pixels,
and written as PNG to ``OUT/train`` or ``OUT/val``. The split is a fixed rule on the name only
(:func:`split_of`), so a photo never moves between splits when the set grows. ``OUT/SOURCES.json`` records,
for each file, where it came from and under which licence.

Usage::

    python -m tadsr.train.photos OUT_DIR [--val-fraction 0.15] [--seed 0] [--max-side 1024]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from tadsr.errors import InputError

__all__ = ["PhotoRecord", "PhotoSet", "collect_photos", "load_photo_set", "main", "split_of"]

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]

PLASMA_PACKAGE = "plasma-workspace-wallpapers"
MATE_PACKAGE = "mate-backgrounds"
SKIMAGE_PACKAGE = "scikit-image"
APT_HINT = "apt-get install plasma-workspace-wallpapers mate-backgrounds"

PLASMA_DIR = Path("/usr/share/wallpapers")
MATE_DIR = Path("/usr/share/backgrounds/mate")
DOC_DIR = Path("/usr/share/doc")

# Chosen by looking at every wallpaper: these are photographs; the others are illustrations or renders.
PLASMA_PHOTOS = (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
    "OneStandsOut", "Path", "summer_1am",
)  # fmt: skip
MATE_PHOTOS = (
    "nature/Aqua.jpg", "nature/Blinds.jpg", "nature/Dune.jpg", "nature/FreshFlower.jpg", "nature/Garden.jpg",
    "nature/GreenMeadow.jpg", "nature/LadyBird.jpg", "nature/RainDrops.jpg", "nature/Storm.jpg",
    "nature/TwoWings.jpg", "nature/Wood.jpg", "nature/YellowFlower.jpg",
)  # fmt: skip
# file in skimage/data -> (licence, credit), quoted from the installed skimage.data docstrings.
SKIMAGE_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut.png": ("Public domain (NASA; 'No known copyright restrictions')", "NASA Great Images"),
    "coffee.png": ("CC0-1.0", "Rachel Michetti, courtesy of Pikolo Espresso Bar"),
    "chelsea.png": ("CC0-1.0", "Stefan van der Walt"),
    "rocket.jpg": ("Public domain (released by SpaceX)", "SpaceX"),
    "camera.png": ("CC0-1.0", "Lav Varshney"),
    "brick.png": ("CC0-1.0", "CC0Textures (Bricks25), transformed by scikit-image"),
    "grass.png": ("CC0-1.0", "linolafett (DeviantArt), cropped by scikit-image"),
    "gravel.png": ("CC0-1.0", "CC0Textures (Gravel04), cropped by scikit-image"),
}


@dataclass(frozen=True, kw_only=True)
class PhotoRecord:
    """One photo of a :class:`PhotoSet`.

    Attributes:
        file: path relative to the set's root, e.g. ``"train/mate_nature_Aqua.png"``.
        origin: installed source file: absolute for Debian packages, ``skimage/data/<file>`` (relative to
            site-packages) for scikit-image.
        package: Debian package, or Python distribution and version, the source file comes from.
        license: licence of the source file as stated by the package's copyright file (Debian) or data docs.
        upstream_license: licence in the upstream metadata where it differs in form (Plasma's metadata.json),
            else ``None``.
        copyright: author / copyright holder.
        split: ``"train"`` or ``"val"``.
        original_size: ``(width, height)`` of the source file.
        size: ``(width, height)`` of the written PNG.
    """

    file: str
    origin: str
    package: str
    license: str
    upstream_license: str | None
    copyright: str
    split: Split
    original_size: tuple[int, int]
    size: tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class PhotoSet:
    """A folder of RGB PNG photos split into train and val, as written by :func:`collect_photos`.

    Attributes:
        root: the folder holding ``train/``, ``val/`` and ``SOURCES.json``.
        records: one record per photo, sorted by file name.
        val_fraction: the fraction used by the split rule.
        seed: the salt used by the split rule.
    """

    root: Path
    records: tuple[PhotoRecord, ...]
    val_fraction: float
    seed: int

    @property
    def train(self) -> list[Path]:
        """Absolute paths of the training photos, sorted."""
        return [self.root / r.file for r in self.records if r.split == "train"]

    @property
    def val(self) -> list[Path]:
        """Absolute paths of the validation photos, sorted. Never train on these."""
        return [self.root / r.file for r in self.records if r.split == "val"]


@dataclass(frozen=True)
class _Candidate:
    name: str
    origin: Path
    package: str
    license: str
    upstream_license: str | None
    copyright: str


def split_of(name: str, *, val_fraction: float, seed: int = 0) -> Split:
    """Deterministic train/val assignment of a photo from its name alone.

    The photo is in val iff ``int(sha256(f"{seed}:{name}")) / 2**256 < val_fraction``, so the decision never
    depends on which other photos are present.

    Args:
        name: the photo's stem, e.g. ``"mate_nature_Aqua"``.
        val_fraction: expected fraction of photos in val, in ``[0, 1]``.
        seed: salt of the hash; ``0`` defines the canonical split.

    Returns:
        ``"val"`` or ``"train"``.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return "val" if int.from_bytes(digest, "big") / 2**256 < val_fraction else "train"


def _dep5_stanzas(copyright_file: Path) -> list[dict[str, str]]:
    """Parse a machine-readable Debian copyright file into stanzas of ``{field: value}``."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in copyright_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _dep5_lookup(stanzas: list[dict[str, str]], rel_path: str) -> tuple[str, str]:
    """``(license, copyright)`` of ``rel_path``: the last ``Files`` stanza that matches wins (DEP-5)."""
    found = ("", "")
    for st in stanzas:
        if "Files" in st and any(fnmatch.fnmatchcase(rel_path, pat) for pat in st["Files"].split()):
            found = (st.get("License", "").splitlines()[0].strip(), " / ".join(st.get("Copyright", "").splitlines()))
    return found


def _require_package(package: str, data_dir: Path) -> Path:
    copyright_file = DOC_DIR / package / "copyright"
    if not data_dir.is_dir() or not copyright_file.is_file():
        raise InputError(
            f"Debian package {package!r} is not installed ({data_dir} or {copyright_file} missing). "
            f"Install the photo sources with: {APT_HINT}"
        )
    return copyright_file


def _plasma_candidates() -> list[_Candidate]:
    stanzas = _dep5_stanzas(_require_package(PLASMA_PACKAGE, PLASMA_DIR))
    out = []
    for name in PLASMA_PHOTOS:
        folder = PLASMA_DIR / name
        files = {p.resolve() for p in (folder / "contents" / "images").glob("*") if p.is_file()}
        if not files:
            raise InputError(f"{folder} has no images; reinstall the package: {APT_HINT}")
        biggest = max(sorted(files), key=lambda p: p.stat().st_size)  # the full-resolution original
        meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["KPlugin"]
        authors = ", ".join(a.get("Name", "") for a in meta.get("Authors", []))
        license_, holder = _dep5_lookup(stanzas, f"{name}/contents/images/{biggest.name}")
        out.append(
            _Candidate(
                name=f"plasma_{name}",
                origin=biggest,
                package=PLASMA_PACKAGE,
                license=license_,
                upstream_license=meta.get("License"),
                copyright=f"{authors} (package: {holder})",
            )
        )
    return out


def _mate_candidates() -> list[_Candidate]:
    stanzas = _dep5_stanzas(_require_package(MATE_PACKAGE, MATE_DIR))
    out = []
    for rel in MATE_PHOTOS:
        origin = MATE_DIR / rel
        if not origin.is_file():
            raise InputError(f"{origin} is missing; reinstall the package: {APT_HINT}")
        license_, holder = _dep5_lookup(stanzas, rel)
        name = "mate_" + rel.rsplit(".", 1)[0].replace("/", "_")
        out.append(_Candidate(name, origin, MATE_PACKAGE, license_, None, holder))
    return out


def _skimage_candidates() -> list[_Candidate]:
    spec = importlib.util.find_spec("skimage.data")
    if spec is None or spec.origin is None:
        raise InputError("scikit-image is not installed; install it with: pip install scikit-image")
    data_dir = Path(spec.origin).parent
    package = f"{SKIMAGE_PACKAGE} {importlib.metadata.version(SKIMAGE_PACKAGE)}"
    out = []
    for file, (license_, credit) in SKIMAGE_PHOTOS.items():
        origin = data_dir / file
        if not origin.is_file():
            raise InputError(f"{origin} is missing from the installed scikit-image; reinstall scikit-image")
        out.append(_Candidate(f"skimage_{file.rsplit('.', 1)[0]}", origin, package, license_, None, credit))
    return out


def _origin_str(origin: Path) -> str:
    """Absolute path, except inside a Python environment: from the top-level package on."""
    parts = origin.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return str(origin)


def _convert(origin: Path, dest: Path, max_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Write ``origin`` as an RGB PNG with long side <= ``max_side``; return (original, new) ``(w, h)``."""
    with Image.open(origin) as im:
        original = im.size
        factor = min(1.0, max_side / max(original))
        target = (max(1, round(original[0] * factor)), max(1, round(original[1] * factor)))
        im.draft("RGB", (2 * target[0], 2 * target[1]))  # JPEG only: decode at >= 2x the target, much faster
        rgb = im.convert("RGB")
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS)
        rgb.save(dest, format="PNG", compress_level=6)
    return original, target


def _prepare_out_dir(out_dir: Path) -> None:
    for split in ("train", "val"):
        sub = out_dir / split
        if sub.is_dir() and any(sub.iterdir()):
            if not (out_dir / "SOURCES.json").is_file():
                raise InputError(f"{sub} is not empty and is not a photo set; choose an empty OUT_DIR")
            for old in sub.glob("*.png"):
                old.unlink()
        sub.mkdir(parents=True, exist_ok=True)


def collect_photos(out_dir: Path, *, val_fraction: float = 0.15, seed: int = 0, max_side: int = 1024) -> PhotoSet:
    """Gather the license-clean photos into ``out_dir/{train,val}/*.png`` plus ``out_dir/SOURCES.json``.

    An existing photo set in ``out_dir`` is replaced.

    Args:
        out_dir: destination folder (created if needed).
        val_fraction: expected fraction of photos held out for validation, see :func:`split_of`.
        seed: salt of the split hash; keep the default ``0`` so every user gets the same split.
        max_side: long-side limit of the written PNGs, in pixels.

    Returns:
        The written :class:`PhotoSet`.

    Raises:
        InputError: a source package is missing (install with
            ``apt-get install plasma-workspace-wallpapers mate-backgrounds``), a bad argument, or ``out_dir``
            holds unrelated files.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise InputError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if max_side < 64:
        raise InputError(f"max_side must be at least 64 pixels, got {max_side}")
    t0 = time.perf_counter()
    candidates = _plasma_candidates() + _mate_candidates() + _skimage_candidates()
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    records = []
    for c in sorted(candidates, key=lambda c: c.name):
        split = split_of(c.name, val_fraction=val_fraction, seed=seed)
        rel = f"{split}/{c.name}.png"
        original, size = _convert(c.origin, out_dir / rel, max_side)
        logger.debug("%s <- %s %s -> %s", rel, c.origin, original, size)
        records.append(
            PhotoRecord(
                file=rel, origin=_origin_str(c.origin), package=c.package, license=c.license,
                upstream_license=c.upstream_license, copyright=c.copyright, split=split,
                original_size=original, size=size,
            )
        )  # fmt: skip
    photo_set = PhotoSet(root=out_dir, records=tuple(records), val_fraction=val_fraction, seed=seed)
    _write_sources(photo_set, max_side)
    logger.info(
        "collected %d photos (%d train, %d val) into %s in %.1f s",
        len(records), len(photo_set.train), len(photo_set.val), out_dir, time.perf_counter() - t0,
    )  # fmt: skip
    return photo_set


def _write_sources(photo_set: PhotoSet, max_side: int) -> None:
    doc = {
        "version": 1,
        "split_rule": "val iff int(sha256(f'{seed}:{name}')) / 2**256 < val_fraction; never train on val",
        "val_fraction": photo_set.val_fraction,
        "seed": photo_set.seed,
        "max_side": max_side,
        "resize": "PIL LANCZOS, RGB, PNG",
        "photos": [asdict(r) for r in photo_set.records],
    }
    (photo_set.root / "SOURCES.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_photo_set(root: Path) -> PhotoSet:
    """Read a photo set written by :func:`collect_photos`.

    Args:
        root: the folder holding ``SOURCES.json``.

    Returns:
        The :class:`PhotoSet`.

    Raises:
        InputError: ``SOURCES.json`` is missing or malformed, or a listed file is missing.
    """
    root = Path(root)
    sources = root / "SOURCES.json"
    if not sources.is_file():
        raise InputError(f"{sources} not found; create the photo set with: python -m tadsr.train.photos {root}")
    try:
        doc = json.loads(sources.read_text(encoding="utf-8"))
        records = tuple(
            PhotoRecord(**{**r, "original_size": tuple(r["original_size"]), "size": tuple(r["size"])})
            for r in doc["photos"]
        )
        photo_set = PhotoSet(root=root, records=records, val_fraction=doc["val_fraction"], seed=doc["seed"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{sources} is malformed ({e}); regenerate it with python -m tadsr.train.photos") from e
    missing = [r.file for r in records if not (root / r.file).is_file()]
    if missing:
        raise InputError(f"photo set {root} lacks {missing}; regenerate it with python -m tadsr.train.photos")
    return photo_set


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``python -m tadsr.train.photos OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m tadsr.train.photos", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ps = collect_photos(args.out_dir, val_fraction=args.val_fraction, seed=args.seed, max_side=args.max_side)
    except InputError as e:
        logger.error("%s", e)
        return 2
    logger.info("train: %d photos, val: %d photos", len(ps.train), len(ps.val))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
