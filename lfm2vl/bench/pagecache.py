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

from pathlib import Path

from ..cpu.memory import reread_file
from ..cpu.wcache import cached_files


def reread(paths) -> int:
    """Evict each file from the page cache and read it back sequentially (`memory.reread_file`). Pages mapped by a
    running process stay where they are, so call this before the engines start. Best effort: a file that cannot be
    opened or advised is left as it is (the engine that loads it reports what is wrong). Returns the bytes read."""
    return sum(reread_file(p) for p in paths)


def weight_files(folder) -> list[Path]:
    """The safetensors files of a checkpoint folder, and the files of its converted weights that lfm2vl keeps
    (cpu/wcache.py: packed or quantized weights an engine maps)."""
    return sorted(Path(folder).glob("*.safetensors")) + cached_files(folder)
