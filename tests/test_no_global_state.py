"""No module-level mutable state in library code (AST scan of every library module).

A library function must give the same answer however often, and in whichever order, it was called before:
state that outlives a call belongs to an object the caller owns (e.g. :class:`tadsr.parity.check.TraceCache`).
The scan flags:

* a module-level container (dict / list / set literal or comprehension, ``dict()``, ``OrderedDict()``,
  ``defaultdict()``, ``deque()``, ...) that the module mutates (item assignment or deletion, augmented
  assignment, a mutating method such as ``append`` / ``update`` / ``setdefault`` / ``pop`` / ``move_to_end``);
* a ``global`` statement (a function rebinding a module name);
* ``functools.lru_cache`` / ``functools.cache`` on a function taking a path (a file changes on disk, the cache
  does not).

The scanner's self-test plants each violation in a synthetic module and checks that it is caught.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_CONTAINER_CALLS = {"dict", "list", "set", "OrderedDict", "defaultdict", "deque", "Counter", "bytearray"}
_MUTATORS = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "popleft", "clear",
             "remove", "discard", "move_to_end", "appendleft", "extendleft", "sort", "reverse"}  # fmt: skip
_CACHES = {"lru_cache", "cache"}
_PATHY_NAMES = ("path", "dir", "folder", "file", "root")
# registries filled by a decorator while the module is imported, read-only afterwards
IMPORT_TIME_REGISTRIES = {"_KERNELS"}


def _is_container(node: ast.AST | None) -> bool:
    if isinstance(node, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        return name in _CONTAINER_CALLS
    return False


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Top-level statements, including those inside module-level ``if`` / ``try`` / ``with`` blocks."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        out.append(node)
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return out


def _containers(tree: ast.Module) -> dict[str, int]:
    names: dict[str, int] = {}
    for node in _module_level(tree):
        if isinstance(node, ast.Assign) and _is_container(node.value):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names[t.id] = node.lineno
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and _is_container(node.value):
            names[node.target.id] = node.lineno
    return names


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_pathy(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    for a in args:
        ann = ast.unparse(a.annotation) if a.annotation is not None else ""
        if "Path" in ann or any(a.arg == p or a.arg.endswith("_" + p) for p in _PATHY_NAMES):
            return True
    return False


def _decorator_name(d: ast.expr) -> str | None:
    d = d.func if isinstance(d, ast.Call) else d
    return d.attr if isinstance(d, ast.Attribute) else d.id if isinstance(d, ast.Name) else None


def scan(source: str, filename: str = "<module>") -> list[str]:
    """Violations in one module's source, as ``"file:line: what"``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    containers = {k: v for k, v in _containers(tree).items() if k not in IMPORT_TIME_REGISTRIES}
    for node in ast.walk(tree):
        mutated: str | None = None
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) or (isinstance(node, ast.AugAssign) and isinstance(t, ast.Name)):
                    mutated = _root_name(t) if _root_name(t) in containers else mutated
                elif isinstance(node, ast.Delete) and isinstance(t, ast.Name):
                    pass
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS:
            if isinstance(node.func.value, ast.Name) and node.func.value.id in containers:
                mutated = node.func.value.id
        if mutated is not None:
            found.append(f"{filename}:{node.lineno}: module-level container {mutated!r} (line "
                         f"{containers[mutated]}) is mutated")  # fmt: skip
        if isinstance(node, ast.Global):
            found.append(f"{filename}:{node.lineno}: 'global {', '.join(node.names)}' rebinds module state")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_pathy(node):
            if any(_decorator_name(d) in _CACHES for d in node.decorator_list):
                found.append(f"{filename}:{node.lineno}: {node.name}() takes a path and is cached (lru_cache/cache)")
    return found


def library_files() -> list[Path]:
    """Every library module, from pyproject's package-dir (tests and scripts excluded)."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    files: set[Path] = set()
    for folder in cfg.values():
        files |= {p for p in (REPO / folder).glob("*.py")}
    return sorted(files)


PLANTED = '''
from collections import OrderedDict
import functools
from pathlib import Path

_CACHE = {}
_SEEN: list[str] = []
_TRACES = OrderedDict()
_COUNT = 0
TABLE = {"a": 1}  # read-only table: fine


def remember(k, v):
    _CACHE[k] = v


def see(x):
    _SEEN.append(x)
    _TRACES.move_to_end(x)


def bump():
    global _COUNT
    _COUNT += 1


@functools.lru_cache(maxsize=None)
def read(path: Path) -> str:
    return path.read_text()


@functools.cache
def table() -> dict:
    return dict(TABLE)
'''


def test_scanner_catches_planted_state() -> None:
    found = scan(PLANTED, "planted.py")
    text = "\n".join(found)
    assert "'_CACHE'" in text and "'_SEEN'" in text and "'_TRACES'" in text, text
    assert "global _COUNT" in text and "read() takes a path and is cached" in text, text
    assert "TABLE" not in text and "table()" not in text, text  # read-only table and a path-free cache are fine
    assert len(found) == 5, text


def test_scanner_passes_clean_code() -> None:
    clean = "import functools\n\nNAMES = ('a', 'b')\nTABLE = {'a': 1}\n\n\ndef f(x):\n    local = {}\n" \
            "    local[x] = TABLE.get(x)\n    return local\n\n\n@functools.cache\ndef g(n: int) -> int:\n    return n\n"
    assert scan(clean) == []


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_level_mutable_state(path: Path) -> None:
    found = scan(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not found, "module-level state (move it into an object the caller owns):\n" + "\n".join(found)
