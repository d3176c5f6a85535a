"""The machine's own ceilings, measured in the bench's run so every speed figure can be read as a share of them:
memory read bandwidth (what a decode step is bound by: it streams every weight once) and a large GEMM's rate in the
run's dtype (what prefill and the vision tower are bound by).

    python -m lfm2vl.bench.machine '<json spec>'   ->  prints one line "BENCH_RESULT <json>"

Read bandwidth: the best of `reps` float32 sums over a 1 GiB tensor (far past the caches), on the run's threads.
GEMM: the best of `reps` (2048 x 2048) @ (2048 x 2048) products in the run's dtype after a warm-up.
"""
from __future__ import annotations

import json
import sys
import time

import torch

_DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def read_gbps(reps: int = 5, size_bytes: int = 2 ** 30) -> float:
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best / 1e9


def gemm_gflops(dtype: torch.dtype, reps: int = 5, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def measure(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    return {"engine": "machine", "read_gbps": read_gbps(), "gemm_gflops": gemm_gflops(_DT[spec["dtype"]]),
            "gemm_dtype": spec["dtype"], "threads": spec["threads"]}


def main() -> None:
    print("BENCH_RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
