"""The C++ runner (runtime/cpp: libtadsr C API + tadsr-cpp) against the Python runtime, on the same artifacts.

Built once per session with CMake against the installed executorch wheel (no downloads) into a temp folder;
skipped with the reason when cmake, a C++ compiler or the wheel's CMake package is missing. The C API is
called through ctypes. Default tier: small stand-in ExecuTorch/XNNPACK artifacts with the real interfaces
(fused ``pipeline`` lr+noise->sr, and encoder/denoiser/decoder with ``prior_noise_scale``), fp32 and INT8
(PT2E, XNNPACK quantizer), lowered in seconds; the tiny-preset model's artifacts (minutes of lowering) are
``slow``. Images: an odd-size crop of a real photo (tadsr/data/calib), plus one smaller than the tile.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tadsr.runtime.tiling import noise_window

REPO = Path(__file__).resolve().parents[1]
CPP = REPO / "runtime" / "cpp"
TILE = 64
PSNR_FP32_DB = 60.0


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


# ------------------------------------------------------------------------------------------------- build


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configure + build runtime/cpp once per session; skip with the reason when the toolchain is missing."""
    from tadsr.runtime.cpp_build import build_cpp_runner, toolchain_problem

    problem = toolchain_problem()
    if problem:
        pytest.skip(f"C++ runner not built: {problem}")
    # TADSR_CPP_BUILD_DIR: keep the build between sessions (CMake rebuilds only what changed)
    return build_cpp_runner(Path(os.environ.get("TADSR_CPP_BUILD_DIR") or tmp_path_factory.mktemp("cpp_build")))


class Lib:
    """ctypes view of libtadsr."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i, u64, u32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_size_t
        lib.tadsr_runner_create.argtypes = [ctypes.c_char_p, p, ctypes.POINTER(p)]
        lib.tadsr_runner_free.argtypes = [p]
        for name in ("tadsr_runner_tile", "tadsr_runner_scale", "tadsr_runner_fused"):
            getattr(lib, name).argtypes = [p]
        lib.tadsr_upscale_rgb8.argtypes = [p, p, i, i, u64, p, sz]
        lib.tadsr_upscale_f32.argtypes = [p, p, i, i, u64, p, sz]
        lib.tadsr_noise.argtypes = [u64, i, i, i, u32, u32, p, sz]
        lib.tadsr_last_error.restype = ctypes.c_char_p
        self.lib = lib

    def error(self) -> str:
        return self.lib.tadsr_last_error().decode()

    def create(self, artifact: Path) -> tuple[int, ctypes.c_void_p]:
        handle = ctypes.c_void_p()
        return self.lib.tadsr_runner_create(str(artifact).encode(), None, ctypes.byref(handle)), handle

    def open(self, artifact: Path) -> ctypes.c_void_p:
        status, handle = self.create(artifact)
        assert status == 0, self.error()
        return handle

    def upscale_rgb8(self, handle: ctypes.c_void_p, rgb: np.ndarray, seed: int, out: np.ndarray | None = None) -> int:
        h, w = rgb.shape[:2]
        rgb = np.ascontiguousarray(rgb, np.uint8)
        return self.lib.tadsr_upscale_rgb8(handle, rgb.ctypes.data, w, h, seed, out.ctypes.data, out.size)

    def upscale_f32(self, handle: ctypes.c_void_p, x: np.ndarray, seed: int, scale: int) -> np.ndarray:
        _, _, h, w = x.shape
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros((1, 3, h * scale, w * scale), np.float32)
        assert self.lib.tadsr_upscale_f32(handle, x.ctypes.data, w, h, seed, out.ctypes.data, out.size) == 0, (
            self.error()
        )
        return out


@pytest.fixture(scope="session")
def lib(cpp_build: Path) -> Lib:
    return Lib(cpp_build / "libtadsr.so")


# ----------------------------------------------------------------------------------------- stand-in artifacts


def _standin_modules(scale: int = 4):
    """Small conv graphs with the interfaces of the real pipeline / encoder / denoiser / decoder graphs."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Pipeline(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(6, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 3 * scale**2, 3, padding=1)
            )
            self.shuffle = nn.PixelShuffle(scale)

        def forward(self, lr, noise):
            mean = lr.mean(dim=(2, 3), keepdim=True)  # a tile-wide statistic, as GroupNorm makes tiles disagree
            return torch.tanh(self.shuffle(self.body(torch.cat([lr - mean, 0.3 * noise], 1))) + 0.2 * mean)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, lr):
            return self.conv(lr)

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1))

        def forward(self, x_t, lr):
            return x_t + self.body(torch.cat([x_t, lr], 1))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3 * scale**2, 3, padding=1)
            self.shuffle = nn.PixelShuffle(scale)

        def forward(self, x0):
            return torch.tanh(self.shuffle(self.conv(x0)))

    return {"pipeline": Pipeline(), "encoder": Encoder(), "denoiser": Denoiser(), "decoder": Decoder()}


