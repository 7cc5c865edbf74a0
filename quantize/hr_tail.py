"""A component's held-out outputs through the rest of the fp32 reference chain, to the image its HR budget judges
(:func:`sr_tail`), reusing the captured reference image where a patch's codes are the reference's."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tadsr.errors import ConfigError
from tadsr.formats.graphs import make_graph
from tadsr.pipeline import Models
from tadsr.quantize.calibration import CalibrationSet

__all__ = ["HR_TAIL_BATCH", "REUSE_ATOL", "sr_tail"]

logger = logging.getLogger(__name__)

REUSE_ATOL = 1e-4  # a decode of the same codes vs the captured image: float summation order only
HR_TAIL_BATCH = 1  # held-out patches per call of the fp32 chain's tail (batching only slows the autoencoder)


def sr_tail(models: Models, graph: str, hold: CalibrationSet, tile: int,
            ) -> Callable[[Sequence[Mapping[str, np.ndarray]]], list[dict[str, np.ndarray]]]:  # fmt: skip
    """``held-out outputs of graph -> [{"sr": image}]``: a component's outputs through the rest of the fp32
    reference chain on the same held-out patches (the encoder's ``z_y`` plus the patch's noise through the denoiser
    and the decoder, the denoiser's ``x0`` through the decoder); the SR graphs' outputs as they are."""
    if graph in ("pipeline", "decoder"):
        return lambda outs: [{"sr": o["sr"]} for o in outs]
    if graph not in ("encoder", "denoiser"):
        raise ConfigError(f"no HR budget for graph {graph!r}")
    pipe, _ = make_graph(models, "pipeline", tile)
    runs = hold.runs
    dec = pipe.decoder
    rows = dec.quantize.search_rows(dec.chunk)  # cache-sized blocks of the codebook search: the same codes, faster
    reuse = _ReferenceImages(runs, lambda x0: dec.quantize.indices(x0, rows))

    @torch.no_grad()
    def tail(outs: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        srs = []
        for a in range(0, len(outs), HR_TAIL_BATCH):
            b = min(a + HR_TAIL_BATCH, len(outs))
            if graph == "encoder":
                z_y = torch.from_numpy(np.concatenate([o["z_y"] for o in outs[a:b]]))
                x_t = z_y + pipe.noise_scale * torch.from_numpy(runs.noise[a:b])
                x0 = pipe.denoiser(x_t, torch.from_numpy(runs.lr[a:b]))
            else:
                x0 = torch.from_numpy(np.concatenate([o["x0"] for o in outs[a:b]]))
            idx = dec.quantize.indices(x0, rows)
            for k in range(b - a):
                sr = reuse.get(a + k, idx[k : k + 1], dec.from_codes)
                srs.append(sr if sr is not None else dec.from_codes(idx[k : k + 1]).numpy())
        return [{"sr": sr} for sr in srs]

    tail.reference_images = reuse  # type: ignore[attr-defined]  # what it reused (tests, logs)
    return tail


class _ReferenceImages:
    """The captured reference images of held-out patches, for a tail whose codes are the reference's own.

    The decoder's input is the codebook rows its codes pick, so a patch whose codes equal the reference run's
    decodes to the reference image the capture already holds (``runs.sr``): the fp32 parent's outputs almost always
    do, and the HR baseline then costs no decoder run. Checked once per tail: the first patch that qualifies is
    decoded as well and must reproduce the captured image (to :data:`REUSE_ATOL`, float summation order); if it does
    not (another decoder, e.g. a capture made with the other autoencoder), nothing is reused.
    """

    def __init__(self, runs: Any, codes_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.runs, self.codes_of = runs, codes_of
        self.codes: dict[int, torch.Tensor] = {}
        self.verified: bool | None = None if runs.sr.size else False
        self.reused = 0

    def get(self, i: int, codes: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray | None:
        """Patch ``i``'s captured image when ``codes`` are the reference's (and the check holds); else None."""
        if self.verified is False or i >= len(self.runs.x0):
            return None
        if i not in self.codes:
            self.codes[i] = self.codes_of(torch.from_numpy(np.ascontiguousarray(self.runs.x0[i : i + 1])))
        if not torch.equal(codes, self.codes[i]):
            return None
        ref = self.runs.sr[i : i + 1]
        if self.verified is None:
            own = decode(codes).numpy()
            self.verified = own.shape == ref.shape and bool(np.abs(own - ref).max() <= REUSE_ATOL)
            if not self.verified:
                logger.info("the HR tail's decoder does not reproduce the captured reference image (max abs %.3g); "
                            "decoding every patch", float(np.abs(own - ref).max()) if own.shape == ref.shape
                            else float("inf"))  # fmt: skip
            return own
        self.reused += 1
        return ref.copy()
