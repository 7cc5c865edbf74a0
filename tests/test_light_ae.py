"""Light autoencoder (tadsr.models.light_ae) and its distillation (tadsr.train.distill_ae), tiny shapes.

Distillation smoke + resume, the pipeline and graphs with the light autoencoder, ONNX export with parity,
``tadsr upscale --light`` and the loading errors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from tadsr.checkpoint import fill_rule_, load_state_dict, save_safetensors
from tadsr.cli import main
from tadsr.config import get_preset
from tadsr.errors import CheckpointError, ConfigError
from tadsr.formats.graphs import make_graphs
from tadsr.models.light_ae import META_CONFIG, LightAutoencoder, light_config, load_light_autoencoder
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import OneStepPipeline, load_models, make_noise
from tadsr.train.data import load_pairs
from tadsr.train.distill_ae import DistillAEConfig, build_target_pool, distill_light_ae

DEV = torch.device("cpu")
# shipped bundled light vs full pipeline on 16 shipped calibration crops (session 29's light autoencoder: PSNR mean
# 30.62 dB, mean-colour shift 0.074 mean / 0.167 largest; the session-18 one it replaced: 28.81 dB, 0.079 / 0.171)
PSNR_VS_FULL_FLOOR = 29.5
COLOUR_SHIFT_MEAN = 0.08
COLOUR_SHIFT_MAX = 0.2


@pytest.fixture(autouse=True, scope="module")
def no_onednn():  # noqa: ANN201
    """Tiny shapes: oneDNN's per-shape kernel creation and a second thread cost more than the convolutions."""
    before, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = before


@pytest.fixture(scope="module")
def tiny_ae() -> VQModelTorch:
    ae = VQModelTorch(get_preset("tiny").vq)
    fill_rule_(ae)
    return ae.eval().requires_grad_(False)


def _cfg(steps: int) -> DistillAEConfig:
    return DistillAEConfig(preset="tiny", steps=steps, batch=4, crop=64, train_crop=64, pool_size=4, lr=5e-3,
                           warmup=2, log_every=5, save_every=5, val_crops=1)  # fmt: skip


# -- distillation ------------------------------------------------------------------------------------------------
def test_distill_smoke_loss_decreases_and_resume_equals_straight_run(
    photos: Path, tiny_ae: VQModelTorch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = load_pairs(photos, "train", min_side=64)
    pool = build_target_pool(tiny_ae, pairs, 4, seed=0, hr_size=64, device=DEV, with_zy=False)
    assert pool.lr.shape == (4, 3, 16, 16) and pool.img_hr.shape == (4, 3, 64, 64)
    with torch.no_grad():  # the targets are the frozen autoencoder's: z_y of the bicubic LR, decode of E(HR)'s codes
        from tadsr.models.ops import bicubic_x4_reference

        torch.testing.assert_close(pool.zy, tiny_ae.encode(bicubic_x4_reference(pool.lr)))
        torch.testing.assert_close(pool.img_hr, tiny_ae.decode(tiny_ae.encode(pool.hr)), rtol=1e-4, atol=1e-4)

    class Interrupted(Exception):
        pass

    from tadsr.train import distill_ae

    original = distill_ae.StageCheckpoint.save

    def save_then_stop(self, **kw):  # noqa: ANN001, ANN003, ANN202 - the process "dies" after the step-5 checkpoint
        original(self, **kw)
        if kw["state"]["step"] == 5:
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill_ae.StageCheckpoint, "save", save_then_stop)
        with pytest.raises(Interrupted):
            distill_light_ae(_cfg(40), tiny_ae, pool, tmp_path / "resumed", DEV)
    first = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert first["step"] == 5
    with caplog.at_level(logging.INFO, logger="tadsr.train.distill_ae"):
        resumed = distill_light_ae(_cfg(40), tiny_ae, pool, tmp_path / "resumed", DEV)
    assert f"resumed {tmp_path / 'resumed'} at step 5" in caplog.text  # continued, not restarted from scratch
    straight = distill_light_ae(_cfg(40), tiny_ae, pool, tmp_path / "straight", DEV)
    assert resumed.steps == straight.steps == 40
    # steps 36-40 vs steps 1-5 (deterministic; measured 0.490 vs 0.593 and 0.083 vs 0.144)
    assert resumed.metrics["loss"] < 0.9 * first["metrics"]["loss"]
    assert resumed.metrics["latent_mse"] < 0.8 * first["metrics"]["latent_mse"]
    a, b = load_state_dict(resumed.weights), load_state_dict(straight.weights)
    for k in a:  # the resumed run continued from the checkpoint: same weights as one uninterrupted run
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert torch.equal(a["quantize.embedding.weight"], tiny_ae.quantize.embedding.weight)  # exact frozen copy
    net = load_light_autoencoder(resumed.weights, "tiny")  # config from the file's metadata
    assert net.cfg == light_config("tiny")


