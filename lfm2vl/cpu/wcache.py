"""Converted weights kept on disk: a checkpoint's bf16 weights packed in 12 bits, or quantized to int8 / int4, are
written once to a safetensors file and memory-mapped at every later load, as llama.cpp maps its GGUF.

Two gains. Loading skips the conversion (3B: 3-7 s of packing, ~1-2 s of quantizing, most of it reading every bf16
weight). And the weights a decode step streams are file pages: read back from disk after writing, the page cache
holds them in large folios that map in 2 MB pages, where converted weights in the process's own memory sit in 4 KB
pages (a TLB miss, and a stop of the hardware prefetchers, every 4 KB). On the 2-core Zen 4 VM, against llama.cpp
(which maps its GGUF the same way) at 450M: packed 1.27 -> 1.35x, int8 1.12 -> 1.27x, int4 1.16 -> 1.28x.

The file of a checkpoint folder and format (int8 / int4 name the float dtype they come from: `int8-bfloat16`) is
`<folder hash>-<format>-<identity>.safetensors` under `cache_dir()`; the identity hashes the format's version and
each weight file's and config's name, size and modification time, so a changed checkpoint gets a new file and its
old one is removed. Writes go to a temporary file, synced and renamed into
place (a crash or a concurrent writer never leaves a partial file under the final name); a file that does not read
back as expected is rebuilt. The first load writes the file and reads it back (3B packed ~20 s on the Zen 4 VM's
disk); later loads convert nothing. Where the folder cannot be written (read-only, full), loading converts in memory
as without a cache, with one warning. `LFM2VL_WEIGHT_CACHE=off` turns it off; a path moves it.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..files.atomic import write_file
from .memory import release_mapped_pages, reread_file

ENV = "LFM2VL_WEIGHT_CACHE"
VERSION = 1  # of the files' contents: a change in a format's layout bumps it
_OFF = ("0", "off", "no", "false", "none")


def cache_dir() -> Path | None:
    """Where converted weights are kept: $LFM2VL_WEIGHT_CACHE, else $XDG_CACHE_HOME/lfm2vl/converted (by default
    ~/.cache/lfm2vl/converted); None when $LFM2VL_WEIGHT_CACHE says off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lfm2vl" / "converted"


class WeightCache:
    """The cached file of one checkpoint folder in one format ("bf16_packed", "int8", "int4", ...)."""

    def __init__(self, folder: str | os.PathLike, fmt: str, root: Path):
        self.fmt, self.root = fmt, root
        self.prefix = f"{self.folder_prefix(folder)}{fmt}-"
        folder = Path(folder).resolve()
        ident = hashlib.sha256(f"{fmt}:{VERSION}".encode())
        for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
            st = f.stat()
            ident.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        self.path = root / f"{self.prefix}{ident.hexdigest()[:16]}.safetensors"

    @staticmethod
    def folder_prefix(folder: str | os.PathLike) -> str:
        """The start of every cached file's name of this checkpoint folder."""
        return f"{hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]}-"

    @classmethod
    def for_folder(cls, folder: str | os.PathLike | None, fmt: str) -> "WeightCache | None":
        """The cache of folder's weights in fmt, or None when caching is off or folder is not a checkpoint folder."""
        root = cache_dir()
        if root is None or folder is None or not Path(folder).is_dir():
            return None
        return cls(folder, fmt, root)

    def read(self, check: dict[str, Callable[[torch.Tensor], None]]) -> dict[str, torch.Tensor] | None:
        """The cached tensors (memory-mapped, read-only) when the file holds exactly the names in `check` and each
        check(tensor) passes (it raises ValueError saying what is wrong); None when there is no file. A file that
        holds anything else is removed (it is rebuilt)."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as sf:
                if set(sf.keys()) != set(check):
                    raise ValueError(f"it holds {len(set(sf.keys()))} tensors, expected {len(check)}")
                out = {k: sf.get_tensor(k) for k in check}
            for k, fn in check.items():
                fn(out[k])
            return out
        except Exception as e:  # a truncated or foreign file: rebuilt from the checkpoint
            warnings.warn(f"{self.path} does not hold the expected converted weights ({e}); rebuilding it",
                          RuntimeWarning, stacklevel=3)
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # a folder that cannot be written: the write after converting says so, once
                pass
            return None

    def write(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Write tensors (contiguous CPU tensors) under the final name, then read the file back from disk so that its
        pages sit in large folios; older files of the same folder and format are removed. False (with a warning)
        where the cache folder cannot be written."""
        from safetensors.torch import save_file

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # fsync: on disk before it takes the final name, and clean pages that can be evicted below
            write_file(self.path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": self.fmt,
                                                                                        "version": str(VERSION)}),
                       fsync=True)
        except OSError as e:
            warnings.warn(f"could not keep the {self.fmt} weights in {self.root} ({e.strerror or e}); they are "
                          f"converted at every load (set {ENV} to another folder, or to off)", RuntimeWarning,
                          stacklevel=3)
            return False
        for old in self.root.glob(f"{self.prefix}*.safetensors"):
            if old != self.path:
                old.unlink(missing_ok=True)
        reread_file(self.path)
        return True


def cached_files(folder: str | os.PathLike) -> list[Path]:
    """The converted weights' files kept for a checkpoint folder, in every format."""
    root = cache_dir()
    if root is None or not root.is_dir():
        return []
    return sorted(root.glob(f"{WeightCache.folder_prefix(folder)}*.safetensors"))


Slot = tuple[str, nn.Module, str, nn.Module]  # a linear's qualified name, its parent, its attribute there, itself


def convert_linears(slots: list[Slot], cache: WeightCache | None, convert: Callable[[nn.Module], nn.Module],
                    parts: Callable[[nn.Module], dict[str, torch.Tensor]],
                    checks: Callable[[nn.Module], dict[str, Callable[[torch.Tensor], None]]],
                    build: Callable[[nn.Module, dict[str, torch.Tensor], nn.Parameter | None], nn.Module]) -> int:
    """Replace each slot's linear by its converted module: convert(linear) does the work; with a cache, the
    converted tensors (parts(module): {"weight": ...}, checked by checks(linear) on reading) are read from its file
    when it holds them (build(linear, tensors, bias) makes the module; the float weight is not read, and its mapped
    pages leave the resident set) or else written there, and either way the modules end up holding the file's
    memory-mapped tensors. Returns the count."""
    want = {f"{name}.{part}": fn for name, _, _, lin in slots for part, fn in checks(lin).items()}
    stored = None if cache is None else cache.read(want)
    done = []
    for name, parent, attr, lin in slots:
        if stored is None:
            new = convert(lin)
        else:
            release_mapped_pages(lin.weight)
            bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            new = build(lin, {part: stored[f"{name}.{part}"] for part in checks(lin)}, bias)
        setattr(parent, attr, new)
        done.append((name, new))
    if stored is None and cache is not None and done:
        if cache.write({f"{name}.{part}": t.contiguous() for name, m in done for part, t in parts(m).items()}):
            mapped = cache.read(want)  # the file's pages instead of the process's own copies
            if mapped is not None:
                for name, m in done:
                    for part in parts(m):
                        setattr(m, part, mapped[f"{name}.{part}"])
    return len(done)

