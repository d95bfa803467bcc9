"""Run folders: every `fit` writes a new `<save_dir>/<name>/version_N` (Lightning's default) and then points
`<save_dir>/<name>/latest` at it, so commands can name the newest run without overwriting older ones.

`latest` is a relative symlink, replaced atomically (a new link renamed over the old one). Where symlinks cannot
be made (some file systems, Windows without the privilege) it is a small text file holding the folder's name;
`resolve_run_pointer` reads either form, so `runs/<name>/latest/model.pt` works in both cases.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["LATEST", "point_latest", "resolve_run_pointer", "working_directory"]

LATEST = "latest"


def point_latest(run_dir: str | os.PathLike) -> Path | None:
    """Make `<parent of run_dir>/latest` point to `run_dir`; returns the pointer (None if run_dir is the pointer)."""
    run_dir = Path(run_dir)
    if run_dir.name == LATEST:
        return None
    pointer = run_dir.parent / LATEST
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    if pointer.is_dir() and not pointer.is_symlink():
        # a real folder (a run pinned to version "latest" by hand): never replace a run with a pointer
        return None
    try:
        os.symlink(run_dir.name, temporary, target_is_directory=True)
    except (OSError, NotImplementedError):
        temporary.write_text(run_dir.name + "\n")
    os.replace(temporary, pointer)  # atomic: readers see the old pointer or the new one, never none
    return pointer


def resolve_run_pointer(path: str | os.PathLike) -> Path:
    """`path` with a text-file `latest` pointer among its parents replaced by the folder it names (a symlink
    pointer needs nothing: the file system follows it)."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part != LATEST:
            continue
        pointer = Path(*parts[:i + 1])
        if pointer.is_file() and pointer.stat().st_size < 4096:
            target = pointer.read_text().strip()
            if target and "/" not in target and "\\" not in target and target not in (".", ".."):
                return resolve_run_pointer(Path(*parts[:i], target, *parts[i + 1:]))
    return path


@contextlib.contextmanager
def working_directory(path: str | os.PathLike):
    """contextlib.chdir, which Python 3.10 lacks (configs name files relative to the repository root)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
