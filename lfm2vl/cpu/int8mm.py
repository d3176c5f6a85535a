"""Int8 compute for products of many rows: the prefill through int8 weights, and the vision tower with int8 vision.

y = x @ (q * ws)^T + bias with x quantized per row as well (symmetric, xs = amax / 127, `kernels.quantize_rows`):
the two int8 matrices multiply exactly into int32 (`kernels.int_mm`: AMX-INT8 tiles where the CPU has them, else
torch._int_mm, oneDNN's int8 GEMM, which multiply-adds twice as many pairs per instruction with AVX512-VNNI as a
bf16 GEMM does with AVX512-BF16), then one native pass scales by xs[m] * ws[n], adds the bias, applies GELU and a
residual, and rounds once (`kernels.int8_epilogue`). Where `kernels.int8_fused` says so (AMX tiles; AVX512-VNNI up
to a prefill chunk's rows) the product and that pass run as one (`kernels.int8_linear`): each block's epilogue on
its sums while they are in the cache, the same values.

The weight-only int8 of decode multiplies the unrounded activations; here they carry one more rounding (their
int8 step is 1/254 of the row's largest value), which the bench's int8 quality check and tests/test_bf16_trained.py
measure. On a CPU with AMX-BF16 but whose int8 tiles cannot run (`wins`), the bf16 product of the expanded weight
is faster and stays.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from . import kernels


@functools.cache
def wins() -> bool:
    """Whether an int8 product of many rows runs on int8 compute here: the native kernels are built, the CPU has int8
    dot products (`kernels.int8_dots`) and, on CPUs with AMX tiles, the int8 tiles run (`kernels.int_mm`: a 2-core
    AMX Xeon, 286 x 1024 x 4608: 3.8 T int-ops/s against 1.6 TFLOP/s for oneDNN's bf16 product on the bf16 tiles).
    Without AMX, torch._int_mm's AVX512-VNNI (a 2-core Zen 5: 1.86 T against 0.93 TFLOP/s bf16). A CPU without int8
    dot products (AVX2 alone: Zen 1-3, older Intel) keeps the fp32 product, 20-30x faster there than torch._int_mm."""
    return (kernels.available() and hasattr(torch, "_int_mm") and kernels.int8_dots()
            and (not kernels.amx() or kernels.amx_int8()))


_SCRATCH = threading.local()


def _acc_buffer(M: int, N: int, slot: int = 0) -> torch.Tensor:
    """This thread's reused int32 (M, N) buffer number `slot` (0 or 1) for the products: a fresh one of several MB
    per product would fault its pages in each time (glibc returns large freed blocks to the system)."""
    name = f"acc{slot}"
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < M * N:
        with torch.inference_mode(False):
            buf = torch.empty(M * N, dtype=torch.int32)
            setattr(_SCRATCH, name, buf)
    return buf[:M * N].view(M, N)


def linear(x: torch.Tensor, q: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, q * ws[:, None], bias)` with x quantized per row, then optional GELU (approximate "tanh" /
    "none"), then `+ residual`, in x's dtype: x (..., K) fp32/bf16 on the CPU, no autograd (the caller checks);
    q (N, K) int8, ws (N,) fp32 (quant.py's format); bias (N,), residual (..., N). The caller checks `wins()`."""
    _check(x, q)
    return _product(*kernels.quantize_rows(x.reshape(-1, x.shape[-1])), q, ws, bias, gelu, residual, x)


def linears(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """[linear(x, q, ws, bias) for (q, ws, bias) in layers] with x quantized once (the vision tower's q, k and v)."""
    for q, _, _ in layers:
        _check(x, q)
    xq, xs = kernels.quantize_rows(x.reshape(-1, x.shape[-1]))
    return [_product(xq, xs, q, ws, bias, None, None, x) for q, ws, bias in layers]


def _check(x: torch.Tensor, q: torch.Tensor) -> None:
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"int8 linear: x has {x.shape[-1]} features but the weight is {tuple(q.shape)}")


def _product(xq: torch.Tensor, xs: torch.Tensor, q: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
             gelu: str | None, residual: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The product of the quantized rows xq (scales xs) with one layer, shaped and typed like x's (..., N)."""
    N = q.shape[0]
    res = None if residual is None else residual.reshape(-1, N)
    if gelu in (None, "tanh") and kernels.int8_fused(xq.shape[0]):  # the epilogue on each block of sums
        y = kernels.int8_linear(xq, xs, q, ws, bias, res, x.dtype, gelu=gelu == "tanh")
        if y is not None:
            return y.view(*x.shape[:-1], N)
    acc = kernels.int_mm(xq, q, _acc_buffer(xq.shape[0], N))
    if gelu not in (None, "tanh"):  # erf GELU: torch's, on the scaled product, before the residual
        y = F.gelu(kernels.int8_epilogue(acc, xs, ws, bias, None, x.dtype), approximate=gelu)
        y = y if res is None else y + res
    else:
        y = kernels.int8_epilogue(acc, xs, ws, bias, res, x.dtype, gelu=gelu == "tanh")
    return y.view(*x.shape[:-1], N)


def swiglu_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor | None:
    """`down(silu(gate(x)) * up(x))` for bf16 x (..., K) in int8 compute, with the values of three `linear` calls
    and `kernels.swiglu` between them: x is quantized once for both gate and up, and the gate's passes are fused:
    into the two products' blocks where `kernels.int8_fused` (`kernels.swiglu_h`, then the quantization of h),
    elsewhere into one native pass over both products (`kernels.swiglu_int8`). gate / up / down: (rows, bias) with
    rows(slot) -> (q, ws) as in `linear`, slot 0 or 1 naming the reused buffer int4's widened rows go to (in the
    fused products gate's and up's are read together, from different slots).
    None where the fused pass cannot run (no AVX512): the caller composes `linear` then."""
    if kernels.isa() < 2:
        return None
    lead, K = x.shape[:-1], x.shape[-1]
    xq, xs = kernels.quantize_rows(x.reshape(-1, K))
    M = xq.shape[0]
    q1, s1 = gate[0](0)
    if kernels.int8_fused(M):  # gate's and up's rows both read at once
        q3, s3 = up[0](1)
        h = kernels.quantize_rows(kernels.swiglu_h(xq, xs, q1, s1, gate[1], q3, s3, up[1]))
    else:  # one after the other: up's rows may take gate's buffer (int4's widened rows)
        s1 = s1.clone()
        a1 = kernels.int_mm(xq, q1, _acc_buffer(M, q1.shape[0], 0))
        q3, s3 = up[0](0)
        a3 = kernels.int_mm(xq, q3, _acc_buffer(M, q3.shape[0], 1))
        h = kernels.swiglu_int8(a1, a3, xs, s1, s3, gate[1], up[1])
        if h is None:
            return None
    q2, s2 = down[0](0)
    return _product(h[0], h[1], q2, s2, down[1], None, None, x).view(*lead, q2.shape[0])
