"""CPU speed-ups for a loaded Lfm2VlModel, applied by one call: `optimize_for_cpu(model)`.

Module swaps that keep parameters, state_dict keys and results (within float rounding):
- linears of the language model and the output head -> `quant.FastLinear` (native multithreaded GEMV for
  decode-size inputs), or `quant.Int8Linear` / `Int4Linear` with int8=True / int4=True (opt-in), or
  `packed.PackedLinear` with bf16_packed=True (bf16 weights packed losslessly, the same values; `lfm2vl.load`'s
  default where it is fast); the vision
  tower's encoder linears -> `quant.Int8Linear` with int8_vision=True (opt-in);
- `ShortConv` -> `FastShortConv`: the depthwise causal conv as K shifted multiply-adds in fp32. torch's bf16
  `F.conv1d` for groups=D goes through oneDNN, which is slow for so small a conv (a decode step has 10); for
  bf16 inference the whole middle (gates, conv, state) is one native pass (`kernels.short_conv`);
- the decode step (T == 1) of the whole language model -> one native call (`cpu/kernels/decode.py`): the model becomes a
  `FastLfm2VlModel` whose `forward_cached` takes that path while the modules still hold the tensors it was built
  from, and the torch path otherwise (prefill, training, LoRA-wrapped or swapped layers);
- `Attention` -> `FastAttention`: a decode step attends over the filled prefix of the static cache only
  (one host read of the lengths, free on CPU), not all max_seq_len slots behind a mask, with the native
  one-query kernel `kernels.attn_decode` (fp32 math on the GEMV pool's threads) instead of torch's SDPA; a bf16
  prefill chunk runs `kernels.attn_many` (causal over each row's prefix, torch flash's rounding points) where it
  beats torch (`kernels.attention_wins`: on AMX tiles where the CPU has them, else AVX512-BF16; torch's flash
  kernel, given the cache's mask, also computes the masked keys);
- `MLP` -> `FastMLP` and `RMSNorm` -> `FastRMSNorm`: SwiGLU and the norms as one native pass each for bf16
  inference (`kernels.swiglu` / `kernels.rmsnorm`, torch's roundings), where torch runs 2 and ~8 ops;
- the vision tower's and projector's modules -> vision.py's subclasses (oneDNN fused linears, native attention,
  cached position grids).
Nothing here runs on other devices: a CUDA model is returned unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..model.lfm2vl import Lfm2VlModel
from ..model.rope import rope_inv_freq
from ..model.text import MLP, Attention, RMSNorm, ShortConv
from . import gemm, int8mm, kernels
from .kernels.decode import NativeDecoder
from .lowmem import LowMemoryModel
from .memory import TRIM_ABOVE, keep_heap_pages, release_library_pages, release_weights, trim_heap
from .packed import PackedLinear, pack_weights
from .quant import FastLinear, Int4Linear, Int8Linear, quantize_vision, quantize_weights, use_fast_linears
from .vision import use_fast_vision
from .wcache import WeightCache


def causal_depthwise_conv(u_ext: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid depthwise conv: u_ext (B, D, K-1+T), weight (D, 1, K) -> (B, D, T) in u_ext's dtype, fp32 math."""
    K = weight.shape[-1]
    T = u_ext.shape[-1] - K + 1
    w = weight[:, 0].float()  # (D, K)
    uf = u_ext.float()
    y = uf[..., 0:T] * w[:, 0:1]
    for j in range(1, K):
        y = y + uf[..., j:j + T] * w[:, j:j + 1]
    if bias is not None:
        y = y + bias.float()[:, None]
    return y.to(u_ext.dtype)


