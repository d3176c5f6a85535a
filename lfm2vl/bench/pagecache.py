"""The weight files' page-cache state, made the same for every engine a benchmark runs.

Every engine here maps its weight files, and the kernel's page cache holds a file in folios whose size depends on how
it got there: read from disk sequentially (readahead), it sits in large folios that a process maps with 2 MB page
table entries; written by a program in small pieces or copied over, it can stay in 4 KB pages until it is evicted. Fewer
TLB misses make a decode step that streams every weight faster: on the Zen 5 VM, 450M bf16 decode ran ~3% faster
from large folios (106.0 / 106.7 / 103.7 against 105.3 / 98.8 / 102.0 tok/s, alternating processes), and
llama.cpp's freshly converted GGUF was 71% mapped in 2 MB pages where the bench's own checkpoint was 0%. `reread`
gives every file the state a fresh read from disk leaves, so a comparison does not depend on each file's history.
"""
from __future__ import annotations

import os
from pathlib import Path

_CHUNK = 8 << 20


def reread(paths) -> int:
    """Evict each file from the page cache and read it back sequentially (Linux; elsewhere nothing is done).
    Pages mapped by a running process stay where they are, so call this before the engines start. Best effort: a
    file that cannot be opened or advised is left as it is (the engine that loads it reports what is wrong).
    Returns the bytes read."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    total = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while chunk := os.read(fd, _CHUNK):
                total += len(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def weight_files(folder) -> list[Path]:
    """The safetensors files of a checkpoint folder."""
    return sorted(Path(folder).glob("*.safetensors"))
