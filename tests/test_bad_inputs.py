"""Bad inputs, as a new user would give them, through the CLI (``tadsr.cli.main`` in-process) and the Python API.

Every case states what correct behaviour is: the exit code (or the exception of an API call), a pattern the
message must match, and which files may be written (none for a failure). A case runs in a fresh folder; every
file that appears there and is not expected is a failure ("files left"). ``benchmarks/bad_inputs_table.py``
prints the whole catalogue as a table (case, exit code, first line of the message, files left).

Cheap on purpose (tiny preset, small images, one tiny ONNX encoder artifact): image-format cases run the CLI
with a pointwise stand-in for the model (the model is not what they test); checkpoint and non-finite cases load
the real tiny networks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTO = sorted((REPO / "tadsr" / "data" / "calib").glob("*.png"))[0]
TINY = ["--preset", "tiny", "--init", "random", "--tile", "64"]


# ------------------------------------------------------------------------------------------------ harness


@dataclass
class Expect:
    """What correct behaviour is: exit ``code`` (CLI) or exception type name ``raises`` (API), a regex for the
    message (searched in the first error line; for a success, in the log), and files that must be written."""

    code: int | None = None
    message: str = ""
    raises: str | None = None  # API cases: the exception class name, or "ok" when the call must return
    written: tuple[str, ...] = ()  # paths relative to the case folder that must exist afterwards


@dataclass
class Outcome:
    name: str
    expect: Expect
    code: int | None  # CLI exit code, or None for an API case
    raised: str | None  # exception class name of an API case
    message: str  # first line of the first error (or of the exception)
    left: list[str]  # files that appeared in the case folder and were not expected
    extra_failures: list[str] = field(default_factory=list)  # case-specific checks that failed

    @property
    def problems(self) -> list[str]:
        out = list(self.extra_failures)
        if self.expect.raises is not None:
            if self.raised != self.expect.raises:
                out.append(f"raised {self.raised}, expected {self.expect.raises}")
        elif self.code != self.expect.code:
            out.append(f"exit {self.code}, expected {self.expect.code}")
        if self.expect.message and not re.search(self.expect.message, self.message):
            out.append(f"message {self.message!r} does not match {self.expect.message!r}")
        if self.left:
            out.append(f"files left: {self.left}")
        return out


class Resources:
    """Lazily built, shared inputs (tiny checkpoints, a tiny ONNX encoder artifact) under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, Any] = {}

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def models(self) -> Any:
        import tadsr

        return self._once("models", lambda: tadsr.load_models(preset="tiny", init="random"))

    def state(self, part: str) -> dict[str, Any]:
        net = getattr(self.models(), part)
        return {k: v.clone() for k, v in net.state_dict().items()}

    def ckpt(self, part: str) -> Path:
        import torch

        def make() -> Path:
            p = self.root / f"tiny_{part}.pth"
            torch.save(self.state(part), p)
            return p

        return self._once(f"ckpt-{part}", make)

    def encoder_artifact(self) -> Path:
        def make() -> Path:
            from tadsr.export.api import export_model

            (res,) = export_model(self.models(), formats=("onnx",), graphs=("encoder",), tile=64,
                                  out_dir=self.root / "exported", n_real=1)  # fmt: skip
            return res.path

        return self._once("encoder", make)