class FastShortConv(ShortConv):
    """ShortConv with the conv as shifted multiply-adds (same parameters, same math as model/text.py)."""

    def forward(self, x, pad_mask=None, cache=None, layer_idx: int = 0):
        if pad_mask is not None:
            x = x * pad_mask[:, :, None].to(x.dtype)
        p = self.in_proj(x)  # (B, T, 3D)
        K = self.conv.kernel_size[0]
        if kernels.serves(p):  # the middle as one native pass (kernels/prefill.cpp), same roundings
            state = (cache.conv_state(layer_idx) if cache is not None
                     else torch.zeros(p.shape[0], p.shape[-1] // 3, K - 1, dtype=p.dtype))
            done = kernels.short_conv(p, state.to(p.dtype), self.conv.weight, self.conv.bias)
            if done is not None:
                if cache is not None and cache.lengths is not None:
                    # right-padded rows: the state after each row's last real input, u = B * x as the kernel rounds it
                    D = p.shape[-1] // 3
                    cache.conv_extend(layer_idx, (p[..., :D] * p[..., 2 * D:]).transpose(1, 2))
                elif cache is not None:
                    cache.conv_store(layer_idx, done[1])
                return self.out_proj(done[0])
        Bg, Cg, xs = p.transpose(1, 2).chunk(3, dim=1)  # each (B, D, T)
        u = Bg * xs
        u_ext = cache.conv_extend(layer_idx, u) if cache is not None else F.pad(u, (K - 1, 0))
        y = causal_depthwise_conv(u_ext, self.conv.weight, self.conv.bias)  # (B, D, T)
        return self.out_proj((Cg * y).transpose(1, 2))


def _native_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Decode attention natively: torch's flash-attention kernel for a single query spends far longer than its math
    (an OpenMP region that stalls beside the GEMV pool's threads)."""
    return q.device.type == "cpu" and k.dtype in (torch.float32, torch.bfloat16) and kernels.available()


class FastAttention(Attention):
    """Attention whose decode step reads only the filled part of the static K/V cache; bf16 prefill natively."""

    def forward(self, x, cos, sin, mask=None, cache=None, layer_idx: int = 0):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None and T == 1 and _native_attention(q, cache.cache.k[layer_idx]):
            kc, vc = cache.kv_write(layer_idx, k, v)  # every cache row: the kernel reads rows in place, no gather
            n = int(cache.start_pos.max()) + 1
            mask = None if B == 1 else mask[..., :n]
            o = kernels.attn_decode(q, kc[:, :, :n], vc[:, :, :n], mask, cache.rows)
            return self.out_proj(o.transpose(1, 2).reshape(B, T, self.H * self.Dh))
        if cache is not None:
            k, v = cache.kv_update(layer_idx, k, v)  # (B, Hkv, S, Dh)
            if T == 1:
                n = int(cache.start_pos.max()) + 1  # keys beyond every row's position are masked anyway
                k, v = k[:, :, :n], v[:, :, :n]
                mask = None if B == 1 else mask[..., :n]  # one row: all n keys are visible
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                return self.out_proj(o.transpose(1, 2).reshape(B, T, self.H * self.Dh))
        o = None
        native = kernels.serves(x) and k.dtype == x.dtype and kernels.attention_wins()
        if native and (cache is not None or mask is None):
            # the mask is causal over each row's prefix (a CacheView's, or none): prefill natively
            o = kernels.attn_many(q, k, v, None if cache is None else (cache.start_pos + T).tolist(), causal=True)
        if o is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            o = o.transpose(1, 2).reshape(B, T, self.H * self.Dh)
        return self.out_proj(o)


class FastMLP(MLP):
    """SwiGLU with silu and the product in one native pass for bf16 inference (kernels.swiglu, same roundings), fused
    into the gate's and up's products where the AMX kernel takes them (gemm.swiglu_gate); with int8 / int4 weights
    in int8 compute, the gate's passes fused (int8mm.swiglu_mlp, same values)."""

    def forward(self, x):
        layers = (self.w1, self.w3, self.w2)
        if kernels.serves(x) and all(isinstance(m, Int8Linear) and m.int8_compute(x) for m in layers):
            y = int8mm.swiglu_mlp(x, *((m.int8_rows, m.bias) for m in layers))
            if y is not None:
                return y
        if kernels.serves(x) and all(type(m) is FastLinear and m.prefills(x) for m in (self.w1, self.w3)):
            h = gemm.swiglu_gate(x, self.w1.weight, self.w1.bias, self.w3.weight, self.w3.bias)
            if h is not None:
                return self.w2(h)
        a, b = self.w1(x), self.w3(x)
        g = kernels.swiglu(a, b) if kernels.serves(x) else None
        return self.w2(F.silu(a) * b if g is None else g)


class FastRMSNorm(RMSNorm):
    """RMSNorm as one native pass for bf16 inference (kernels.rmsnorm, same roundings) instead of ~8 small ops."""

    def forward(self, x):
        y = kernels.rmsnorm(x, self.weight, self.eps) if kernels.serves(x) else None
        return super().forward(x) if y is None else y


class FastLfm2VlModel(LowMemoryModel):
    """Lfm2VlModel whose single-token cached steps run natively (`native_decoder`, set by optimize_for_cpu); it
    keeps the low-memory mode (lowmem.py)."""

    native_decoder: NativeDecoder | None = None

    def image_features(self, pixel_values, pixel_attention_mask, spatial_shapes) -> torch.Tensor:
        # glibc keeps freed heap pages (memory.keep_heap_pages): a long prompt's activations (~100 MB after 1807 tokens
        # at 450M) would sit in RSS beside the tower's weights and activations, the peak of a request
        if pixel_values.device.type == "cpu" and not torch.is_grad_enabled():
            trim_heap(above=TRIM_ABOVE)
        return super().image_features(pixel_values, pixel_attention_mask, spatial_shapes)

    def forward_cached(self, inputs_embeds, cache, start_pos, rows=None, last_only=True, lengths=None):
        dec = self.native_decoder
        if dec is not None and lengths is None and not torch.is_grad_enabled():
            logits = dec(inputs_embeds, cache, start_pos, rows)  # None: not a step it can take
            if logits is not None:
                return logits if last_only else logits[:, None]
        return super().forward_cached(inputs_embeds, cache, start_pos, rows, last_only, lengths)


def _swap_class(root: nn.Module, base: type, fast: type) -> int:
    n = 0
    for m in root.modules():
        if type(m) is base:
            m.__class__ = fast  # same instance, parameters and hooks; only forward changes
            n += 1
    return n


def optimize_for_cpu(model: nn.Module, int8: bool = False, quantize_head: bool = True,
                     int4: bool = False, int8_vision: bool = False, bf16_packed: bool = False,
                     source: str | os.PathLike | None = None) -> nn.Module:
    """Make a loaded Lfm2VlModel decode fast on CPU, in place; returns it. Call once after loading.

    int8=True: weight-only int8 for the language model's linears and, unless quantize_head=False, the output head
    (a tied head is ~19% of a 450M decode step's bytes; the embedding table stays float for lookups, so make_cache
    still picks the activation dtype by default). int4=True: the same with int4 (groups of 32 weights).
    int8_vision=True: the vision tower's encoder linears in int8 too (quant.quantize_vision), independent of the
    language model's format. bf16_packed=True: the bf16 language model's linears and output head packed losslessly
    in 12 bits a weight (packed.py: the same results, a faster decode, a slightly slower first token).
    source: the checkpoint folder the model's weights were read from unchanged (no adapter merged): the packed or
    quantized weights are then kept in its cache (wcache.py: on disk, mapped at every later load).
    It also sets glibc's heap policy for the process so freed activations' pages are reused instead of faulted in
    again (memory.keep_heap_pages), and, last, unmaps the libraries' pages that importing and loading ran
    (memory.release_library_pages: the page cache keeps them; a request maps back what it runs).
    """
    if int8 + int4 + bf16_packed > 1:
        raise ValueError("int8, int4 and bf16_packed are exclusive: pick one weight format")
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        return model
    if dev.type != "cpu":
        return model
    # What loading touched leaves RSS first (safetensors reads every tensor, and with the file in large folios a touch
    # maps 2 MB): quantizing or packing would add its output to ~0.3 GB of such pages at 3B. A request maps back
    # what it reads.
    release_weights(model)
    keep_heap_pages()
    lm = model.model.language_model
    _swap_class(lm, ShortConv, FastShortConv)
    _swap_class(lm, Attention, FastAttention)
    _swap_class(lm, MLP, FastMLP)
    _swap_class(lm, RMSNorm, FastRMSNorm)
    dtype = model.model.language_model.embed_tokens.weight.dtype
    if int8 or int4:
        bits = 4 if int4 else 8
        # the quantized values depend on the float weights' dtype (bf16-rounded or not) and on the head's format
        fmt = f"int{bits}-{str(dtype).removeprefix('torch.')}" + ("" if quantize_head else "-float-head")
        quantize_weights(model, bits=bits, quantize_head=quantize_head, cache=WeightCache.for_folder(source, fmt))
    if bf16_packed:
        if dtype != torch.bfloat16:
            raise ValueError(f"bf16_packed packs bfloat16 weights; this model is {str(dtype).removeprefix('torch.')} "
                             "(load it with dtype=torch.bfloat16)")
        pack_weights(model, cache=WeightCache.for_folder(source, "bf16_packed"))
    if int8_vision:
        quantize_vision(model)
    use_fast_linears(model)
    use_fast_vision(model.model)
    if type(model) in (Lfm2VlModel, LowMemoryModel, FastLfm2VlModel):
        model.__class__ = FastLfm2VlModel
        model.native_decoder = NativeDecoder.build(
            model, linears=(nn.Linear, FastLinear, Int8Linear, Int4Linear, PackedLinear), scaled=(Int8Linear,),
            inv_freq=_rope_inv_freq(model), packed=(PackedLinear,))
    release_library_pages()
    return model


def _rope_inv_freq(model: nn.Module) -> torch.Tensor:
    cfg = model.model.language_model.config
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta)
