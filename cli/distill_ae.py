"""``tadsr distill-ae``: distil a light conv-only encoder/decoder from a VQ-f4 autoencoder (``tadsr.train.distill_ae``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_distill_ae_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tadsr distill-ae`` (same arguments as ``python -m tadsr.train.distill_ae``)."""
    from tadsr.train import distill_ae

    p = subparsers.add_parser(
        "distill-ae",
        help="distil a light conv-only encoder/decoder from a VQ-f4 autoencoder (CPU by default, resumable)",
        description=(distill_ae.__doc__ or "").splitlines()[0],
    )
    distill_ae.build_parser(p)
    p.set_defaults(func=distill_ae.run)
    return p