def _standin_specs(tile: int = TILE, scale: int = 4) -> dict:
    from tadsr.formats.graphs import GraphSpec, TensorSpec

    lr = TensorSpec("lr", (1, 3, tile, tile), value_range=(-1.0, 1.0))
    lat = (1, 3, tile, tile)
    sr = TensorSpec("sr", (1, 3, tile * scale, tile * scale))
    return {
        "pipeline": GraphSpec("pipeline", tile, scale, (lr, TensorSpec("noise", lat)), (sr,)),
        "encoder": GraphSpec("encoder", tile, scale, (lr,), (TensorSpec("z_y", lat),)),
        "denoiser": GraphSpec("denoiser", tile, scale, (TensorSpec("x_t", lat), lr), (TensorSpec("x0", lat),),
                              constants={"prior_noise_scale": 0.75}),
        "decoder": GraphSpec("decoder", tile, scale, (TensorSpec("x0", lat),), (sr,)),
    }  # fmt: skip


def _lower(module, spec, folder: Path, precision: str) -> None:
    """Lower to ExecuTorch/XNNPACK (INT8: PT2E with the XNNPACK quantizer) and write the artifact's manifest."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from tadsr.formats.artifact import BackendResult, build_manifest, write_manifest

    module = module.eval()
    example = spec.example_inputs()
    if precision == "int8":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        captured = torch.export.export(module, example, strict=False).module()
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
        prepared = prepare_pt2e(captured, quantizer)
        for k in range(4):
            prepared(*spec.example_inputs(seed=k))
        module = convert_pt2e(prepared)
    folder.mkdir(parents=True)
    ep = torch.export.export(module, example, strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    name = f"{spec.name}.pte"
    (folder / name).write_bytes(edge.to_executorch().buffer)
    backend = BackendResult(files=[name], format="executorch", precision=precision)
    manifest = build_manifest(folder=folder, graph_spec=spec.to_dict(), backend=backend, preset={"name": "stand-in"},
                              sources={})  # fmt: skip
    write_manifest(folder, manifest)


@pytest.fixture(scope="session")
def standin_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"fp32": dir, "int8": dir}``: fp32 pipeline + encoder/denoiser/decoder; INT8 pipeline (~45 s together)."""
    pytest.importorskip("executorch")
    out = {}
    modules, specs = _standin_modules(), _standin_specs()
    for precision, graphs in (("fp32", ("pipeline", "encoder", "denoiser", "decoder")), ("int8", ("pipeline",))):
        root = tmp_path_factory.mktemp(f"standin_{precision}")
        for graph in graphs:
            _lower(modules[graph], specs[graph], root / f"{graph}-executorch-{precision}-t{TILE}", precision)
        out[precision] = root
    return out


def _components_only(root: Path, dest: Path) -> Path:
    dest.mkdir()
    for g in ("encoder", "denoiser", "decoder"):
        (src,) = root.glob(f"{g}-*")
        shutil.copytree(src, dest / src.name)
    return dest


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """An odd-size RGB8 crop (75 x 133) of a real photo (the shipped calibration patches)."""
    from PIL import Image

    files = sorted((REPO / "tadsr" / "data" / "calib").glob("*.png"))
    if not files:
        pytest.skip("no shipped calibration photos in tadsr/data/calib")
    with Image.open(files[0]) as im:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape[0] < 75 or rgb.shape[1] < 133:
        rgb = np.asarray(Image.fromarray(rgb).resize((133, 75), Image.BICUBIC))
    return np.ascontiguousarray(rgb[:75, :133])


def _python_rgb8(artifacts: dict[str, Path] | Path, rgb: np.ndarray, seed: int) -> np.ndarray:
    """The Python runtime's output for an RGB8 image, as ``tadsr upscale --artifact`` writes it."""
    from tadsr.runtime.imageio import from_model, to_model
    from tadsr.runtime.pipeline import MobileSRPipeline

    pipe = MobileSRPipeline.from_path(artifacts) if isinstance(artifacts, Path) else MobileSRPipeline(artifacts)
    sr = pipe.upscale(to_model(rgb.astype(np.float32) / np.float32(255.0)), seed=seed)
    return np.round(from_model(sr) * np.float32(255.0)).astype(np.uint8)


def _artifact_set(root: Path, which: str) -> dict[str, Path]:
    graphs = ("pipeline",) if which == "pipeline" else ("encoder", "denoiser", "decoder")
    return {g: next(root.glob(f"{g}-*")) for g in graphs}


# ------------------------------------------------------------------------------------------------ tests