@contextlib.contextmanager
def _capture_errors() -> Iterator[list[logging.LogRecord]]:
    """Collect the records of the ``tadsr`` loggers (errors and everything else) while the CLI runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("tadsr")
    handler, old = Keep(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()} | {
        p.relative_to(root).as_posix() + "/" for p in root.rglob("*") if p.is_dir()
    }


def _pointwise_runner(args: Any) -> tuple[Callable, Callable[[int], tuple[int, ...]], int, int]:
    """A stand-in for the reference model: each LR pixel -> its own 4x4 block (cheap, deterministic); its tile is
    ``--tile`` or 128."""
    return (lambda lr, noise: lr.repeat(4, axis=2).repeat(4, axis=3)), (lambda t: (3, t, t)), 4, args.tile or 128


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Resources], tuple[list[str] | Callable[[], Any], Expect]]
    cheap_model: bool = False  # run the CLI with the pointwise stand-in instead of the tiny networks
    patches: Callable[[Path], list[Any]] = lambda ws: []  # context managers active while it runs
    check: Callable[[Path], list[str]] | None = None  # extra checks after the run (messages of failures)


def run_case(case: Case, ws: Path, res: Resources, log_dir: Path) -> Outcome:
    """Set up ``case`` in the empty folder ``ws``, run it, and report what happened."""
    from tadsr.cli import main

    ws.mkdir(parents=True, exist_ok=True)
    call, expect = case.setup(ws, res)
    before = _files(ws)
    code = raised = None
    message = ""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"TADSR_LOG_DIR": str(log_dir)}))
        if case.cheap_model:
            stack.enter_context(mock.patch("tadsr.cli.upscale._reference_runner", _pointwise_runner))
        for p in case.patches(ws):
            stack.enter_context(p)
        records = stack.enter_context(_capture_errors())
        if callable(call):
            try:
                raised, message = "ok", str(call() or "")
            except Exception as e:  # noqa: BLE001 - the case says which exception is right
                raised, message = type(e).__name__, (str(e).splitlines() or [""])[0]
        else:
            code = main(["-q", *call])
            errors = [r for r in records if r.levelno >= logging.ERROR]
            message = (errors[0].getMessage().splitlines() or [""])[0] if errors else ""
            if expect.code == 0 and expect.message:  # a success: match the message against the whole log
                message = next((r.getMessage() for r in records if re.search(expect.message, r.getMessage())), "")
    after = _files(ws)
    wanted = {w.rstrip("/") for w in expect.written}
    left = sorted(f for f in after - before if f.rstrip("/") not in wanted and not any(
        w.startswith(f.rstrip("/") + "/") for w in wanted))  # fmt: skip
    extra = [f"expected {w} to be written" for w in sorted(wanted) if w not in {a.rstrip("/") for a in after}]
    if case.check is not None:
        extra += case.check(ws)
    return Outcome(case.name, expect, code, raised, message, left, extra)


# ------------------------------------------------------------------------------------------------- inputs


def _photo(size: tuple[int, int] = (24, 20)) -> Image.Image:
    return Image.open(PHOTO).convert("RGB").crop((0, 0, *size))


def _upscale(ws: Path, name: str, *extra: str) -> list[str]:
    return ["upscale", str(ws / name), str(ws / "out.png"), *TINY, *extra]


def _image_case(name: str, make: Callable[[Path], None], size: tuple[int, int], mode: str = "RGB",
                code: int = 0, message: str = "", suffix: str = ".png") -> Case:  # fmt: skip
    """An image the CLI must upscale to ``size`` (W, H) x4 in ``mode``, or refuse with ``code``/``message``."""

    def setup(ws: Path, res: Resources) -> tuple[list[str], Expect]:
        make(ws / f"in{suffix}")
        written = ("out.png",) if code == 0 else ()
        return _upscale(ws, f"in{suffix}"), Expect(code, message, written=written)

    def check(ws: Path) -> list[str]:
        if code != 0:
            return []
        im = Image.open(ws / "out.png")
        ok = im.size == (4 * size[0], 4 * size[1]) and im.mode == mode
        return [] if ok else [f"out.png is {im.size} {im.mode}, expected {(4 * size[0], 4 * size[1])} {mode}"]

    return Case(name, setup, cheap_model=True, check=check)


def _save(fmt: str, img: Callable[[], Image.Image], **kw: Any) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        buf = io.BytesIO()
        img().save(buf, format=fmt, **kw)
        path.write_bytes(buf.getvalue())

    return make


def _png16_rgb(path: Path) -> None:
    from tadsr.runtime.imageio import _encode_png16

    rgb = np.asarray(_photo()).astype(np.uint16) * 257 + 3
    path.write_bytes(_encode_png16(rgb))


def _exif_rotated(path: Path) -> None:
    img = _photo((24, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    path.write_bytes(buf.getvalue())


def _palette_transparent() -> Image.Image:
    img = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    return img


def _grey_alpha() -> Image.Image:
    img = _photo().convert("LA")
    img.putalpha(Image.linear_gradient("L").resize(img.size))
    return img


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _huge_header(path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip


def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    _photo((64, 64)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


IMAGE_CASES = [
    _image_case("CMYK JPEG -> upscaled as RGB", _save("JPEG", lambda: _photo().convert("CMYK")), (24, 20),
                suffix=".jpg"),
    _image_case("16-bit RGB PNG -> upscaled", _png16_rgb, (24, 20)),
    _image_case("palette PNG -> upscaled as RGB", _save("PNG", lambda: _photo().convert("P")), (24, 20)),
    _image_case("palette PNG with transparency -> RGBA", _save("PNG", _palette_transparent), (24, 20), "RGBA"),
    _image_case("grey+alpha PNG -> RGBA", _save("PNG", _grey_alpha), (24, 20), "RGBA"),
    _image_case("EXIF-rotated JPEG -> upscaled upright", _exif_rotated, (20, 24), suffix=".jpg"),
    _image_case("1x1 image -> 4x4", _save("PNG", lambda: _photo((1, 1))), (1, 1)),
    _image_case("1x10000 image -> 4x40000", _save("PNG", lambda: Image.new("RGB", (10000, 1), (90, 30, 200))),
                (10000, 1)),  # fmt: skip
    _image_case("zero-byte file", _bytes(b""), (0, 0), code=2, message=r"cannot read image .*(empty|zero|not a)"),
    _image_case("truncated PNG", _truncated_png, (0, 0), code=2, message=r"cannot read image .*truncated"),
    _image_case("text file named .png", _bytes(b"hello"), (0, 0), code=2, message=r"not a readable image"),
    _image_case("60000x60000 PNG header", _huge_header, (0, 0), code=2, message=r"cannot read image"),
]


# ------------------------------------------------------------------------------------------------ checkpoints


def _ckpt_case(name: str, make: Callable[[Path, Resources], list[str]], code: int, message: str) -> Case:
    def setup(ws: Path, res: Resources) -> tuple[list[str], Expect]:
        _photo((16, 16)).save(ws / "in.png")
        flags = make(ws, res)
        return ["upscale", str(ws / "in.png"), str(ws / "out.png"), "--tile", "64", *flags], Expect(
            code, message, written=("out.png",) if code == 0 else ())

    return Case(name, setup)


def _saved(ws: Path, name: str, state: dict[str, Any]) -> str:
    import torch

    torch.save(state, ws / name)
    return str(ws / name)


def _with_student(ws: Path, res: Resources, state: dict[str, Any], *, preset: str = "tiny") -> list[str]:
    return ["--student", _saved(ws, "student.pth", state), "--autoencoder", str(res.ckpt("autoencoder")),
            "--preset", preset]  # fmt: skip


def _fp16(ws: Path, res: Resources) -> list[str]:
    state = res.state("student")
    return _with_student(ws, res, {k: v.half() if v.is_floating_point() else v for k, v in state.items()})


def _int_weights(ws: Path, res: Resources) -> list[str]:
    return _with_student(ws, res, {k: (v * 100).long() if v.is_floating_point() else v
                                   for k, v in res.state("student").items()})  # fmt: skip


def _missing_key(ws: Path, res: Resources) -> list[str]:
    state = res.state("student")
    state.pop(sorted(state)[0])
    return _with_student(ws, res, state)


def _extra_key(ws: Path, res: Resources) -> list[str]:
    import torch

    return _with_student(ws, res, {**res.state("student"), "lora_extra.weight": torch.zeros(4)})


def _other_preset(ws: Path, res: Resources) -> list[str]:
    bundled = REPO / "tadsr" / "weights" / "bundled_student.safetensors"
    return ["--student", str(bundled), "--autoencoder", str(res.ckpt("autoencoder")), "--preset", "tiny"]


def _x2_model(ws: Path, res: Resources) -> list[str]:
    """A x2 autoencoder: the tiny one with one down-sampling level fewer (downsample factor 2)."""
    from tadsr.config import get_preset
    from tadsr.models.vqgan import VQModelTorch

    vq = get_preset("tiny").vq
    vq2 = dataclasses.replace(vq, ch_mult=tuple(vq.ch_mult[:-1]))
    state = VQModelTorch(vq2).state_dict()
    return ["--student", str(res.ckpt("student")), "--autoencoder", _saved(ws, "ae_x2.pth", state), "--preset", "tiny"]


def _nan(ws: Path, res: Resources) -> list[str]:
    state = res.state("student")
    next(v for v in state.values() if v.is_floating_point() and v.numel() > 1).view(-1)[0] = float("nan")
    return _with_student(ws, res, state)


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("this would have run code",))


def _pickle(ws: Path, res: Resources) -> list[str]:
    (ws / "evil.pth").write_bytes(pickle.dumps({"w": _Evil()}, protocol=2))
    return ["--student", str(ws / "evil.pth"), "--autoencoder", str(res.ckpt("autoencoder")), "--preset", "tiny"]


def _truncated_safetensors(ws: Path, res: Resources) -> list[str]:
    from tadsr.checkpoint import save_safetensors

    save_safetensors(res.state("student"), ws / "s.safetensors")
    data = (ws / "s.safetensors").read_bytes()
    (ws / "s.safetensors").write_bytes(data[: len(data) // 3])
    return ["--student", str(ws / "s.safetensors"), "--autoencoder", str(res.ckpt("autoencoder")), "--preset", "tiny"]


def _ae_as_student(ws: Path, res: Resources) -> list[str]:
    return ["--student", str(res.ckpt("autoencoder")), "--autoencoder", str(res.ckpt("autoencoder")),
            "--preset", "tiny"]  # fmt: skip


def _huge_weights(ws: Path, res: Resources) -> list[str]:
    """Finite but huge decoder weights: the model's output overflows to inf / NaN."""
    ae = res.state("autoencoder")
    state = {k: v * 1e36 if k.startswith("decoder") and v.dim() == 4 else v for k, v in ae.items()}
    return ["--student", str(res.ckpt("student")), "--autoencoder", _saved(ws, "huge.pth", state), "--preset", "tiny"]


