"""Training data: HR photos, their MATLAB-bicubic x4 LR images, aligned random crops, cached latent crops.

Degradation (DIV2K's "bicubic x4" convention): the HR photo is cropped to a multiple of 4 ("modcrop"), then
``LR = round(clip(imresize(HR, 1/4)))`` with :func:`tadsr.imresize.imresize` (MATLAB bicubic with
antialiasing), stored as uint8 like DIV2K's LR PNGs. Training crops are *aligned* pairs: HR ``[4i:4i+S]``,
LR ``[i:i+S/4]``, with one of the 8 flips/rotations applied to both (the MATLAB kernel is symmetric, so this
commutes with the degradation).

Sources accepted by :func:`load_pairs`:

* a photo set folder written by :mod:`tadsr.train.photos` (``SOURCES.json`` + ``train/`` + ``val/``);
* a folder with ``train/`` and ``val/`` sub-folders of images (no ``SOURCES.json``: tests, other data);
* a ``.npz`` pack written by :func:`pack_photos` (``train/<name>`` and ``val/<name>`` uint8 HWC arrays);
* a plain folder of images (no ``train/`` or ``val/``): held-out images, e.g. ``tadsr/data/bench``; they are its
  ``val`` split and it has no ``train`` split.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from tadsr.errors import InputError
from tadsr.imresize import imresize
from tadsr.models.ops import bicubic_x4_reference
from tadsr.models.vqgan import VQModelTorch

__all__ = [
    "PhotoPairs",
    "load_pairs",
    "pack_photos",
    "degrade_x4",
    "sample_crops",
    "grid_crops",
    "to_unit",
    "LatentPool",
    "build_latent_pool",
]

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
SCALE = 4
_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class PhotoPairs:
    """HR photos (uint8 HWC, sides multiples of 4) with their x4 LR images (uint8 HWC)."""

    names: tuple[str, ...]
    hr: tuple[np.ndarray, ...]
    lr: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def pixels(self) -> int:
        return int(sum(h.shape[0] * h.shape[1] for h in self.hr))


def degrade_x4(hr: np.ndarray) -> np.ndarray:
    """uint8 HWC HR (sides multiples of 4) -> uint8 LR = round(clip(MATLAB imresize(HR, 1/4), 0, 255))."""
    lr = imresize(hr.astype(np.float64), 1.0 / SCALE)
    return np.clip(np.round(lr), 0, 255).astype(np.uint8)


def _modcrop(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[: h - h % SCALE, : w - w % SCALE, :3])


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)


def _images_of(source: Path, split: Split) -> list[tuple[str, np.ndarray]]:
    if source.suffix == ".npz":
        with np.load(source) as z:
            keys = sorted(k for k in z.files if k.startswith(f"{split}/"))
            return [(k.split("/", 1)[1], z[k]) for k in keys]
    if (source / "SOURCES.json").is_file():
        from tadsr.train.photos import load_photo_set

        ps = load_photo_set(source)
        paths = ps.train if split == "train" else ps.val
    else:
        sub = source / split
        if not source.is_dir():
            raise InputError(f"{source} is not a photo set: pass a folder or a .npz pack "
                             "(python -m tadsr.train.photos DIR)")  # fmt: skip
        plain = not (source / "train").is_dir() and not (source / "val").is_dir() and _image_files(source)
        if plain and split == "val":
            sub = source
        elif plain:
            raise InputError(f"{source} is a plain image folder: its images are held out (val), never trained on; "
                             "pass a photo set (python -m tadsr.train.photos DIR) to train")  # fmt: skip
        elif not sub.is_dir():
            raise InputError(f"{source} has no {split}/ folder; pass a photo set (python -m tadsr.train.photos DIR)")
        paths = _image_files(sub)
    return [(p.stem, _read_rgb(p)) for p in paths]


def load_pairs(source: Path, split: Split, *, min_side: int = 0) -> PhotoPairs:
    """Load one split of a photo source and make its LR images.

    Args:
        source: photo set folder, folder with train/ and val/, .npz pack, or a plain image folder (its images are
            ``val``; see module docstring).
        split: ``"train"`` or ``"val"``; never train on ``"val"``.
        min_side: drop photos whose shorter HR side is below this (they cannot hold a crop).

    Raises:
        InputError: the source is missing or holds no usable photo for this split.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"photo source {source} does not exist; create it with python -m tadsr.train.photos DIR")
    t0 = time.perf_counter()
    names, hrs, lrs = [], [], []
    for name, img in _images_of(source, split):
        hr = _modcrop(img)
        if min(hr.shape[:2]) < max(min_side, SCALE):
            log.warning("skipping %s/%s: %s is smaller than %d px", split, name, hr.shape[:2], min_side)
            continue
        names.append(name)
        hrs.append(hr)
        lrs.append(degrade_x4(hr))
    if not names:
        raise InputError(f"no {split} photos of at least {min_side} px in {source}")
    pairs = PhotoPairs(tuple(names), tuple(hrs), tuple(lrs))
    log.info("%s: %d %s photos, %.1f Mpx, LR made in %.1f s", source, len(pairs), split, pairs.pixels / 1e6,
             time.perf_counter() - t0)  # fmt: skip
    return pairs


