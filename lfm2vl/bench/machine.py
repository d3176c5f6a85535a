"""The machine's own ceilings, measured in the bench's run so every speed figure can be read as a share of them:
memory read bandwidth (what a decode step is bound by: it streams every weight once) and a large GEMM's rate in the
run's dtype and in int8 (what prefill and the vision tower are bound by).

    python -m lfm2vl.bench.machine '<json spec>'   ->  prints one line "BENCH_RESULT <json>"

Read bandwidth: the fastest of the reads of a 1 GiB tensor (far past the caches) on the run's threads: a float32
sum, a float32 matrix-vector product, a uint8 max and the native kernels' eight-stream read, each the best of `reps`.
GEMM: the best of `reps` (2048 x 2048) @ (2048 x 2048) products after a warm-up, in the dtype lfm2vl multiplies the
run's dtype in on this CPU (fp32 for bf16 where the CPU has no bf16 GEMM: cpu/gemm.py), and where lfm2vl multiplies
int8 weights in int8 (cpu/int8mm.py), the same product in int8.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from ..cpu import int8mm, kernels
from ..cpu.gemm import compute_dtype

_DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def read_gbps(reps: int = 5, size_bytes: int = 2 ** 30) -> float:
    """The fastest of the streaming reads of the same 1 GiB: torch's float32 sum, float32 matrix-vector product and
    uint8 max (they differ in how close they come to the memory's rate), and where the native kernels are built a
    plain read with eight streams per thread (`kernels.stream_read`: one sequential stream per core stops short of
    the memory's rate on some CPUs, ~30% on a Sapphire Rapids VM)."""
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    m, v = x.view(-1, 4096), torch.ones(4096)
    u = x.view(torch.uint8)
    reads = [x.sum, lambda: m @ v, u.amax]
    if kernels.available():
        reads.append(lambda: kernels.stream_read(u))
    rates = []
    for read in reads:
        best = float("inf")
        for _ in range(reps + 1):
            t = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t)
        rates.append(size_bytes / best / 1e9)
    return max(rates)


def _square_rate(product, reps: int, n: int) -> float:
    """1e9 x 2 n^3 / the best of `reps` timed calls of an n x n x n product, after two warm-up calls."""
    for _ in range(2):
        product()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def gemm_gflops(dtype: torch.dtype, reps: int = 5, n: int = 2048) -> float:
    dtype = compute_dtype(dtype)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return _square_rate(lambda: a @ b, reps, n)


def int8_gops(reps: int = 5, n: int = 2048) -> float | None:
    """The int8 GEMM's rate (`kernels.int_mm`, int8 x int8 -> int32), in 1e9 multiply-adds x 2 per second, where
    lfm2vl computes int8 products of many rows in int8 (cpu/int8mm.py); None elsewhere."""
    if not int8mm.wins():
        return None
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    out = torch.empty(n, n, dtype=torch.int32)
    return _square_rate(lambda: kernels.int_mm(a, b, out), reps, n)


def measure(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    dtype = _DT[spec["dtype"]]
    return {"engine": "machine", "read_gbps": read_gbps(), "gemm_gflops": gemm_gflops(dtype),
            "gemm_dtype": {v: k for k, v in _DT.items()}[compute_dtype(dtype)], "int8_gops": int8_gops(),
            "threads": spec["threads"]}


def main() -> None:
    print("BENCH_RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
