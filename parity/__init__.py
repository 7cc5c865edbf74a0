"""tadsr.parity: is an exported or quantized file still the model? Verdicts, hops, VQ judge, diagnosis.

The public names below are imported lazily (the verdict code pulls torch and the format slices).
"""

from __future__ import annotations

from tadsr.lazy import lazy_names

_LAZY = {
    "check_parity": "tadsr.parity.check",
    "ParityOptions": "tadsr.parity.check",
    "ParityResult": "tadsr.parity.check",
    "ReferenceSpec": "tadsr.parity.check",
    "write_report": "tadsr.parity.check",
    "render_markdown": "tadsr.parity.check",
    "TraceCache": "tadsr.parity.check",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
