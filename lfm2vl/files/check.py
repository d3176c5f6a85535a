"""Whether an output path can be written, asked before the work that produces it starts: a run that fails only
when it saves loses its work. Nothing is created; a file is created and removed in the folder that will hold the
output (or in its nearest existing ancestor, where the missing folders are created when writing), which answers
for permissions, read-only mounts and pseudo file systems alike.

    check_file("--json", args.json)                  # a file written atomically in its folder
    check_folder("--output", out, beside=True)       # a folder written beside its place, then renamed (atomic.folder)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written; the message names it (and the option that gave it) and says why."""


def check_file(option: str, path: str | os.PathLike, *, make_parents: bool = False) -> Path:
    """path as a Path, or OutputError: it is a folder, a missing folder on the way is not created when writing
    (make_parents False), a path component is a file, or its folder does not take new files."""
    p = Path(path).expanduser()
    label = _label(option, path)
    if p.is_dir():
        raise OutputError(f"{label} is a folder; expected a file name")
    above = _existing(p.parent, label)
    if above != p.parent and not make_parents:
        raise OutputError(f"{label}: folder {p.parent} does not exist")
    _probe(above, label)
    return p


def check_folder(option: str, path: str | os.PathLike, *, beside: bool = False) -> Path:
    """path as a Path, or OutputError: it is a file, a path component is a file, or the folder that receives the
    new files does not take them. beside: the output is written beside its place and renamed into it, so its
    parent folder must take new entries (else the folder itself, once it exists)."""
    p = Path(path).expanduser()
    label = _label(option, path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{label} is a file, not a folder")
    _probe(_existing(p.parent if beside else p, label), label)
    return p


def _label(option: str, path) -> str:
    return f"{option} {os.fspath(path)}" if option else os.fspath(path)


def _existing(p: Path, label: str) -> Path:
    """The nearest of p and its ancestors that exists; OutputError where that one is not a folder."""
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"{label}: {p} is a file, not a folder")
    return p


def _probe(folder: Path, label: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".lfm2vl-check-", dir=folder)
    except OSError as e:
        raise OutputError(f"{label}: cannot create files in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)
