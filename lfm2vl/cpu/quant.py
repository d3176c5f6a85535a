"""Fast CPU linears for decoding: a module swap onto lfm2vl's native GEMV kernels, and weight-only int8 / int4.

- `FastLinear` (an nn.Linear: same parameters, same state_dict keys) calls the native kernel when the input has
  few rows (a decode step) and F.linear otherwise (prefill), or when autograd needs a backward.
- `Int8Linear`: symmetric per-output-channel int8 weights + fp32 scales; decode through the kernel (x @ (q * s)^T),
  prefill through int8 compute with x quantized per row too (int8mm.py) where that wins, else through the bf16
  product of the dequantized weight.
- `Int4Linear`: symmetric int4 in groups of 32 weights along a row (llama.cpp's Q4_0 rule), fp16 group scales,
  two weights per byte; prefill through int8 compute over the weight widened to int8 rows where that wins, else
  through the dequantized weight.
- `use_fast_linears(model)` / `quantize_weights(model, bits=8 | 4)`: swap the language model's
  linears (and the output head),
  never the vision tower or projector (their inputs are prefill-size). `lfm2vl.cpu.speed.optimize_for_cpu` calls them.
  Quantizing streams each weight in row blocks and drops the float weight's mapped pages afterwards, so only the
  quantized weights stay resident (not the bf16 ones, not an fp32 copy).
- Everything degrades to plain torch: with LFM2VL_NO_KERNELS=1, no compiler, a non-x86 CPU or a non-CPU device,
  the swapped modules compute F.linear exactly as before.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gemm, int8mm, kernels
from .memory import release_mapped_pages, trim_heap
from .wcache import Slot, WeightCache, convert_linears

MAX_ROWS = 8  # up to this many input rows the weight-streaming kernel beats torch's GEMM (scripts/bench_gemv.py)


def default_max_rows() -> int:
    """Input rows up to which a linear runs the weight-streaming kernel rather than gemm.linear: MAX_ROWS where the
    CPU has a bf16 GEMM; 32 where gemm.py widens weights to fp32 first, which the kernel does in registers while it
    reads each weight once (on an AVX2 Zen 3, 4608x1024, 16 rows: bf16 2.97 vs 3.98 ms, int8 2.28 vs 5.52, int4 2.03
    vs 4.98; even around 32 rows for bf16 and 64 for int8 / int4)."""
    return MAX_ROWS if gemm.bf16_native() else 32


def inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x is fp32/bf16 on the CPU and nothing needs a gradient: the native kernels and gemm.linear have no backward,
    so training (grad enabled and something requires grad) keeps F.linear."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def use_kernel(x: torch.Tensor, weight: torch.Tensor, max_elems: int) -> bool:
    return x.numel() <= max_elems and inference(x, weight)


class FastLinear(nn.Linear):
    """nn.Linear whose few-row forward runs the native multithreaded GEMV (same math, fp32 accumulation)."""

    max_rows: int = MAX_ROWS

    @classmethod
    def from_linear(cls, lin: nn.Linear, max_rows: int | None = None) -> "FastLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight  # the same Parameter: tying (lm_head = embed_tokens) survives the swap
        new.bias = lin.bias
        new.max_rows = default_max_rows() if max_rows is None else max_rows
        return new

    def prefills(self, x: torch.Tensor) -> bool:
        """Whether forward(x) multiplies with gemm.linear: inference on more rows than the GEMV kernel takes."""
        return (not use_kernel(x, self.weight, self.max_rows * self.in_features) and inference(x, self.weight)
                and x.dtype == self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernel(x, self.weight, self.max_rows * self.in_features):
            return kernels.linear(x, self.weight, self.bias)
        if self.prefills(x):
            return gemm.linear(x, self.weight, self.bias)  # oneDNN; fp32 where the CPU has no bf16 GEMM
        return F.linear(x, self.weight, self.bias)


_SCRATCH = threading.local()


def scratch(shape: torch.Size, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
    """This thread's reusable buffer number `slot` of one shape and dtype: dequantized weights (N, K) (~30 MB at 450M
    shapes, bf16), or int4 weights widened to int8 rows (N, K) and their scales (N,)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (tuple(shape), dtype, slot)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(shape, dtype=dtype)
    return buf


