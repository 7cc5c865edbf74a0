"""Checkpoint reading (``-m checkpoint``): synthetic upstream-format checkpoints - flat, wrapped (``state_dict``,
``model``, ``params_ema``, ``ema``), ``module.`` / ``_orig_mod.`` prefixes - with the tiny and the official-x4 key
names load strictly through tadsr.checkpoint and load_models; every bad form gets its specific error. These run in
the default tier; tests/test_official_checkpoints.py reads the real files when ``TADSR_CKPT_DIR`` is set."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import pytest
import torch

import tadsr
from tadsr.checkpoint import load_into, save_safetensors
from tadsr.errors import CheckpointError, ConfigError
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import infer_preset, load_autoencoder, load_denoiser

pytestmark = pytest.mark.checkpoint


@pytest.fixture(scope="module")
def tiny_sd(tiny_models) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "student": {k: v.clone() for k, v in tiny_models.student.state_dict().items()},
        "autoencoder": {k: v.clone() for k, v in tiny_models.autoencoder.state_dict().items()},
    }


def _same(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, b[k]) for k, v in a.state_dict().items())


WRAPPERS = {
    "flat": lambda sd: sd,
    "state_dict": lambda sd: {"iters_start": 5, "log_step": {}, "state_dict": sd},
    "model": lambda sd: {"model": sd, "epoch": 3},
    "params_ema": lambda sd: {"params_ema": sd},
    "ema": lambda sd: {"ema": sd},
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "orig_mod_prefix": lambda sd: {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    "both_prefixes": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("form", sorted(WRAPPERS))
def test_wrapper_forms_load_strictly(tmp_path: Path, tiny_sd, form: str) -> None:
    path = tmp_path / f"{form}.pth"
    torch.save(WRAPPERS[form](tiny_sd["student"]), path)
    sd = tadsr.load_state_dict(path)
    assert set(sd) == set(tiny_sd["student"])
    net = UNetModelSwin(tadsr.get_preset("tiny").unet)
    load_into(net, sd, kind="denoiser")
    assert _same(net, tiny_sd["student"])


def test_safetensors_and_load_models(tmp_path: Path, tiny_sd) -> None:
    save_safetensors(tiny_sd["student"], tmp_path / "s.safetensors")
    torch.save(tiny_sd["autoencoder"], tmp_path / "ae.pth")
    m = tadsr.load_models(student=tmp_path / "s.safetensors", autoencoder=tmp_path / "ae.pth", preset="tiny")
    assert _same(m.student, tiny_sd["student"]) and _same(m.autoencoder, tiny_sd["autoencoder"])
    assert len(m.sources["student"]["sha256"]) == 64
    # in-memory state dicts are accepted too
    m2 = tadsr.load_models(student=tiny_sd["student"], autoencoder=tiny_sd["autoencoder"], preset="tiny")
    assert _same(m2.student, tiny_sd["student"])


def test_official_key_count() -> None:
    p = tadsr.get_preset("official-x4")
    assert len(UNetModelSwin(p.unet).state_dict()) == 564
    assert len(VQModelTorch(p.vq).state_dict()) == 205


def test_official_key_names_load_strictly() -> None:
    """Upstream-format official-x4 state dicts (in memory: 118M + 55M parameters, no 700 MB files; ~15 s) unwrap,
    infer their preset and load strictly through load_models: ``state_dict`` + ``_orig_mod.`` for the UNet,
    ``module.`` for the autoencoder (every wrapper form is covered on the tiny key names above)."""
    p = tadsr.get_preset("official-x4")
    unet = {k: v.detach() for k, v in UNetModelSwin(p.unet).state_dict().items()}
    ae = {k: v.detach() for k, v in VQModelTorch(p.vq).state_dict().items()}
    student, autoencoder = WRAPPERS["orig_mod_prefix"](unet), WRAPPERS["module_prefix"](ae)
    assert infer_preset(student=student, autoencoder=autoencoder) == "official-x4"
    m = tadsr.load_models(student=student, autoencoder=autoencoder, preset="official-x4")
    assert _same(m.student, unet) and _same(m.autoencoder, ae)


def test_missing_keys_listed(tmp_path: Path, tiny_sd) -> None:
    sd = dict(tiny_sd["student"])
    del sd["out.2.bias"], sd["input_blocks.0.0.weight"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing 2 keys: .*(out\.2\.bias|input_blocks\.0\.0\.weight)") as e:
        tadsr.load_models(student=tmp_path / "m.pth", preset="tiny", init="random")
    assert set(e.value.missing) == {"out.2.bias", "input_blocks.0.0.weight"}
    assert "incomplete" in str(e.value)


def test_unexpected_keys_listed(tmp_path: Path, tiny_sd) -> None:
    sd = dict(tiny_sd["student"], **{"extra.weight": torch.zeros(2)})
    torch.save(sd, tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys: extra\.weight"):
        tadsr.load_models(student=tmp_path / "u.pth", preset="tiny", init="random")


def test_load_one_network(tmp_path: Path, tiny_sd) -> None:
    save_safetensors(tiny_sd["student"], tmp_path / "s.safetensors")
    torch.save(tiny_sd["autoencoder"], tmp_path / "ae.pth")
    net, ae = load_denoiser(tmp_path / "s.safetensors", "tiny"), load_autoencoder(tmp_path / "ae.pth", "tiny")
    assert isinstance(net, UNetModelSwin) and _same(net, tiny_sd["student"]) and not net.training
    assert isinstance(ae, VQModelTorch) and _same(ae, tiny_sd["autoencoder"]) and not ae.training
    assert not any(p.requires_grad for p in [*net.parameters(), *ae.parameters()])
    with pytest.raises(CheckpointError, match="autoencoder .*checkpoint given as the denoiser"):
        load_denoiser(tmp_path / "ae.pth", "tiny")
    with pytest.raises(CheckpointError, match="denoiser .*checkpoint given as the autoencoder"):
        load_autoencoder(tmp_path / "s.safetensors", "tiny")


def test_swapped_student_and_autoencoder(tmp_path: Path, tiny_sd) -> None:
    torch.save(tiny_sd["autoencoder"], tmp_path / "ae.pth")
    torch.save(tiny_sd["student"], tmp_path / "unet.pth")
    with pytest.raises(CheckpointError, match="autoencoder .*checkpoint given as the denoiser"):
        tadsr.load_models(student=tmp_path / "ae.pth", autoencoder=tmp_path / "unet.pth", preset="tiny")
    with pytest.raises(CheckpointError, match="denoiser .*checkpoint given as the autoencoder"):
        tadsr.load_models(student=tmp_path / "unet.pth", autoencoder=tmp_path / "unet.pth", preset="tiny")


def test_wrong_preset_shape_mismatch(tmp_path: Path, tiny_sd) -> None:
    torch.save(tiny_sd["student"], tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="shape mismatches.*another preset") as e:
        tadsr.load_models(student=tmp_path / "tiny.pth", preset="official-x4", init="random")
    assert e.value.mismatched and e.value.missing  # official has more blocks than tiny


def test_x2_model_named(tmp_path: Path, tiny_sd) -> None:
    sd = dict(tiny_sd["student"], **{"feature_extractor.0.weight": torch.zeros(3, 3, 3, 3)})
    torch.save(sd, tmp_path / "x2.pth")
    with pytest.raises(CheckpointError, match="x2 model"):
        tadsr.load_models(student=tmp_path / "x2.pth", preset="tiny", init="random")


def test_truncated_file(tmp_path: Path, tiny_sd) -> None:
    path = tmp_path / "full.pth"
    torch.save(tiny_sd["student"], path)
    data = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        tadsr.load_state_dict(tmp_path / "trunc.pth")
    save_safetensors(tiny_sd["student"], tmp_path / "s.safetensors")
    sdata = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(sdata[: len(sdata) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        tadsr.load_state_dict(tmp_path / "t.safetensors")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "img.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="cannot read"):
        tadsr.load_state_dict(tmp_path / "img.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        tadsr.load_state_dict(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        tadsr.load_state_dict(tmp_path / "nope.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        tadsr.load_state_dict(tmp_path / "meta.pth")


class _Evil:
    def __reduce__(self):  # would run code on unpickling
        return (print, ("pwned",))


def test_code_executing_pickle_refused(tmp_path: Path, tiny_sd) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_sd["student"], "hook": _Evil()}, path)
    with pytest.raises(CheckpointError, match="execute code"):
        tadsr.load_state_dict(path)
    # a classic pickle (not a torch zip file) is refused the same way
    (tmp_path / "old.pth").write_bytes(pickle.dumps(collections.OrderedDict(a=_Evil())))
    with pytest.raises(CheckpointError):
        tadsr.load_state_dict(tmp_path / "old.pth")


def test_non_finite_weights(tmp_path: Path, tiny_sd) -> None:
    sd = {k: v.clone() for k, v in tiny_sd["student"].items()}
    sd["out.2.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        tadsr.load_models(student=sd, preset="tiny", init="random")


def test_no_weights_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="--init random"):
        tadsr.load_models(preset="official-x4")


def test_preset_inferred_from_checkpoint_shapes(tmp_path: Path, tiny_sd) -> None:
    from tadsr.cli import main
    from tadsr.pipeline import bundled_weight_path, infer_preset

    s, a = tmp_path / "s.pth", tmp_path / "a.safetensors"
    torch.save({"params_ema": tiny_sd["student"]}, s)
    save_safetensors(tiny_sd["autoencoder"], a)
    assert infer_preset(student=s, autoencoder=a) == "tiny"
    assert infer_preset() == "bundled"
    bundled = tadsr.get_preset("bundled")
    assert infer_preset(autoencoder=bundled_weight_path(bundled, "autoencoder")) == "bundled"
    # a tiny student with the bundled autoencoder: no preset has both
    with pytest.raises(CheckpointError, match="no preset"):
        infer_preset(student=s, autoencoder=bundled_weight_path(bundled, "autoencoder"))
    # the CLI needs no --preset for checkpoints of a known preset
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (20, 18), (120, 60, 30)).save(img)
    assert main(["-q", "upscale", str(img), str(tmp_path / "y.png"), "--student", str(s), "--autoencoder", str(a),
                 "--tile", "64"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "y.png").size == (80, 72)
