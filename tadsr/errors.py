"""Exception hierarchy of tadsr-mobile, and the exit codes of the ``tadsr`` command.

Every user-facing failure derives from :class:`TadsrError`; its message says what happened and what to do.
The CLI prints that one line and exits with the error's :attr:`TadsrError.exit_code`:

- ``EXIT_BAD_INPUT`` (2): bad input or environment (files, folders, checkpoints, flags, missing backends).
- ``EXIT_VERDICT`` (1): a verdict failed (parity below its floor, an image of a folder run failed).
- ``EXIT_INTERNAL`` (3): anything else is a bug: the traceback goes to a log file, the console gets one line.
"""

from __future__ import annotations

from collections.abc import Sequence


EXIT_OK = 0
EXIT_VERDICT = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class TadsrError(Exception):
    """Base class for all expected, user-facing errors (exit status :attr:`exit_code`, 2 unless overridden)."""

    exit_code: int = EXIT_BAD_INPUT


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

    exit_code = EXIT_VERDICT

    def __init__(self, message: str, *, hop: str = "", stats: dict | None = None) -> None:
        super().__init__(message)
        self.hop = hop
        self.stats = dict(stats or {})


class BackendUnavailableError(TadsrError):
    """A runtime backend cannot run here (e.g. Core ML on Linux)."""


class ModelOutputError(TadsrError, ValueError):
    """A model (or a tile function) returned an output of the wrong shape or with invalid values."""


class NonFiniteOutputError(ModelOutputError):
    """A model produced NaN or infinite values (broken or overflowing weights); nothing is written."""


class RunnerError(TadsrError, RuntimeError):
    """A runtime backend returned something other than what the artifact's manifest declares."""