def _quantize_blocks(w: torch.Tensor, bits: int, q: torch.Tensor, scale: torch.Tensor, torch_formula,
                     block_bytes: int, release_source: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill q / scale from w one block of rows (~block_bytes of fp32) at a time: natively (`kernels.quantize`, the
    same arithmetic) or with `torch_formula(fp32 rows) -> (q rows, scale rows)`. Blocks, because a whole-matrix fp32
    copy would be 2x a bf16 weight and glibc keeps such freed blocks in its heap (over 1 GB of RSS after quantizing
    the 450M model). release_source: drop w's memory-mapped pages block by block once read
    (`memory.release_mapped_pages`)."""
    N, K = w.shape
    rows = max(1, block_bytes // (4 * K))
    native = (kernels.available() and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
              and w.is_contiguous())
    with torch.no_grad():
        for r in range(0, N, rows):
            if native:
                kernels.quantize(w[r:r + rows], bits, q[r:r + rows], scale[r:r + rows])
            else:  # a copy even for fp32 w: the formulas divide in place
                q[r:r + rows], scale[r:r + rows] = torch_formula(w[r:r + rows].to(torch.float32, copy=True))
            if release_source:  # from the previous block on: pages that straddle two blocks go at the second
                release_mapped_pages(w[max(0, r - rows):r + rows])
    return q, scale


def _int8_formula(wf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = wf.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return wf.div_(s[:, None]).round_().clamp_(-127, 127), s  # integral values: exact in int8


def quantize_weight_int8(w: torch.Tensor, block_bytes: int = 1 << 22,
                         release_source: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns q (N, K) int8 in [-127, 127] and scale (N,) fp32 with w ≈ q * scale[:, None]:
    s = amax / 127 (1 for an all-zero row), q = clamp(round(w / s), -127, 127). Row blocks: `_quantize_blocks`."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scale = torch.empty(N, dtype=torch.float32, device=w.device)
    return _quantize_blocks(w, 8, q, scale, _int8_formula, block_bytes, release_source)


class Int8Linear(nn.Module):
    """Weight-only int8 linear: y = x @ (q * scale)^T + bias, computed in x's dtype with fp32 accumulation."""

    bits = 8
    quantize_weight = staticmethod(quantize_weight_int8)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, max_rows: int | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = bias
        self.max_rows = default_max_rows() if max_rows is None else max_rows

    @classmethod
    def from_linear(cls, lin: nn.Linear, max_rows: int | None = None, release_source: bool = False) -> "Int8Linear":
        """release_source: lin's float weight is not used afterwards, so its mapped pages may leave the RSS."""
        q, s = cls.quantize_weight(lin.weight, release_source=release_source)
        bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return cls(q, s, bias, max_rows)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # fp32 products rounded once to dtype. Three vectorized passes: torch.mul(q, s, out=<bf16>) gives the same
        # values without the fp32 copy but runs a scalar mixed-dtype loop, much slower than the three passes
        return self.weight.float().mul_(self.scale[:, None]).to(dtype)

    def _native_dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return kernels.dequantize_int8(self.weight, self.scale, out)

    def int8_rows(self, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as int8 rows and their fp32 scales, for int8 compute (slot: see Int4Linear's)."""
        return self.weight, self.scale

    def int8_compute(self, x: torch.Tensor) -> bool:
        """Whether forward() of an input with x's rows, dtype and device multiplies in int8 compute (int8mm.py):
        more rows than the weight-streaming kernel takes, inference, where that wins."""
        return (kernels.available() and x.numel() > self.max_rows * x.shape[-1] and not torch.is_grad_enabled()
                and inference(x, self.weight) and int8mm.wins())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.available() and use_kernel(x, self.weight, self.max_rows * self.in_features):
            return kernels.linear(x, self.weight, self.bias, self.scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.int8_compute(x):  # int8 x int8 products (int8mm.py), x quantized per row
            return int8mm.linear(x, *self.int8_rows(), bias)
        if not torch.is_grad_enabled() and inference(x, self.weight) and kernels.available():
            # prefill: dequantize into a reused per-thread buffer (same values as dequantize()), in the dtype the
            # CPU multiplies x's dtype in (fp32 without a bf16 GEMM). A fresh ~10 MB weight per product would
            # fault in all its pages each time; no autograd here, so nothing keeps the buffer alive
            shape = torch.Size((self.out_features, self.in_features))
            return gemm.linear(x, self._native_dequantize(scratch(shape, gemm.compute_dtype(x.dtype))), bias)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit"


def _int4_formula(wf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    G = kernels.I4_GROUP
    wf = wf.view(wf.shape[0], -1, G)
    extreme = wf.gather(-1, wf.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    d = torch.where(extreme != 0, extreme / -8.0, torch.ones_like(extreme))
    q = wf.div_(d[..., None]).round_().clamp_(-8, 7).add_(8).to(torch.uint8)  # (rows, K/G, G) in 0..15
    return (q[..., :G // 2] | (q[..., G // 2:] << 4)).view(wf.shape[0], -1), d


def quantize_weight_int4(w: torch.Tensor, block_bytes: int = 1 << 22,
                         release_source: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 in groups of G = 32 weights along each row: returns packed (N, K/2) uint8 and scale (N, K/G)
    fp16 with w[n, G*g + i] ~ q * scale[n, g].

    Per group (llama.cpp's Q4_0 rule): d = (the weight of largest magnitude) / -8 and q = clamp(round(w / d), -8, 7),
    so the extreme maps to -8 and all 16 levels are used; an all-zero group has d = 1. d is stored in fp16 (rounded
    to nearest even after the levels are taken, as Q4_0 does): 4.5 bits a weight instead of 5 with fp32 scales, so a
    decode step reads 10% fewer bytes. Stored as q + 8 in nibbles: byte j of a group holds element j in its low
    nibble and element 16 + j in its high one (gemv.h).
    Row blocks: `_quantize_blocks`.
    """
    N, K = w.shape
    G = kernels.I4_GROUP
    if K % G:
        raise ValueError(f"int4 needs a row length that is a multiple of {G}, got a {N}x{K} weight")
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(N, K // G, dtype=torch.float16, device=w.device)
    return _quantize_blocks(w, 4, packed, scale, _int4_formula, block_bytes, release_source)


class Int4Linear(Int8Linear):
    """Weight-only int4 linear (`quantize_weight_int4`'s format): `weight` (N, K/2) uint8, `scale` (N, K/32) fp16."""

    bits = 4
    quantize_weight = staticmethod(quantize_weight_int4)

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 max_rows: int | None = None):
        super().__init__(packed, scale, bias, max_rows)
        self.in_features = packed.shape[1] * 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, G = self.out_features, kernels.I4_GROUP
        b = self.weight.view(N, -1, G // 2)
        q = torch.cat((b & 15, b >> 4), dim=-1).float().sub_(8)  # (N, K/G, G)
        return q.mul_(self.scale.float()[..., None]).view(N, self.in_features).to(dtype)

    def _native_dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return kernels.dequantize_int4(self.weight, self.scale, out)

    def int8_rows(self, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The int4 weight widened to int8 rows (`kernels.int4_to_int8`: each level moves by at most half an int8
        step) in reused per-thread buffers (number `slot`: rows needed together take different slots), for int8
        compute."""
        shape = torch.Size((self.out_features, self.in_features))
        q8, s = scratch(shape, torch.int8, slot), scratch(torch.Size((self.out_features,)), torch.float32, slot)
        kernels.int4_to_int8(self.weight, self.scale, q8, s)
        return q8, s


def head_and_lm(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    lm = model.model.language_model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
    return lm, getattr(model, "lm_head", None)


def _slots(root: nn.Module, prefix: str = "") -> list[Slot]:
    """Each nn.Linear / FastLinear under root as (prefix + its path, parent, attribute, linear), in module order."""
    out = []
    for attr, child in root.named_children():
        if type(child) is nn.Linear or type(child) is FastLinear:
            out.append((prefix + attr, root, attr, child))
        else:
            out += _slots(child, f"{prefix}{attr}.")
    return out


def swap_linears(root: nn.Module, make) -> int:
    """Replace each nn.Linear / FastLinear under root by make(linear); returns the count."""
    slots = _slots(root)
    for _, parent, attr, lin in slots:
        setattr(parent, attr, make(lin))
    return len(slots)


def linear_slots(model: nn.Module, head: bool = True) -> list[Slot]:
    """The language model's nn.Linear / FastLinear layers, and the output head if head=True and it is one, each as
    (qualified name, parent, attribute, linear), in module order (wcache.convert_linears replaces them)."""
    lm, lm_head = head_and_lm(model)
    path = next(name for name, m in model.named_modules() if m is lm)
    out = _slots(lm, f"{path}." if path else "")
    if head and lm_head is not lm and type(lm_head) in (nn.Linear, FastLinear):
        out.append(("lm_head", model, "lm_head", lm_head))
    return out


def _kind(lin: nn.Module, bits: int) -> type:
    return Int4Linear if bits == 4 and lin.in_features % kernels.I4_GROUP == 0 else Int8Linear


def _checks(lin: nn.Module, bits: int) -> dict:
    """What a cached quantized weight of lin must be: int8 (N, K) with fp32 (N,) scales, or int4 (N, K/2) bytes
    with fp16 (N, K/32) scales."""
    N, K = lin.out_features, lin.in_features
    if _kind(lin, bits) is Int4Linear:
        shapes = {"weight": ((N, K // 2), torch.uint8), "scale": ((N, K // kernels.I4_GROUP), torch.float16)}
    else:
        shapes = {"weight": ((N, K), torch.int8), "scale": ((N,), torch.float32)}
    return {part: functools.partial(_check_tensor, part=part, shape=shape, dtype=dtype)
            for part, (shape, dtype) in shapes.items()}


def _check_tensor(t: torch.Tensor, part: str, shape: tuple, dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"a {part} of {tuple(t.shape)} {t.dtype} where {shape} {dtype} was expected")


def quantize_weights(model: nn.Module, bits: int = 8, quantize_head: bool = False,
                     max_rows: int | None = None, cache: WeightCache | None = None) -> int:
    """Replace the language model's nn.Linear layers (and the output head if asked) by Int8Linear, or with bits=4
    by Int4Linear (a layer whose rows are not a multiple of 32 long gets Int8Linear); returns the count.

    The vision tower and projector stay in their dtype. A tied head keeps sharing nothing with the embedding once
    quantized (the embedding table stays bf16/fp32 for lookups). Idempotent. With a cache (wcache.py) the quantized
    weights are read from its file when it holds them, else written there, and mapped from it.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")

    n = convert_linears(linear_slots(model, head=quantize_head), cache, lambda lin: _quantized(lin, max_rows, bits),
                        lambda m: {"weight": m.weight, "scale": m.scale}, lambda lin: _checks(lin, bits),
                        lambda lin, t, bias: _kind(lin, bits)(t["weight"], t["scale"], bias, max_rows))
    trim_heap()  # the fp32 blocks were freed between the quantized weights (~70 MB of holes at 450M shapes)
    return n


def quantize_vision(model: nn.Module, max_rows: int | None = None) -> int:
    """Replace the vision tower's encoder linears (attention and MLP of every layer) by Int8Linear; returns the count.

    Opt-in (`int8_vision`): the tower's prefill-size products then run on int8 compute where that wins (int8mm.py;
    ONNX exports of LFM2-VL keep this tower in int8, and found int4 hurt it). The patch embedding, whose input is
    the pixels, and the projector stay in their dtype. The float weights' mapped pages leave the resident set.
    """
    n = swap_linears(model.model.vision_tower.encoder,
                     lambda lin: Int8Linear.from_linear(lin, max_rows, release_source=True))
    trim_heap()
    return n


def _quantized(lin: nn.Linear, max_rows: int | None, bits: int) -> Int8Linear:
    """Int8Linear / Int4Linear of lin; the float weight's memory-mapped pages leave the resident set (memory.py says
    why). A tied head's pages are the embedding's: lookups map back only the rows they read."""
    return _kind(lin, bits).from_linear(lin, max_rows, release_source=True)


def use_fast_linears(model: nn.Module, max_rows: int | None = None) -> nn.Module:
    """The language model's nn.Linear layers and the output head become FastLinear, in place; returns the model.

    Results equal F.linear within float rounding (fp32 accumulation). Without the native kernels
    (LFM2VL_NO_KERNELS=1, no compiler, not x86-64) nothing is swapped. Quantized layers are left as they are.
    """
    if not kernels.available():
        return model
    lm, _ = head_and_lm(model)
    swap_linears(lm, lambda lin: FastLinear.from_linear(lin, max_rows))
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:
        model.lm_head = FastLinear.from_linear(head, max_rows)
    return model
