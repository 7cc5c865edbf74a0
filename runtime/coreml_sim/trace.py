"""A caller-owned record of the op types a simulated program executed (test coverage, debugging)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OpTrace"]


@dataclass
class OpTrace:
    """Op types executed by the programs it is passed to (``load_mlpackage(..., trace=trace)``).

    The simulator keeps no record of its own: bookkeeping happens only where a caller passes a trace.

    Attributes:
        counts: op type -> how many times it ran (constexpr ops decompressed at load count once per load).
    """

    counts: dict[str, int] = field(default_factory=dict)

    def record(self, op_type: str) -> None:
        """Count one execution of ``op_type``."""
        self.counts[op_type] = self.counts.get(op_type, 0) + 1

    @property
    def op_types(self) -> set[str]:
        """The op types executed at least once."""
        return set(self.counts)

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.counts.clear()
