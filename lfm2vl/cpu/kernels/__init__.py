"""Native CPU kernels: multithreaded GEMV / small-M GEMM over bf16, fp32, int8 and int4 weights, attention.

- `gemv.cpp` (products; `gemv_scalar.cpp` their scalar rows, `gemv_avx2.cpp` their AVX2 rows, `gemv_vnni.cpp`
  int8 / int4 rows with AVX512-VNNI, `gemv_streams.cpp` several bf16 / int8 weight rows at once for one activation row),
  `attn.cpp` (decode attention), `attn_many.cpp` (the vision tower's and the prefill's attention; `attn_q8.cpp`
  its int8 scores for an int8 tower), `prefill.cpp` (a bf16 prefill's SwiGLU, RMSNorm and short-conv middle),
  `decode.cpp` (the fused decode step, its small ops
  in `decode_ops.h`, driven by `kernels/decode.py`), `quantized.cpp` (the int8 / int4 formats: quantization at load,
  expansion for prefill),
  `packed.cpp` / `packed_pack.cpp` (bf16 weights packed losslessly in 12 bits: products and unpacking / packing),
  `int8mm.cpp` (the passes around an int8 product of many rows: activations quantized per row, the int32 result
  scaled), `amx.cpp` (that product, and the vision tower's bf16 ones, on AMX tiles; `amx.h` their setup, shared with
  attn_many's tiled path), `vnni_mm.cpp` (the int8 product of a prefill's rows in AVX512-VNNI registers; `panels.h`
  the weight panels it and amx.cpp pack), `dropout.cpp` (training's dropout, mask hashed from a seed) and `pool.cpp`
  (their thread pool), with `gemv.h` / `pool.h` / `packed.h` / `int8mm.h`, are
  compiled once per machine with the system `g++ -O3 -march=native` (no ninja, no Python headers: a plain shared
  library called through ctypes) and cached under ~/.cache/lfm2vl/kernels/<hash>/ (`build.py`).
- Here: the decode side's wrappers (products, decode attention) and the CPU's traits; `prefill_ops.py`: the
  prefill's and vision tower's passes, `packed_ops.py`: the packed bf16 format's, both re-exported here.
- Threads: the caller plus `torch.get_num_threads() - 1` helpers of pool.cpp's own work-sharing pool (a contiguous
  range of chunks per thread, the others' leftovers taken from their ends, so a helper descheduled by another process
  never stalls a product); the prefill's and vision tower's passes run on torch's own OpenMP team instead, between
  its products (pool.h).
- `available()` is False, and callers fall back to F.linear, when LFM2VL_NO_KERNELS=1, the CPU is not x86-64,
  or the compiler is missing or fails. A failure is reported once as a warning, never raised.
"""
from __future__ import annotations

import functools

import torch

from .build import DT as _DT
from .build import I4_GROUP, KIND as _KIND
from .build import load as _load
from .packed_ops import (BLOCK as PACK_BLOCK, bf16_mm, check_packed, pack_bf16, packed_fast, packed_linear,  # noqa: F401
                         packed_mm, unpack_bf16)
from .prefill_ops import (amx_bf16, amx_int8, attn_int8_scores, attn_many, bf16_linear_amx, gelu_tanh_,  # noqa: F401
                          int4_to_int8, int8_epilogue, int8_fused, int8_linear, int_mm, layernorm, quantize_rows, rmsnorm,
                          set_amx, short_conv, swiglu, swiglu_h, swiglu_h_bf16_amx, swiglu_int8)


def available() -> bool:
    """True when the native library is built and loaded (and not disabled by LFM2VL_NO_KERNELS=1)."""
    return _load() is not None


def isa() -> int:
    """Instruction set in use: 3 AVX512-BF16, 2 AVX512F, 1 AVX2+FMA, 0 scalar; -1 without kernels."""
    lib = _load()
    return -1 if lib is None else lib.lfm2vl_isa()


def set_isa(cap: int) -> None:
    """Cap the instruction set (tests use it to exercise the AVX2 and scalar fallbacks on an AVX512 CPU)."""
    lib = _load()
    if lib is not None:
        lib.lfm2vl_set_isa(int(cap))


def set_streams(mode: int) -> None:
    """Several weight streams for one activation row (bf16 eight, int8 four, gemv_streams.cpp; int4 two,
    gemv_vnni.cpp; packed bf16 two, packed.cpp): -1 by the CPU's vendor (the default: Intel),
    0 never, 1 always (tests use it to run both paths on any CPU)."""
    lib = _load()
    if lib is not None:
        lib.lfm2vl_set_streams(int(mode))


def set_prefetch(mode: int) -> None:
    """Software prefetch of the weights in the one-stream rows other than int4's integer-dot rows (gemv.cpp's
    weight_prefetch): -1 as the CPU says (the default: on, except on AMD Zen 4), 0 never, 1 always (tests use it to
    run both paths on any CPU)."""
    lib = _load()
    if lib is not None:
        lib.lfm2vl_set_prefetch(int(mode))


