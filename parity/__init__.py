"""tadsr.parity: is an exported or quantized file still the model? Verdicts, hops, VQ judge, diagnosis.

The public names below are imported lazily (the verdict code pulls torch and the format slices).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "check_parity": "tadsr.parity.check",
    "ParityOptions": "tadsr.parity.check",
    "ParityResult": "tadsr.parity.check",
    "ReferenceSpec": "tadsr.parity.check",
    "write_report": "tadsr.parity.check",
    "render_markdown": "tadsr.parity.check",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