def test_distill_cli_writes_final_and_resume_flag(photos: Path, tiny_ae: VQModelTorch, tmp_path: Path) -> None:
    ae_file = tmp_path / "ae.safetensors"
    save_safetensors(tiny_ae.state_dict(), ae_file)
    out = tmp_path / "run"
    common = ["--autoencoder", str(ae_file), "--photos", str(photos), "--out", str(out), "--preset", "tiny",
              "--pool-size", "2", "--crop", "64", "--train-crop", "32", "--batch", "2", "--threads", "1"]  # fmt: skip
    assert main(["distill-ae", *common, "--resume", "--steps", "2"]) == 2  # nothing to resume yet: usage error
    assert main(["distill-ae", *common, "--steps", "2", "--save-every", "1", "--light", "dec_ch=8"]) == 0
    meta = json.loads((out / "state.json").read_text())
    assert meta["step"] == 2 and meta["light_config"]["dec_ch"] == 8
    assert main(["distill-ae", *common, "--resume", "--steps", "3", "--light", "dec_ch=8"]) == 0
    assert json.loads((out / "state.json").read_text())["step"] == 3
    from safetensors import safe_open

    with safe_open(str(out / "final.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[META_CONFIG])["dec_ch"] == 8
    assert main(["distill-ae", *common, "--steps", "4"]) == 2  # another light config than the checkpoint's


def test_distill_cli_init_and_training_options(photos: Path, tiny_ae: VQModelTorch, tmp_path: Path) -> None:
    """--init starts from the given light weights (a zero learning rate keeps them); the shared training flags
    (bf16 autocast on the CPU, channels-last, a pause) are taken, not refused; an --init of another light
    config is a usage error."""
    ae_file = tmp_path / "ae.safetensors"
    save_safetensors(tiny_ae.state_dict(), ae_file)
    start = LightAutoencoder(light_config("tiny"))
    torch.manual_seed(3)
    for p in start.parameters():
        p.data.normal_(0, 0.05)
    init = tmp_path / "start.safetensors"
    save_safetensors(start.state_dict(), init, {META_CONFIG: light_config("tiny").to_json()})
    common = ["--autoencoder", str(ae_file), "--photos", str(photos), "--preset", "tiny", "--pool-size", "2",
              "--crop", "64", "--batch", "2", "--threads", "1", "--steps", "2"]  # fmt: skip
    assert main(["distill-ae", *common, "--out", str(tmp_path / "a"), "--init", str(init), "--lr", "0"]) == 0
    kept = load_state_dict(tmp_path / "a" / "final.safetensors")
    for k, v in start.state_dict().items():
        if k != "quantize.embedding.weight":  # the codebook is always the frozen autoencoder's
            torch.testing.assert_close(kept[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert torch.equal(kept["quantize.embedding.weight"], tiny_ae.quantize.embedding.weight)
    assert main(["distill-ae", *common, "--out", str(tmp_path / "b"), "--init", str(init), "--cpu-bf16",
                 "--channels-last", "--pause-minutes", "5"]) == 0  # fmt: skip
    moved = load_state_dict(tmp_path / "b" / "final.safetensors")
    assert any(not torch.equal(moved[k], v) for k, v in start.state_dict().items() if k != "quantize.embedding.weight")
    assert main(["distill-ae", *common, "--out", str(tmp_path / "c"), "--init", str(init),
                 "--light", "dec_ch=8"]) == 2  # fmt: skip


# -- pipeline, graphs, export --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def light_models():  # noqa: ANN201
    return load_models(preset="tiny", init="random", light_autoencoder=True)


def test_light_pipeline_uses_light_networks(light_models) -> None:  # noqa: ANN001
    m = light_models
    light = m.light_autoencoder
    assert isinstance(light, LightAutoencoder) and m.sources["light_autoencoder"]["path"] == "random-fill"
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    noise = make_noise((1, 3, 64, 64), 3)
    pipe = OneStepPipeline(m)
    sr = pipe(lr, noise=noise)
    with torch.no_grad():  # light encode -> same noise + denoiser at T-1 -> codebook quantise -> light decode
        x0 = pipe.denoise(light.encoder(lr), noise, lr)
        zq = light.quantize.embedding(light.quantize.indices(x0)).permute(0, 3, 1, 2)
        expect = light.decoder(zq).clamp(-1, 1)
    torch.testing.assert_close(sr, expect)
    full = load_models(preset="tiny", init="random")
    assert (OneStepPipeline(full)(lr, noise=noise) - sr).abs().max() > 1e-3  # not the VQ-f4 path
    graphs = make_graphs(m, 64)
    with torch.no_grad():
        torch.testing.assert_close(graphs["pipeline"][0](lr, noise), sr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphs["encoder"][0](lr), light.encoder(lr))


def test_light_graphs_export_onnx_with_parity(light_models, tmp_path: Path) -> None:  # noqa: ANN001
    from tadsr.export.api import export_model

    res = export_model(light_models, formats=("onnx",), graphs=("encoder", "decoder"), tile=64, out_dir=tmp_path,
                       n_real=1)  # fmt: skip
    assert [r.graph for r in res] == ["encoder", "decoder"] and all(r.passed for r in res)
    for r in res:
        assert r.manifest["sources"]["light_autoencoder"]["path"] == "random-fill"
        assert any(h.hop.startswith("reference torch -> onnx") and h.psnr > 100 for h in r.parity.hops)
        ops = {n.op_type for n in onnx.load(str(r.files[0])).graph.node}
        # conv-only: no normalisation, no attention (MatMul / Softmax), no resize
        assert not ops & {"GroupNormalization", "InstanceNormalization", "Softmax", "MatMul", "Resize"}, ops
    enc_ops = {n.op_type for n in onnx.load(str(res[0].files[0])).graph.node}
    assert enc_ops <= {"Conv", "Relu", "Add", "ReduceMean", "GlobalAveragePool"}, enc_ops


def test_local_light_networks_have_their_receptive_field() -> None:
    cfg = light_config("tiny", global_context=False)
    net = LightAutoencoder(cfg).eval()
    fill_rule_(net)
    r_enc, r_dec = (r // 2 for r in cfg.receptive_field)  # radius in LR pixels
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    y = x.clone()
    y[..., 40:, 40:] = -x[..., 40:, 40:]  # change a far corner
    with torch.no_grad():
        a, b = net.encode(x), net.encode(y)
        assert torch.equal(a[..., : 40 - r_enc, :], b[..., : 40 - r_enc, :])
        assert not torch.equal(a, b)
        da, db = net.decoder(x), net.decoder(y)
        assert torch.equal(da[..., : 4 * (40 - r_dec), :], db[..., : 4 * (40 - r_dec), :])
        ctx = LightAutoencoder(light_config("tiny")).eval()  # the tile-wide context branch: every pixel moves
        fill_rule_(ctx)
        assert not torch.equal(ctx.encode(x)[..., :8, :8], ctx.encode(y)[..., :8, :8])


def test_upscale_light_cli(light_models, tmp_path: Path) -> None:  # noqa: ANN001
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)).save(src)
    args = ["-q", "upscale", str(src), str(tmp_path / "a.png"), "--preset", "tiny", "--init", "random", "--tile", "64"]
    assert main([*args, "--light"]) == 0
    assert Image.open(tmp_path / "a.png").size == (208, 160)
    light_file = tmp_path / "light.safetensors"
    save_safetensors(light_models.light_autoencoder.state_dict(), light_file,
                     {META_CONFIG: light_models.light_autoencoder.cfg.to_json()})  # fmt: skip
    args[3] = str(tmp_path / "b.png")
    assert main([*args, "--light-autoencoder", str(light_file)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    other = LightAutoencoder(light_config("tiny"))  # another codebook than the autoencoder's
    save_safetensors(other.state_dict(), light_file, {META_CONFIG: other.cfg.to_json()})
    assert main([*args, "--light-autoencoder", str(light_file)]) == 2


def test_light_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ships no light autoencoder"):
        load_models(preset="tiny", init=None, student=_zeros("tiny", "student"),
                    autoencoder=_zeros("tiny", "autoencoder"), light_autoencoder=True)  # fmt: skip
    other = LightAutoencoder(light_config("bundled"))  # a light autoencoder for bundled's 4096-code latent
    f = tmp_path / "bundled_light.safetensors"
    save_safetensors(other.state_dict(), f, {META_CONFIG: other.cfg.to_json()})
    with pytest.raises(CheckpointError, match="latent of 3 channels / 4096 codes; preset 'tiny' has 3 / 256"):
        load_light_autoencoder(f, "tiny")
    assert load_light_autoencoder(f, "bundled").cfg == other.cfg
    with pytest.raises(CheckpointError, match="does not fit the light autoencoder"):
        load_light_autoencoder(other.state_dict(), "official-x4")  # no metadata: the preset's widths


def _zeros(preset: str, part: str) -> dict[str, torch.Tensor]:
    from tadsr.models.unet_swin import UNetModelSwin

    p = get_preset(preset)
    net = UNetModelSwin(p.unet) if part == "student" else VQModelTorch(p.vq)
    return {k: torch.zeros_like(v) for k, v in net.state_dict().items()}


# -- the shipped light autoencoder -----------------------------------------------------------------------------------
def test_shipped_bundled_light_autoencoder_loads_and_keeps_colours() -> None:
    """The shipped light autoencoder loads with the bundled model and its pipeline follows the full one on the
    top-left 64-px crops of 16 shipped calibration photos: PSNR against the full pipeline and the per-crop shift of
    the mean colour (largest channel) stay within floors below what the shipped file measures."""
    from tadsr.pipeline import bundled_weight_path

    path = bundled_weight_path(get_preset("bundled"), "light_autoencoder")
    assert path is not None and path.stat().st_size <= 3_000_000
    light = load_models(preset="bundled", light_autoencoder=True)  # codebook checked against the bundled autoencoder
    assert light.sources["light_autoencoder"]["path"] == "bundled:bundled_light_autoencoder.safetensors"
    assert light.light_autoencoder.cfg == light_config("bundled")
    full = load_models(preset="bundled")
    photos = sorted((Path(__file__).resolve().parents[1] / "tadsr" / "data" / "calib").glob("*.png"))[:16]
    crops = [np.asarray(Image.open(p).convert("RGB"))[:64, :64] for p in photos]
    lr = torch.from_numpy(np.stack(crops).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    noise = make_noise((len(crops), 3, 64, 64), 0)
    with torch.no_grad():
        a, b = OneStepPipeline(full)(lr, noise=noise), OneStepPipeline(light)(lr, noise=noise)
    psnr = 10 * torch.log10(4 / (a - b).square().mean(dim=(1, 2, 3)))
    colour = (a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).abs().amax(dim=1)
    assert psnr.mean() > PSNR_VS_FULL_FLOOR and colour.mean() < COLOUR_SHIFT_MEAN and colour.max() < COLOUR_SHIFT_MAX, (
        psnr.tolist(), colour.tolist())  # fmt: skip