def quantizes_x(bits: int) -> bool:
    """Whether int8 (bits 8) or int4 (bits 4) products round x to integers on the instruction set in use (rows whose
    length is a multiple of 32): int8 in 16 bits per block of 256, int4 in 8 bits per block of 32 (on AVX2 and on
    AVX512 with VNNI: gemv_avx2.cpp, gemv_vnni.cpp)."""
    lib = _load()
    return lib is not None and bool(lib.lfm2vl_quantizes_x(2 if bits == 8 else 3))


def stream_read(buf: torch.Tensor) -> int:
    """Read every byte of the contiguous CPU tensor `buf` once, eight streams per thread on the pool's threads (the
    bench's read-bandwidth probe); returns the XOR of its 8-byte words. The caller checks `available()`."""
    if buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError("stream_read: needs a contiguous CPU tensor")
    return _load().lfm2vl_read(buf.data_ptr(), buf.numel() * buf.element_size(), torch.get_num_threads())


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` runs natively for these dtypes/devices (callers otherwise use F.linear)."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in _DT
            and weight.dtype in _KIND and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantized weight, bias) with fp32 accumulation; the output has x's dtype.

    x (..., K) fp32/bf16; weight (N, K) bf16/fp32/int8, or (N, K/2) uint8 packed int4; int8 needs `scale` (N,) fp32,
    int4 (N, K/32) fp16 (quant.py has the formats); bias (N,) or None.
    The caller checks `supports()` first. Kept lean: it runs ~100 times per decoded token.
    """
    N, K = weight.shape
    kind = _KIND[weight.dtype]
    if kind == 3:
        K *= 2
    if x.shape[-1] != K:
        raise ValueError(f"linear: x has {x.shape[-1]} features but weight is {tuple(weight.shape)}")
    if kind >= 2:
        n_scales = N if kind == 2 else N * (K // I4_GROUP)
        want = torch.float32 if kind == 2 else torch.float16
        if scale is None or scale.dtype != want or scale.numel() != n_scales or (kind == 3 and K % I4_GROUP):
            raise ValueError(f"linear: {'int8' if kind == 2 else 'int4'} weight {tuple(weight.shape)} needs a "
                             f"{str(want).removeprefix('torch.')} scale of {n_scales} values"
                             + (f" and K a multiple of {I4_GROUP}" if kind == 3 else ""))
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    lib = _load()
    if lib is None:
        raise RuntimeError("lfm2vl native kernels are unavailable (check kernels.available() first)")
    y = x.new_empty(x.shape[:-1] + (N,))
    dt = _DT[x.dtype]
    lib.lfm2vl_linear(kind, weight.data_ptr(), None if scale is None else scale.data_ptr(), x.data_ptr(),
                      y.data_ptr(), None if bias is None else bias.data_ptr(), x.numel() // K, N, K, dt, dt,
                      torch.get_num_threads())
    return y


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, K) fp32/bf16 <- q (N, K) int8 * scale (N,) fp32: the fp32 product rounded once, as
    `(q.float() * scale[:, None]).to(out.dtype)`, in one pass on the pool's threads. Returns out. The caller checks
    `available()`."""
    if (q.dtype != torch.int8 or q.dim() != 2 or scale.dtype != torch.float32 or scale.shape != (q.shape[0],)
            or out.dtype not in _DT or out.shape != q.shape or not out.is_contiguous()):
        raise ValueError(f"dequantize_int8: needs (N, K) int8, (N,) float32 scales and a contiguous (N, K) fp32/bf16 "
                         f"output, got {tuple(q.shape)} {q.dtype}, {tuple(scale.shape)} {scale.dtype}, "
                         f"{tuple(out.shape)} {out.dtype}")
    q, scale = q.contiguous(), scale.contiguous()
    _load().lfm2vl_dequant_int8(q.data_ptr(), scale.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1], _DT[out.dtype],
                             torch.get_num_threads())
    return out


def quantize(w: torch.Tensor, bits: int, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Fill q / scale with quant.py's int8 (bits 8) or int4 (bits 4) format of w (N, K) fp32/bf16, contiguous: the
    same values as its torch formula, on the pool's threads. The caller checks `available()` and the shapes."""
    N, K = w.shape
    _load().lfm2vl_quantize(bits, w.data_ptr(), _DT[w.dtype], q.data_ptr(), scale.data_ptr(), N, K,
                         torch.get_num_threads())


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, K) fp32/bf16 <- packed int4 q (N, K/2) uint8 with group scales (N, K/32) fp16 (quant.py's format):
    each fp32 product rounded once to out's dtype, on the pool's threads. Returns out. The caller checks
    `available()`."""
    N, K = out.shape
    if (q.dtype != torch.uint8 or q.shape != (N, K // 2) or K % I4_GROUP or scale.dtype != torch.float16
            or scale.shape != (N, K // I4_GROUP) or out.dtype not in _DT or not out.is_contiguous()):
        raise ValueError(f"dequantize_int4: needs (N, K/2) uint8, (N, K/{I4_GROUP}) float16 scales and a contiguous "
                         f"(N, K) fp32/bf16 output, K a multiple of {I4_GROUP}; got {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(scale.shape)} {scale.dtype}, {tuple(out.shape)} {out.dtype}")
    q, scale = q.contiguous(), scale.contiguous()
    _load().lfm2vl_dequant_int4(q.data_ptr(), scale.data_ptr(), out.data_ptr(), N, K, _DT[out.dtype],
                             torch.get_num_threads())
    return out


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux's /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def amx() -> bool:
    """Whether the CPU has AMX-BF16 tiles."""
    return "amx_bf16" in cpu_flags()


def int8_dots() -> bool:
    """Whether the CPU multiplies int8 with dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), which
    torch._int_mm needs to run at speed: without them it is a plain loop (a 2-core AVX2 Zen 3: 87 x 1024 x 4608 in
    154 ms, against 7.8 ms for the same product in fp32)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def attention_wins() -> bool:
    """Whether attn_many beats torch's SDPA for bf16 attention over many queries: where it runs (AVX512-BF16); on CPUs
    with AMX-BF16 (whose tiles torch's attention uses too, well ahead of AVX512-BF16 dot products) only on attn_many's
    own tiles (docs/cpu.md has the figures)."""
    return isa() >= 3 and (not amx() or amx_bf16())


def serves(x: torch.Tensor) -> bool:
    """Whether the bf16 inference kernels (attn_many, swiglu, rmsnorm, short_conv) may take activations x: bf16 on
    the CPU, no autograd, and the library built."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and available()


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for one query per row, fp32 math, on the pool's threads (no OpenMP region).

    q (B, H, 1, Dh); k, v (B, Hkv, n, Dh) fp32/bf16 views with contiguous last dim and equal strides (e.g. a
    slice of the static cache); mask (B, 1, 1, n) bool or None. Query head h reads kv head h // (H // Hkv).
    rows (B,) long: query row b reads k[rows[b]] (no gathered copy of the cache); None: row b.
    Returns (B, H, 1, Dh) in q's dtype. The caller checks `available()` first.
    """
    B, H, _, Dh = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    if k.stride() != v.stride() or k.stride(-1) != 1 or k.dtype != v.dtype or k.dtype not in _DT or H % Hkv:
        raise ValueError(f"attn_decode: unsupported k/v layout {tuple(k.shape)} {k.stride()} {k.dtype}")
    qf = (q.float() * Dh ** -0.5).contiguous()
    m = None if mask is None else mask.reshape(B, n).to(torch.uint8).contiguous()
    if rows is not None:
        if rows.shape != (B,) or int(rows.min()) < 0 or int(rows.max()) >= k.shape[0]:
            raise ValueError(f"attn_decode: rows {rows.tolist()} must be {B} indices below {k.shape[0]}")
        rows = rows.to(torch.int64).contiguous()
    elif k.shape[0] != B:
        raise ValueError(f"attn_decode: k has {k.shape[0]} rows for {B} queries and no rows given")
    o = torch.empty(B, H, 1, Dh)
    _load().lfm2vl_attn_decode(qf.data_ptr(), k.data_ptr(), v.data_ptr(), None if m is None else m.data_ptr(),
                            None if rows is None else rows.data_ptr(), o.data_ptr(), B, H, Hkv, n, Dh, k.stride(0),
                            k.stride(1), k.stride(2), _DT[k.dtype], torch.get_num_threads())
    return o.to(q.dtype)


DROPOUT_BITS = 24  # dropout.cpp keeps an element when 24 bits of its hash reach round(p * 2^24)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep / (1 - p) for a contiguous fp32 / bf16 CPU tensor x (a new tensor of x's shape and dtype), the keep
    mask a hash of (seed, element index) with P(keep) = 1 - p (dropout.cpp): the same seed gives the same mask, so
    the backward pass applies it to the gradient by calling this again. bf16: the fp32 product rounded once.
    The caller checks `available()`."""
    if x.device.type != "cpu" or x.dtype not in _DT or not x.is_contiguous() or not 0 <= p < 1:
        raise ValueError(f"dropout: needs a contiguous fp32/bf16 CPU tensor and 0 <= p < 1, got {x.dtype} on "
                         f"{x.device}, contiguous={x.is_contiguous()}, p={p}")
    y = torch.empty_like(x)
    threshold = min(round(p * (1 << DROPOUT_BITS)), (1 << DROPOUT_BITS) - 1)
    _load().lfm2vl_dropout(x.data_ptr(), y.data_ptr(), x.numel(), seed & (2 ** 64 - 1), threshold, 1.0 / (1.0 - p),
                        int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return y
