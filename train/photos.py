"""License-clean photographs and illustrations for training and calibration, gathered from installed packages.

Sources (all installed locally, nothing is downloaded; :data:`SOURCES` names them, ``--sources`` picks some):

* ``plasma``: Debian ``plasma-workspace-wallpapers``: every wallpaper (the photographs of :data:`PLASMA_PHOTOS`
  are ``kind="photo"``, the others ``"illustration"``), licence from the package's DEP-5 copyright file plus
  the upstream licence and author from each wallpaper's ``metadata.json``.
* ``mate``: Debian ``mate-backgrounds``: ``nature/`` photographs plus the ``abstract/`` and ``desktop/``
  illustrations, licence and author from the per-file stanzas of the package's copyright file.
* ``ukui``, ``lomiri``: Debian ``ukui-wallpapers`` and ``lomiri-wallpapers{,-16.04,-20.04}``
  (``/usr/share/backgrounds``): photographs of :data:`WALLPAPER_PHOTOS` and illustrations; per-file licence
  from the DEP-5 copyright files (matched on the file name, as the files are installed flat).
* ``gcompris``: Debian ``gcompris-qt-data``: the photographs, paintings and drawings that the activities of
  :data:`GCOMPRIS_ACTIVITIES` carry inside their Qt resource files (``/usr/share/gcompris-qt/rcc/*.rcc``,
  read with :func:`read_rcc`); per-file licence from the package's DEP-5 copyright file (the activity's
  source path, whose ``.jpg``/``.png`` original became ``.webp`` in the package).
* ``tuxpaint``: Debian ``tuxpaint-stamps-default``: the larger mostly-opaque stamps (photographs cut out of
  their background, and cartoon drawings), composited on mid-grey and cropped to the stamp.
* ``tuxpaint_templates``: Debian ``tuxpaint-data``: the template photographs (bark, moss, rock, wool, sea...).
* ``wesnoth``: Debian ``wesnoth-1.16-data``: the painted portraits (faces and figures, cut out, composited like
  the stamps) and story paintings of *The Battle for Wesnoth* (GPL-2+ per the package's copyright file).
* ``skimage``: scikit-image's bundled sample images (``skimage/data``), licence as stated in the
  ``skimage.data`` docstrings of the installed version.

Each image is converted to RGB, downscaled with PIL's LANCZOS so its long side is at most ``max_side`` pixels,
and written as PNG to ``OUT/train`` or ``OUT/val``; an image whose short side would be below ``min_side``
(it cannot hold a training crop) is left out, and so is a near-duplicate (same 8x8 gradient hash, e.g. one
photo shipped by two activities or at two resolutions) of an image with an earlier name, so that no picture
can sit in both splits. Only licences of :data:`REDISTRIBUTABLE` are taken. The split is a fixed rule on the
name only (:func:`split_of`), so a photo never moves between splits when the set grows. ``OUT/SOURCES.json``
records, for each file, where it came from, under which licence, and its kind (photo / illustration / ...).

Usage::

    python -m tadsr.train.photos OUT_DIR [--val-fraction 0.15] [--seed 0] [--max-side 1024] [--sources ...]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from tadsr import fileio
from tadsr.errors import InputError

__all__ = [
    "SOURCES",
    "PhotoRecord",
    "PhotoSet",
    "collect_photos",
    "counts",
    "load_photo_set",
    "main",
    "read_rcc",
    "split_of",
]  # fmt: skip

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]

PLASMA_PACKAGE = "plasma-workspace-wallpapers"
MATE_PACKAGE = "mate-backgrounds"
UKUI_PACKAGE = "ukui-wallpapers"
LOMIRI_PACKAGES = ("lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
GCOMPRIS_PACKAGE = "gcompris-qt-data"
TUXPAINT_PACKAGE = "tuxpaint-stamps-default"
TUXPAINT_DATA_PACKAGE = "tuxpaint-data"
WESNOTH_PACKAGE = "wesnoth-1.16-data"
SKIMAGE_PACKAGE = "scikit-image"
DEBIAN_PACKAGES = (
    PLASMA_PACKAGE, MATE_PACKAGE, UKUI_PACKAGE, *LOMIRI_PACKAGES, GCOMPRIS_PACKAGE, TUXPAINT_PACKAGE,
    TUXPAINT_DATA_PACKAGE, WESNOTH_PACKAGE,
)  # fmt: skip
APT_HINT = "apt-get install " + " ".join(DEBIAN_PACKAGES)

PLASMA_DIR = Path("/usr/share/wallpapers")
MATE_DIR = Path("/usr/share/backgrounds/mate")
BACKGROUNDS_DIR = Path("/usr/share/backgrounds")
GCOMPRIS_RCC_DIR = Path("/usr/share/gcompris-qt/rcc")
TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_TEMPLATES_DIR = Path("/usr/share/tuxpaint/templates")
WESNOTH_DIR = Path("/usr/share/games/wesnoth/1.16/data/core/images")
WESNOTH_SUBDIRS = ("portraits", "story")  # painted faces / figures and story paintings (terrain tiles left out)
# wesnoth-1.16-data's copyright file is not machine-readable; it states GPL version 2 or (at your option) later
# for the whole game, its artwork included.
WESNOTH_LICENSE = "GPL-2+"
DOC_DIR = Path("/usr/share/doc")
DPKG_INFO_DIR = Path("/var/lib/dpkg/info")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Licences accepted (SPDX-like ids as the Debian copyright files and data docs spell them); anything else is
# left out with a warning. All allow redistribution of the image and of derived training data.
REDISTRIBUTABLE = (
    "CC0-1.0", "CC-BY-1.0", "CC-BY-2.0", "CC-BY-2.5", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-2.0", "CC-BY-SA-2.5",
    "CC-BY-SA-3.0", "CC-BY-SA-4.0", "GPL-2", "GPL-2+", "GPL-3", "GPL-3+", "LGPL-2.1", "LGPL-2.1+", "LGPL-3",
    "LGPL-3+", "LGPL-3.0+", "GFDL-NIV-1.2", "GFDL-NIV-1.2+", "Expat", "MIT", "BSD-3-clause", "public-domain",
    "Public domain",
)  # fmt: skip

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
MATE_ILLUSTRATION_DIRS = ("abstract", "desktop")
# /usr/share/backgrounds files of ukui-wallpapers / lomiri-wallpapers* that are photographs (looked at each).
WALLPAPER_PHOTOS = (
    "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Kleiber_by_Lukas_Baubkus", "Picture_0B_by_freespace",
    "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
    "analogpattern_by_Peter_Nerlich", "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi",
    "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
    "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi",
)  # fmt: skip
# GCompris activity -> kind of its images (looked at a sample of each). Activities left out: planet renders
# (solar_system, gravity), flat textures (digital_electricity), paintings with cut-out holes (babyshapes).
GCOMPRIS_ACTIVITIES = {
    "categorization": "photo", "clickgame": "photo", "details": "photo+painting", "erase": "photo",
    "explore_farm_animals": "photo", "explore_monuments": "photo", "explore_world_animals": "photo",
    "explore_world_music": "photo", "lang": "illustration", "paintings": "painting",
}  # fmt: skip
# file in skimage/data -> (licence, credit, kind), quoted from the installed skimage.data docstrings.
SKIMAGE_PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut.png": ("Public domain (NASA; 'No known copyright restrictions')", "NASA Great Images", "photo"),
    "coffee.png": ("CC0-1.0", "Rachel Michetti, courtesy of Pikolo Espresso Bar", "photo"),
    "chelsea.png": ("CC0-1.0", "Stefan van der Walt", "photo"),
    "rocket.jpg": ("Public domain (released by SpaceX)", "SpaceX", "photo"),
    "camera.png": ("CC0-1.0", "Lav Varshney", "photo"),
    "brick.png": ("CC0-1.0", "CC0Textures (Bricks25), transformed by scikit-image", "photo"),
    "grass.png": ("CC0-1.0", "linolafett (DeviantArt), cropped by scikit-image", "photo"),
    "gravel.png": ("CC0-1.0", "CC0Textures (Gravel04), cropped by scikit-image", "photo"),
    "hubble_deep_field.jpg": ("Public domain (NASA; 'may be freely used in the public domain')", "NASA", "photo"),
    "ihc.png": ("Public domain ('No known copyright restrictions')", "Immunohistochemistry, skimage.data", "photo"),
    "retina.jpg": ("CC0-1.0", "Wikimedia Fundus_photograph_of_normal_left_eye", "photo"),
    "text.png": ("Public domain ('No known copyright restrictions, released into the public domain')",
                 "Wikipedia File:Corner.png", "text"),
    "coins.png": ("Public domain ('No known copyright restrictions')", "Brooklyn Museum open collection", "photo"),
}  # fmt: skip
SOURCES = ("plasma", "mate", "ukui", "lomiri", "gcompris", "tuxpaint", "tuxpaint_templates", "wesnoth", "skimage")
TUXPAINT_MIN_OPAQUE = 0.4  # fraction of opaque pixels within the stamp's bounding box
TUXPAINT_BACKGROUND = (128, 128, 128)
DUPLICATE_HAMMING = 4  # two images whose 64-bit gradient hashes differ in at most this many bits are one


@dataclass(frozen=True, kw_only=True)
class PhotoRecord:
    """One photo of a :class:`PhotoSet`.

    Attributes:
        file: path relative to the set's root, e.g. ``"train/mate_nature_Aqua.png"``.
        origin: installed source file: absolute for Debian packages (``<file.rcc>:<resource path>`` for an
            image inside a Qt resource file), ``skimage/data/<file>`` (relative to site-packages) for
            scikit-image.
        package: Debian package, or Python distribution and version, the source file comes from.
        license: licence of the source file as stated by the package's copyright file (Debian) or data docs.
        upstream_license: licence in the upstream metadata where it differs in form (Plasma's metadata.json),
            else ``None``.
        copyright: author / copyright holder.
        split: ``"train"`` or ``"val"``.
        original_size: ``(width, height)`` of the source file.
        size: ``(width, height)`` of the written PNG.
        source: key of :data:`SOURCES` the image was gathered by.
        kind: ``"photo"``, ``"illustration"``, ``"painting"``, ``"photo+painting"``, ``"cutout"`` (a
            photographed object on a flat background) or ``"text"``.
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
    source: str = ""
    kind: str = "photo"


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
    origin: str
    package: str
    license: str
    upstream_license: str | None
    copyright: str
    source: str
    kind: str
    load: Callable[[], Image.Image]


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


def _dep5_match(stanzas: list[dict[str, str]], rel_path: str, *, basename: bool = False) -> tuple[str, str, str] | None:
    """``(license, copyright, pattern)`` of the last ``Files`` stanza matching ``rel_path`` (DEP-5), or None.

    With ``basename=True`` a pattern matches when its last path component matches the file name (for
    packages that install their files flat while the copyright file names source paths).
    """
    found = None
    for st in stanzas:
        for pat in st.get("Files", "").split():
            hit = fnmatch.fnmatchcase(rel_path, pat)
            base = pat.rsplit("/", 1)[-1]
            if basename and not hit and not any(ch in base for ch in "*?["):
                hit = rel_path.rsplit("/", 1)[-1] == base
            if hit:
                lic = st.get("License", "").splitlines()[0].strip() if st.get("License") else ""
                found = (lic, " / ".join(st.get("Copyright", "").splitlines()), pat)
                break
    return found


def _dep5_lookup(stanzas: list[dict[str, str]], rel_path: str) -> tuple[str, str]:
    """``(license, copyright)`` of ``rel_path``: the last ``Files`` stanza that matches wins (DEP-5)."""
    m = _dep5_match(stanzas, rel_path)
    return (m[0], m[1]) if m else ("", "")


def _package_files(package: str) -> list[Path]:
    """Files installed by a Debian package (dpkg's file list), or [] when it is not installed."""
    for name in (f"{package}.list", f"{package}:all.list", f"{package}:amd64.list", f"{package}:arm64.list"):
        lst = DPKG_INFO_DIR / name
        if lst.is_file():
            return [Path(x) for x in lst.read_text(encoding="utf-8", errors="replace").splitlines() if x]
    return []


def _require_package(package: str, data_dir: Path) -> Path:
    copyright_file = DOC_DIR / package / "copyright"
    if not data_dir.is_dir() or not copyright_file.is_file():
        raise InputError(
            f"Debian package {package!r} is not installed ({data_dir} or {copyright_file} missing). "
            f"Install the photo sources with: {APT_HINT}"
        )
    return copyright_file


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    return lambda: Image.open(path)


def _bytes_loader(data: bytes) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(data))


