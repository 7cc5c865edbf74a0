"""The light-vs-full hop (``full-autoencoder reference -> light reference``): every export of a light graph
records how far the light autoencoder's reference is from the full VQ-f4 one on the same inputs, held to the
``light`` floors of numerics.json, and refuses, before exporting anything, a light autoencoder that does not
approximate this autoencoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tadsr.errors import ParityError
from tadsr.formats.graphs import make_graphs
from tadsr.parity.hops import HOP_LIGHT, light_hop, make_cases, reference_runs
from tadsr.pipeline import load_models


@pytest.fixture(scope="module")
def bundled_light():
    return load_models(preset="bundled", light_autoencoder=True)


@pytest.fixture(scope="module")
def runs(bundled_light):
    """The light reference pipeline on one real patch (the cases' inputs for every graph)."""
    return reference_runs(bundled_light, 64, 1)


def _hops(models, graph: str, runs=None):
    _, spec = make_graphs(models, 64, (graph,))[graph]
    cases, _ = make_cases(models, spec, runs=runs if runs is not None else reference_runs(models, 64, 1))
    return light_hop(models, spec, cases)


def _damaged(models):
    """The shipped light autoencoder with its decoder's weights halved: loads (same codebook), but is no longer a
    copy of this autoencoder's decoder."""
    import copy

    bad = copy.deepcopy(models)
    with torch.no_grad():
        for name, p in bad.light_autoencoder.named_parameters():
            if "decoder" in name and p.dim() == 4:
                p.mul_(0.5)
    return bad


@pytest.mark.parametrize("graph", ["encoder", "decoder", "pipeline"])
def test_the_shipped_light_autoencoder_passes_its_floor(bundled_light, runs, graph: str) -> None:
    hops = _hops(bundled_light, graph, runs)
    assert {h.inputs for h in hops} == {"seeded", "real"} and all(h.hop == HOP_LIGHT for h in hops)
    assert all(h.passed and h.floor.psnr == 18 and 20 < h.psnr < 60 for h in hops), hops


def test_no_light_hop_without_a_light_autoencoder_or_for_the_denoiser(bundled_light) -> None:
    import dataclasses

    specs = {g: make_graphs(bundled_light, 64, (g,))[g][1] for g in ("pipeline", "denoiser")}
    assert light_hop(dataclasses.replace(bundled_light, light_autoencoder=None), specs["pipeline"], []) == []
    assert light_hop(bundled_light, specs["denoiser"], []) == []


def test_a_light_autoencoder_of_another_decoder_is_refused_before_export(bundled_light, tmp_path: Path) -> None:
    from tadsr.export.api import export_model

    bad = _damaged(bundled_light)
    assert not all(h.passed for h in _hops(bad, "decoder"))  # its own references (the runs are the models')
    with pytest.raises(ParityError, match="light decoder .*light reference"):
        export_model(bad, formats=("onnx",), graphs=("decoder",), tile=64, out_dir=tmp_path / "out", n_real=1)
    assert not list(tmp_path.rglob("*.onnx"))


def test_random_light_weights_are_recorded_not_gated() -> None:
    models = load_models(preset="tiny", init="random", light_autoencoder=True)
    hops = _hops(models, "decoder")
    assert hops and all(h.passed and h.floor.psnr is None for h in hops)
