"""The one list of phone formats: ``get_format(name)`` -> :class:`~tadsr.formats.spec.FormatSpec`.

Export, quantize, parity, bench and the CLI reach a format only through this registry. Importing it imports
the slices' ``__init__`` (a ``FormatSpec`` each) and no toolchain.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tadsr.errors import ConfigError
from tadsr.formats.coreml import SPEC as COREML
from tadsr.formats.executorch import SPEC as EXECUTORCH
from tadsr.formats.onnx import SPEC as ONNX
from tadsr.formats.spec import FormatSpec

__all__ = ["FORMAT_NAMES", "all_formats", "get_format"]

_SPECS: Mapping[str, FormatSpec] = MappingProxyType({s.name: s for s in (ONNX, EXECUTORCH, COREML)})
FORMAT_NAMES: tuple[str, ...] = tuple(_SPECS)


def all_formats() -> tuple[FormatSpec, ...]:
    """Every registered format, in :data:`FORMAT_NAMES` order."""
    return tuple(_SPECS.values())


def get_format(name: str) -> FormatSpec:
    """The :class:`FormatSpec` of format ``name``.

    Raises:
        ConfigError: an unknown name (the known ones are listed).
    """
    spec = _SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown format {name!r}; choose from {', '.join(_SPECS)}")
    return spec