def _plasma_candidates() -> list[_Candidate]:
    stanzas = _dep5_stanzas(_require_package(PLASMA_PACKAGE, PLASMA_DIR))
    out = []
    for folder in sorted(p for p in PLASMA_DIR.iterdir() if (p / "metadata.json").is_file()):
        name = folder.name
        files = {p.resolve() for p in (folder / "contents" / "images").glob("*") if p.is_file()}
        if not files and name in PLASMA_PHOTOS:
            raise InputError(f"{folder} has no images; reinstall the package: {APT_HINT}")
        files = {p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
        if not files:
            continue
        biggest = max(sorted(files), key=lambda p: p.stat().st_size)  # the full-resolution original
        meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["KPlugin"]
        authors = ", ".join(a.get("Name", "") for a in meta.get("Authors", []))
        license_, holder = _dep5_lookup(stanzas, f"{name}/contents/images/{biggest.name}")
        out.append(
            _Candidate(
                name=f"plasma_{name}", origin=str(biggest), package=PLASMA_PACKAGE, license=license_,
                upstream_license=meta.get("License"), copyright=f"{authors} (package: {holder})", source="plasma",
                kind="photo" if name in PLASMA_PHOTOS else "illustration", load=_file_loader(biggest),
            )
        )  # fmt: skip
    missing = set(PLASMA_PHOTOS) - {c.name.removeprefix("plasma_") for c in out}
    if missing:
        raise InputError(f"{PLASMA_DIR} lacks {sorted(missing)}; reinstall the package: {APT_HINT}")
    return out


def _mate_candidates() -> list[_Candidate]:
    stanzas = _dep5_stanzas(_require_package(MATE_PACKAGE, MATE_DIR))
    rels = list(MATE_PHOTOS)
    for sub in MATE_ILLUSTRATION_DIRS:
        rels += sorted(f"{sub}/{p.name}" for p in (MATE_DIR / sub).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for rel in rels:
        origin = MATE_DIR / rel
        if not origin.is_file():
            raise InputError(f"{origin} is missing; reinstall the package: {APT_HINT}")
        license_, holder = _dep5_lookup(stanzas, rel)
        name = "mate_" + rel.rsplit(".", 1)[0].replace("/", "_")
        kind = "photo" if rel in MATE_PHOTOS else "illustration"
        out.append(
            _Candidate(name, str(origin), MATE_PACKAGE, license_, None, holder, "mate", kind, _file_loader(origin))
        )
    return out


def _backgrounds_candidates(packages: tuple[str, ...], source: str) -> list[_Candidate]:
    """Images a package installs flat into /usr/share/backgrounds, licence matched on the file name."""
    out = []
    for package in packages:
        files = [
            p for p in _package_files(package) if p.parent == BACKGROUNDS_DIR and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        copyright_file = DOC_DIR / package / "copyright"
        if not files or not copyright_file.is_file():
            raise InputError(f"Debian package {package!r} is not installed. Install the photo sources with: {APT_HINT}")
        stanzas = _dep5_stanzas(copyright_file)
        for f in sorted(files):
            m = _dep5_match(stanzas, f.name, basename=True)
            license_, holder = (m[0], m[1]) if m else ("", "")
            kind = "photo" if f.stem in WALLPAPER_PHOTOS else "illustration"
            out.append(_Candidate(f"{source}_{f.stem}", str(f), package, license_, None, holder, source, kind,
                                  _file_loader(f)))  # fmt: skip
    return out


def read_rcc(path: Path) -> list[tuple[str, bytes]]:
    """The files of a Qt resource file (``.rcc``, format versions 1-3): ``[(resource path, bytes)]``.

    The format: a header (``qres``, version, offsets of the tree, the data and the names), a tree of fixed-size
    nodes (name offset, flags; a directory has its child count and first child, a file its data offset),
    names as UTF-16BE with a length prefix, data as a length-prefixed blob that ``flags & 1`` marks as
    zlib-compressed behind a 4-byte length. zstd-compressed entries (``flags & 4``) are skipped.

    Raises:
        InputError: not a Qt resource file.
    """
    b = Path(path).read_bytes()
    if b[:4] != b"qres" or len(b) < 20:
        raise InputError(f"{path} is not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 14 if version == 1 else 22

    def name_at(off: int) -> str:
        (n,) = struct.unpack(">H", b[names + off : names + off + 2])
        return b[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    out: list[tuple[str, bytes]] = []
    stack = [(0, "")]
    while stack:
        i, prefix = stack.pop()
        o = tree + i * node
        name_off, flags = struct.unpack(">IH", b[o : o + 6])
        name = name_at(name_off) if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", b[o + 6 : o + 14])
            stack.extend((c, f"{prefix}{name}/") for c in range(first + count - 1, first - 1, -1))
            continue
        (doff,) = struct.unpack(">I", b[o + 10 : o + 14])
        (size,) = struct.unpack(">I", b[data + doff : data + doff + 4])
        raw = b[data + doff + 4 : data + doff + 4 + size]
        if flags & 4:
            continue
        out.append((prefix + name, zlib.decompress(raw[4:]) if flags & 1 else raw))
    return out


def _gcompris_candidates() -> list[_Candidate]:
    stanzas = _dep5_stanzas(_require_package(GCOMPRIS_PACKAGE, GCOMPRIS_RCC_DIR))
    out = []
    for activity, kind in GCOMPRIS_ACTIVITIES.items():
        rcc = GCOMPRIS_RCC_DIR / f"{activity}.rcc"
        if not rcc.is_file():
            raise InputError(f"{rcc} is missing; reinstall the package: {APT_HINT}")
        for res, data in sorted(read_rcc(rcc)):
            if not res.lower().endswith(IMAGE_SUFFIXES):
                continue
            rel = res.split("/gcompris/", 1)[-1].lstrip("/")  # -> src/activities/<activity>/resource/...
            stem = rel.rsplit(".", 1)[0]
            m = None
            for ext in (rel.rsplit(".", 1)[-1], "jpg", "jpeg", "png", "svg"):  # the package made .webp of these
                m = _dep5_match(stanzas, f"{stem}.{ext}")
                if m and m[2] != "*":
                    break
            license_, holder = (m[0], m[1]) if m else ("", "")
            name = "gcompris_" + stem.split("/activities/", 1)[-1].replace("/resource/", "_").replace("/", "_")
            out.append(_Candidate(name, f"{rcc}:{res}", GCOMPRIS_PACKAGE, license_, None, holder, "gcompris", kind,
                                  _bytes_loader(data)))  # fmt: skip
    return out


def _stamp_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
        bbox = rgba.getchannel("A").getbbox() or (0, 0, *rgba.size)
        rgba = rgba.crop(bbox)
        canvas = Image.new("RGBA", rgba.size, (*TUXPAINT_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")

    return load


def _opaque_enough(path: Path, min_side: int) -> bool:
    """A cut-out image whose opaque bounding box is at least ``min_side`` and mostly opaque."""
    with Image.open(path) as im:
        if min(im.size) < min_side:
            return False
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    ys, xs = np.nonzero(alpha > 0)
    if ys.size == 0:
        return False
    box = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return min(box.shape) >= min_side and float((box > 250).mean()) >= TUXPAINT_MIN_OPAQUE


def _tuxpaint_candidates(min_side: int) -> list[_Candidate]:
    stanzas = _dep5_stanzas(_require_package(TUXPAINT_PACKAGE, TUXPAINT_DIR))
    out = []
    for f in sorted(p for p in _package_files(TUXPAINT_PACKAGE) if p.suffix.lower() == ".png" and p.is_file()):
        if not _opaque_enough(f, min_side):
            continue
        rel = f.relative_to(TUXPAINT_DIR).with_suffix("")
        license_, holder = _dep5_lookup(stanzas, f"stamps/{rel}.png")
        kind = "illustration" if "cartoon" in rel.parts else "cutout"
        out.append(_Candidate("tuxpaint_" + "_".join(rel.parts), str(f), TUXPAINT_PACKAGE, license_, None, holder,
                              "tuxpaint", kind, _stamp_loader(f)))  # fmt: skip
    return out


def _tuxpaint_template_candidates() -> list[_Candidate]:
    stanzas = _dep5_stanzas(_require_package(TUXPAINT_DATA_PACKAGE, TUXPAINT_TEMPLATES_DIR))
    out = []
    for f in sorted(p for p in TUXPAINT_TEMPLATES_DIR.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        license_, holder = _dep5_lookup(stanzas, f"templates/{f.name}")
        out.append(_Candidate(f"tuxpaint_template_{f.stem}", str(f), TUXPAINT_DATA_PACKAGE, license_, None, holder,
                              "tuxpaint_templates", "photo", _file_loader(f)))  # fmt: skip
    return out


def _wesnoth_candidates(min_side: int) -> list[_Candidate]:
    _require_package(WESNOTH_PACKAGE, WESNOTH_DIR)
    holder = f"The Battle for Wesnoth project and contributors (see {DOC_DIR / WESNOTH_PACKAGE / 'copyright'})"
    out = []
    for sub in WESNOTH_SUBDIRS:
        for f in sorted(p for p in (WESNOTH_DIR / sub).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(f) as im:
                cutout = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            if cutout and not _opaque_enough(f, min_side):
                continue
            rel = f.relative_to(WESNOTH_DIR).with_suffix("")
            out.append(_Candidate("wesnoth_" + "_".join(rel.parts), str(f), WESNOTH_PACKAGE, WESNOTH_LICENSE, None,
                                  holder, "wesnoth", "illustration",
                                  _stamp_loader(f) if cutout else _file_loader(f)))  # fmt: skip
    return out


def _skimage_candidates() -> list[_Candidate]:
    spec = importlib.util.find_spec("skimage.data")
    if spec is None or spec.origin is None:
        raise InputError("scikit-image is not installed; install it with: pip install scikit-image")
    data_dir = Path(spec.origin).parent
    package = f"{SKIMAGE_PACKAGE} {importlib.metadata.version(SKIMAGE_PACKAGE)}"
    out = []
    for file, (license_, credit, kind) in SKIMAGE_PHOTOS.items():
        origin = data_dir / file
        if not origin.is_file():
            raise InputError(f"{origin} is missing from the installed scikit-image; reinstall scikit-image")
        out.append(_Candidate(f"skimage_{file.rsplit('.', 1)[0]}", _origin_str(origin), package, license_, None,
                              credit, "skimage", kind, _file_loader(origin)))  # fmt: skip
    return out


def _origin_str(origin: Path) -> str:
    """Absolute path, except inside a Python environment: from the top-level package on."""
    parts = origin.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return str(origin)


def _target_size(original: tuple[int, int], max_side: int) -> tuple[int, int]:
    factor = min(1.0, max_side / max(original))
    return max(1, round(original[0] * factor)), max(1, round(original[1] * factor))


def _gradient_hash(rgb: Image.Image) -> int:
    """64-bit difference hash: signs of horizontal differences of a 9x8 grey thumbnail."""
    g = np.asarray(rgb.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()
    return int("".join("1" if x else "0" for x in bits), 2)


def _convert(rgb: Image.Image, dest: Path, target: tuple[int, int]) -> None:
    """Write ``rgb`` resized to ``target`` (w, h) as PNG."""
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    rgb.save(dest, format="PNG", compress_level=6)


def _open_rgb(c: _Candidate, max_side: int) -> Image.Image:
    """The candidate as RGB; a JPEG is decoded at >= 2x the target (draft mode), much faster."""
    im = c.load()
    original = im.size
    target = _target_size(original, max_side)
    im.draft("RGB", (2 * target[0], 2 * target[1]))
    rgb = im.convert("RGB")
    rgb.info["original_size"] = original
    return rgb


def _is_licence_ok(license_: str) -> bool:
    return license_ in REDISTRIBUTABLE or license_.startswith("Public domain")


def _prepare_out_dir(out_dir: Path) -> None:
    for split in ("train", "val"):
        sub = out_dir / split
        if sub.is_dir() and any(sub.iterdir()):
            if not (out_dir / "SOURCES.json").is_file():
                raise InputError(f"{sub} is not empty and is not a photo set; choose an empty OUT_DIR")
            for old in sub.glob("*.png"):
                old.unlink()
        sub.mkdir(parents=True, exist_ok=True)


def _candidates(sources: tuple[str, ...], min_side: int) -> list[_Candidate]:
    """All candidates of the chosen sources; one error naming every missing package."""
    makers: dict[str, Callable[[], list[_Candidate]]] = {
        "plasma": _plasma_candidates,
        "mate": _mate_candidates,
        "ukui": lambda: _backgrounds_candidates((UKUI_PACKAGE,), "ukui"),
        "lomiri": lambda: _backgrounds_candidates(LOMIRI_PACKAGES, "lomiri"),
        "gcompris": _gcompris_candidates,
        "tuxpaint": lambda: _tuxpaint_candidates(min_side),
        "tuxpaint_templates": _tuxpaint_template_candidates,
        "wesnoth": lambda: _wesnoth_candidates(min_side),
        "skimage": _skimage_candidates,
    }
    out: list[_Candidate] = []
    errors: list[str] = []
    for s in sources:
        try:
            out += makers[s]()
        except InputError as e:
            errors.append(f"{s}: {e}")
    if errors:
        raise InputError("photo sources missing:\n  " + "\n  ".join(errors))
    return out


def collect_photos(
    out_dir: Path, *, val_fraction: float = 0.15, seed: int = 0, max_side: int = 1024, min_side: int = 256,
    sources: tuple[str, ...] = SOURCES,
) -> PhotoSet:  # fmt: skip
    """Gather the license-clean images into ``out_dir/{train,val}/*.png`` plus ``out_dir/SOURCES.json``.

    An existing photo set in ``out_dir`` is replaced.

    Args:
        out_dir: destination folder (created if needed).
        val_fraction: expected fraction of photos held out for validation, see :func:`split_of`.
        seed: salt of the split hash; keep the default ``0`` so every user gets the same split.
        max_side: long-side limit of the written PNGs, in pixels.
        min_side: images whose written short side would be below this are left out (0 keeps all).
        sources: keys of :data:`SOURCES` to gather from.

    Returns:
        The written :class:`PhotoSet`.

    Raises:
        InputError: a source package is missing (the message gives the ``apt-get install`` / ``pip install``
            line), a bad argument, or ``out_dir`` holds unrelated files.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise InputError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if max_side < 64:
        raise InputError(f"max_side must be at least 64 pixels, got {max_side}")
    if not 0 <= min_side <= max_side:
        raise InputError(f"min_side must be in [0, max_side], got {min_side}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise InputError(f"unknown photo sources {unknown}; choose from {', '.join(SOURCES)}")
    t0 = time.perf_counter()
    candidates = _candidates(tuple(dict.fromkeys(sources)), min_side)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    records = []
    skipped: Counter[str] = Counter()
    hashes: dict[int, str] = {}
    seen_names: set[str] = set()
    for c in sorted(candidates, key=lambda c: c.name):
        if c.name in seen_names:
            skipped["same name"] += 1
            continue
        seen_names.add(c.name)
        if not _is_licence_ok(c.license):
            logger.warning("leaving out %s: licence %r is not in the redistributable list", c.origin, c.license)
            skipped["licence"] += 1
            continue
        rgb = _open_rgb(c, max_side)
        original = rgb.info["original_size"]
        size = _target_size(original, max_side)
        if min(size) < min_side:
            skipped["small"] += 1
            continue
        h = _gradient_hash(rgb)
        dup = next((n for k, n in hashes.items() if (k ^ h).bit_count() <= DUPLICATE_HAMMING), None)
        if dup is not None:
            logger.debug("leaving out %s: near-duplicate of %s", c.name, dup)
            skipped["duplicate"] += 1
            continue
        hashes[h] = c.name
        split = split_of(c.name, val_fraction=val_fraction, seed=seed)
        rel = f"{split}/{c.name}.png"
        _convert(rgb, out_dir / rel, size)
        records.append(
            PhotoRecord(
                file=rel, origin=c.origin, package=c.package, license=c.license,
                upstream_license=c.upstream_license, copyright=c.copyright, split=split,
                original_size=original, size=size, source=c.source, kind=c.kind,
            )
        )  # fmt: skip
    photo_set = PhotoSet(root=out_dir, records=tuple(records), val_fraction=val_fraction, seed=seed)
    _write_sources(photo_set, max_side, min_side, dict(skipped))
    logger.info(
        "collected %d photos (%d train, %d val) into %s in %.1f s; left out: %s",
        len(records), len(photo_set.train), len(photo_set.val), out_dir, time.perf_counter() - t0, dict(skipped),
    )  # fmt: skip
    return photo_set


def counts(records: tuple[PhotoRecord, ...] | list[PhotoRecord]) -> dict[str, dict[str, int]]:
    """``{"source": {src: {split: n}}, "kind": ..., "license": ...}`` counts of a set's records."""
    out: dict[str, dict] = {}
    for field_ in ("source", "kind", "license"):
        table: dict[str, dict[str, int]] = {}
        for r in records:
            row = table.setdefault(getattr(r, field_) or "?", {"train": 0, "val": 0})
            row[r.split] += 1
        out[field_] = dict(sorted(table.items()))
    return out


def _write_sources(photo_set: PhotoSet, max_side: int, min_side: int, skipped: dict[str, int]) -> None:
    doc = {
        "version": 2,
        "split_rule": "val iff int(sha256(f'{seed}:{name}')) / 2**256 < val_fraction; never train on val",
        "val_fraction": photo_set.val_fraction,
        "seed": photo_set.seed,
        "max_side": max_side,
        "min_side": min_side,
        "resize": "PIL LANCZOS, RGB, PNG",
        "dedup": f"64-bit gradient hash of a 9x8 grey thumbnail, <= {DUPLICATE_HAMMING} differing bits = duplicate",
        "left_out": skipped,
        "counts": counts(photo_set.records),
        "photos": [asdict(r) for r in photo_set.records],
    }
    fileio.write_text(photo_set.root / "SOURCES.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


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
    parser.add_argument("--min-side", type=int, default=256, help="leave out images with a shorter short side")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ps = collect_photos(args.out_dir, val_fraction=args.val_fraction, seed=args.seed, max_side=args.max_side,
                            min_side=args.min_side, sources=tuple(args.sources))  # fmt: skip
    except InputError as e:
        logger.error("%s", e)
        return 2
    logger.info("train: %d photos, val: %d photos", len(ps.train), len(ps.val))
    for field_, table in counts(ps.records).items():
        for key, row in table.items():
            logger.info("  %-8s %-40s train %4d  val %3d", field_, key, row["train"], row["val"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
