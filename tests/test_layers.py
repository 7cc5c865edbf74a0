"""The architecture's rules, checked on the source (ARCHITECTURE.md).

Layers import only downward: core (``tadsr.<module>``) -> runtime -> formats -> parity -> export -> quantize
-> bench -> cli, with ``train`` beside parity (core only). Every import counts: module level, function level,
``importlib.import_module("...")`` and lazy-name tables (any string literal that names one of our modules).
The runtime is numpy + backend runtimes: no torch, directly or through anything it imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# first-level part -> layer; core modules (tadsr.<module>) are layer 0
LAYER = {"runtime": 1, "formats": 2, "parity": 3, "train": 3, "export": 4, "quantize": 5, "bench": 6, "cli": 7}
# the only core modules the runtime may use: they import neither torch nor each other's heavy parts
RUNTIME_MAY_USE = {"tadsr", "tadsr.errors", "tadsr.fileio", "tadsr.versions"}
MAX_LINES = 800
# The one torch import the runtime needs: executorch's Python bindings take torch tensors only (numpy inputs are
# refused: "Unsupported python type <class 'numpy.ndarray'>") and `executorch.runtime` imports torch itself. It
# stays inside the run method, so importing the runtime loads no torch; a phone app uses runtime/cpp, no Python.
# The Core ML simulator's convolution borrows torch's only when the process already loaded it (the toolkit's parity
# and quantize processes): its imports sit inside the conv path behind that check, so the simulator never loads
# torch itself (tests/test_coreml_sim.py::test_runtime_import_needs_no_torch runs it without torch).
TORCH_AT_RUN_TIME = {
    "runtime/executorch_runner.py",
    "runtime/coreml_sim/kernels/linear.py",  # convolutions through torch when the process has it
    "runtime/coreml_sim/kernels/base.py",  # half-precision conversions through torch when the process has it
}


def _package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {pkg: REPO / folder for pkg, folder in cfg.items()}


def library_modules() -> dict[str, Path]:
    """Every library module name -> its file, from pyproject's package-dir (tests and scripts excluded)."""
    dirs = _package_dirs()
    sub_roots = {d.resolve() for pkg, d in dirs.items() if pkg != "tadsr"}
    mods: dict[str, Path] = {}
    for pkg, root in dirs.items():
        for path in sorted(root.rglob("*.py")):
            if pkg == "tadsr" and any(p.resolve() in sub_roots for p in path.parents):
                continue
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith(".") or p in {"tests", "cpp"} for p in rel.parts):
                continue
            mods[".".join([pkg, *parts])] = path
    return mods


def part_of(module: str) -> str:
    """``tadsr.formats.onnx.ptq`` -> ``tadsr.formats``; core ``tadsr.pipeline`` -> ``tadsr.pipeline``."""
    return ".".join(module.split(".")[:2])


def layer_of(part: str) -> int:
    name = part.split(".")[1] if "." in part else ""
    return LAYER.get(name, 0)


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attr``) starts with."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int]]:
    """Our modules imported anywhere in ``path``: (module, line), relative imports and module-name strings included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("tadsr."):
            names = [node.value.split(":")[0]]  # "pkg.mod:attr" (entry-point style) counts too
        for n in names:
            target = _resolve(n, known)
            if target and target != module:
                found.add((target, node.lineno))
    return sorted(found)


def import_graph() -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> ["file:line", ...] (edges between different first-level parts)."""
    mods = library_modules()
    known = set(mods)
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for mod, path in mods.items():
        for target, line in imports_of(path, mod, known):
            a, b = part_of(mod), part_of(target)
            if a != b:
                graph[a][b].append(f"{path.relative_to(REPO)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_the_scan_sees_the_library() -> None:
    """Guard against a scan that silently finds nothing: every layer has modules and imports are seen."""
    mods = library_modules()
    parts = {part_of(m) for m in mods}
    for name in LAYER:
        assert f"tadsr.{name}" in parts, f"no modules found for tadsr.{name}"
    graph = import_graph()
    assert "tadsr.formats" in graph["tadsr.export"]  # export_model drives the format slices
    assert "tadsr.errors" in graph["tadsr.runtime"]


def test_no_import_cycles_among_first_level_parts() -> None:
    found = cycles(import_graph())
    assert not found, f"import cycles among tadsr's first-level parts: {found}"


def test_layers_import_only_downward() -> None:
    bad = []
    for a, targets in import_graph().items():
        for b, where in targets.items():
            la, lb = layer_of(a), layer_of(b)
            if la == 0 and lb == 0:
                continue  # core modules among themselves: the cycle test covers them
            if lb >= la:
                bad.append(f"{a} (layer {la}) imports {b} (layer {lb}) at {', '.join(where[:3])}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_runtime_uses_only_torch_free_core() -> None:
    bad = [
        f"tadsr.runtime imports {b} at {', '.join(where[:3])}"
        for b, where in import_graph()["tadsr.runtime"].items()
        if layer_of(b) == 0 and b not in RUNTIME_MAY_USE
    ]
    assert not bad, "\n".join(bad)


def torch_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level?) of every ``import torch`` / ``from torch... import`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n.split(".")[0] == "torch" for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_no_torch_import_in_runtime_source() -> None:
    bad = []
    for mod, path in library_modules().items():
        if part_of(mod) != "tadsr.runtime":
            continue
        rel = path.relative_to(REPO).as_posix()
        for line, top in torch_imports(path):
            if rel not in TORCH_AT_RUN_TIME or top:
                bad.append(f"{rel}:{line} imports torch" + (" at module level" if top else ""))
    assert not bad, "\n".join(bad)


def test_importing_the_runtime_loads_no_torch() -> None:
    """Every runtime module imported in a fresh interpreter: torch must not be loaded (an app ships without it)."""
    runtime = sorted(m for m in library_modules() if part_of(m) == "tadsr.runtime")
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in runtime)
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False", f"importing {runtime} loaded torch"


def test_no_library_file_over_the_line_limit() -> None:
    long = {str(p.relative_to(REPO)): n for p in library_modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"library files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("from tadsr.cli import main\n", "tadsr.cli"),  # an upward import, written at module level
        ("def f():\n    from tadsr.bench.bench import run_bench\n", "tadsr.bench"),  # hidden in a function
        ("import importlib\nM = importlib.import_module('tadsr.quantize.api')\n", "tadsr.quantize"),  # a string
        ("from ..quantize import api\n", "tadsr.quantize"),  # relative
    ],
)
def test_the_scan_catches_every_import_form(tmp_path: Path, src: str, expected: str) -> None:
    """The scanner itself: each way of importing an upper layer from the formats layer is found."""
    path = tmp_path / "probe.py"
    path.write_text(src)
    known = set(library_modules())
    found = {part_of(m) for m, _ in imports_of(path, "tadsr.formats.probe", known)}
    assert expected in found