def test_noise_matches_python(lib: Lib) -> None:
    for seed, shape, y0, x0 in ((0, (3, 16, 16), 0, 0), (2**63 + 5, (4, 9, 33), 48, 4000), (12345, (1, 1, 1), 63, 64)):
        out = np.zeros(shape, np.float32)
        assert lib.lib.tadsr_noise(seed, *shape, y0, x0, out.ctypes.data, out.size) == 0, lib.error()
        want = noise_window(seed, shape, y0, x0)
        # same uint32 words; float32 normals equal up to libm rounding (one ulp, rarely)
        np.testing.assert_array_max_ulp(out, want, maxulp=1)
        assert np.mean(out == want) > 0.99
    small = np.zeros(3, np.float32)
    assert lib.lib.tadsr_noise(0, 3, 2, 2, 0, 0, small.ctypes.data, small.size) == 1
    assert "needs 12" in lib.error()


@pytest.mark.parametrize("which,precision", [("pipeline", "fp32"), ("components", "fp32"), ("pipeline", "int8")])
def test_cpp_matches_python_runtime(lib: Lib, standin_artifacts, photo: np.ndarray, which: str, precision: str,
                                    tmp_path: Path) -> None:  # fmt: skip
    root = standin_artifacts[precision]
    folder = root if which == "pipeline" else _components_only(root, tmp_path / "components")
    handle = lib.open(folder)
    try:
        assert lib.lib.tadsr_runner_fused(handle) == (which == "pipeline")
        assert lib.lib.tadsr_runner_tile(handle) == TILE and lib.lib.tadsr_runner_scale(handle) == 4
        for seed, rgb in ((7, photo), (2**40 + 3, photo[:37, :23])):  # odd size; smaller than the tile
            out = np.zeros((rgb.shape[0] * 4, rgb.shape[1] * 4, 3), np.uint8)
            assert lib.upscale_rgb8(handle, rgb, seed, out) == 0, lib.error()
            want = _python_rgb8(_artifact_set(root, which), rgb, seed)
            psnr = _psnr(out, want, 255.0)
            # fp32: same program, same tiles/noise/blend -> >= 60 dB (measured: identical 8-bit output);
            # INT8: the same quantized program on both sides, so the same floor holds
            assert psnr >= PSNR_FP32_DB, f"{which}/{precision} seed {seed}: {psnr:.1f} dB"
            other = np.zeros_like(out)
            assert lib.upscale_rgb8(handle, rgb, seed + 1, other) == 0
            assert _psnr(other, out, 255.0) < psnr  # the seed matters
        # the float API too, against the Python runtime's float output
        from tadsr.runtime.imageio import to_model
        from tadsr.runtime.pipeline import MobileSRPipeline

        x = to_model(photo.astype(np.float32) / np.float32(255.0))
        got = lib.upscale_f32(handle, x, 11, 4)
        want_f = MobileSRPipeline(_artifact_set(root, which)).upscale(x, seed=11)
        assert _psnr(got, want_f, 2.0) >= 80.0, _psnr(got, want_f, 2.0)
    finally:
        lib.lib.tadsr_runner_free(handle)