def pack_photos(source: Path, out: Path) -> Path:
    """Write both splits of a photo source as one compressed ``.npz`` (uint8 HWC; plus SOURCES.json text).

    Used to carry the training photos to another machine in one compact file.
    """
    source, out = Path(source), Path(out)
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        for name, img in _images_of(source, split):  # type: ignore[arg-type]
            arrays[f"{split}/{name}"] = _modcrop(img)
    sources = source / "SOURCES.json"
    if sources.is_file():
        arrays["meta/SOURCES.json"] = np.frombuffer(sources.read_bytes(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    out.write_bytes(buf.getvalue())
    log.info("packed %d photos into %s (%.1f MB)", len(arrays) - ("meta/SOURCES.json" in arrays), out,
             out.stat().st_size / 1e6)  # fmt: skip
    return out


def sources_json(source: Path) -> list[dict]:
    """The photo records (file, licence, ...) of a photo set folder or pack; ``[]`` when unknown."""
    source = Path(source)
    if source.suffix == ".npz":
        with np.load(source) as z:
            if "meta/SOURCES.json" not in z.files:
                return []
            doc = json.loads(z["meta/SOURCES.json"].tobytes().decode())
    elif (source / "SOURCES.json").is_file():
        doc = json.loads((source / "SOURCES.json").read_text())
    else:
        return []
    return list(doc.get("photos", []))


def _dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of an HWC array (k in 0..7)."""
    if k & 4:
        img = img.transpose(1, 0, 2)
    if k & 2:
        img = img[::-1]
    if k & 1:
        img = img[:, ::-1]
    return img


def sample_crops(
    pairs: PhotoPairs, rng: np.random.Generator, n: int, hr_size: int, *, augment: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random aligned crops.

    Args:
        pairs: the photos.
        rng: numpy generator (drawn: image, position, transform per crop).
        n: number of crops.
        hr_size: HR crop side (multiple of 4); LR side is ``hr_size // 4``.
        augment: apply a random flip/rotation (one of 8) to each pair.

    Returns:
        ``(hr, lr)`` uint8 arrays (n, 3, S, S) and (n, 3, S/4, S/4). Photos are drawn with probability
        proportional to their number of crop positions.
    """
    if hr_size % SCALE:
        raise InputError(f"crop size {hr_size} must be a multiple of {SCALE}")
    s = hr_size // SCALE
    fits = [i for i, lr in enumerate(pairs.lr) if min(lr.shape[:2]) >= s]
    if not fits:
        raise InputError(f"no photo is large enough for {hr_size}x{hr_size} crops")
    weights = np.array([(pairs.lr[i].shape[0] - s + 1) * (pairs.lr[i].shape[1] - s + 1) for i in fits], float)
    hr_out = np.empty((n, 3, hr_size, hr_size), np.uint8)
    lr_out = np.empty((n, 3, s, s), np.uint8)
    for j in range(n):
        i = fits[rng.choice(len(fits), p=weights / weights.sum())]
        lr_img, hr_img = pairs.lr[i], pairs.hr[i]
        y = int(rng.integers(0, lr_img.shape[0] - s + 1))
        x = int(rng.integers(0, lr_img.shape[1] - s + 1))
        k = int(rng.integers(0, 8)) if augment else 0
        lr_out[j] = _dihedral(lr_img[y : y + s, x : x + s], k).transpose(2, 0, 1)
        hr_out[j] = _dihedral(hr_img[SCALE * y : SCALE * (y + s), SCALE * x : SCALE * (x + s)], k).transpose(2, 0, 1)
    return hr_out, lr_out


def grid_crops(
    pairs: PhotoPairs, hr_size: int, max_per_image: int = 8, *, max_crops: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Deterministic non-overlapping aligned crops (a centred grid, at most ``max_per_image`` per photo; at most
    ``max_crops`` in all, spread evenly over the list).

    Returns:
        ``(hr, lr, labels)``: uint8 (n, 3, S, S), uint8 (n, 3, S/4, S/4) and ``"name@y,x"`` labels.
    """
    s = hr_size // SCALE
    hrs, lrs, labels = [], [], []
    for name, hr, lr in zip(pairs.names, pairs.hr, pairs.lr):
        ny, nx = lr.shape[0] // s, lr.shape[1] // s
        oy, ox = (lr.shape[0] - ny * s) // 2, (lr.shape[1] - nx * s) // 2
        cells = [(a, b) for a in range(ny) for b in range(nx)]
        if len(cells) > max_per_image:  # spread the kept cells evenly over the grid
            keep = np.linspace(0, len(cells) - 1, max_per_image).round().astype(int)
            cells = [cells[k] for k in keep]
        for a, b in cells:
            y, x = oy + a * s, ox + b * s
            lrs.append(lr[y : y + s, x : x + s].transpose(2, 0, 1))
            hrs.append(hr[SCALE * y : SCALE * (y + s), SCALE * x : SCALE * (x + s)].transpose(2, 0, 1))
            labels.append(f"{name}@{SCALE * y},{SCALE * x}")
    if not hrs:
        raise InputError(f"no photo is large enough for {hr_size}x{hr_size} validation crops")
    if max_crops is not None and len(hrs) > max_crops:
        keep = np.linspace(0, len(hrs) - 1, max_crops).round().astype(int)
        hrs, lrs, labels = [hrs[i] for i in keep], [lrs[i] for i in keep], [labels[i] for i in keep]
    return np.stack(hrs), np.stack(lrs), labels


def to_unit(x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 array/tensor -> float32 tensor in [-1, 1] on ``device``."""
    t = torch.as_tensor(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device=device, dtype=torch.float32) / 127.5 - 1.0


@dataclass
class LatentPool:
    """Cached latent crops for the diffusion stages (one shard per process under DDP).

    Attributes:
        z0: (N, C, h, w) HR latents ``encode(HR)``.
        zy: (N, C, h, w) LR latents ``encode(bicubic_x4(LR))``.
        lq: (N, 3, h, w) LR crops in [-1, 1] (the UNet's condition).
    """

    z0: torch.Tensor
    zy: torch.Tensor
    lq: torch.Tensor

    def __len__(self) -> int:
        return int(self.z0.shape[0])

    def to(self, device: torch.device | str) -> LatentPool:
        return LatentPool(self.z0.to(device), self.zy.to(device), self.lq.to(device))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = idx.to(self.z0.device)
        return self.z0[idx], self.zy[idx], self.lq[idx]

    def stats(self) -> dict[str, float]:
        return {
            "z0_mean": float(self.z0.mean()),
            "z0_std": float(self.z0.std()),
            "residual_std": float((self.zy - self.z0).std()),
        }


@torch.no_grad()
def build_latent_pool(
    ae: VQModelTorch,
    pairs: PhotoPairs,
    n: int,
    *,
    seed: int,
    hr_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    batch: int = 32,
) -> LatentPool:
    """Encode ``n`` random aligned crops (the same crops for any world size; this rank keeps ``rank::world``).

    The crops use their own generator (``seed``), so the pool does not depend on the training steps.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 7919])
    hr, lr = sample_crops(pairs, rng, n, hr_size)
    hr, lr = hr[rank::world], lr[rank::world]
    ae.eval()
    z0s, zys, lqs = [], [], []
    for i in range(0, len(hr), batch):
        x = to_unit(hr[i : i + batch], device)
        y = to_unit(lr[i : i + batch], device)
        z0s.append(ae.encode(x).float())
        zys.append(ae.encode(bicubic_x4_reference(y)).float())
        lqs.append(y)
    pool = LatentPool(torch.cat(z0s), torch.cat(zys), torch.cat(lqs))
    log.info("latent pool: %d crops (of %d) encoded in %.1f s; %s", len(pool), n, time.perf_counter() - t0,
             {k: round(v, 4) for k, v in pool.stats().items()})  # fmt: skip
    return pool
