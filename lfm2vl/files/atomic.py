"""Atomic writes: a file or folder is written under a temporary name beside its final path, then renamed into
place (os.replace: atomic on one file system). A reader never sees it half-written, and a write that fails
leaves the previous file or folder as it was and no temporary behind.

The result gets the mode a plain open() or mkdir() gives under the process umask (0644 / 0755 under umask 022):
the temporaries tempfile makes, and the files some writers make, are owner-only, so the mode is set before the
rename.

    write_text(path, text)
    write_file(path, lambda tmp: save_file(tensors, str(tmp)))   # any writer that takes a path
    with folder(out) as tmp:                                      # a whole folder, renamed into place at the end
        ...write into tmp...
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

FILE_MODE = 0o666  # open()'s, before the umask
EXEC_MODE = 0o777  # an executable's or a folder's (mkdir()'s), before the umask


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only set it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(dest: str | os.PathLike, write: Callable[[Path], object], *, mode: int = FILE_MODE,
               fsync: bool = False) -> Path:
    """Call write(tmp) to write a temporary file beside dest, then rename it to dest; returns dest. mode: the
    permissions before the umask (EXEC_MODE for a program or library); fsync: flush it to disk before the rename."""
    dest = Path(dest)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode & ~umask())
        if fsync:
            _fsync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def write_text(dest: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_file(dest, lambda tmp: tmp.write_text(text, encoding=encoding))


@contextmanager
def folder(dest: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary folder beside dest to write into; when the block ends without an error it becomes dest (an
    existing dest is replaced: moved aside, and deleted once the new one is in place), else it is deleted. Its
    files then get a plain write's mode (some writers, e.g. safetensors' save_file, make owner-only files);
    executables stay executable. fsync: flush its files to disk before the rename."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        mask = umask()
        os.chmod(tmp, EXEC_MODE & ~mask)
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, (EXEC_MODE if f.stat().st_mode & 0o111 else FILE_MODE) & ~mask)
                if fsync:
                    _fsync(f)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(tmp: Path, dest: Path) -> None:
    """Put the finished folder tmp at dest: a rename, so dest is never half-written; an old dest is moved aside
    first and deleted only once the new one is in place (put back if the rename fails)."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / "x")
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old / "x", dest)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
