"""Flip-aware parity for outputs that pass through the VQ codebook lookup (decoder, fused pipeline).

The codebook search is a discrete choice: a latent within rounding of a tie between two codes may pick the
other code in another runtime, which moves a 4x4 patch of output pixels (tens of dB on a 64 px tile)
although nothing is wrong. A real codebook (8,192 codes in 3 dimensions) is dense, so such near-ties are
common; judging the image against the reference as is would refuse correct exports at random.

For one case of one hop, with the two sides' pre-quantisation latents ``z`` and chosen codes ``c`` (reference
side ``r``, tested side ``o``), :meth:`VQJudge.analyse`:

1. finds the flipped positions ``p`` (``c_o[p] = b != a = c_r[p]``);
2. classifies each: its *gap* ``g = |z_r - e_b|^2 - |z_r - e_a|^2`` (how much farther the tested side's code
   is from the reference latent than the reference's own) is a *near-tie* when the latent error at that hop
   can reorder the two codes: ``g <= 2 |z_o - z_r| |e_a - e_b|`` (Cauchy-Schwarz on the change of the distance
   difference) plus the rounding of the distance arithmetic at the hop's precision
   (``rounding_rel * (|z_r| + |e_a|)^2``, from the floors table). Where the tested side does not expose its
   latent, its error is bounded by the latent floor of the hop's precision (``latent_budget``);
3. judges the image *like with like*: the tested image against the reference decoder run on the tested side's
   codes, by the image floor; flips must all be near-ties and within the floor's flip budget
   (``max_fraction`` of the positions), and (fused graphs) the two latents must agree within the latent floor.

Where the tested side exposes no codes (a fused ExecuTorch or Core ML program, or an ONNX graph whose lookup
cannot be tapped), the codes are *recovered from its image*: among the near-tie alternatives of the
reference codes (bounded by the latent budget, so only genuine near-ties are candidates), the ones whose
4x4 output block the tested image matches better are taken, and the result is verified by decoding them. The
verdict can therefore only pass when the tested image *is* the reference decoder's output for a code map that
differs from the reference only at near-ties; a perturbed weight, a wrong schedule constant or a non-near-tie
flip cannot be reproduced that way and fails.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tadsr.metrics import db_from_json, error_stats

__all__ = ["FlipBudget", "CaseFlips", "VQView", "VQJudge", "VQCompare", "nearest_codes", "code_gaps", "torch_decoder"]

logger = logging.getLogger(__name__)

_CHUNK = 1024  # positions per distance table chunk (1024 x 8192 float64 = 64 MB)
_MAX_GAPS = 256  # gaps listed per case in reports
_BLOB = 5  # blocks per side of the error window that ranks single-flip candidates
_ONE_BY_ONE = 8  # most single-flip decodes when recovering codes from an image (a decode is ~7 s at official size)


@dataclass(frozen=True)
class FlipBudget:
    """VQ code flips allowed for one image output at one precision (``numerics.json``, ``flips`` of the output).

    Attributes:
        max_fraction: flipped positions / latent positions per case (near-ties only; a non-near-tie fails).
        rounding_rel: rounding of the distance arithmetic, relative to ``(|z| + |e|)^2``.
        why: the reason for the numbers.
    """

    max_fraction: float
    rounding_rel: float
    why: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlipBudget:
        return cls(float(d.get("max_fraction", 0.0)), float(d.get("rounding_rel", 1e-6)), str(d.get("why", "")))


@dataclass
class VQView:
    """One side of a hop at the VQ lookup, per case: pre-quantisation latent and chosen codes (None: not exposed).

    Attributes:
        latents: ``(1, C, h, w)`` float32 per case, or None.
        codes: ``(1, h, w)`` int64 per case, or None.
        source: how they were obtained (for the report).
    """

    latents: list[np.ndarray | None]
    codes: list[np.ndarray | None]
    source: str

    @classmethod
    def unexposed(cls, n: int, why: str) -> VQView:
        return cls([None] * n, [None] * n, why)


@dataclass
class CaseFlips:
    """The flip analysis of one case (one tile) of one hop."""

    case: str
    positions: int
    flipped: int
    near_tie: int
    max_gap: float
    gaps: list[float]
    codes_from: str
    same_codes_psnr: float | None
    latent_psnr: float | None
    passed: bool
    note: str = ""
    psnr: float | None = None
    codes: np.ndarray | None = field(default=None, repr=False, compare=False)  # the tested side's, not serialised

    @property
    def not_near_tie(self) -> int:
        return self.flipped - self.near_tie

    def line(self) -> str:
        s = f"{self.case}: {self.near_tie} near-tie flips of {self.positions} positions, max gap {self.max_gap:.3g}"
        if self.not_near_tie:
            s += f", {self.not_near_tie} flip(s) NOT near-ties"
        if self.same_codes_psnr is not None:
            p = "inf" if math.isinf(self.same_codes_psnr) else f"{self.same_codes_psnr:.1f}"
            s += f"; vs the reference decoded with the same codes: {p} dB"
        if self.latent_psnr is not None:
            s += f"; latents agree to {'inf' if math.isinf(self.latent_psnr) else f'{self.latent_psnr:.1f}'} dB"
        if self.note:
            s += f" ({self.note})"
        return s

    def to_dict(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            if x is None:
                return None
            return 999.0 if math.isinf(x) else float(f"{x:.5g}")

        return {"case": self.case, "positions": self.positions, "flipped": self.flipped, "near_tie": self.near_tie,
                "not_near_tie": self.not_near_tie, "max_gap": float(f"{self.max_gap:.4g}"),
                "gaps": [float(f"{g:.3g}") for g in self.gaps[:_MAX_GAPS]], "codes_from": self.codes_from,
                "psnr": num(self.psnr), "same_codes_psnr": num(self.same_codes_psnr),
                "latent_psnr": num(self.latent_psnr),
                "passed": self.passed, "note": self.note}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseFlips:
        """A case read back from a manifest or report (:meth:`to_dict`; the gaps kept there, 999 dB = identical)."""
        def num(x: float | None) -> float | None:
            return None if x is None else db_from_json(x)

        return cls(str(d["case"]), int(d["positions"]), int(d["flipped"]), int(d["near_tie"]), float(d["max_gap"]),
                   [float(g) for g in d.get("gaps") or []], str(d.get("codes_from", "")), num(d.get("same_codes_psnr")),
                   num(d.get("latent_psnr")), bool(d["passed"]), str(d.get("note", "")), num(d.get("psnr")))  # fmt: skip


def _rows(z: np.ndarray) -> np.ndarray:
    """(1, C, h, w) -> (h w, C) float64."""
    z = np.asarray(z, np.float64)
    return z.reshape(z.shape[-3], -1).T


def nearest_codes(codebook: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Nearest code of every position of ``z (1, C, h, w)`` (float64 distances), shape ``(1, h, w)``."""
    e = np.asarray(codebook, np.float64)
    zr = _rows(z)
    out = np.empty(len(zr), np.int64)
    e2 = (e * e).sum(1)
    for s in range(0, len(zr), _CHUNK):
        p = zr[s : s + _CHUNK]
        out[s : s + _CHUNK] = ((p * p).sum(1, keepdims=True) + e2 - 2 * p @ e.T).argmin(1)
    return out.reshape(1, *np.asarray(z).shape[-2:])


