"""Atomic writes (tadsr.fileio): a target is the old content or the new one, never a partial file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tadsr import fileio
from tadsr.errors import InputError


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    assert fileio.write_text(target, "new") == target
    assert target.read_text() == "new"
    fileio.write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    fileio.write_json(tmp_path / "b.json", {"x": [1, 2]}, sort_keys=True)
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "b.json").read_text().endswith("\n")
    assert _leftovers(tmp_path, {"a.txt", "b.json"}) == []


def test_error_while_writing_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def half_then_fail(f) -> None:
        f.write(b"partial")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        fileio.write_with(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"a.bin"}) == []
    with pytest.raises(ValueError):  # NaN is not strict JSON: refused before anything is written
        fileio.write_json(target, {"x": float("nan")})
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"a.bin"}) == []


def test_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        fileio.write_text(tmp_path / "nope" / "a.txt", "x")
    with pytest.raises(InputError, match="does not exist"), fileio.atomic_path(tmp_path / "nope" / "a.pt"):
        pass


def test_atomic_path_for_writers_that_want_a_name(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    target.write_text("old")
    with fileio.atomic_path(target, ".pt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".state.pt.") and tmp.suffix == ".pt"
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("save failed")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path, {"state.pt"}) == []


def test_temp_names_are_unique(tmp_path: Path) -> None:
    # two writers of one target (concurrent checkpoints) must not share a temp file
    names = {fileio.temp_name(tmp_path / "model.safetensors") for _ in range(50)}
    assert len(names) == 50 and all(n.name.startswith(".model.safetensors.") for n in names)


def test_replace_folder(tmp_path: Path) -> None:
    final = tmp_path / "art"
    new = tmp_path / ".art.tmp"
    new.mkdir()
    (new / "f").write_text("1")
    assert fileio.replace_folder(new, final) == final
    assert (final / "f").read_text() == "1" and not new.exists()
    newer = tmp_path / ".art.tmp2"
    newer.mkdir()
    (newer / "g").write_text("2")
    fileio.replace_folder(newer, final)  # an existing folder is replaced whole, not merged
    assert sorted(p.name for p in final.iterdir()) == ["g"]
    assert _leftovers(tmp_path, {"art"}) == []


def test_replace_folder_failure_puts_the_old_folder_back(tmp_path: Path) -> None:
    final = tmp_path / "art"
    final.mkdir()
    (final / "f").write_text("old")
    with pytest.raises(OSError):
        fileio.replace_folder(tmp_path / "missing", final)
    assert (final / "f").read_text() == "old"
    assert _leftovers(tmp_path, {"art"}) == []
