"""torch intra-op threading around the small ops of a decode step.

On CPU a tiny op can still open an OpenMP region: MKL's vectorized cos/sin (torch's cos and sin kernels) go
parallel from 128 elements, so the RoPE angles of two decode rows did. Its worker threads then spin for a while
after the region, on the cores the native decode step is about to use (seen: a 2-row step 1.35x a 1-row step,
1.2x with the spinning off), and the region stalls for a whole time slice when another process holds a core.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """Run the enclosed torch ops on the calling thread only (sampling's passes over ~65k logits, RoPE angles).
    Measured: a 0.5 ms sampling step took 30-100 ms on a busy 2-core machine with 2 threads."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
