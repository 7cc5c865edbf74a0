"""``tadsr all --resume``: reuse the export and INT8 stages an earlier run into the same folder finished.

Every finished stage is recorded in ``OUT/.resume/<lane>.json`` with a *key*: the sha256 of everything its output
depends on (the networks' checkpoint digests, the stage's settings, the tool versions and the tadsr source files
themselves, so an edited or upgraded toolkit never reuses stale artifacts), and the artifact folders it wrote. With
``--resume`` a stage is skipped when its recorded key equals the key of this run and every folder it wrote is
intact (its manifest's files present with their recorded sha256). The record is written after the stage's folders
(each written atomically), so a run killed mid-stage redoes only that stage. Parity and the benchmark always run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from tadsr import fileio
from tadsr.errors import InputError

__all__ = ["ResumeLog", "source_digest", "stage_key"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the installed tadsr packages' Python sources and numerics.json (paths and contents): the
    version of this toolkit's code, for caches that must not outlive an edit (``tadsr all --resume``, capture
    files); the distribution version does not change between edits of a source checkout."""
    h = hashlib.sha256()
    for pkg in ("tadsr", "tadsr.export", "tadsr.formats", "tadsr.quantize", "tadsr.runtime", "tadsr.parity"):
        root = Path(str(resources.files(pkg)))
        for f in sorted([*root.rglob("*.py"), *root.glob("numerics.json")]):
            h.update(f"{pkg}/{f.relative_to(root).as_posix()}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def stage_key(**parts: Any) -> str:
    """The key of a stage: sha256 of its inputs (``parts``, JSON with sorted keys), the tool versions and
    :func:`source_digest`."""
    from tadsr.versions import tool_versions

    blob = json.dumps({"parts": parts, "versions": tool_versions(), "source": source_digest()}, sort_keys=True,
                      default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def _intact(folder: Path) -> bool:
    from tadsr.runtime.runner import read_manifest, verify_files

    try:
        verify_files(folder, read_manifest(folder))
    except (InputError, OSError, ValueError) as e:
        log.info("resume: %s is not reusable (%s)", folder, e)
        return False
    return True


class ResumeLog:
    """The finished stages of one lane in ``out/.resume/<lane>.json``; ``enabled`` says whether they may be
    reused (they are recorded either way, so that a later ``--resume`` can use them)."""

    def __init__(self, out: Path, lane: str, enabled: bool) -> None:
        self.path = Path(out) / ".resume" / f"{lane}.json"
        self.enabled = enabled
        self.stages: dict[str, Any] = {}
        if self.path.exists():
            try:
                self.stages = json.loads(self.path.read_text())["stages"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("resume: ignoring unreadable %s (%s)", self.path, e)

    def reusable(self, stage: str, key: str, parent: Path) -> list[dict[str, str]] | None:
        """The folders (``name``, ``precision``) stage ``stage`` wrote under ``parent`` in an earlier run with the
        same key, if reuse is enabled and all are intact; else None."""
        rec = self.stages.get(stage)
        if not self.enabled or not isinstance(rec, Mapping) or rec.get("key") != key:
            return None
        folders = rec.get("folders") or []
        if not all(_intact(Path(parent) / f["name"]) for f in folders):
            return None
        log.info("resume: %s reused (%d folder%s, key %s)", stage, len(folders), "" if len(folders) == 1 else "s",
                 key[:12])  # fmt: skip
        return list(folders)

    def record(self, stage: str, key: str, folders: Sequence[Mapping[str, str]]) -> None:
        self.stages[stage] = {"key": key, "folders": [dict(f) for f in folders]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_json(self.path, {"schema": 1, "stages": self.stages})
