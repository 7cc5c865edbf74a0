"""Atomic file and folder writes: a reader sees the old content or the new, never a partial one.

Every writer of the toolkit that replaces a file (PNG outputs, manifests, reports, checkpoints, training state)
or a folder (an artifact, an ``.mlpackage``) goes through this module. A file is written under a hidden,
unique temporary name in the target's own folder (same file system, so the final ``os.replace`` is atomic),
flushed and fsynced, then moved over the target; on any error the temporary file is removed and the target is
untouched. Unique names make concurrent writers of one target safe: the last replace wins.

Core, torch-free (the runtime uses it): only the standard library and :mod:`tadsr.errors`.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from tadsr.errors import InputError

__all__ = [
    "RACE_ERRNOS",
    "atomic_path", "replace_folder", "temp_name", "write_bytes", "write_json", "write_text", "write_with"]


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden, unique sibling of ``path`` (``.<name>.<pid>.<random><suffix>``) for staging a write."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def _check_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: output folder {path.parent} does not exist; create it first")


def write_with(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically through ``write(f)`` on a binary file object. Returns ``path``.

    The file gets the default permissions (umask applied), unlike a ``NamedTemporaryFile`` (0600).

    Raises:
        InputError: the folder does not exist or cannot be written (full, read-only); ``path`` is unchanged.
    """
    path = Path(path)
    _check_folder(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise InputError(f"cannot write to output folder {path.parent}: {e.strerror}; choose a writable folder") from e
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}; free some space or choose another output") from e
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`write_with`)."""
    return write_with(path, lambda f: f.write(data))


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`write_with`)."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:  # fmt: skip
    """Write ``data`` as strict JSON (no NaN/inf), with a final newline, to ``path`` atomically."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False, default=default)
    return write_text(path, text + "\n")


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name (``torch.save``, a library's
    ``save(path)``); on a clean exit it is moved over ``path``, on an error it is removed and ``path`` is kept.

    Args:
        path: the target file.
        suffix: appended to the temporary name (for writers that pick the format from the extension).
    """
    path = Path(path)
    _check_folder(path)
    tmp = temp_name(path, f".tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def replace_folder(src: Path, final: Path) -> Path:
    """Move the folder ``src`` to ``final``, replacing an existing ``final`` only at this moment.

    ``src`` must be on the same file system (a sibling). An existing ``final`` is renamed aside, ``src`` renamed
    into place, and the old one removed; if the second rename fails the old folder is put back. Another writer
    committing the same name at the same moment makes this raise ``OSError`` with ``ENOTEMPTY`` / ``EEXIST`` /
    ``ENOENT`` (callers that expect races retry).

    Raises:
        OSError: the folder could not be moved into place.
    """
    src, final = Path(src), Path(final)
    if not (final.exists() or final.is_symlink()):
        os.rename(src, final)
        return final
    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
    os.rename(final, old)
    try:
        os.rename(src, final)
    except OSError:
        try:
            os.rename(old, final)  # put the previous folder back
        except OSError:  # another writer's folder is there now: drop the previous one
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return final


RACE_ERRNOS = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT)
"""``OSError.errno`` values of :func:`replace_folder` that mean another writer raced for the same name."""