CKPT_CASES = [
    _ckpt_case("fp16 checkpoint -> works (cast to fp32)", _fp16, 0, ""),
    _ckpt_case("checkpoint with integer weights", _int_weights, 2, r"dtype torch\.int64.*floating"),
    _ckpt_case("checkpoint missing a key", _missing_key, 2, r"does not fit the denoiser.*missing 1 keys"),
    _ckpt_case("checkpoint with an extra key", _extra_key, 2, r"unexpected 1 keys: .*lora_extra"),
    _ckpt_case("checkpoint of another preset (bundled into tiny)", _other_preset, 2, r"shape mismatches"),
    _ckpt_case("x2 autoencoder into the x4 preset", _x2_model, 2, r"does not fit the autoencoder"),
    _ckpt_case("NaN in a checkpoint", _nan, 2, r"non-finite values"),
    _ckpt_case("code-executing pickle", _pickle, 2, r"refusing to load .*execute code"),
    _ckpt_case("truncated safetensors", _truncated_safetensors, 2, r"not a readable safetensors"),
    _ckpt_case("autoencoder given as the student", _ae_as_student, 2, r"does not fit the denoiser"),
    _ckpt_case("model output not finite (huge weights)", _huge_weights, 2, r"NaN or infinite"),
]


# ------------------------------------------------------------------------------------------------- artifacts


