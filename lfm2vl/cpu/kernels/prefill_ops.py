"""The prefill's and the vision tower's native passes (attn_many.cpp, prefill.cpp, int8mm.cpp): each wrapper checks
its inputs and returns None (or raises a clear ValueError) where the kernel cannot take them."""
from __future__ import annotations

import ctypes

import torch

from .build import DT as _DT
from .build import load as _load


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp32/bf16 on the CPU -> (q (M, K) int8, s (M,) fp32), symmetric per row: s = amax / 127 (1 for an
    all-zero row), q = clamp(round(x / s), -127, 127), the values of that torch formula (int8mm.cpp), on the pool's
    threads. The caller checks `available()`."""
    if x.dim() != 2 or x.dtype not in _DT or x.device.type != "cpu":
        raise ValueError(f"quantize_rows: needs an (M, K) fp32/bf16 CPU tensor, got {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}")
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8)
    s = torch.empty(M, dtype=torch.float32)
    _load().lfm2vl_quantize_rows(x.data_ptr(), _DT[x.dtype], q.data_ptr(), s.data_ptr(), M, K, torch.get_num_threads())
    return q, s


def amx_int8() -> bool:
    """Whether int_mm runs on AMX-INT8 tiles here (the CPU has them and Linux grants this process their use)."""
    return bool(_load().lfm2vl_amx_int8())


def amx_bf16() -> bool:
    """Whether attn_many and bf16_linear_amx run on AMX-BF16 tiles here (the CPU has them and Linux grants this
    process their use)."""
    return bool(_load().lfm2vl_amx_bf16())


def set_amx(on: bool) -> None:
    """Turn the AMX tiles (int8 and bf16 products, bf16 attention) off (False) or back on where the CPU has them (tests run
    both paths with it)."""
    _load().lfm2vl_set_amx(int(on))


def int8_fused(rows: int) -> bool:
    """Whether int8_linear and swiglu_h run here for x of `rows` rows: on AMX-INT8 tiles (amx.cpp), else in
    AVX512-VNNI registers up to a prefill chunk's rows (vnni_mm.cpp says why; not with the instruction set capped
    below AVX512-BF16)."""
    lib = _load()
    return bool(lib.lfm2vl_amx_int8() or lib.lfm2vl_int8_vnni(rows))


def int_mm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (M, N) int32 <- x (M, K) int8 . w (N, K)^T int8, exactly (the values of torch._int_mm(x, w.t())), all
    contiguous on the CPU: on AMX-INT8 tiles where they run (amx.cpp), else torch._int_mm. The caller checks
    `available()` and the shapes."""
    M, K = x.shape
    N = w.shape[0]
    if _load().lfm2vl_int_mm_amx(x.data_ptr(), w.data_ptr(), out.data_ptr(), M, N, K, torch.get_num_threads()):
        torch._int_mm(x, w.t(), out=out)
    return out


def int8_linear(xq: torch.Tensor, xs: torch.Tensor, q: torch.Tensor, ws: torch.Tensor,
                bias: torch.Tensor | None, residual: torch.Tensor | None, dtype: torch.dtype,
                gelu: bool = False) -> torch.Tensor | None:
    """int8_epilogue(int_mm(xq, q), xs, ws, bias, residual, dtype, gelu) with each block's epilogue run on its sums
    (the same values, no int32 result in memory): on AMX-INT8 tiles (amx.cpp), else in AVX512-VNNI registers
    (vnni_mm.cpp). xq (M, K) int8, q (N, K) int8. None where neither runs (`int8_fused`). The caller checks
    `available()` and the shapes."""
    M, K = xq.shape
    N = q.shape[0]
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    residual = None if residual is None else residual.to(dtype).contiguous()
    y = torch.empty(M, N, dtype=dtype)
    lib = _load()
    args = (xq.data_ptr(), q.data_ptr(), xs.data_ptr(), ws.data_ptr(), None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(), y.data_ptr(), _DT[dtype], int(gelu), M, N, K,
            torch.get_num_threads())
    ok = lib.lfm2vl_int8_linear_amx(*args) == 0 or lib.lfm2vl_int8_linear_vnni(*args) == 0
    return y if ok else None


