"""torch's intra-op thread count, fixed for a block.

The float result of a convolution or matmul depends on how its work is split between threads, so a computation
whose result must be reproducible on one machine (the INT8 calibration captures and observer ranges: their
min / max set the quantization scales, and a near-tie in the VQ codebook can flip with the last bit) runs with a
fixed count. Measured (session 19, bundled model, 8 calibration patches): captures taken with 2 threads instead
of 1 differ by 2e-6 in the latents and by 0.056 in one HR output (a codebook flip), and the ONNX decoder
quantized again from its recipe got other scales, so a different file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["REPRODUCIBLE_THREADS", "fixed_threads"]

# the count the calibration runs use everywhere (tadsr all's format lanes run with one thread already)
REPRODUCIBLE_THREADS = 1


@contextlib.contextmanager
def fixed_threads(n: int = REPRODUCIBLE_THREADS) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block; the previous count is restored on exit."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
