"""Resident-memory helpers: glibc heap policy and trimming, the startup's library pages, and the opt-in low-memory
mode (peak RSS).

Float weights of the checkpoint's dtype stay memory-mapped from the file (loading.py), and every page this process has
read stays in its resident set. A request with images reads the vision tower, then the language model, so both sit in
RSS together: at the 450M shapes 172 MB + 708 MB on top of ~250 MB of torch and libraries, over 1.1 GB before any
activation. The low-memory mode (lowmem.py: `lfm2vl.load(..., low_memory=True)`, `--low-memory`) keeps the two from adding up:
- before the tower runs, room for it (its weights and one encoder batch's activations) is made from the language
  model's last-read weights (`release_tail`: the output head, then the last layers), and the tower is mapped in;
  after it, the tower's and projector's pages are dropped, glibc's free heap pages returned (the tower's
  temporaries), and the dropped language-model weights mapped back, each in one `populate`;
- the page cache keeps the pages, so the next read re-maps them from memory (no disk read). That costs time on every
  image request (dropping and re-mapping pages around the tower; dropping only the tail of the language model costs
  less than dropping all of it, for the same peak). Hence opt-in (`lfm2vl bench --low-memory` measures it).
Only pages that still equal the file are dropped (`release_mapped_pages`); weights converted to another dtype,
quantized or written in place are anonymous memory and stay.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import sys

import numpy as np
import torch
from torch import nn

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_NOHUGEPAGE = 15
_MADV_POPULATE_READ = 22


def _madvise():
    """libc's madvise with its argument types set, or None where there is none (not glibc)."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def release_mapped_pages(t: torch.Tensor) -> int:
    """Drop the resident pages that lie wholly inside CPU tensor t's bytes, if they all map the checkpoint file
    unmodified; returns the bytes released (0 when nothing was done). Linux only; a no-op elsewhere.

    Why: weights are memory-mapped, and a mapped page stays in this process's RSS after it is read, even when no
    tensor uses it for a while (int8 quantization reads the float weights once; the low-memory mode drops idle
    weights). MADV_DONTNEED unmaps them while the page cache keeps them, so a later read re-maps them from memory
    (it does not fault them in from disk unless the kernel has evicted them). It is data-safe only for pages that
    still equal the file: a private page (the tensor was written in place, or it is not file-backed at all) would
    be zeroed or reverted, so /proc/self/pagemap is checked first and then nothing is released.

    The released range is also advised MADV_NOHUGEPAGE: a file read from disk sits in the page cache in large
    folios, and a later touch of one byte (a tied embedding table's lookups, once the output head is quantized) would
    map its whole 2 MB back; with the advice it maps 4 KB pages (and the kernel's fault-around). At 450M that kept
    int4's peak RSS at ~590 MiB instead of ~665.
    """
    return _release(t, small_pages=True)[0]


def release_span(tensors: list[torch.Tensor]) -> int:
    """Drop the mapped pages of CPU tensors that lie back to back in memory (one module's weights, as a safetensors
    file stores them) in one check and one madvise instead of one per tensor; returns the bytes released (0 when
    they are not back to back, or not all file pages that equal the file: release_mapped_pages)."""
    if not tensors or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return 0
    lo = min(t.data_ptr() for t in tensors)
    hi = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    if hi - lo != sum(t.numel() * t.element_size() for t in tensors):
        return 0  # gaps, or overlapping views: not one span of these tensors alone
    return _release_range(lo, hi)[0]