def bf16_linear_amx(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor | None, gelu: bool = False) -> torch.Tensor | None:
    """x w^T + bias + residual for bf16 x (M, K) and w (N, K) on AMX-BF16 tiles (amx.cpp): fp32 sums, the bias and
    the residual in fp32, one rounding to bf16; with gelu, GELU's tanh form on the sum rounded to bf16 before the
    residual (torch's bf16 F.linear then F.gelu). None where the tiles cannot run. The caller checks `available()`
    and the shapes."""
    M, K = x.shape
    N = w.shape[0]
    x, w = x.contiguous(), w.contiguous()
    bias = None if bias is None else bias.float().contiguous()
    residual = None if residual is None else residual.to(torch.bfloat16).contiguous()
    y = torch.empty(M, N, dtype=torch.bfloat16)
    ok = _load().lfm2vl_bf16_linear_amx(x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(),
                                        None if residual is None else residual.data_ptr(), y.data_ptr(), 1, int(gelu),
                                        M, N, K, torch.get_num_threads())
    return y if ok == 0 else None


def swiglu_h_bf16_amx(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w3: torch.Tensor,
                      b3: torch.Tensor | None) -> torch.Tensor | None:
    """silu(x w1^T + b1) * (x w3^T + b3) for bf16 x (M, K) and the gate's and up's rows w1, w3 (N, K) on AMX-BF16
    tiles, the gate fused into the two products' blocks (amx.cpp): each product rounded to bf16, then silu and the
    product rounded, as kernels.swiglu after two bf16 products. (M, N) bf16, or None where the tiles cannot run. The
    caller checks `available()` and the shapes."""
    M, K = x.shape
    N = w1.shape[0]
    x, w1, w3 = x.contiguous(), w1.contiguous(), w3.contiguous()
    b1, b3 = (None if b is None else b.float().contiguous() for b in (b1, b3))
    h = torch.empty(M, N, dtype=torch.bfloat16)
    ok = _load().lfm2vl_swiglu_h_bf16_amx(x.data_ptr(), w1.data_ptr(), w3.data_ptr(),
                                          None if b1 is None else b1.data_ptr(), None if b3 is None else b3.data_ptr(),
                                          h.data_ptr(), M, N, K, torch.get_num_threads())
    return h if ok == 0 else None


def swiglu_h(xq: torch.Tensor, xs: torch.Tensor, q1: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor | None,
             q3: torch.Tensor, s3: torch.Tensor, b3: torch.Tensor | None) -> torch.Tensor | None:
    """The bf16 h that swiglu_int8 quantizes, from xq's int8 products with the gate's rows q1 and up's q3 (N, K),
    both products' epilogues and the gate fused into their blocks: on AMX-INT8 tiles (amx.cpp), else in AVX512-VNNI
    registers (vnni_mm.cpp). (M, N) bf16, or None where neither runs (`int8_fused`). The caller checks `available()`
    and the shapes."""
    M, K = xq.shape
    N = q1.shape[0]
    xs, s1, s3 = (t.float().contiguous() for t in (xs, s1, s3))
    b1, b3 = (None if b is None else b.float().contiguous() for b in (b1, b3))
    h = torch.empty(M, N, dtype=torch.bfloat16)
    lib = _load()
    args = (xq.data_ptr(), q1.data_ptr(), q3.data_ptr(), xs.data_ptr(), s1.data_ptr(), s3.data_ptr(),
            None if b1 is None else b1.data_ptr(), None if b3 is None else b3.data_ptr(), h.data_ptr(), M, N, K,
            torch.get_num_threads())
    ok = lib.lfm2vl_swiglu_h_amx(*args) == 0 or lib.lfm2vl_swiglu_h_vnni(*args) == 0
    return h if ok else None


def int4_to_int8(q: torch.Tensor, scale: torch.Tensor, q8: torch.Tensor, srow: torch.Tensor) -> None:
    """Fill q8 (N, K) int8 and srow (N,) fp32 with int4 weights (quant.py's format: q (N, K/2) uint8, scale (N, K/32)
    fp16) as int8 rows (int8mm.cpp): srow = 8 max|scale| / 127 per row (1 for an all-zero row), q8 = clamp(round(
    level * (scale / srow)), -127, 127). The caller checks `available()` and the shapes."""
    N, K = q8.shape
    _load().lfm2vl_int4_to_int8(q.data_ptr(), scale.data_ptr(), q8.data_ptr(), srow.data_ptr(), N, K,
                                torch.get_num_threads())


