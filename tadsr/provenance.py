"""The networks an artifact was exported from, rebuilt from its manifest (``preset`` + ``sources``).

``tadsr parity`` and ``tadsr quantize`` both need the exact weights an artifact came from; this module is the one
rule for finding them again. A source is a checkpoint path (its sha256 must still match), ``bundled:<file>`` (the
shipped weights of the preset, sha256 checked) or ``random-fill`` (the deterministic fill rule). An artifact made
with the light autoencoder records it as a third source, ``light_autoencoder``, and is rebuilt with it.

Importing this module loads no torch (the benchmark's memory probe child reads manifests with it).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any

from tadsr.config import Preset
from tadsr.errors import CheckpointError, InputError

__all__ = ["PARTS", "manifest_preset", "source_checkpoint", "models_from_manifest", "uses_light_autoencoder"]

PARTS = ("student", "autoencoder", "light_autoencoder")


def _flag(part: str) -> str:
    return "--" + part.replace("_", "-")


def manifest_preset(manifest: Mapping[str, Any]) -> Preset:
    """The preset recorded in ``manifest``.

    Raises:
        InputError: none recorded, or unreadable.
    """
    d = manifest.get("preset")
    if not isinstance(d, dict) or "name" not in d:
        raise InputError("the manifest records no preset; pass --preset NAME (and --student/--autoencoder)")
    try:
        return Preset.from_dict(d)
    except (TypeError, KeyError, ValueError) as e:
        raise InputError(f"the manifest's preset cannot be read ({e}); pass --preset NAME") from e


def uses_light_autoencoder(manifest: Mapping[str, Any]) -> bool:
    """Whether the artifact was exported with the light autoencoder (``sources.light_autoencoder``)."""
    return bool((manifest.get("sources") or {}).get("light_autoencoder"))


def source_checkpoint(part: str, src: Any, preset: Preset, flags: Container[str] = PARTS) -> tuple[Path | None, bool]:
    """(checkpoint path or None, needs the random fill) for one network's recorded source, sha256 checked.

    ``flags``: the parts the caller's command lets the user pass again (``--student`` ...); the errors name
    that option, or say to re-export.

    Raises:
        InputError: the source is missing or not reproducible (in-memory state dict, missing file).
        CheckpointError: the checkpoint's sha256 differs from the manifest's.
    """
    fix = f"pass it with {_flag(part)} CKPT" if part in flags else "restore it or re-export the artifact"
    if not isinstance(src, Mapping) or "path" not in src:
        raise InputError(f"the manifest records no source for the {part}; {fix}")
    path, want = str(src["path"]), str(src.get("sha256") or "")
    if path == "random-fill":
        return None, True
    if path.startswith("bundled:"):
        from tadsr.pipeline import bundled_weight_path

        p = bundled_weight_path(preset, part)
        if p is None or p.name != path.removeprefix("bundled:"):
            raise InputError(f"the {part} was exported from bundled weights {path!r}, which this installation of "
                             f"preset {preset.name!r} does not ship; {fix}")  # fmt: skip
    elif path.startswith("<"):
        raise InputError(f"the {part} was exported from {path}, which cannot be reloaded; {fix}")
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"the {part} checkpoint recorded in the manifest, {p}, does not exist here; {fix}")
    if want:
        from tadsr.checkpoint import sha256_file

        got = sha256_file(p)
        if got != want:
            raise CheckpointError(f"{p} has sha256 {got[:16]}..., the artifact was exported from {want[:16]}...: "
                                  f"not the same weights; {fix}")  # fmt: skip
    return p, False


def models_from_manifest(
    manifest: Mapping[str, Any], *, overrides: Mapping[str, Path | None] | None = None, flags: Container[str] = PARTS
) -> Any:
    """The networks ``manifest`` was exported from (:class:`tadsr.pipeline.Models`), light autoencoder included.

    ``overrides``: checkpoints the user passed for some parts (used instead of the recorded source; a checkpoint
    with other weights than the manifest's then fails :func:`tadsr.pipeline.load_models`' checks only where the
    shapes differ, so the caller warns about a sha256 mismatch).

    Raises:
        InputError, CheckpointError: see :func:`source_checkpoint`.
    """
    from tadsr.pipeline import load_models

    preset = manifest_preset(manifest)
    sources = manifest.get("sources") or {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    ckpts: dict[str, Path | None] = {}
    random = False
    for part in PARTS:
        if part in overrides:
            ckpts[part] = Path(overrides[part])
            continue
        if part == "light_autoencoder" and not uses_light_autoencoder(manifest):
            continue
        path, fill = source_checkpoint(part, sources.get(part), preset, flags)
        random |= fill
        # the shipped weights load as such (None / True), so the rebuilt sources read "bundled:<file>" again
        ckpts[part] = None if str(sources[part]["path"]).startswith("bundled:") else path
    light: Path | bool | None = None
    if "light_autoencoder" in ckpts:
        light = ckpts["light_autoencoder"] if ckpts["light_autoencoder"] is not None else True
    return load_models(student=ckpts["student"], autoencoder=ckpts["autoencoder"], preset=preset,
                       init="random" if random else None, light_autoencoder=light)  # fmt: skip
