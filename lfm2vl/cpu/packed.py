"""bf16 linears packed losslessly in 12 bits a weight (`bf16_packed`): the same values, 25% fewer bytes.

A decode step reads every weight of the language model once, so on a CPU whose memory sets its pace it takes as long
as those bytes take to arrive. `PackedLinear` holds its bf16 weight packed (kernels/packed.cpp: each weight's low byte,
and a 4-bit code for its high byte, the sign and top exponent bits, of which a matrix uses few values; the rare
others stored apart), ~1.5 bytes a weight instead of 2, and multiplies with it exactly as `FastLinear` does with the
bf16 weight: the same sums in the same order, so generation gives the same tokens as bf16. Prefill-size products
unpack the weight a panel at a time inside lfm2vl's own bf16 product (gemm.py: the same kernel and bits as the plain
bf16 weight's), elsewhere a block of rows at a time, each multiplied by torch's GEMM while it is in the cache. Fast
on CPUs with AVX512-BF16 and AVX512-VBMI2 (`kernels.packed_fast()`); elsewhere correct but slow. `lfm2vl.load`
packs by default where it is fast (`packs_by_default`) and keeps the packed weights on disk (wcache.py).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm, kernels
from .memory import release_mapped_pages, trim_heap
from .quant import FastLinear, default_max_rows, inference, linear_slots, scratch, use_kernel
from .wcache import WeightCache, convert_linears


class PackedLinear(nn.Module):
    """A bf16 linear whose weight is `kernels.pack_bf16`'s buffer (`packed`, 1-D uint8); bias stays bf16."""

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None,
                 max_rows: int | None = None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("packed", packed)
        self.bias = bias
        self.max_rows = default_max_rows() if max_rows is None else max_rows

    @classmethod
    def from_linear(cls, lin: nn.Linear, max_rows: int | None = None, release_source: bool = False) -> "PackedLinear":
        """release_source: lin's weight is not used afterwards, so its mapped pages may leave the RSS."""
        with torch.no_grad():
            packed = kernels.pack_bf16(lin.weight.detach())
        if release_source:
            release_mapped_pages(lin.weight)
        bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return cls(packed, lin.out_features, lin.in_features, bias, max_rows)

    def unpack(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bf16 weight (out_features, in_features), bit for bit, into out or a new tensor."""
        return kernels.unpack_bf16(self.packed, self.out_features, self.in_features, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        if use_kernel(x, self.packed, self.max_rows * K):
            return kernels.packed_linear(x, self.packed, N, K, self.bias)
        if not torch.is_grad_enabled() and inference(x, self.packed) and x.dtype == torch.bfloat16:
            # prefill: lfm2vl's panel kernel unpacks the weight a panel at a time inside the product (in the L2 cache),
            # the bits of gemm.linear with the bf16 weight; where it does not run, unpacked a block of rows at a time,
            # each multiplied while it is in the cache, or else whole into this thread's reused buffer (a fresh ~10
            # MB weight would fault in its pages)
            if gemm.panels_take(x, None, self.bias):
                y = kernels.packed_mm(x.reshape(-1, K), self.packed, N, K)
                if y is not None:
                    return y.view(*x.shape[:-1], N)
            y = gemm.linear_by_blocks(x, N, lambda n0, n1, out: kernels.unpack_bf16(self.packed, N, K, out, (n0, n1)),
                                      self.bias)
            if y is not None:
                return y
            return gemm.linear(x, self.unpack(scratch(torch.Size((N, K)), torch.bfloat16)), self.bias)
        return F.linear(x, self.unpack().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 packed in 12 bits"


def packs_by_default() -> bool:
    """Whether `lfm2vl.load` packs a bf16 model's weights when not told (and asked for no other weight format, low
    memory or a compiled decode step): where the packed kernels run fast. A decode step then reads 25% fewer bytes
    for the same tokens (2-core Zen 4 VM, 450M: ~1.25x plain bf16's decode, peak RSS -8%), the first token costs 0-6%
    more and loading ~0.3 s more at 450M (3-7 s at 3B, mostly reading the file's pages that a first request would
    read anyway)."""
    return kernels.available() and kernels.packed_fast()


def packable(lin: nn.Module) -> bool:
    """Whether lin is a bf16 CPU linear whose rows `kernels.pack_bf16` takes (a multiple of 64 long)."""
    return (type(lin) in (nn.Linear, FastLinear) and lin.weight.dtype == torch.bfloat16
            and lin.weight.device.type == "cpu" and lin.in_features % kernels.PACK_BLOCK == 0)


def pack_weights(model: nn.Module, max_rows: int | None = None, cache: WeightCache | None = None) -> int:
    """Replace the language model's bf16 linears and the output head by PackedLinear (those whose rows are not a
    multiple of 64 long stay); returns the count. The float weights' mapped pages leave the resident set; a tied
    head's are the embedding's, whose lookups map back only the rows they read. With a cache (wcache.py), the packed
    weights come from its file when it has them, else they are packed and written there; either way they end up
    memory-mapped from that file."""
    if not kernels.available():
        raise RuntimeError("bf16_packed needs lfm2vl's native kernels (a C++ compiler on an x86-64 CPU, and "
                           "LFM2VL_NO_KERNELS unset)")
    if not kernels.packed_fast():
        warnings.warn("bf16_packed: this CPU lacks AVX512-BF16 / AVX512-VBMI2, so packed products run a scalar path, "
                      "slower than plain bf16 (the results are the same)", RuntimeWarning, stacklevel=3)
    convert_linears([slot for slot in linear_slots(model) if packable(slot[3])], cache,
                    lambda lin: PackedLinear.from_linear(lin, max_rows, release_source=True),
                    lambda m: {"packed": m.packed},
                    lambda lin: {"packed": functools.partial(kernels.check_packed, N=lin.out_features,
                                                             K=lin.in_features)},
                    lambda lin, t, bias: PackedLinear(t["packed"], lin.out_features, lin.in_features, bias, max_rows))
    trim_heap()
    return sum(isinstance(m, PackedLinear) for m in model.modules())
