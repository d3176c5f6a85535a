"""torch intra-op threading around the small ops between decode steps (sampling's passes over the logits).

On CPU a tiny op can still open an OpenMP region (MKL's vectorized cos/sin go parallel from 128 elements; passes
over ~65k logits too). Its worker threads then spin for a while after the region, on the cores the native decode
step is about to use, and the region stalls for a whole time slice when another process holds a core.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """Run the enclosed torch ops on the calling thread only (sampling's passes over ~65k logits).
    Such passes are short, so a thread team's start-up and stalls on a busy machine would outweigh them."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
