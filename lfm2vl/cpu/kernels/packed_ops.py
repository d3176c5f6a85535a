"""bf16 weights packed losslessly in 12 bits a weight (packed.cpp has the format): packing, unpacking, products.

A packed (N, K) weight is one uint8 tensor; `pack_bf16` makes it, `unpack_bf16` gives back the same bf16 values, and
`packed_linear` multiplies with it as `linear` does with the bf16 weight (the same sums, bit for bit, on CPUs with
AVX512-BF16 and AVX512-VBMI2: `packed_fast()`; elsewhere a scalar path that unpacks each row). The caller checks
`available()`.
"""
from __future__ import annotations

import torch

from .build import DT as _DT
from .build import PACKED_BF16 as _KIND
from .build import load as _load

BLOCK = 64  # weights a row is packed in: K must be a multiple of it


def packed_fast() -> bool:
    """Whether packed products and unpacking run the AVX512 path (AVX512-BF16 and AVX512-VBMI2)."""
    return bool(_load().lfm2vl_p12_fast())


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """The packed form of w (N, K) bf16, a contiguous CPU tensor with K a multiple of 64 and fewer than 2^31
    weights: a 1-D uint8 tensor of ~1.5 N K bytes (more where the high bytes spread over more than 15 values), made
    on the pool's threads."""
    if (w.dtype != torch.bfloat16 or w.dim() != 2 or w.device.type != "cpu" or w.shape[1] % BLOCK
            or w.numel() >= 2 ** 31):
        raise ValueError(f"pack_bf16: needs an (N, K) bfloat16 CPU tensor with K a multiple of {BLOCK} and fewer "
                         f"than 2^31 weights, got {tuple(w.shape)} {w.dtype} on {w.device}")
    w = w.contiguous()
    N, K = w.shape
    lib = _load()
    table, row_esc = torch.empty(64, dtype=torch.uint8), torch.empty(N + 1, dtype=torch.int32)
    escapes = lib.lfm2vl_p12_plan(w.data_ptr(), N, K, table.data_ptr(), row_esc.data_ptr(), torch.get_num_threads())
    buf = torch.empty(lib.lfm2vl_p12_bytes(N, K, escapes), dtype=torch.uint8)
    lib.lfm2vl_p12_pack(w.data_ptr(), N, K, table.data_ptr(), row_esc.data_ptr(), buf.data_ptr(),
                        torch.get_num_threads())
    return buf


def check_packed(buf: torch.Tensor, N: int, K: int) -> None:
    """Raise ValueError unless buf is a whole packed (N, K) weight: 1-D uint8, as long as its escape count says."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or K % BLOCK or N < 1:
        raise ValueError(f"a packed {N}x{K} weight is a 1-D uint8 tensor (K a multiple of {BLOCK}), got "
                         f"{tuple(buf.shape)} {buf.dtype}")
    lib = _load()
    if buf.numel() < lib.lfm2vl_p12_bytes(N, K, 0):
        raise ValueError(f"{buf.numel()} bytes cannot hold a packed {N}x{K} weight")
    escapes = int(buf[64 + 4 * N:64 + 4 * (N + 1)].view(torch.int32)[0])
    want = lib.lfm2vl_p12_bytes(N, K, escapes) if 0 <= escapes <= N * K else -1
    if buf.numel() != want:
        raise ValueError(f"{buf.numel()} bytes where a packed {N}x{K} weight with {escapes} escapes takes {want}")


def _check(buf: torch.Tensor, N: int, K: int, who: str) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or K % BLOCK:
        raise ValueError(f"{who}: needs a packed buffer (1-D contiguous uint8) and K a multiple of {BLOCK}, got "
                         f"{tuple(buf.shape)} {buf.dtype}, K={K}")
    if buf.numel() < _load().lfm2vl_p12_bytes(N, K, 0):
        raise ValueError(f"{who}: a buffer of {buf.numel()} bytes cannot hold a packed {N}x{K} weight")


def unpack_bf16(buf: torch.Tensor, N: int, K: int, out: torch.Tensor | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The (N, K) bf16 weight `buf` was packed from, or its rows [n0, n1) (`rows`), into out (a contiguous
    (n1 - n0, K) bf16 tensor) or a new tensor, on the pool's threads."""
    _check(buf, N, K, "unpack_bf16")
    n0, n1 = (0, N) if rows is None else rows
    if not 0 <= n0 < n1 <= N:
        raise ValueError(f"unpack_bf16: rows must satisfy 0 <= n0 < n1 <= {N}, got {rows}")
    if out is None:
        out = torch.empty(n1 - n0, K, dtype=torch.bfloat16)
    elif out.dtype != torch.bfloat16 or out.shape != (n1 - n0, K) or not out.is_contiguous():
        raise ValueError(f"unpack_bf16: out must be a contiguous ({n1 - n0}, {K}) bfloat16 tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    _load().lfm2vl_p12_unpack(buf.data_ptr(), N, K, n0, n1, out.data_ptr(), torch.get_num_threads())
    return out


def packed_linear(x: torch.Tensor, buf: torch.Tensor, N: int, K: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, the unpacked weight, bias) with fp32 accumulation; x (..., K) fp32/bf16, the output in x's dtype.
    Kept lean like `linear`: the caller passes a buffer `pack_bf16` made for an (N, K) weight."""
    if x.shape[-1] != K:
        raise ValueError(f"packed_linear: x has {x.shape[-1]} features, the weight {K}")
    x = x.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    y = x.new_empty(x.shape[:-1] + (N,))
    dt = _DT[x.dtype]
    _load().lfm2vl_linear(_KIND, buf.data_ptr(), None, x.data_ptr(), y.data_ptr(),
                          None if bias is None else bias.data_ptr(), x.numel() // K, N, K, dt, dt,
                          torch.get_num_threads())
    return y


def packed_mm(x: torch.Tensor, buf: torch.Tensor, N: int, K: int) -> torch.Tensor | None:
    """x (M, K) bf16 times the packed (N, K) weight, transposed: (M, N) bf16, the bits of `bf16_mm` with the unpacked
    weight (bf16_mm.cpp: each panel unpacked inside the product). None where the kernel does not run here."""
    return _bf16_mm(x, buf, 1, N, K)


def bf16_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) bf16 times w (N, K) bf16 (contiguous), transposed: (M, N) bf16, fp32 sums over K in order rounded once
    (bf16_mm.cpp). None where the kernel does not run here (without AVX512-BF16, VBMI and VBMI2, or K not a multiple
    of 32)."""
    if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"bf16_mm: w must be a contiguous (N, K) bfloat16 tensor, got {tuple(w.shape)} {w.dtype}")
    return _bf16_mm(x, w, 0, *w.shape)


def _bf16_mm(x: torch.Tensor, w: torch.Tensor, packed: int, N: int, K: int) -> torch.Tensor | None:
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"bf16 products: x must be (M, {K}) bfloat16, got {tuple(x.shape)} {x.dtype}")
    x = x.contiguous()
    y = x.new_empty(x.shape[0], N)
    if _load().lfm2vl_bf16_mm(w.data_ptr(), packed, x.data_ptr(), y.data_ptr(), x.shape[0], N, K,
                              torch.get_num_threads()):
        return None
    return y