def int8_epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, dtype: torch.dtype, gelu: bool = False) -> torch.Tensor:
    """(M, N) in `dtype` <- gelu?(acc * xs[:, None] * ws[None, :] + bias) + residual, fp32 math in that order,
    rounded once (int8mm.cpp): acc (M, N) int32, xs (M,) and ws (N,) fp32, bias (N,) or None, residual (M, N) or
    None; gelu: GELU's tanh approximation. The caller checks `available()`."""
    M, N = acc.shape
    if (acc.dtype != torch.int32 or xs.shape != (M,) or ws.shape != (N,) or dtype not in _DT
            or (bias is not None and bias.shape != (N,)) or (residual is not None and residual.shape != (M, N))):
        raise ValueError(f"int8_epilogue: needs (M, N) int32, (M,) and (N,) scales, (N,) bias, (M, N) residual; got "
                         f"{tuple(acc.shape)} {acc.dtype}, {tuple(xs.shape)}, {tuple(ws.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}, "
                         f"{None if residual is None else tuple(residual.shape)}")
    acc, xs, ws = acc.contiguous(), xs.float().contiguous(), ws.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    residual = None if residual is None else residual.to(dtype).contiguous()
    y = torch.empty(M, N, dtype=dtype)
    _load().lfm2vl_int8_epilogue(acc.data_ptr(), xs.data_ptr(), ws.data_ptr(), None if bias is None else bias.data_ptr(),
                              None if residual is None else residual.data_ptr(), y.data_ptr(), _DT[dtype], int(gelu),
                              M, N, torch.get_num_threads())
    return y