def code_gaps(codebook: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|z - e_b|^2 - |z - e_a|^2`` per position (float64, flat), for code maps ``a`` and ``b``."""
    e = np.asarray(codebook, np.float64)
    zr = _rows(z)
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    return ((zr - e[b]) ** 2).sum(1) - ((zr - e[a]) ** 2).sum(1)


@dataclass
class VQCompare:
    """What :func:`tadsr.parity.hops.compare` needs to judge VQ outputs flip-aware: the judge and both sides."""

    judge: VQJudge
    outputs: VQView
    references: VQView


@dataclass
class VQJudge:
    """Flip-aware verdict for the image outputs of a graph that ends in the VQ lookup.

    Attributes:
        codebook: ``(n_embed, C)``.
        decode: reference decoder from codes: ``(1, h, w)`` int64 -> ``(1, 3, s h, s w)`` float32 in [-1, 1].
        outputs: the image outputs judged this way (``("sr",)``).
        latent_floor: the latent floor of the hop's precision (fused graphs: the latents must agree within it).
        latent_budget: per-component latent error assumed where a side does not expose its latent (max abs);
            None: from the latent floor (its max abs, else 4x the RMS its PSNR allows on the case's range).
        latent_is_input: the latent is the graph's input (decoder graph): both sides quantise the same values.
        count_always: recover unexposed codes even when the image is within its floor as is (fp16 / INT8, where
            flips are many and budgeted); at fp32 an image within 80 dB has no flip to find.
    """

    codebook: np.ndarray
    decode: Callable[[np.ndarray], np.ndarray]
    outputs: tuple[str, ...] = ("sr",)
    latent_floor: Any = None
    latent_budget: float | None = None
    latent_is_input: bool = False
    count_always: bool = False

    # ---------------------------------------------------------------------------------------------- analysis

    def analyse(
        self, case: str, out_img: np.ndarray, ref_img: np.ndarray, z_o: np.ndarray | None, c_o: np.ndarray | None,
        z_r: np.ndarray, c_r: np.ndarray | None, floor: Any, budget: FlipBudget, codes_from: str,
    ) -> CaseFlips:  # fmt: skip
        """Flip analysis and verdict of one case (see the module docstring). ``floor`` is the image floor."""
        e = np.asarray(self.codebook, np.float64)
        a = nearest_codes(e, z_r) if c_r is None else np.asarray(c_r, np.int64).reshape(1, *z_r.shape[-2:])
        positions = int(a.size)
        zr = _rows(z_r)
        mag = (np.sqrt((zr * zr).sum(1)) + np.sqrt((e[a.reshape(-1)] ** 2).sum(1))) ** 2
        tol = budget.rounding_rel * mag
        lat_psnr = None
        lat_ok = True
        delta: np.ndarray | float
        if z_o is not None:  # measured (for a decoder: its input as the lookup sees it, e.g. cast to fp16)
            d = _rows(z_o) - zr
            delta = np.sqrt((d * d).sum(1))
            st = error_stats(np.asarray(z_o, np.float32), np.asarray(z_r, np.float32))
            lat_psnr = st.psnr
            if self.latent_floor is not None and not self.latent_is_input:
                lat_ok = self.latent_floor.accepts(st.max_abs, st.psnr)
        elif self.latent_is_input:
            delta = 0.0
        else:
            delta = self._budget(z_r) * math.sqrt(e.shape[1])
        raw = error_stats(out_img, ref_img, 2.0)
        note = ""
        if c_o is None:
            if floor.accepts(raw.max_abs, raw.psnr) and not self.count_always:
                b, note = a, "image within the floor as is: no flip searched"
            else:
                b, note = self._recover(out_img, ref_img, e, zr, a, delta, tol, floor)
                if (b != a).any():  # recovered codes count only where they explain the image better than none
                    st = error_stats(out_img, self.decode(b), 2.0)
                    if st.psnr <= raw.psnr or (floor.accepts(raw.max_abs, raw.psnr)
                                               and not floor.accepts(st.max_abs, st.psnr)):  # fmt: skip
                        b, note = a, f"{note}; no near-tie code map explains the image better than the reference's"
            codes_from = f"{codes_from}; codes recovered from the image among near-tie candidates"
        else:
            b = np.asarray(c_o, np.int64).reshape(a.shape)
        flip = np.nonzero(a.reshape(-1) != b.reshape(-1))[0]
        gaps = code_gaps(e, z_r, a, b)[flip]
        ea, eb = e[a.reshape(-1)[flip]], e[b.reshape(-1)[flip]]
        dlt = delta if np.isscalar(delta) else np.asarray(delta)[flip]
        bound = 2 * dlt * np.sqrt(((ea - eb) ** 2).sum(1)) + tol[flip]
        near = gaps <= bound
        same_psnr = None
        if flip.size:
            same = error_stats(out_img, self.decode(b), 2.0)
            same_psnr = same.psnr
            img_ok = floor.accepts(same.max_abs, same.psnr)
        else:
            img_ok = floor.accepts(raw.max_abs, raw.psnr)
        within = flip.size <= budget.max_fraction * positions
        passed = bool(img_ok and lat_ok and bool(near.all()) and within)
        if not passed:
            why = []
            if not lat_ok:
                why.append("the latents disagree beyond the latent floor")
            if not near.all():
                why.append(f"{int((~near).sum())} flip(s) beyond the latent error's reach")
            if not within:
                why.append(f"{flip.size} flips exceed the budget of {budget.max_fraction:g} of the positions")
            if not img_ok:
                why.append("the image differs from the reference decoded with the same codes" if flip.size
                           else "the image differs with no code flipped")  # fmt: skip
            note = "; ".join(x for x in (note, ", ".join(why)) if x)
        order = np.argsort(-gaps)
        return CaseFlips(case, positions, int(flip.size), int(near.sum()), float(gaps.max()) if flip.size else 0.0,
                         [float(g) for g in gaps[order]], codes_from, same_psnr, lat_psnr, passed, note,
                         raw.psnr, b.reshape(a.shape))  # fmt: skip

    def _budget(self, z_r: np.ndarray) -> float:
        if self.latent_budget is not None:
            return float(self.latent_budget)
        fl = self.latent_floor
        if fl is not None and fl.max_abs is not None:
            return float(fl.max_abs)
        if fl is not None and fl.psnr is not None:
            return 4.0 * float(np.ptp(z_r)) * 10 ** (-float(fl.psnr) / 20)
        return 0.0

    def _alternatives(self, e: np.ndarray, zr: np.ndarray, a: np.ndarray, delta: Any,
                      tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Positions with a near-tie alternative code, and the best such code, under the latent error ``delta``."""
        af = a.reshape(-1)
        e2 = (e * e).sum(1)
        pos, alt = [], []
        for s in range(0, len(zr), _CHUNK):
            p = zr[s : s + _CHUNK]
            d = (p * p).sum(1, keepdims=True) + e2 - 2 * p @ e.T
            ai = af[s : s + _CHUNK]
            rows = np.arange(len(p))
            gap = d - d[rows, ai][:, None]
            dl = delta if np.isscalar(delta) else np.asarray(delta)[s : s + _CHUNK, None]
            sep = np.sqrt(np.maximum(e2[ai][:, None] + e2[None, :] - 2 * e[ai] @ e.T, 0.0))
            ok = gap <= 2 * dl * sep + tol[s : s + _CHUNK, None]
            ok[rows, ai] = False
            gap = np.where(ok, gap, np.inf)
            k = gap.argmin(1)
            hit = np.isfinite(gap[rows, k])
            pos.append(np.nonzero(hit)[0] + s)
            alt.append(k[hit])
        return np.concatenate(pos), np.concatenate(alt)

    def _recover(self, out_img: np.ndarray, ref_img: np.ndarray, e: np.ndarray, zr: np.ndarray, a: np.ndarray,
                 delta: Any, tol: np.ndarray, floor: Any) -> tuple[np.ndarray, str]:  # fmt: skip
        """Codes for the tested image among the near-tie alternatives of ``a``, block by block, verified."""
        pos, alt = self._alternatives(e, zr, a, delta, tol)
        if pos.size == 0:
            return a, "no near-tie candidate"
        h, w = a.shape[-2:]
        s = out_img.shape[-1] // w

        def block_err(img: np.ndarray) -> np.ndarray:
            d = (np.asarray(out_img, np.float64) - np.asarray(img, np.float64)) ** 2
            d = d.sum(axis=(0, 1)).reshape(h, s, w, s).sum(axis=(1, 3)).reshape(-1)
            return d[pos]

        cur = a.reshape(-1).copy()
        cur_img = ref_img
        for _ in range(2):
            trial = cur.copy()
            trial[pos] = np.where(cur[pos] == a.reshape(-1)[pos], alt, a.reshape(-1)[pos])
            t_img = self.decode(trial.reshape(a.shape))
            take = block_err(t_img) < block_err(cur_img)
            if not take.any():
                break
            cur[pos[take]] = trial[pos[take]]
            cur_img = self.decode(cur.reshape(a.shape))
            st = error_stats(out_img, cur_img, 2.0)
            if floor.accepts(st.max_abs, st.psnr):
                break
        note = f"{pos.size} near-tie candidate position(s)"
        st = error_stats(out_img, cur_img, 2.0)
        if not floor.accepts(st.max_abs, st.psnr):
            if _sse(out_img, ref_img) <= _sse(out_img, cur_img):
                cur, cur_img = a.reshape(-1).copy(), ref_img  # the batch made it worse: start from the reference
            cur, n = self._one_by_one(out_img, cur, cur_img, pos, alt, a, floor)
            note += f"; {n} tried one by one where the image differs most"
        return cur.reshape(a.shape), note

    def _one_by_one(self, out_img: np.ndarray, cur: np.ndarray, cur_img: np.ndarray, pos: np.ndarray,
                    alt: np.ndarray, a: np.ndarray, floor: Any) -> tuple[np.ndarray, int]:  # fmt: skip
        """Toggle one candidate at a time, where the tested image differs most from the current decode (the centre
        of the largest error blob), keeping a toggle that brings the decode closer to the tested image; at most
        :data:`_ONE_BY_ONE` decodes.

        Trying every candidate at once fails where candidates are many (an unexposed latent at official size:
        hundreds of positions within the latent floor's reach) and the decoder spreads each flip over its
        neighbours' blocks, so a true flip's block does not improve while its neighbours are wrong.
        """
        af = a.reshape(-1)
        where = {int(p): i for i, p in enumerate(pos)}
        h, w = a.shape[-2:]

        def blob_err(img: np.ndarray) -> np.ndarray:
            """Block error summed over the 5x5 blocks around each candidate: the decoder spreads a flip's change
            over its neighbours, so the flip sits at the centre of the error blob, not always at its largest block."""
            d = ((np.asarray(out_img, np.float64) - np.asarray(img, np.float64)) ** 2).sum(axis=(0, 1))
            s = d.shape[-1] // w
            e = np.pad(d.reshape(h, s, w, s).sum(axis=(1, 3)), _BLOB // 2)
            c = np.pad(e.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            box = c[_BLOB:, _BLOB:] - c[:-_BLOB, _BLOB:] - c[_BLOB:, :-_BLOB] + c[:-_BLOB, :-_BLOB]
            return box.reshape(-1)[pos]

        err, tried = _sse(out_img, cur_img), set()
        for n in range(1, _ONE_BY_ONE + 1):
            order = pos[np.argsort(-blob_err(cur_img), kind="stable")]
            p = next((int(q) for q in order if int(q) not in tried), None)
            if p is None:
                return cur, n - 1
            tried.add(p)
            trial = cur.copy()
            trial[p] = alt[where[p]] if cur[p] == af[p] else af[p]
            t_img = self.decode(trial.reshape(a.shape))
            t_err = _sse(out_img, t_img)
            if t_err < err:
                cur, cur_img, err = trial, t_img, t_err
                st = error_stats(out_img, cur_img, 2.0)
                if floor.accepts(st.max_abs, st.psnr):
                    return cur, n
        return cur, _ONE_BY_ONE


def _sse(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of squared differences in float64."""
    return float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).sum())


# code maps whose decodes a judge keeps: an INT8 write judges its 16 held-out cases in two hops (against the fp32
# artifact, then the reference) with the same tested codes, so 16 would decode each map once; an image is 0.8 MB
# for a 64 px tile
DECODE_MEMO = 32


def torch_decoder(autoencoder: torch.nn.Module, memo: int = DECODE_MEMO) -> Callable[[np.ndarray], np.ndarray]:
    """The reference decoder from codes: embedding lookup, post_quant_conv (none in a light autoencoder), decoder,
    clamp to [-1, 1].

    The last ``memo`` code maps' images are kept (read-only) and returned when the same map is decoded again: one
    case's analysis decodes its final code map up to three times (the recovery's last step, the check that it
    explains the image better, the like-with-like verdict), and an INT8 write judges each held-out case in two hops
    (against the fp32 artifact and the reference) that recover the same maps. Each decode is a full decoder pass
    (~0.3 s a 64 px tile on one core at bundled size); with fewer than 16 kept, the second hop decoded all 16 again.
    """
    post = getattr(autoencoder, "post_quant_conv", None) or torch.nn.Identity()
    kept: dict[tuple[tuple[int, ...], bytes], np.ndarray] = {}

    @torch.no_grad()
    def run(codes: np.ndarray) -> np.ndarray:
        idx = torch.from_numpy(codes)
        zq = autoencoder.quantize.embedding(idx).permute(0, 3, 1, 2)
        return autoencoder.decoder(post(zq)).clamp(-1.0, 1.0).numpy().astype(np.float32)

    def decode(codes: np.ndarray) -> np.ndarray:
        c = np.ascontiguousarray(codes, np.int64)
        key = (c.shape, hashlib.blake2b(c.tobytes(), digest_size=16).digest())
        img = kept.pop(key, None)
        if img is None:
            img = run(c)
            img.flags.writeable = False
        kept[key] = img  # most recent last
        while len(kept) > memo:
            kept.pop(next(iter(kept)))
        return img

    return decode
