"""CPU subclasses of the vision tower's and projector's modules (model/vision.py, model/projector.py stay plain).

Same parameters, state_dict keys and results within float rounding; `use_fast_vision(model)` swaps them in place:
- the linears run `gemm.linear`: oneDNN with the bias and residual add fused (a GELU after a bf16 product in a native
  pass), fp32 on CPUs without a bf16 GEMM;
  int8 encoder linears (int8 vision, quant.quantize_vision) run int8 compute with the bias, GELU and residual fused
  (int8mm.py);
- bf16 attention runs the native `kernels.attn_many` where it beats torch's SDPA (`kernels.attention_wins`), its
  scores in int8 for an int8 tower;
- the resized position grids are cached per (h, w, dtype, device) until the table's weights change;
- bf16 LayerNorms run natively (`kernels.layernorm`);
- each encoder layer and the projector drop their weights' mapped pages after use (`RELEASE_PAGES`), so the tower
  never adds its whole size to RSS.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..model import vision
from ..model.projector import Projector
from . import gemm, int8mm, kernels
from .memory import release_span, weights
from .quant import Int8Linear


def _int8_compute(layers: tuple[nn.Module, ...], x: torch.Tensor) -> bool:
    """Whether these layers multiply x in int8 compute (int8 vision: Int8Linear encoder layers, int8mm.py)."""
    return all(type(m) is Int8Linear and m.int8_compute(x) for m in layers)


def _rows(layer: Int8Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return layer.weight, layer.scale, layer.bias


def fast_linear(layer: nn.Module, x: torch.Tensor, gelu: str | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(x)`, then optional GELU (approximate="tanh"/"none"), then `+ residual`: a plain nn.Linear at inference
    runs `gemm.linear` (oneDNN, fused; fp32 on CPUs without a bf16 GEMM). Training and wrapped layers (LoRA, int8)
    keep their own forward."""
    if _int8_compute((layer,), x):
        return int8mm.linear(x, *_rows(layer), gelu, residual)  # int8 vision
    w = layer.weight if type(layer) is nn.Linear else None
    if (w is not None and x.device.type == "cpu" and x.dtype == w.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                  or (layer.bias is not None and layer.bias.requires_grad)))):
        return gemm.linear(x, w, layer.bias, gelu, residual)
    y = layer(x)
    y = y if gelu is None else F.gelu(y, approximate=gelu)
    return y if residual is None else y + residual