def _artifact(ws: Path, res: Resources, edit: Callable[[Path, dict], dict | None] | None = None) -> Path:
    art = ws / "art" / res.encoder_artifact().name
    shutil.copytree(res.encoder_artifact(), art)
    if edit is not None:
        m = json.loads((art / "manifest.json").read_text())
        new = edit(art, m)
        if new is not None:
            (art / "manifest.json").write_text(json.dumps(new))
    return art


def _quantize_case(name: str, edit: Callable[[Path, dict], dict | None], message: str) -> Case:
    def setup(ws: Path, res: Resources) -> tuple[list[str], Expect]:
        art = _artifact(ws, res, edit)
        return ["quantize", str(art), "--out", str(ws / "Q"), "--num-patches", "4"], Expect(2, message)

    return Case(name, setup)


def _rm_model(art: Path, m: dict) -> None:
    (art / m["files"][0]["name"]).unlink()


def _not_json(art: Path, m: dict) -> None:
    (art / "manifest.json").write_text("{not json")


def _schema(art: Path, m: dict) -> dict:
    return {**m, "schema": 99}


def _outside(art: Path, m: dict) -> dict:
    m["files"][0]["name"] = "../../outside.onnx"
    return m


def _tampered(art: Path, m: dict) -> None:
    f = art / m["files"][0]["name"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _wrong_spec_api(ws: Path, res: Resources) -> tuple[Callable[[], Any], Expect]:
    def edit(art: Path, m: dict) -> dict:
        m["graph"]["inputs"][0]["shape"] = [1, 3, 32, 32]
        return m

    art = _artifact(ws, res, edit)
    from tadsr.runtime.runner import load_runner

    return (lambda: load_runner(art).run({"lr": np.zeros((1, 3, 32, 32), np.float32)})), Expect(
        raises="InputError", message=r"takes 'lr' of shape \[1, 3, 64, 64\], but its manifest says \[1, 3, 32, 32\]")


def _fake_set(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    """A folder holding two runnable pipeline sets (fp32 and fp16): upscale must say which ones and how to choose."""
    for prec in ("fp32", "fp16"):
        d = ws / "arts" / f"pipeline-onnx-{prec}-t64"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"format": "onnx", "precision": prec,
                                                     "graph": {"name": "pipeline", "tile": 64}}))  # fmt: skip
    _photo((16, 16)).save(ws / "in.png")
    return ["upscale", str(ws / "in.png"), str(ws / "out.png"), "--artifact", str(ws / "arts")], Expect(
        2, r"several artifact sets .*onnx/fp16/t64, onnx/fp32/t64.*choose with --format/--precision")


