"""Products of many rows on the CPU (prefill, the vision tower, the projector): oneDNN, with bf16 widened to fp32 on
CPUs that have no bf16 GEMM.

torch multiplies bf16 matrices with oneDNN only on CPUs with AVX512 (BW/VL/DQ) or AVX-NE-CONVERT. Elsewhere, on
AVX2-only CPUs such as AMD Zen 2/3 and most laptops before them, it falls back to a generic loop: ~5 GFLOP/s on two
Zen 3 cores against ~35 for fp32, which puts minutes into a tiled image's first token. There `linear` widens x and
the weight to fp32 (exact), multiplies with oneDNN's fp32 GEMM and rounds the result once to bf16: the same math as
a bf16 product (fp32 accumulation, one rounding). The weight is widened one block of rows at a time into a reused
buffer, so the fp32 copy never exists whole and each block is multiplied while it is still in the cache.

Where oneDNN takes the dtype, the bias and a residual add are fused into the product (one rounding, fewer passes over
the activations); fp32 products fuse their GELU too. A GELU after a bf16 product applies to the product rounded to
bf16, as torch's bf16 `F.linear` then `F.gelu` (and so transformers) round: on AMX CPUs fused into lfm2vl's kernel
(below), elsewhere in lfm2vl's native pass for the tanh form (`kernels.gelu_tanh_`): oneDNN's fused GELU was the
slower way on the 2-core AMX Xeon VM, 1024 x 3072 x 768 (the 450M vision tower's fc1) 4.6-5.4 ms fused against
3.8-4.1 with the pass. torch's own float32 GEMM is MKL, which takes a slow path on AMD CPUs, so fp32 goes through
oneDNN too.

On AMX CPUs the bf16 products of at least 128 rows and at most 1024 outputs (the 450M vision tower's attention
projections and second MLP layer; the prefill's attention projections, the conv blocks' out_proj and the MLPs' w2)
run on lfm2vl's own AMX kernel instead (`kernels.bf16_linear_amx`, the same fusions): oneDNN's choice for them ran at
~1.0 TFLOP/s on the 2-core AMX Xeon VM where the kernel runs 1.7-2.1 (1024 x 768 x 768, 1024 x 768 x 3072,
1024 x 1024 x 1024), 286 x 1024 x 4608 1.8 against 2.0-2.2 ms; a 286-token prefill took 5-8 ms less with the kernel
from 128 rows than from 1024 (interleaved runs; 64 or 32 rows: less gain). At wider outputs oneDNN's is faster and
stays, except where a pass over the output fuses into the kernel's blocks as they leave the tiles, at any width,
with the same bits as the products and then the pass: the tanh GELU after a product (fc1 3.4 ms against oneDNN's
product and the pass 3.6) and the SwiGLU gate over two (`swiglu_gate`).

On CPUs with AVX512-BF16, VBMI and VBMI2 and no AMX tiles (AMD Zen 4 / 5, Intel Ice Lake Xeons) bf16 products with
nothing to fuse (the language model's: no biases) run on lfm2vl's own kernel (`kernels.bf16_mm`, bf16_mm.cpp), which
also takes the 12-bit packed weights, unpacking them inside the product, so plain and packed bf16 give the same bits:
fp32 sums over K in order, rounded once, where oneDNN cuts K in blocks (~0.02% of outputs round the other way). It
runs 3-9% faster than oneDNN's at a prefill's shapes on a 2-core Zen 4 VM (bf16_mm.cpp has the figures).
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from . import kernels

_BLOCK_BYTES = 4 << 20  # bytes of weight rows made per block (widened or unpacked; in the cache while multiplied)
_SCRATCH = threading.local()


@functools.cache
def onednn() -> bool:
    """Whether torch has oneDNN's fused linear (x86 builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def bf16_native() -> bool:
    """Whether torch multiplies bf16 matrices natively on this CPU (oneDNN's bf16 kernels run here)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype `linear` multiplies in for operands of `dtype` on this CPU."""
    return torch.float32 if dtype == torch.bfloat16 and not bf16_native() else dtype