class FastVisionEmbeddings(vision.VisionEmbeddings):
    """Fused patch linear; resized position grids cached while the table is unchanged."""

    linear = staticmethod(fast_linear)
    _CACHE_SIZE = 32
    _pos_cache: OrderedDict | None = None  # set per instance at the first call (the class is swapped in, no init)
    _pos_stamp: tuple | None = None

    def positions(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings (h*w, Dv) for an h x w patch grid (cached while the table is unchanged)."""
        table = self.position_embedding.weight
        if torch.is_grad_enabled() and table.requires_grad:
            return self._resize(h, w, dtype)  # keep the autograd graph: never serve a cached tensor
        if self._pos_cache is None:
            self._pos_cache = OrderedDict()
        try:
            version = table._version
        except RuntimeError:  # inference tensors carry no version counter
            version = None
        ref = self._pos_stamp[0]() if self._pos_stamp is not None else None
        if version is None or ref is not table or self._pos_stamp[1] != version:
            self._pos_cache.clear()
            self._pos_stamp = (weakref.ref(table), version) if version is not None else None
        key = (h, w, dtype, table.device)
        hit = self._pos_cache.get(key)
        if hit is None:
            hit = self._resize(h, w, dtype)
            if self._pos_stamp is not None:
                self._pos_cache[key] = hit
                while len(self._pos_cache) > self._CACHE_SIZE:
                    self._pos_cache.popitem(last=False)
        else:
            self._pos_cache.move_to_end(key)
        return hit


class FastVisionAttention(vision.Attention):
    """Fused linears; attention natively where it beats torch's SDPA (an int8 tower's scores in int8)."""

    linear = staticmethod(fast_linear)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if _int8_compute(layers, x):  # x quantized once for all three
            return tuple(int8mm.linears(x, [_rows(m) for m in layers]))
        return super().project(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kernels.serves(q) and kernels.attention_wins():  # it beats torch's flash kernel here
            # an int8 tower (int8 vision) takes its scores in int8 too, on CPUs without AMX tiles
            o = kernels.attn_many(q, k, v, int8_scores=type(self.q_proj) is Int8Linear)
            if o is not None:
                return o
        return super().attend(q, k, v)


# Encoder layers drop their pages after use, on every CPU. Dropping costs ~0.6 ms per 14 MB layer (~8 ms an image at
# 450M; mapping back from large folios is nearly free): under 1% of a vision pass where the CPU multiplies bf16 in
# fp32 (seconds); on an AVX512-BF16 Zen 5 VM 402 -> 420 ms of vision, 2.9% of a 0.65 s first token; on an AMX Xeon VM
# (vision in ~0.21 s) 0.386 / 0.380 s to the first token of a 512x512 image without / with it, a tiled 1024x768 one
# 2.47 / 2.53 s. The bf16 peak falls by the tower's size (1170 -> 1018-1025 MiB on the Zen 5, 1211-1220 ->
# 1044-1057 MiB on the AMX Xeon). Tests turn it off to compare.
RELEASE_PAGES = True


class PageReleasing(nn.Module):
    """A module that can drop its weights' mapped pages after each inference pass (memory.py): the vision tower's and
    projector's weights (172 + 20 MB at 450M) then never sit in RSS all together beside the whole language model,
    only one encoder layer's; the next image maps them back from the page cache (no disk read). A module whose
    weights are not the file's pages (another dtype, quantized, on a GPU, written in place) stops trying after the
    first time."""

    _pages_releasable = False  # set per module by use_fast_vision (RELEASE_PAGES)

    def release_pages(self, out: torch.Tensor) -> None:
        if self._pages_releasable and out.device.type == "cpu" and not torch.is_grad_enabled():
            self._pages_releasable = release_span(weights(self)) > 0


class FastEncoderLayer(PageReleasing, vision.EncoderLayer):
    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        x = super().forward(x, n)
        self.release_pages(x)
        return x


class FastLayerNorm(nn.LayerNorm):
    """LayerNorm as one native pass for bf16 inference (kernels.layernorm: fp32 statistics, one rounding) where
    torch takes ~0.36 ms for a 1024 x 768 tile's rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.serves(x) and len(self.normalized_shape) == 1 and self.elementwise_affine:
            y = kernels.layernorm(x, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        return super().forward(x)


class FastVisionMLP(vision.MLP):
    linear = staticmethod(fast_linear)


class FastProjector(PageReleasing, Projector):
    linear = staticmethod(fast_linear)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        y = super().forward(feats)
        self.release_pages(y)
        return y


SWAPS = ((vision.VisionEmbeddings, FastVisionEmbeddings), (vision.Attention, FastVisionAttention),
         (vision.MLP, FastVisionMLP), (vision.EncoderLayer, FastEncoderLayer), (Projector, FastProjector))


def use_fast_vision(root: nn.Module) -> int:
    """Swap the reference vision / projector modules under `root` for the classes above, in place; returns how many.
    The tower's LayerNorms become FastLayerNorm (the projector's keeps torch's)."""
    n = 0
    for m in root.modules():
        for base, fast in SWAPS:
            if type(m) is base:
                m.__class__ = fast  # same instance, parameters and hooks; only forward changes
                n += 1
    for tower in (m for m in root.modules() if isinstance(m, vision.VisionTower)):
        for m in tower.modules():
            if type(m) is nn.LayerNorm:
                m.__class__ = FastLayerNorm
                n += 1
    for m in root.modules():
        if isinstance(m, PageReleasing):
            m._pages_releasable = RELEASE_PAGES
    return n