def _release(t: torch.Tensor, small_pages: bool = False) -> tuple[int, bool]:
    """Drop t's mapped pages (`_release_range`), and whether all of them were resident before."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return 0, False
    return _release_range(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), small_pages)


def _release_range(lo: int, hi: int, small_pages: bool = False) -> tuple[int, bool]:
    """Release the whole pages inside the addresses [lo, hi) when all are file pages equal to the file; the bytes
    released and whether all were resident before. small_pages: later reads of the range map 4 KB pages
    (MADV_NOHUGEPAGE), not the 2 MB of a large folio."""
    start = -(-lo // _PAGE) * _PAGE  # whole pages only: the neighbours' pages stay untouched
    end = hi // _PAGE * _PAGE
    if end <= start:
        return 0, False
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            n = (end - start) // _PAGE
            entries = np.frombuffer(os.pread(fd, 8 * n, start // _PAGE * 8), dtype=np.uint64)
        finally:
            os.close(fd)
    except OSError:
        return 0, False
    in_memory = (entries >> np.uint64(62)) & np.uint64(3)  # bit 63 present, bit 62 swapped out
    file_or_shared = (entries >> np.uint64(61)) & np.uint64(1)
    if len(entries) != n or bool(((in_memory > 0) & (file_or_shared == 0)).any()):
        return 0, False  # a private (anonymous or copied-on-write) page: its content is not in the file
    madvise = _madvise()
    if madvise is None or madvise(start, end - start, _MADV_DONTNEED) != 0:
        return 0, False
    if small_pages:
        madvise(start, end - start, _MADV_NOHUGEPAGE)  # advice: a kernel without it maps as before
    return end - start, bool(in_memory.all())


# glibc's mallopt parameters, and the values keep_heap_pages sets: the largest mmap threshold glibc accepts (its own
# dynamic threshold's ceiling on 64-bit), and a trim threshold above the heap a 450M or 3B request grows.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_heap_pages() -> bool:
    """Let glibc keep freed activations' pages for the next ones (process-wide); returns whether it was set.

    torch's CPU tensors come straight from malloc. By default glibc gives each block over its dynamic mmap threshold
    its own mapping and trims the top of the heap whenever more than twice that threshold is free there, so every
    layer's activations fault fresh zeroed pages in again (page faults and brk were ~8% of a prefill). With a fixed
    32 MB mmap threshold and a 256 MB trim threshold, blocks under 32 MB reuse the heap's free pages: prefill and
    vision stop faulting, and the peak RSS stays within ~15 MB of what it was (a heap that is not trimmed, but no
    separate mappings beside it; docs/cpu.md has the figures). Idle memory still goes back through `trim_heap` (the
    server calls it when its queue empties). A user's own MALLOC_* settings (environment or GLIBC_TUNABLES) are
    left alone; a no-op without glibc."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_SETTINGS) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap_bytes() -> int | None:
    """Bytes glibc holds free in its heaps (all arenas: mallinfo2's fordblks), or None without glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def trim_heap(above: int = 0) -> None:
    """Return glibc's free heap pages to the OS: freed temporaries leave holes that glibc keeps (tens of MB after a
    vision pass or a quantization). With `above`, only when more than that many bytes are free (a request's
    activations fault back in after a trim: ~0.5 us a page). No-op without glibc."""
    if above > 0:
        free = free_heap_bytes()
        if free is None or free <= above:
            return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# What a request may leave free in the heap before the next vision pass trims it: at 450M a 512-token or a 512x512
# image request leaves 33-40 MB (the next one reuses it without faults), an 1807-token tiled one 66-99 MB.
TRIM_ABOVE = 64 << 20


_LIBRARY = re.compile(r"\.so(\.\d+)*$")


def release_library_pages() -> int:
    """Unmap the resident pages of the loaded shared libraries' code and read-only data; returns the bytes of the
    mappings released (0 where /proc/self/smaps or madvise is missing). Process-wide, Linux only.

    Why: importing torch and loading a model run code that never runs again (libtorch's operator registrations,
    the loader), and every page of it stays in the resident set: ~65 MB of libtorch_cpu's code after a 450M
    request, of which a request uses ~22 MB. MADV_DONTNEED unmaps the pages while the page cache keeps them, so
    the code a later request runs maps back in (minor faults, a few thousand on the first request) and the rest
    leaves the resident set. Only private read-only mappings of `.so` files without a single private page
    (resident or swapped out) are touched: their content is the file's, so nothing is lost (a mapping with a
    copied-on-write page, such as relocated data made read-only, is left alone).
    """
    madvise = _madvise() if sys.platform.startswith("linux") else None
    if madvise is None:
        return 0
    try:
        with open("/proc/self/smaps") as f:
            spans = _droppable_library_spans(f.read())
    except OSError:
        return 0
    return sum(hi - lo for lo, hi in spans if madvise(lo, hi - lo, _MADV_DONTNEED) == 0)


def _droppable_library_spans(smaps: str) -> list[tuple[int, int]]:
    """(start, end) of each private read-only mapping of a `.so` file in /proc/self/smaps' text whose pages are all
    the file's: its Anonymous (copied-on-write pages) and Swap (such pages swapped out) lines both say 0 kB. A
    mapping whose entry lacks the Anonymous line is not trusted."""
    found: list[list[int]] = []
    cur: list[int] | None = None
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: address range, permissions, offset, device, inode, path
            cur = None
            if len(fields) > 5 and fields[1] in ("r-xp", "r--p") and _LIBRARY.search(fields[5]):
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                cur = [lo, hi, 0, 0]  # start, end, private kB, whether the Anonymous line was seen
                found.append(cur)
        elif cur is not None and fields[0] in ("Anonymous:", "Swap:"):
            cur[2] += int(fields[1])
            cur[3] |= fields[0] == "Anonymous:"
    return [(lo, hi) for lo, hi, kb, seen in found if seen and kb == 0]


def reread_file(path, chunk: int = 8 << 20) -> int:
    """Evict a file from the page cache and read it back sequentially, so that it sits there in the large folios a
    fresh read from disk leaves (mapped in 2 MB pages), not in the 4 KB pages writing it may have left (Linux;
    elsewhere nothing is done). Pages a process maps stay where they are. Best effort: a file that cannot be opened or
    advised is left as it is. Returns the bytes read."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    total = 0
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while data := os.read(fd, chunk):
            total += len(data)
    except OSError:
        pass
    finally:
        os.close(fd)
    return total