def _corrupt_copies(root: Path, tmp_path: Path) -> dict[str, Path]:
    """Artifact folders broken one way each (from the fp32 stand-in pipeline)."""
    src = next(root.glob("pipeline-*"))
    cases = {}
    for case in ("missing_file", "tampered_file", "bad_json", "wrong_schema", "onnx_format", "other_noise",
                 "wrong_shape", "encoder_only"):  # fmt: skip
        d = tmp_path / case
        shutil.copytree(src if case != "encoder_only" else next(root.glob("encoder-*")), d)
        m = json.loads((d / "manifest.json").read_text())
        if case == "missing_file":
            (d / "pipeline.pte").unlink()
        elif case == "tampered_file":
            data = bytearray((d / "pipeline.pte").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (d / "pipeline.pte").write_bytes(bytes(data))
        elif case == "bad_json":
            (d / "manifest.json").write_text('{"schema": 1, "graph": ')
        elif case == "wrong_schema":
            m["schema"] = 2
        elif case == "onnx_format":
            m["format"] = "onnx"
        elif case == "other_noise":
            m["noise"] = {"algorithm": "pcg64", "version": 1}
        elif case == "wrong_shape":
            m["graph"]["inputs"][1]["shape"] = [1, 3, 32, 32]
        if case in ("wrong_schema", "onnx_format", "other_noise", "wrong_shape"):
            (d / "manifest.json").write_text(json.dumps(m))
        cases[case] = d
    cases["no_folder"] = tmp_path / "does-not-exist"
    return cases


EXPECTED_ERRORS = {  # case -> (status, words in the message)
    "missing_file": (2, "is missing"),
    "tampered_file": (4, "does not match its manifest"),
    "bad_json": (3, "not readable JSON"),
    "wrong_schema": (3, "schema"),
    "onnx_format": (3, "ExecuTorch (.pte) artifacts only"),
    "other_noise": (3, "noise generator"),
    "wrong_shape": (5, "in the program but"),
    "encoder_only": (3, "holds only the 'encoder' graph"),
    "no_folder": (2, "does not exist"),
}


def test_bad_inputs_give_codes_and_messages(lib: Lib, standin_artifacts, photo: np.ndarray, tmp_path: Path) -> None:
    for case, folder in _corrupt_copies(standin_artifacts["fp32"], tmp_path).items():
        status, handle = lib.create(folder)
        code, words = EXPECTED_ERRORS[case]
        assert (status, handle.value) == (code, None), f"{case}: status {status}, {lib.error()}"
        assert words in lib.error(), f"{case}: {lib.error()}"
    # bad images through an open runner: nothing is written to the output buffer
    handle = lib.open(standin_artifacts["fp32"])
    try:
        out = np.full((8 * 4, 8 * 4, 3), 17, np.uint8)
        assert lib.lib.tadsr_upscale_rgb8(handle, out.ctypes.data, 5, 0, 0, out.ctypes.data, out.size) == 1
        assert "zero size (5x0)" in lib.error()
        assert lib.upscale_rgb8(handle, np.zeros((9, 8, 3), np.uint8), 0, out) == 1  # output buffer too small
        assert "needs 3456" in lib.error()
        assert lib.lib.tadsr_upscale_rgb8(handle, None, 8, 8, 0, out.ctypes.data, out.size) == 1
        assert "NULL" in lib.error()
        assert (out == 17).all()
        # and the runner still works afterwards
        assert lib.upscale_rgb8(handle, photo[:8, :8], 0, out) == 0, lib.error()
    finally:
        lib.lib.tadsr_runner_free(handle)


def test_cli_upscale_png_and_errors(cpp_build: Path, standin_artifacts, photo: np.ndarray, tmp_path: Path) -> None:
    from PIL import Image

    exe = cpp_build / "tadsr-cpp"
    png = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    suffix = ".png" if "png" in png else ".ppm"
    src, dst = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    Image.fromarray(photo).save(src, format="PNG" if suffix == ".png" else "PPM")
    art = standin_artifacts["fp32"]
    run = subprocess.run([exe, "upscale", src, dst, "--artifact", art, "--seed", "7", "--stats"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)
    assert stats["fused"] and stats["tile"] == TILE and stats["peak_rss_mb"] > 0
    with Image.open(dst) as im:
        got = np.asarray(im.convert("RGB"))
    assert _psnr(got, _python_rgb8(art, photo, 7), 255.0) >= PSNR_FP32_DB
    # errors: exit 2, a message, and no output file (nor temp file) left behind
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for args, words in (
        ([tmp_path / "none.png", tmp_path / "o1.png", "--artifact", art], "cannot read"),
        ([bad, tmp_path / "o2.png", "--artifact", art], "cannot read"),
        ([src, tmp_path / "o3.png", "--artifact", tmp_path / "nothing"], "does not exist"),
        ([src, tmp_path / "o4.png", "--artifact", art, "--seed", "-1"], "--seed"),
    ):
        run = subprocess.run([exe, "upscale", *args], capture_output=True, text=True, check=False)
        assert run.returncode == 2 and words in run.stderr, (args, run.returncode, run.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in" + suffix, "out" + suffix, "bad.png"])


def test_cpp_matches_python_on_the_smoke_model(lib: Lib, tiny_all, photo: np.ndarray) -> None:
    """The real ExecuTorch fused pipeline of the default tier's `tadsr all --smoke` run (which lowers no
    ExecuTorch component set: cli/main_job._SMOKE_GRAPHS; test_cpp_matches_python_runtime runs a tiny one), on a
    75 x 70 part of the photo (2 x 2 tiles, odd on both axes: 4 tiles per run instead of 6)."""
    photo = np.ascontiguousarray(photo[:, :70])
    for folder in (tiny_all.out / "artifacts" / "pipeline-executorch-fp32-t64",):
        handle = lib.open(folder)
        try:
            out = np.zeros((photo.shape[0] * 4, photo.shape[1] * 4, 3), np.uint8)
            assert lib.upscale_rgb8(handle, photo, 5, out) == 0, lib.error()
        finally:
            lib.lib.tadsr_runner_free(handle)
        assert _psnr(out, _python_rgb8(folder, photo, 5), 255.0) >= PSNR_FP32_DB


def test_build_is_not_needed_for_python(tmp_path: Path) -> None:
    # the toolchain probe names what is missing instead of failing
    from tadsr.runtime.cpp_build import toolchain_problem

    env = {**os.environ, "PATH": str(tmp_path)}
    assert "cmake" in (toolchain_problem(env=env) or "")