def _fused(x: torch.Tensor, w: torch.Tensor, bias, gelu: str | None, residual) -> torch.Tensor:
    """oneDNN's linear with the bias, GELU or residual add fused (x, w, bias, residual in one dtype)."""
    if residual is not None and gelu is None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, bias, "add")
    y = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none" if gelu is None else "gelu", [],
                                           "" if gelu is None else gelu)
    return y if residual is None else y + residual


def _block(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's reused buffer of at least rows x cols in dtype (grown when a larger one is asked for)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
            buf = bufs[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buf[:rows * cols].view(rows, cols)


def _widened(x: torch.Tensor, w: torch.Tensor, bias, gelu: str | None, residual) -> torch.Tensor:
    """The product in fp32, one block of weight rows at a time, rounded once to x's dtype."""
    N, K = w.shape
    xf = x.reshape(-1, K).float()
    res = None if residual is None else residual.reshape(-1, N).float()
    bf = None if bias is None else bias.float()
    if w.dtype == torch.float32:
        y = _fused(xf, w, bf, gelu, res)
    else:
        y = torch.empty(xf.shape[0], N, dtype=torch.float32)
        rows = max(1, min(N, _BLOCK_BYTES // (4 * K)))
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            y[:, n0:n1] = _fused(xf, _block(n1 - n0, K).copy_(w[n0:n1]), None if bf is None else bf[n0:n1], gelu,
                                 None if res is None else res[:, n0:n1])
    return y.to(x.dtype).view(*x.shape[:-1], N)


AMX_ROWS, AMX_COLS = 128, 1024  # the shapes the AMX kernel takes: at least this many rows, at most this many outputs
AMX_FUSED_COLS = 1 << 20  # ... or this many with a GELU or gate fused into it (any width: it saves a pass)


def _amx_takes(x: torch.Tensor, w: torch.Tensor, fused: bool = False) -> bool:
    """Whether this bf16 product (with a tanh GELU or a SwiGLU gate fused) runs on lfm2vl's AMX kernel (see the top
    of this file)."""
    return w.dtype == torch.bfloat16 and _amx_shape(x, w.shape[0], fused)


def _amx_shape(x: torch.Tensor, N: int, fused: bool = False) -> bool:
    """_amx_takes for a bf16 weight of N outputs."""
    return (x.dtype == torch.bfloat16 and x.numel() >= AMX_ROWS * x.shape[-1]
            and N <= (AMX_FUSED_COLS if fused else AMX_COLS) and kernels.available() and kernels.amx_bf16())


def panels_take(x: torch.Tensor, w: torch.Tensor | None = None, bias=None, gelu=None, residual=None) -> bool:
    """Whether this bf16 product (w: bf16 (N, K), or None for a packed one) runs on lfm2vl's panel kernel
    (`kernels.bf16_mm` / `packed_mm`): nothing to fuse, K a multiple of 32, the kernel's instructions here
    (`kernels.packed_fast`) and no AMX tiles (their kernel and oneDNN's run there)."""
    return (x.dtype == torch.bfloat16 and bias is None and gelu is None and residual is None
            and (w is None or (w.dtype == torch.bfloat16 and w.is_contiguous())) and x.shape[-1] % 32 == 0
            and kernels.available() and kernels.packed_fast() and not kernels.amx_bf16())


def _gelu(y: torch.Tensor, approximate: str) -> torch.Tensor:
    """F.gelu(y, approximate) for a bf16 product y: the tanh form in lfm2vl's native pass (in place) where it runs."""
    if approximate == "tanh" and kernels.available():
        out = kernels.gelu_tanh_(y)  # None without AVX512
        if out is not None:
            return out
    return F.gelu(y, approximate=approximate)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)`, then optional GELU (approximate "tanh" / "none"), then `+ residual`; x's dtype out.

    x (..., K) fp32/bf16 on the CPU, no autograd (the caller checks); w (N, K) in x's dtype, or fp32 (a weight the
    caller already widened, e.g. a dequantized int8 one); bias (N,) and residual (..., N) in x's dtype. With bf16 x
    a GELU applies to the product rounded to bf16 (see the top of this file).
    """
    if gelu is not None and x.dtype == torch.bfloat16:
        if gelu == "tanh" and _amx_takes(x, w, fused=True):
            y = kernels.bf16_linear_amx(x.reshape(-1, w.shape[1]), w, bias, None, True)
            if y is not None:
                y = y.view(*x.shape[:-1], w.shape[0])
                return y if residual is None else y + residual
        y = _gelu(linear(x, w, bias), gelu)
        return y if residual is None else y + residual
    if panels_take(x, w, bias, gelu, residual):
        y = kernels.bf16_mm(x.reshape(-1, w.shape[1]), w)
        if y is not None:
            return y.view(*x.shape[:-1], w.shape[0])
    if _amx_takes(x, w):
        y = kernels.bf16_linear_amx(x.reshape(-1, w.shape[1]), w, bias,
                                    None if residual is None else residual.reshape(-1, w.shape[0]))
        if y is not None:
            return y.view(*x.shape[:-1], w.shape[0])
    if onednn() and x.dtype in (torch.float32, torch.bfloat16):
        if compute_dtype(x.dtype) != x.dtype or w.dtype != x.dtype:
            return _widened(x, w, bias, gelu, residual)
        return _fused(x, w, bias, gelu, residual)
    y = F.linear(x, w.to(x.dtype), bias)
    y = y if gelu is None else F.gelu(y, approximate=gelu)
    return y if residual is None else y + residual


def linear_by_blocks(x: torch.Tensor, N: int, fill: Callable[[int, int, torch.Tensor], object],
                     bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`linear(x, w, bias)` for a bf16 (N, K) weight that is made a block of rows at a time (`fill(n0, n1, out)` writes
    w[n0:n1] into out, e.g. unpacking it), the same values: each block of ~4 MB is multiplied by oneDNN while it is
    still in the cache, where a whole weight made at once (~10 MB at 450M shapes) goes out to memory and comes back
    (a 286-row pass over 16 layers' 450M-shaped weights on a 2-core Zen 4 VM: +6% over the bf16 weights' own
    products when unpacked whole, +2.6% in blocks). None where `linear` would not take the product to oneDNN's bf16
    GEMM (lfm2vl's AMX or panel kernel, or a CPU that widens bf16 to fp32): the caller makes the whole weight and
    calls it."""
    K = x.shape[-1]
    if x.dtype != torch.bfloat16 or not (onednn() and bf16_native()) or _amx_shape(x, N):
        return None
    if panels_take(x, None, bias):
        return None
    x2 = x.reshape(-1, K)
    y = x2.new_empty(x2.shape[0], N)
    parts = -(-N * K * 2 // _BLOCK_BYTES)
    rows = -(-N // parts)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = _block(n1 - n0, K, torch.bfloat16)
        fill(n0, n1, w)
        if bias is None:
            torch.mm(x2, w.t(), out=y[:, n0:n1])  # oneDNN's product, the bits of `linear`'s fused one
        else:
            torch.addmm(bias[n0:n1], x2, w.t(), out=y[:, n0:n1])
    return y.view(*x.shape[:-1], N)


def swiglu_gate(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w3: torch.Tensor,
                b3: torch.Tensor | None) -> torch.Tensor | None:
    """silu(linear(x, w1, b1)) * linear(x, w3, b3) with each product rounded to bf16 and then silu and the product
    rounded (kernels.swiglu's roundings), for bf16 x, w1, w3: on lfm2vl's AMX kernel, the gate fused into the two
    products' blocks (no (rows, N) products through memory; 286 x 4608 x 1024 3.4 ms against oneDNN's two products
    and the pass 4.0), where it takes products of this many rows, at any width. None elsewhere: the caller runs the
    products and the pass."""
    if not (_amx_takes(x, w1, fused=True) and w3.dtype == w1.dtype and w3.shape == w1.shape):
        return None
    h = kernels.swiglu_h_bf16_amx(x.reshape(-1, w1.shape[1]), w1, b1, w3, b3)
    return None if h is None else h.view(*x.shape[:-1], w1.shape[0])