def weights(*modules: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of `modules`, in module order, shared (tied) ones once, detached."""
    seen, out = set(), []
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t.detach())
    return out


def release_weights(*modules: nn.Module) -> list[torch.Tensor]:
    """Drop the mapped pages of the modules' weights (parameters and buffers). Returns the weights that were wholly
    resident before (in use, so worth mapping back with `populate`), not e.g. an embedding table of which only the
    looked-up rows were read."""
    return [t for t in weights(*modules) if _release(t)[1]]


def release_tail(tensors: list[torch.Tensor], nbytes: int) -> list[torch.Tensor]:
    """Drop the mapped pages of the last of `tensors` (weights listed in the order a forward reads them) until at least
    nbytes of resident pages are released. Returns the dropped weights that were wholly resident, in use order, for
    `populate`. The last-read weights go first: the next forward reaches them last."""
    hot, freed = [], 0
    for t in reversed(tensors):
        if freed >= nbytes:
            break
        n, was_resident = _release(t)
        freed += n
        if was_resident:
            hot.append(t)
    return hot[::-1]


def populate(weights: list[torch.Tensor]) -> None:
    """Map weights back in one MADV_POPULATE_READ per tensor (Linux 5.14+; else the first read faults them in):
    one call per tensor costs less than a page fault per page."""
    madvise = _madvise() if sys.platform.startswith("linux") else None  # the advice number is Linux's
    if madvise is None:
        return
    for t in weights:
        start = t.data_ptr() // _PAGE * _PAGE
        if madvise(start, t.data_ptr() + t.numel() * t.element_size() - start, _MADV_POPULATE_READ) != 0:
            return  # an older kernel: EINVAL for every tensor
