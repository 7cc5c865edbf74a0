"""Artifact folders: manifest content, runner checks, atomic writing, parity gate, bad input, CLI.

One real ONNX export of the tiny encoder (shared with the session fixture ``tiny_onnx_artifacts`` of
tests/conftest.py when it exists, else exported here). The other tests swap the backend exporter for one
that copies that real file (optionally with a corrupted weight, to force a genuine parity failure), so they
run the real staging, manifest, runner and parity code in a second or two each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tadsr.checkpoint import save_safetensors, sha256_file
from tadsr.errors import CheckpointError, ConfigError, ExportError, InputError, InputSpecError, ParityError
from tadsr.export import api
from tadsr.formats.artifact import BackendResult
from tadsr.cli.export import add_export_parser, format_summary, run_export
from tadsr.formats.graphs import make_graphs
from tadsr.parity.hops import HOP_REFERENCE, end_to_end_hop, runtime_hop
from tadsr.runtime.runner import load_runner, read_manifest

NAME = "encoder-onnx-fp32-t64"


@pytest.fixture(scope="module")
def models(tiny_models):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_models
    torch.set_num_threads(n)


@dataclass
class _Artifact:
    path: Path
    manifest: dict
    files: list[Path]
    bytes: int


@pytest.fixture(scope="module")
def artifact(request, models, tmp_path_factory):
    """A real tiny encoder ONNX artifact (default export options, 1 real parity patch), copied to a temp folder."""
    out = tmp_path_factory.mktemp("artifacts")
    try:  # reuse the session export of tests/conftest.py when it exists
        shutil.copytree(Path(request.getfixturevalue("tiny_onnx_artifacts")) / NAME, out / NAME)
    except pytest.FixtureLookupError:
        api.export_model(models, graphs=("encoder",), out_dir=out, n_real=1)
    m = read_manifest(out / NAME)
    return _Artifact(out / NAME, m, [out / NAME / f["name"] for f in m["files"]], sum(f["bytes"] for f in m["files"]))


def _fake_exporter(src: Path, *, corrupt: bool = False, crash: bool = False):
    """An export_onnx stand-in that writes the real encoder.onnx (weights perturbed if ``corrupt``)."""

    def export(graph, spec, out_dir, *, precision="fp32", progress=False, **opts):
        dst = Path(out_dir) / "encoder.onnx"
        if corrupt:
            m = onnx.load(str(src))
            big = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
            big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) + np.float32(0.05), big.name))
            onnx.save(m, str(dst))
        else:
            shutil.copyfile(src, dst)
        if crash:
            raise RuntimeError("simulated backend crash")
        return BackendResult(files=["encoder.onnx"], format="onnx", precision=precision, info={"fake": True})

    return export


@pytest.fixture
def use_fake(monkeypatch, artifact):
    def install(**kw):
        fake = _fake_exporter(artifact.files[0], **kw)
        monkeypatch.setattr(api, "get_exporter", lambda fmt: fake)

    return install


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_content(artifact, models):
    spec = make_graphs(models, 64, ("encoder",))["encoder"][1]
    m = read_manifest(artifact.path)
    assert m == json.loads((artifact.path / "manifest.json").read_text()) == artifact.manifest
    assert m["schema"] == 1 and m["format"] == "onnx" and m["precision"] == "fp32" and m["parent"] is None
    assert m["graph"] == json.loads(json.dumps(spec.to_dict()))
    assert [i["name"] for i in m["graph"]["inputs"]] == ["lr"] and m["graph"]["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert [o["name"] for o in m["graph"]["outputs"]] == ["z_y"]
    (entry,) = m["files"]
    path = artifact.path / entry["name"]
    assert entry["name"] == "encoder.onnx" and entry["sha256"] == sha256_file(path)
    assert entry["bytes"] == path.stat().st_size == artifact.bytes
    assert m["preset"] == json.loads(json.dumps(models.preset.to_dict())) and m["preset"]["name"] == "tiny"
    assert m["sources"] == json.loads(json.dumps(models.sources))
    assert {"torch", "onnx", "onnxruntime", "onnxsim", "coremltools", "executorch", "tadsr", "python"} <= set(
        m["tool_versions"]
    )
    assert m["tool_versions"]["onnx"] == onnx.__version__
    assert dt.datetime.fromisoformat(m["created"]).tzinfo is not None
    assert m["backend_info"]["opset"] == 18 and m["backend_info"]["warnings"] == []
    assert m["parity_passed"] is True and m["parity_gate"] is True
    hops = {(h["hop"], h["inputs"]) for h in m["parity"]}
    assert hops == {(h, k) for h in (HOP_REFERENCE, runtime_hop("onnx"), end_to_end_hop("onnx"))
                    for k in ("seeded", "real")}  # fmt: skip
    for h in m["parity"]:
        assert h["passed"] and h["output"] == "z_y" and h["max_abs"] <= 1e-4 and h["psnr"] >= 80
        assert set(h) >= {"max_abs", "mean_abs", "psnr", "floor", "n", "worst_case"}


def test_runner_checks_inputs(artifact):
    r = load_runner(artifact.path)
    assert r.spec.input_names == ["lr"] and r.spec.output_names == ["z_y"] and r.backend == "onnx"
    ok = np.zeros((1, 3, 64, 64), np.float32)
    assert r.run({"lr": ok})["z_y"].shape == (1, 3, 64, 64)
    bad = [
        ({"lr": np.zeros((1, 3, 32, 32), np.float32)}, "shape"),
        ({"lr": ok.astype(np.float64)}, "dtype"),
        ({}, "missing"),
        ({"lr": ok, "noise": ok}, "unexpected"),
        ({"lr": ok.tolist()}, "numpy array"),
    ]
    for inputs, words in bad:
        with pytest.raises(InputSpecError, match=words):
            r.run(inputs)
    with pytest.raises(ConfigError, match="cannot run"):
        load_runner(artifact.path, backend="executorch")


def test_tampered_or_missing_files_are_refused(artifact, tmp_path):
    copy = tmp_path / NAME
    shutil.copytree(artifact.path, copy)
    model = copy / "encoder.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match its manifest"):
        load_runner(copy)
    model.unlink()
    with pytest.raises(InputError, match="missing"):
        load_runner(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(InputError, match="no manifest.json"):
        load_runner(copy)


# ----------------------------------------------------------------------------------------------- atomicity


def test_parity_failure_with_gate_leaves_nothing(models, use_fake, tmp_path):
    use_fake(corrupt=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / NAME).mkdir()
    (out / NAME / "old.txt").write_text("previous artifact")
    with pytest.raises(ParityError) as e:
        api.export_model(models, graphs=("encoder",), out_dir=out, n_real=0)
    assert e.value.hop == runtime_hop("onnx")
    assert e.value.stats["max_abs"] > 1e-4 and e.value.stats["graph"] == "encoder"
    assert "max abs" in str(e.value) and "--no-parity-gate" in str(e.value)
    assert _listing(out) == [NAME] and _listing(out / NAME) == ["old.txt"]  # old artifact untouched, no temp


def test_parity_failure_without_gate_is_written_and_recorded(models, use_fake, tmp_path):
    use_fake(corrupt=True)
    (r,) = api.export_model(models, graphs=("encoder",), out_dir=tmp_path, n_real=0, parity_gate=False)
    assert not r.passed and _listing(tmp_path) == [NAME]
    m = read_manifest(tmp_path / NAME)
    assert m["parity_passed"] is False and m["parity_gate"] is False
    failed = {h["hop"] for h in m["parity"] if not h["passed"]}
    assert failed == {runtime_hop("onnx"), end_to_end_hop("onnx")}
    assert all(h["passed"] for h in m["parity"] if h["hop"] == HOP_REFERENCE)
    assert "FAIL" in format_summary([r])


def test_success_replaces_existing_artifact(models, use_fake, tmp_path):
    use_fake()
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "old.txt").write_text("previous artifact")
    (r,) = api.export_model(models, graphs=("encoder",), out_dir=tmp_path, n_real=0)
    assert r.passed and r.manifest["backend_info"]["fake"] is True
    assert _listing(tmp_path) == [NAME] and _listing(tmp_path / NAME) == ["encoder.onnx", "manifest.json"]


def test_backend_crash_leaves_nothing(models, use_fake, tmp_path):
    use_fake(crash=True)
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="simulated backend crash"):
        api.export_model(models, graphs=("encoder",), out_dir=out, n_real=0)
    assert not (tmp_path / "new").exists()  # folders it created are removed again


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"formats": ("tflite",)}, ConfigError, "unknown format"),
        ({"tile": 96}, ConfigError, "multiple of 64"),
        ({"precisions": ("int4",)}, ConfigError, "unknown precision"),
        ({"graphs": ("unet",)}, ConfigError, "unknown graph"),
    ],
)
def test_bad_arguments_fail_before_any_work(models, monkeypatch, tmp_path, kwargs, error, words):
    monkeypatch.setattr(api, "make_graphs", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "out"
    with pytest.raises(error, match=words):
        api.export_model(models, out_dir=out, **kwargs)
    assert not out.exists()


def test_unwritable_output_folder(models, monkeypatch, tmp_path):
    monkeypatch.setattr(api, "make_graphs", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "file.txt").write_text("a regular file")
    with pytest.raises(InputError, match="cannot write to the output folder"):
        api.export_model(models, out_dir=tmp_path / "file.txt" / "sub")
    assert _listing(tmp_path) == ["file.txt"]


def test_missing_backend_module(models, monkeypatch, tmp_path):
    monkeypatch.setattr(api, "make_graphs", lambda *a, **k: pytest.fail("work started"))
    from dataclasses import replace

    from tadsr.formats import registry

    specs = dict(registry._SPECS)
    specs["coreml"] = replace(specs["coreml"], export="tadsr.export.no_such_backend:export_coreml")
    monkeypatch.setattr(registry, "_SPECS", specs)
    with pytest.raises(ExportError, match="not part of this installation"):
        api.export_model(models, formats=("onnx", "coreml"), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tadsr")
    add_export_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["export", *argv])


def test_cli_summary_and_exit_status(use_fake, tmp_path, capsys):
    use_fake()
    args = _parse(["--preset", "tiny", "--init", "random", "--graphs", "encoder", "--out", str(tmp_path),
                   "--parity-patches", "0"])  # fmt: skip
    assert args.func is run_export and run_export(args) == 0
    table = capsys.readouterr().out
    assert NAME in table and "encoder.onnx" in table and "pass" in table
    use_fake(corrupt=True)
    assert run_export(_parse([*map(str, ["--preset", "tiny", "--init", "random", "--graphs", "encoder", "--out",
                                         tmp_path, "--parity-patches", 0, "--no-parity-gate"])])) == 1  # fmt: skip
    assert "FAIL" in capsys.readouterr().out


def test_cli_swapped_checkpoints_surface_load_error(models, tmp_path):
    save_safetensors(models.student.state_dict(), tmp_path / "student.safetensors")
    save_safetensors(models.autoencoder.state_dict(), tmp_path / "ae.safetensors")
    args = _parse(["--preset", "tiny", "--student", str(tmp_path / "ae.safetensors"), "--autoencoder",
                   str(tmp_path / "student.safetensors"), "--out", str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(CheckpointError):
        run_export(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "error"),
    [(["--format", "tflite"], ConfigError), (["--tile", "96"], ConfigError), (["--graphs", "unet"], ConfigError)],
)
def test_cli_checks_arguments_before_loading_models(monkeypatch, tmp_path, argv, error):
    monkeypatch.setattr("tadsr.pipeline.load_models", lambda *a, **k: pytest.fail("models loaded before checks"))
    with pytest.raises(error):
        run_export(_parse(["--preset", "tiny", "--init", "random", "--out", str(tmp_path / "out"), *argv]))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError):
        run_export(_parse(["--preset", "tiny", "--init", "random", "--out", str(tmp_path / "file.txt" / "o")]))
    assert _listing(tmp_path) == ["file.txt"]