def _two_fp32(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    art = _artifact(ws, res)
    shutil.copytree(art, ws / "art" / "encoder-onnx-fp32-t64-copy")
    return ["quantize", str(ws / "art"), "--out", str(ws / "Q")], Expect(
        2, r"holds 2 fp32 artifacts: encoder-onnx-fp32-t64, encoder-onnx-fp32-t64-copy; pass one of them")


def _one_fp32_api(ws: Path, res: Resources) -> tuple[Callable[[], Any], Expect]:
    art = _artifact(ws, res)
    from tadsr.quantize.api import find_fp32_artifact

    def call() -> str:
        found = find_fp32_artifact(ws / "art")
        if found != art:
            raise AssertionError(f"found {found}, expected {art}")
        return f"found {found.name}"

    return call, Expect(raises="ok", message=r"found encoder-onnx-fp32-t64")


def _low_memory_api(ws: Path, res: Resources) -> tuple[Callable[[], Any], Expect]:
    from tadsr.runtime.runner import load_runner

    def call() -> str:
        r = load_runner(res.encoder_artifact(), backend="onnxruntime", low_memory=True)
        return f"backend {r.backend}, low_memory={r.inner.low_memory}"

    return call, Expect(raises="ok", message=r"low_memory=True")


def _bench_defaults_api(ws: Path, res: Resources) -> tuple[Callable[[], Any], Expect]:
    from tadsr.bench.bench import BenchConfig, manifest_defaults
    from tadsr.bench.systems import ArtifactSet
    from tadsr.runtime.runner import read_manifest

    m = read_manifest(res.encoder_artifact())

    def call() -> str:
        s = ArtifactSet("onnx-fp32-fused", "onnx", "fp32", 64, "fused", {"pipeline": ws}, {"pipeline": m})
        got = manifest_defaults(BenchConfig(out_dir=ws / "bench", artifacts=(ws,)), [s])
        kept = manifest_defaults(BenchConfig(out_dir=ws / "bench", artifacts=(ws,), student=ws / "s.pth"), [s])
        return f"init {got.init!r} from the manifests; with --student: {kept.init!r}"

    return call, Expect(raises="ok", message=r"init 'random' from the manifests; with --student: None")


ARTIFACT_CASES = [
    _quantize_case("artifact with its model file missing", _rm_model, r"model file .* is missing"),
    _quantize_case("artifact manifest that is not JSON", _not_json, r"is not readable JSON"),
    _quantize_case("artifact manifest of an unknown schema", _schema, r"manifest schema 99"),
    _quantize_case("artifact manifest pointing outside its folder", _outside,
                   r"names the model file '\.\./\.\./outside\.onnx', outside the artifact folder"),
    _quantize_case("artifact model file modified", _tampered, r"(modified|sha256|digest)"),
    Case("artifact with a wrong input spec (API)", _wrong_spec_api),
    Case("upscale --artifact on a folder with two sets", _fake_set),
    Case("quantize on a folder with two fp32 artifacts", _two_fp32),
    Case("quantize on an export folder with one artifact (API)", _one_fp32_api),
    Case("--backend onnxruntime --low-memory (API)", _low_memory_api),
    Case("bench: random-fill taken from the manifests (API)", _bench_defaults_api),
]


# ------------------------------------------------------------------------------------------ calibration, outputs


def _calib_case(name: str, fill: Callable[[Path], None], message: str) -> Case:
    def setup(ws: Path, res: Resources) -> tuple[list[str], Expect]:
        art = _artifact(ws, res)
        (ws / "calib").mkdir()
        fill(ws / "calib")
        return ["quantize", str(art), "--calib", str(ws / "calib"), "--out", str(ws / "Q")], Expect(2, message)

    return Case(name, setup)


def _one_image(d: Path) -> None:
    Image.open(PHOTO).save(d / "only.png")


def _unreadable(d: Path) -> None:
    (d / "a.png").write_bytes(b"\x89PNG broken")
    (d / "b.jpg").write_bytes(b"")


def _folder_case(name: str, good: int, bad: int, code: int, message: str) -> Case:
    def setup(ws: Path, res: Resources) -> tuple[list[str], Expect]:
        (ws / "in").mkdir()
        for i in range(good):
            _photo((12, 10)).save(ws / "in" / f"good{i}.png")
        for i in range(bad):
            (ws / "in" / f"bad{i}.png").write_bytes(b"\x89PNG broken")
        written = tuple(f"out/good{i}.png" for i in range(good))
        return ["upscale", str(ws / "in"), str(ws / "out"), *TINY], Expect(code, message, written=written)

    return Case(name, setup, cheap_model=True)


def _raise_in_write(exc: BaseException) -> Callable[[Path], list[Any]]:
    """Patch the image writer so that writing the file's bytes fails with ``exc`` (after the temp file exists)."""

    def patches(ws: Path) -> list[Any]:
        def boom(image: Any, f: Any, format: str) -> None:  # noqa: A002 - Pillow's keyword
            f.write(b"partial")
            raise exc

        return [mock.patch("PIL.Image.Image.save", boom)]

    return patches


def _single(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    _photo((12, 10)).save(ws / "in.png")
    return _upscale(ws, "in.png"), Expect()


def _full_disk(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    argv, _ = _single(ws, res)
    return argv, Expect(2, r"cannot write .*out\.png: No space left on device; free some space")


def _unwritable(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    argv, _ = _single(ws, res)
    return argv, Expect(2, r"cannot write to output folder .*Permission denied; choose a writable folder")


def _deny_open(ws: Path) -> list[Any]:
    real = os.open

    def deny(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if str(path).endswith(".tmp") and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **kw)

    return [mock.patch("os.open", deny)]


def _interrupt_upscale(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    (ws / "in").mkdir()
    _photo((12, 10)).save(ws / "in" / "a.png")
    return ["upscale", str(ws / "in"), str(ws / "new" / "out"), *TINY], Expect(130, r"interrupted")


def _internal(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    argv, _ = _single(ws, res)
    return argv, Expect(3, r"internal error \(ZeroDivisionError: boom\); this is a bug.*traceback is in .*\.log")


def _export_unwritable(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    argv = ["export", "--preset", "tiny", "--init", "random", "--graphs", "encoder", "--out", str(ws / "new" / "exp")]
    return argv, Expect(2, r"cannot write to the output folder .*Read-only file system; choose a writable folder")


def _deny_probe(ws: Path) -> list[Any]:
    def deny(self: Path, data: bytes) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    return [mock.patch("pathlib.Path.write_bytes", deny)]


def _export_interrupted(ws: Path, res: Resources) -> tuple[list[str], Expect]:
    argv, _ = _export_unwritable(ws, res)
    return argv, Expect(130, r"interrupted")


def _interrupt_graphs(ws: Path) -> list[Any]:
    return [mock.patch("tadsr.export.api.make_graphs", mock.Mock(side_effect=KeyboardInterrupt))]


def _two_exports(ws: Path, res: Resources) -> tuple[Callable[[], Any], Expect]:
    """Two exports commit the same artifact name into one --out at the same moment. The race is forced: the other
    export's folder lands between this one's "is the name free?" check and its rename."""
    from tadsr.formats.artifact import staged_artifact

    def call() -> str:
        out = ws / "out"
        out.mkdir()
        real = os.rename
        with staged_artifact(out, "encoder-onnx-fp32-t64") as a, staged_artifact(out, "encoder-onnx-fp32-t64") as b:
            (a.path / "model.onnx").write_text("a")
            (b.path / "model.onnx").write_text("b")

            def racing(src: Any, dst: Any) -> None:
                if Path(src) == b.path and not a.committed:
                    a.commit()  # the other export wins the name first
                real(src, dst)

            with mock.patch("os.rename", racing):
                b.commit()
        names = sorted(p.name for p in out.iterdir())
        return f"both committed; folder holds {names}, model from writer {(out / names[0] / 'model.onnx').read_text()}"

    return call, Expect(raises="ok", message=r"both committed; folder holds \['encoder-onnx-fp32-t64'\], .* writer b",
                        written=("out/encoder-onnx-fp32-t64/model.onnx",))


OUTPUT_CASES = [
    _calib_case("quantize --calib with an empty folder", lambda d: None, r"no images .* it is empty"),
    _calib_case("quantize --calib with one image", _one_image, r"gives only 1 distinct .*fewer than"),
    _calib_case("quantize --calib with only unreadable files", _unreadable, r"2 bad image files in .*calib"),
    _folder_case("folder run: one bad image among good ones", 2, 1, 1, r"skipped .*bad0\.png"),
    _folder_case("folder run: every image bad", 0, 2, 1, r"skipped .*bad"),
    Case("output disk full (ENOSPC while writing)", _full_disk, cheap_model=True,
         patches=_raise_in_write(OSError(errno.ENOSPC, "No space left on device"))),
    Case("output folder not writable", _unwritable, cheap_model=True, patches=_deny_open),
    Case("Ctrl-C during a folder upscale", _interrupt_upscale, cheap_model=True,
         patches=lambda ws: [mock.patch("tadsr.runtime.tiling.upscale_tiled", side_effect=KeyboardInterrupt)]),
    Case("internal error (a bug) during upscale", _internal, cheap_model=True,
         patches=lambda ws: [mock.patch("tadsr.runtime.tiling.upscale_tiled", side_effect=ZeroDivisionError("boom"))]),
    Case("export --out on a read-only file system", _export_unwritable, patches=_deny_probe),
    Case("Ctrl-C during export", _export_interrupted, patches=_interrupt_graphs),
    Case("two exports into the same --out at once", _two_exports),
]

CASES: list[Case] = IMAGE_CASES + CKPT_CASES + ARTIFACT_CASES + OUTPUT_CASES


# ----------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> Resources:
    return Resources(tmp_path_factory.mktemp("bad-inputs-resources"))


def test_catalogue_size() -> None:
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, resources: Resources, tmp_path: Path) -> None:
    out = run_case(case, tmp_path / "ws", resources, tmp_path / "logs")
    assert not out.problems, out
    crash_logs = list((tmp_path / "logs").glob("tadsr-crash-*.log")) if (tmp_path / "logs").exists() else []
    if out.expect.code == 3:  # the traceback went to the log file, the console got one line
        assert len(crash_logs) == 1 and "ZeroDivisionError: boom" in crash_logs[0].read_text()
        assert "Traceback" not in out.message
    else:
        assert crash_logs == [], [p.read_text() for p in crash_logs]


@pytest.mark.parametrize("verbose", [False, True])
def test_internal_error_traceback_only_with_verbose(tmp_path: Path, verbose: bool) -> None:
    """Exit 3: the console gets one line (and the traceback only with -v); the log file always has it."""
    from tadsr.cli import main

    _photo((12, 10)).save(tmp_path / "in.png")
    argv = [*(["-v"] if verbose else ["-q"]), "upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), *TINY]
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"TADSR_LOG_DIR": str(tmp_path / "logs")}))
        stack.enter_context(mock.patch("tadsr.cli.upscale._reference_runner", _pointwise_runner))
        stack.enter_context(mock.patch("tadsr.runtime.tiling.upscale_tiled", side_effect=ZeroDivisionError("boom")))
        records = stack.enter_context(_capture_errors())
        assert main(argv) == 3
    errors = [r for r in records if r.levelno >= logging.ERROR]
    (log_file,) = (tmp_path / "logs").glob("tadsr-crash-*.log")
    assert str(log_file) in errors[0].getMessage() and "Traceback" in log_file.read_text()
    assert [r.exc_info is not None for r in errors] == ([False, True] if verbose else [False])
    assert not (tmp_path / "o.png").exists()
