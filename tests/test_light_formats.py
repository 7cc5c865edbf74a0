"""The light autoencoder downstream of export, tiny shapes: light graphs in all three formats, rebuilt from their
manifests by ``tadsr parity`` and ``tadsr quantize`` (light networks included), INT8 per format, and the runtime
through parity's whole images.

Tier cost: the fused pipeline is exported to ONNX; ExecuTorch and Core ML get the light encoder and decoder (the
light graphs proper; lowering the Swin denoiser again would add minutes and test nothing light-specific).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tadsr.cli import main
from tadsr.errors import InputError
from tadsr.parity.check import ParityOptions, ReferenceSpec, check_parity
from tadsr.pipeline import load_models
from tadsr.provenance import models_from_manifest, uses_light_autoencoder

FORMATS = ("onnx", "executorch", "coreml")
GRAPHS = {"onnx": ("pipeline",), "executorch": ("encoder", "decoder"), "coreml": ("encoder", "decoder")}


@pytest.fixture(scope="module")
def light_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Light graphs exported (with parity) in every format (:data:`GRAPHS`): format -> folder of its artifacts."""
    from tadsr.export.api import export_model

    out = tmp_path_factory.mktemp("light_exports")
    models = load_models(preset="tiny", init="random", light_autoencoder=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = [
            r
            for f in FORMATS
            for r in export_model(models, formats=(f,), graphs=GRAPHS[f], tile=64, out_dir=out / f, n_real=1)
        ]
    finally:
        torch.set_num_threads(threads)
    assert [(r.format, r.graph) for r in res] == [(f, g) for f in FORMATS for g in GRAPHS[f]]
    assert all(r.passed for r in res)
    return {f: out / f for f in FORMATS}


def _art(light_exports: dict[str, Path], fmt: str, graph: str) -> Path:
    return next(light_exports[fmt].glob(f"{graph}-{fmt}-fp32-t64"))


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_light_manifest_rebuilds_the_light_networks(light_exports: dict[str, Path]) -> None:
    m = _manifest(_art(light_exports, "onnx", "pipeline"))
    assert uses_light_autoencoder(m) and m["sources"]["light_autoencoder"]["path"] == "random-fill"
    models = models_from_manifest(m)
    assert models.light_autoencoder is not None
    full = dict(m, sources={k: v for k, v in m["sources"].items() if k != "light_autoencoder"})
    assert models_from_manifest(full).light_autoencoder is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_standalone_parity_of_a_light_artifact(light_exports: dict[str, Path], fmt: str) -> None:
    """``tadsr parity`` rebuilds the light reference from each manifest; the runtime runs the fused pipeline's
    whole images (ONNX)."""
    opts = ParityOptions(patches=1, whole_images=1, max_side=72, threads=1)
    res = check_parity(light_exports[fmt], ReferenceSpec(), opts)
    assert len(res.artifacts) == len(GRAPHS[fmt])
    assert res.exit_code == 0, [(c.name, c.detail) for a in res.artifacts for c in a.checks if not c.passed]
    if fmt == "onnx":
        assert res.sets and res.sets[0].images and all(i.passed for i in res.sets[0].images)


def test_light_artifact_with_a_moved_light_checkpoint_names_the_option(light_exports: dict[str, Path],
                                                                       tmp_path: Path) -> None:  # fmt: skip
    import shutil

    art = tmp_path / "art"
    shutil.copytree(_art(light_exports, "onnx", "pipeline"), art)
    m = _manifest(art)
    m["sources"]["light_autoencoder"] = {"path": str(tmp_path / "gone.safetensors"), "sha256": "0" * 64}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="--light-autoencoder CKPT"):
        models_from_manifest(m)
    assert main(["-q", "quantize", str(art), "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_light_int8_per_format(light_exports: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    """INT8 of a light graph (ONNX: the fused pipeline; else the light decoder, W8A8 + W8 for Core ML): the
    quantizer rebuilds the light graph and parity passes its int8 floors."""
    from tadsr.quantize.api import quantize_artifact

    paths = quantize_artifact(_art(light_exports, fmt, "pipeline" if fmt == "onnx" else "decoder"), out_dir=tmp_path, num_patches=4, holdout_patches=2,
                              sensitivity_patches=1, sensitivity_budget=2, threads=1)  # fmt: skip
    assert paths
    for p in paths:
        m = _manifest(p)
        assert uses_light_autoencoder(m) and m["parity_passed"], (p.name, m.get("parity"))


def test_bench_compares_light_artifacts_with_the_light_reference(light_exports: dict[str, Path],
                                                                 tmp_path: Path) -> None:  # fmt: skip
    """``tadsr bench`` on light artifacts: the student runs both ways (full and light autoencoder) and the light
    artifact is compared with the light one; the do-nothing baseline stays on VQ-f4."""
    from PIL import Image

    from tadsr.bench.bench import BenchConfig, run_bench
    from tadsr.patches import default_calibration_dir

    data = tmp_path / "data"
    data.mkdir()
    with Image.open(sorted(default_calibration_dir().glob("*.png"))[0]) as im:
        im.convert("RGB").crop((40, 60, 136, 140)).save(data / "img.png")
    art = _art(light_exports, "onnx", "pipeline")
    cfg = BenchConfig(out_dir=tmp_path / "report", data=data, artifacts=(art,), teacher_steps=0, threads=1,
                      repeats=1, warmup=0, memory="off", grid_crop=64)  # fmt: skip
    res = run_bench(cfg)
    systems = {s["name"]: s for s in res.report["systems"]}
    light_sets = [n for n in systems if n.endswith("[light]")]
    assert {"torch-student", "torch-student-light"} <= set(systems) and len(light_sets) == 1, list(systems)
    mean = {n: s["fidelity"]["mean"] for n, s in systems.items() if s.get("fidelity")}
    assert mean[light_sets[0]]["parity_psnr"] > 80  # the artifact against the light reference it was exported from
    assert mean["torch-student"]["parity_psnr"] > 200  # the full student against itself ...
    assert mean["torch-student-light"]["parity_psnr"] > 200  # ... and the light one against itself
    assert abs(mean["torch-student"]["psnr_y"] - mean["torch-student-light"]["psnr_y"]) > 1e-3  # two paths
    assert res.report["conditions"]["model_sources"]["light_autoencoder"]["path"] == "random-fill"
