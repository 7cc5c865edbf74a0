"""Reading checkpoints (upstream ``.pth`` or ``.safetensors``), strict loading with diagnostics, fill rule.

Loading is: read (``weights_only=True`` only) -> unwrap containers -> strip ``module.`` / ``_orig_mod.``
prefixes -> strict load. Every failure is a :class:`~tadsr.errors.CheckpointError` that lists the missing,
unexpected and shape-mismatched keys and names the likely cause.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tadsr.errors import CheckpointError
from tadsr.fileio import atomic_path

__all__ = [
    "load_state_dict",
    "load_into",
    "fill_rule_",
    "sha256_file",
    "save_safetensors",
    "WRAPPER_KEYS",
]

WRAPPER_KEYS = ("state_dict", "model", "params_ema", "ema", "model_ema", "ema_model", "params", "module", "net")
_PREFIXES = ("module.", "_orig_mod.")
_LIST_LIMIT = 8


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .pth or .safetensors file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint (expected a torch.save zip file or a pickle, "
            f"file starts with {magic!r}); accepted formats are .pth/.pt/.ckpt and .safetensors"
        )
    try:
        # zip checkpoints are memory-mapped: tensors are read when used, so inspecting shapes (preset inference)
        # and then loading costs one read of the file, not two
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=magic.startswith(b"PK\x03\x04"))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects whose unpickling would execute code "
            f"(only plain tensors and containers are accepted with weights_only=True). Re-save the state dict "
            f"with torch.save(model.state_dict(), ...) or as .safetensors. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint (truncated download or not a checkpoint?): {e}"
        ) from e


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    for _ in range(4):
        if _is_state_dict(obj):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                if len(tensors) > 0 and len(tensors) >= len(obj) - 8:  # flat dict with a few metadata entries
                    obj = tensors
                    break
                raise CheckpointError(
                    f"{source}: no state dict found; top-level keys are {sorted(map(str, obj))[:_LIST_LIMIT]} "
                    f"(expected tensors, or one of the containers {', '.join(WRAPPER_KEYS)})"
                )
            obj = inner
        else:
            raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if not _is_state_dict(obj):
        raise CheckpointError(f"{source}: nested containers without tensors")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():  # type: ignore[union-attr]
        key = str(k)
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p) :], True
        out[key] = v
    return out


def load_state_dict(path: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{key: tensor}`` dict with upstream key names.

    Accepts upstream ``.pth`` files (flat, or wrapped in ``state_dict`` / ``model`` / ``params_ema`` / ``ema``
    style containers, with ``module.`` / ``_orig_mod.`` prefixes), ``.safetensors`` files, or an in-memory
    mapping. Pickles are read with ``torch.load(..., weights_only=True)`` only.

    Raises:
        CheckpointError: missing, truncated, non-checkpoint or code-executing files.
    """
    if isinstance(path, Mapping):
        return _unwrap(path, "state dict")
    p = Path(path)
    return _unwrap(_read(p), str(p))


def _fmt(keys: list, limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _likely_cause(kind: str, missing: list[str], unexpected: list[str], mism: list) -> str:
    unexp_roots = {k.split(".")[0] for k in unexpected}
    if kind == "denoiser" and unexp_roots & {"encoder", "decoder", "quantize", "quant_conv"}:
        return "this looks like an autoencoder (VQGAN) checkpoint given as the denoiser; pass it as --autoencoder"
    if kind == "autoencoder" and unexp_roots & {"input_blocks", "middle_block", "output_blocks", "time_embed"}:
        return "this looks like a denoiser (UNet) checkpoint given as the autoencoder; pass it as --student/--teacher"
    if any(k.startswith("feature_extractor") for k in unexpected):
        return "this looks like a x2 model (lq_size 128, learned feature_extractor); only x4 models are supported"
    if kind == "denoiser" and any(k.startswith(("model.diffusion_model", "first_stage_model")) for k in unexpected):
        return "this looks like a Stable-Diffusion/LDM checkpoint, not a ResShift-family denoiser"
    if mism:
        return "same layout but different sizes: the checkpoint was made for another preset (e.g. official-x4 vs tiny/bundled)"
    if missing and not unexpected:
        return "the checkpoint is incomplete (truncated save or a partial model)"
    return "the checkpoint does not belong to this architecture"


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, kind: str, source: str = "") -> None:
    """Strictly load ``state`` into ``module``; on any mismatch raise a CheckpointError that lists it.

    Args:
        kind: ``"denoiser"`` or ``"autoencoder"`` (used to name the likely cause).
        source: path or description for the message.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mism = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mism:
        parts = [f"{source or 'checkpoint'} does not fit the {kind} ({type(module).__name__}, {len(own)} keys)"]
        if missing:
            parts.append(f"missing {len(missing)} keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_fmt(unexpected)}")
        if mism:
            parts.append(
                f"{len(mism)} shape mismatches: "
                + _fmt([f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mism], 4)
            )
        parts.append("likely cause: " + _likely_cause(kind, missing, unexpected, mism))
        raise CheckpointError("; ".join(parts), missing=missing, unexpected=unexpected, mismatched=mism)
    wrong = [k for k, v in own.items() if v.is_floating_point() and not state[k].is_floating_point()]
    if wrong:
        raise CheckpointError(
            f"{source or 'checkpoint'}: {len(wrong)} tensors have dtype {state[wrong[0]].dtype} where the {kind} has "
            f"floating-point weights ({_fmt(wrong)}); this is not a weights checkpoint of this model"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source or 'checkpoint'}: non-finite values (NaN/inf) in {_fmt(bad)}")
    converted = {k: v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(converted, strict=True)


@torch.no_grad()
def fill_rule_(module: nn.Module) -> nn.Module:
    """Deterministic weights from the key names (the golden fill rule of shared/golden/README.md).

    Every entry of ``named_parameters()`` gets ``randn(shape, float64)`` seeded with ``crc32(key)``, scaled by
    1/sqrt(fan_in) for >= 2-D tensors, ``1 + 0.1 w`` for 1-D ``*weight`` and ``0.1 w`` otherwise. Buffers keep
    their computed values.
    """
    for key, p in module.named_parameters():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        w = torch.randn(tuple(p.shape), generator=g, dtype=torch.float64)
        if p.dim() >= 2:
            w = w / math.sqrt(math.prod(p.shape[1:]))
        elif key.endswith("weight"):
            w = 1.0 + 0.1 * w
        else:
            w = 0.1 * w
        p.copy_(w.to(p.dtype))
    return module


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a state dict as safetensors (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a unique temp name: concurrent writers of one path do not collide
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
