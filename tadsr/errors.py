"""Exception hierarchy of tadsr-mobile.

Every error raised on bad user input derives from :class:`TadsrError`, so the CLI can print the message
and exit with status 2 (usage / input error) instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class TadsrError(Exception):
    """Base class for all expected, user-facing errors."""


class ConfigError(TadsrError, ValueError):
    """An invalid configuration value or an unknown preset."""


class CheckpointError(TadsrError):
    """A checkpoint that cannot be read or does not fit the model.

    Attributes:
        missing: keys the model expects but the checkpoint lacks.
        unexpected: keys in the checkpoint the model does not have.
        mismatched: ``(key, checkpoint_shape, model_shape)`` triples.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class InputError(TadsrError, ValueError):
    """Bad user input: not an image, wrong size, empty folder, unwritable output..."""


class InputSpecError(InputError):
    """Inputs that do not match a graph's declared spec (names, shapes, dtypes)."""


class ExportError(TadsrError):
    """An export step failed."""


class ParityError(TadsrError):
    """An exported or quantized file does not compute what the reference computes.

    Attributes:
        hop: name of the failing parity hop (e.g. ``"torch->onnx"``).
        stats: the measured error statistics (a dict of numbers).
    """

    def __init__(self, message: str, *, hop: str = "", stats: dict | None = None) -> None:
        super().__init__(message)
        self.hop = hop
        self.stats = dict(stats or {})


class BackendUnavailableError(TadsrError):
    """A runtime backend cannot run here (e.g. Core ML on Linux)."""
