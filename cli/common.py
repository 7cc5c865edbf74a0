"""Arguments every verb shares: the model checkpoints or preset, and the light autoencoder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("tadsr")


def add_model_args(
    p: argparse.ArgumentParser,
    *,
    teacher: bool = True,
    default_preset: str | None = None,
    title: str = "model",
    preset_help: str | None = None,
) -> argparse._ArgumentGroup:
    """The model arguments every verb shares: --student/[--teacher]/--autoencoder checkpoints or --preset [--init].

    ``--preset`` stays None unless given: :func:`resolve_preset` then infers it from the checkpoints' keys and
    shapes (official files need no ``--preset official-x4``), or takes ``bundled`` (the shipped weights) without
    checkpoints. Verbs that read the preset from an artifact's manifest pass their own ``preset_help``.
    """
    g = p.add_argument_group(title)
    g.add_argument("--student", type=Path, metavar="CKPT",
                   help="one-step student checkpoint (.pth / .safetensors; TAD-SR, SinSR)")  # fmt: skip
    if teacher:
        g.add_argument("--teacher", type=Path, metavar="CKPT", help="multi-step teacher checkpoint (ResShift v1/v3)")
    g.add_argument("--autoencoder", type=Path, metavar="CKPT", help="VQ-f4 autoencoder checkpoint (autoencoder_vq_f4.pth)")
    if preset_help is None:
        preset_help = ("model preset: bundled (the shipped trained model), official-x4, tiny (default: inferred "
                       "from the checkpoints' shapes; bundled without checkpoints)")
    g.add_argument("--preset", default=default_preset, help=preset_help)
    g.add_argument("--init", choices=["random"],
                   help="deterministic random weights for networks without a checkpoint (latency work and tests)")  # fmt: skip
    return g


def add_light_args(g: argparse._ArgumentGroup) -> None:
    """``--light`` / ``--light-autoencoder CKPT``: run the light autoencoder (``tadsr distill-ae``) instead of VQ-f4."""
    g.add_argument("--light", action="store_true",
                   help="use the light conv-only encoder/decoder distilled from the autoencoder (shipped for bundled; "
                   "else give --light-autoencoder)")  # fmt: skip
    g.add_argument("--light-autoencoder", type=Path, metavar="CKPT",
                   help="light autoencoder weights from tadsr distill-ae (implies --light)")  # fmt: skip


def light_choice(args: argparse.Namespace) -> Path | bool | None:
    """The ``light_autoencoder`` argument of :func:`tadsr.pipeline.load_models` from ``--light[-autoencoder]``."""
    ckpt = getattr(args, "light_autoencoder", None)
    if ckpt is not None:
        return ckpt
    return True if getattr(args, "light", False) else None


def resolve_preset(args: argparse.Namespace) -> str:
    """Fill ``args.preset`` when not given: :func:`tadsr.pipeline.infer_preset` (from the checkpoints, else bundled)."""
    if getattr(args, "preset", None) is None:
        from tadsr.pipeline import infer_preset

        ckpts = {k: getattr(args, k, None) for k in ("student", "teacher", "autoencoder")}
        args.preset = infer_preset(**ckpts)
        if any(ckpts.values()):
            log.info("preset %r (inferred from the checkpoints)", args.preset)
    return args.preset


def load_models_from_args(args: argparse.Namespace):  # noqa: ANN201 - returns tadsr.Models
    from tadsr.pipeline import load_models

    resolve_preset(args)
    return load_models(
        student=args.student,
        teacher=getattr(args, "teacher", None),
        autoencoder=args.autoencoder,
        preset=args.preset,
        init=args.init,
        light_autoencoder=light_choice(args),
    )


def named_path(text: str) -> tuple[str, Path]:
    """argparse type of a ``NAME=PATH`` option (e.g. ``--net shipped=tadsr/weights/bundled_teacher.safetensors``)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"want NAME=PATH, got {text!r}")
    return name, Path(path)