def swiglu_int8(a1: torch.Tensor, a3: torch.Tensor, xs: torch.Tensor, s1: torch.Tensor, s3: torch.Tensor,
                b1: torch.Tensor | None, b3: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """quantize_rows(swiglu(int8_epilogue(a1, xs, s1, b1), int8_epilogue(a3, xs, s3, b3))) in bf16, in one pass
    (int8mm.cpp): a1, a3 (M, N) int32, xs (M,), s1, s3 (N,) fp32, b1, b3 (N,) or None -> (q (M, N) int8, s (M,)
    fp32), or None without AVX512 (the caller runs the three passes then). The caller checks `available()`."""
    M, N = a1.shape
    if a1.dtype != torch.int32 or a3.shape != (M, N) or a3.dtype != torch.int32 or xs.shape != (M,) or \
            s1.shape != (N,) or s3.shape != (N,) or any(b is not None and b.shape != (N,) for b in (b1, b3)):
        raise ValueError(f"swiglu_int8: needs two (M, N) int32 products, (M,) and (N,) scales, (N,) biases; got "
                         f"{tuple(a1.shape)}, {tuple(a3.shape)}, {tuple(xs.shape)}, {tuple(s1.shape)}, {tuple(s3.shape)}")
    a1, a3, xs, s1, s3 = (t.contiguous() for t in (a1, a3, xs.float(), s1.float(), s3.float()))
    b1, b3 = (None if b is None else b.float().contiguous() for b in (b1, b3))
    q = torch.empty(M, N, dtype=torch.int8)
    s = torch.empty(M, dtype=torch.float32)
    ok = _load().lfm2vl_swiglu_int8(a1.data_ptr(), a3.data_ptr(), xs.data_ptr(), s1.data_ptr(), s3.data_ptr(),
                                    None if b1 is None else b1.data_ptr(), None if b3 is None else b3.data_ptr(),
                                    q.data_ptr(), s.data_ptr(), M, N, torch.get_num_threads())
    return (q, s) if ok == 0 else None


def attn_int8_scores() -> bool:
    """Whether attn_many(..., int8_scores=True) multiplies q k^T in int8 here: AVX512-VNNI and no AMX tiles in use
    (their bf16 scores are faster)."""
    lib = _load()
    return lib is not None and bool(lib.lfm2vl_attn_int8_scores())


def attn_many(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nkeys: list[int] | None = None,
              causal: bool = False, int8_scores: bool = False) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(Dh)) v for many queries, bf16 (attn_many.cpp), for the vision tower (no mask) and the
    prefill (causal: query l of unit u sees keys 0 .. nkeys[u] - L + l). int8_scores: q k^T on int8 dot products
    (attn_q8.cpp: the int8 vision tower's) where `attn_int8_scores()`, elsewhere in bf16.

    q (n, H, L, Dh), k and v (n, Hkv, S, Dh): bf16 views with a contiguous last dim (e.g. slices of the KV cache);
    query head h reads kv head h // (H // Hkv). nkeys: keys of each unit (default S). Returns (n, L, H*Dh), or None
    when the CPU or shape is not supported (no AVX512-BF16, Dh odd or > 128) or the library is missing: the caller
    runs torch then."""
    n, H, L, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if (k.shape != v.shape or k.shape[0] != n or k.shape[3] != Dh or any(t.stride(-1) != 1 for t in (q, k, v))
            or {q.dtype, k.dtype, v.dtype} != {torch.bfloat16}):
        raise ValueError(f"attn_many: unsupported q/k/v {tuple(q.shape)} {q.stride()} {q.dtype}, "
                         f"{tuple(k.shape)} {k.stride()} {k.dtype}, {tuple(v.shape)} {v.stride()} {v.dtype}")
    nkeys = [S] * n if nkeys is None else nkeys
    if len(nkeys) != n or max(nkeys) > S or min(nkeys) < (L if causal else 1):
        raise ValueError(f"attn_many: nkeys {nkeys} for {n} units of {L} queries and at most {S} keys")
    lib = _load()
    if lib is None:
        return None
    out = torch.empty(n, L, H * Dh, dtype=torch.bfloat16)
    arr = ctypes.c_int64 * 3
    rc = lib.lfm2vl_attn_many(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n, H, Hkv, L, Dh,
                              arr(*q.stride()[:3]), arr(*k.stride()[:3]), arr(*v.stride()[:3]),
                              (ctypes.c_int64 * n)(*nkeys),
                              int(causal), int(int8_scores), Dh ** -0.5, torch.get_num_threads())
    return out if rc == 0 else None


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """silu(a) * b for bf16 a, b of one shape (prefill.cpp; torch's roundings: silu, then the product), or None
    when the kernel cannot run (no AVX512, no library, other dtypes or layouts): the caller runs torch then."""
    lib = _load()
    if (lib is None or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or a.shape != b.shape
            or not a.is_contiguous() or not b.is_contiguous()):
        return None
    out = torch.empty_like(a)
    return out if lib.lfm2vl_swiglu_bf16(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(),
                                         torch.get_num_threads()) == 0 else None


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor | None:
    """x = gelu(x, approximate="tanh") in place for a contiguous bf16 x (prefill.cpp: fp32 math, one rounding; torch's
    values but in the negative tail, |gelu| < 1e-2, where torch's formula cancels and this one does not), returning
    x; None when the kernel cannot run (no AVX512, no library, another dtype or layout)."""
    lib = _load()
    if lib is None or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    return x if lib.lfm2vl_gelu_tanh_bf16(x.data_ptr(), x.numel(), torch.get_num_threads()) == 0 else None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * bf16(x * rsqrt(mean(x^2, -1) + eps)) for bf16 x (..., n) and weight (n) (prefill.cpp; model/text.py's
    RMSNorm and roundings), or None when the kernel cannot run: the caller runs torch then."""
    lib = _load()
    n = x.shape[-1]
    if (lib is None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.shape != (n,)
            or not x.is_contiguous() or not weight.is_contiguous() or x.numel() == 0):
        return None
    out = torch.empty_like(x)
    return out if lib.lfm2vl_rmsnorm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps,
                                          torch.get_num_threads()) == 0 else None


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """F.layer_norm over the last dim for bf16 x (..., n), weight and bias (n) (prefill.cpp; fp32 statistics, one
    rounding), or None when the kernel cannot run: the caller runs torch then."""
    lib = _load()
    n = x.shape[-1]
    if (lib is None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.shape != (n,)
            or (bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (n,)))
            or not x.is_contiguous() or not weight.is_contiguous() or x.numel() == 0
            or (bias is not None and not bias.is_contiguous())):
        return None
    out = torch.empty_like(x)
    rc = lib.lfm2vl_layernorm_bf16(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                   out.data_ptr(), x.numel() // n, n, eps, torch.get_num_threads())
    return out if rc == 0 else None


def short_conv(p: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The gated short convolution between in_proj and out_proj (prefill.cpp; speed.FastShortConv's roundings):
    p (B, T, 3D) bf16 in_proj output (B gate, C gate, x), state (B, D, K-1) bf16 conv inputs before it (zeros for
    a fresh row), weight (D, 1, K) / bias (D) of the depthwise conv -> out (B, T, D) = C * conv(B * x) and the next
    state (B, D, K-1), both bf16; None when the kernel cannot run (the caller runs torch then)."""
    lib = _load()
    B, T, D3 = p.shape
    D, K = D3 // 3, weight.shape[-1]
    if (lib is None or p.dtype != torch.bfloat16 or state.dtype != torch.bfloat16 or not p.is_contiguous()
            or state.shape != (B, D, K - 1) or weight.shape != (D, 1, K)):
        return None
    state = state.contiguous()
    w = weight.reshape(D, K).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    out = torch.empty(B, T, D, dtype=torch.bfloat16)
    tail = torch.empty(B, D, K - 1, dtype=torch.bfloat16)
    rc = lib.lfm2vl_short_conv_bf16(p.data_ptr(), state.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(),
                                    out.data_ptr(), tail.data_ptr(), B, T, D, K, torch.get_num_threads())
    return (out, tail) if rc == 0 else None
