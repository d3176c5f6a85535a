"""The fused native decode step (`decode.cpp`): ctypes descriptors of a loaded language model, and the call.

`NativeDecoder.build(model, linears, scaled, inv_freq, packed)` returns a decoder for a CPU Lfm2VlModel whose
language-model linears are of the `linears` types (those of the `scaled` types carry a `scale`: int8 / int4; those of
the `packed` types a bf16 weight packed in 12 bits: packed.cpp) and whose floats share one dtype
(fp32 or bf16), or None when anything else is found (LoRA-wrapped layers, mixed dtypes, no kernels): callers then keep
the torch path. `inv_freq` holds the RoPE frequencies (model/rope.py's rope_inv_freq; the native step turns q and k
by float32(position) * inv_freq itself). The CPU layer (speed.py) passes them all, so this package imports nothing
else of lfm2vl.
`decoder(embeds, cache, start_pos, rows)` runs one T=1 step for every row and returns (b, V) logits, like
`Lfm2VlModel.forward_cached(..., last_only=True)`, or None when it cannot take that step (the caller runs torch).
It writes the new K/V and conv state into the cache.

The descriptors hold raw pointers into the model's tensors: the decoder keeps references to those tensors (so the
memory stays valid) and `matches()` re-checks, after any module / parameter / buffer assignment in the process, that
the modules still hold the same tensors (call `optimize_for_cpu` again after swapping layers); the registration hooks
that count those assignments are installed by the first `build`.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import available
from .build import KIND as _KIND
from .build import PACKED_BF16 as _PACKED
from .build import load as _load

_ACT = {torch.float32: 0, torch.bfloat16: 1}
_MAX_CONV_K, _MAX_HEAD_DIM = 16, 512  # decode.cpp's stack buffers
_registrations = [0]  # counts module / parameter / buffer assignments anywhere in the process
_hooks: list = []  # the process-wide registration hooks, once installed


def _count_registration(*args) -> None:
    _registrations[0] += 1


def _count_registrations() -> None:
    """Install the process-wide hooks that count assignments (once). `matches()` runs every step, too often for a
    full check of ~300 attributes: that check runs only after an assignment."""
    if not _hooks:
        _hooks.extend(hook(_count_registration) for hook in (
            nn.modules.module.register_module_module_registration_hook,
            nn.modules.module.register_module_parameter_registration_hook,
            nn.modules.module.register_module_buffer_registration_hook))


class DLin(ctypes.Structure):
    _fields_ = [("W", ctypes.c_void_p), ("S", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64), ("kind", ctypes.c_int64)]


class DLayer(ctypes.Structure):
    _fields_ = [("is_attn", ctypes.c_int64), ("op_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("mix", DLin * 4), ("ff", DLin * 3), ("conv_w", ctypes.c_void_p), ("conv_b", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p)]


class DModel(ctypes.Structure):
    _fields_ = [("D", ctypes.c_int64), ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("Dh", ctypes.c_int64),
                ("Kc", ctypes.c_int64), ("n_layers", ctypes.c_int64), ("act_dt", ctypes.c_int64),
                ("eps", ctypes.c_double), ("final_norm", ctypes.c_void_p), ("head", DLin),
                ("layers", ctypes.POINTER(DLayer)), ("inv_freq", ctypes.c_void_p)]


class _Unsupported(Exception):
    pass


class NativeDecoder:
    def __init__(self, linears: tuple[type, ...] = (nn.Linear,), scaled: tuple[type, ...] = (),
                 inv_freq: torch.Tensor | None = None, packed: tuple[type, ...] = ()):
        self._linears, self._scaled, self._inv_freq, self._packed = linears, scaled, inv_freq, packed
        self._keep: list[torch.Tensor] = []  # every tensor a descriptor points into
        self._checks: list[tuple[nn.Module, str, torch.Tensor]] = []  # (module, attribute, tensor it must hold)
        self._cache_flat: list | None = None  # the cache buffers' addresses the array below was built for
        self._cache_arr = None
        self._checked_at = -1  # value of _registrations when matches() last passed

    # ---- building ---------------------------------------------------------------------------------------------
    def _ptr(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
        if t.device.type != "cpu" or (dtype is not None and t.dtype != dtype) or not t.is_contiguous():
            raise _Unsupported(f"tensor {tuple(t.shape)} {t.dtype} on {t.device}")
        self._keep.append(t)
        return t.data_ptr()

    def _tensor(self, module: nn.Module, attr: str, dtype: torch.dtype) -> int:
        t = getattr(module, attr)
        self._checks.append((module, attr, t))
        return self._ptr(t.detach(), dtype)

    def _sub(self, parent: nn.Module, name: str) -> nn.Module:
        """parent.name, remembered: a later swap of that module (LoRA, quantization) disables the decoder."""
        child = getattr(parent, name)
        self._checks.append((parent, name, child))
        return child

    def _lin(self, parent: nn.Module, name: str) -> DLin:
        lin = self._sub(parent, name)
        if type(lin) not in self._linears:
            raise _Unsupported(f"{type(lin).__name__} layer")
        bias = self._bias(lin)
        if isinstance(lin, self._packed):  # one uint8 buffer (packed.cpp)
            return DLin(self._tensor(lin, "packed", torch.uint8), None, bias, lin.out_features, lin.in_features,
                        _PACKED)
        w = lin.weight
        if w.dtype not in _KIND or w.dim() != 2:
            raise _Unsupported(f"weight dtype {w.dtype}")
        scale = None
        if isinstance(lin, self._scaled):  # int8 row scales fp32, int4 group scales fp16 (gemv.h)
            scale = self._tensor(lin, "scale", torch.float16 if w.dtype == torch.uint8 else torch.float32)
        N, K = lin.out_features, lin.in_features  # int4 packs two weights per byte
        return DLin(self._tensor(lin, "weight", w.dtype), scale, bias, N, K, _KIND[w.dtype])

    def _bias(self, lin: nn.Module) -> int | None:
        if lin.bias is None:
            return None
        self._checks.append((lin, "bias", lin.bias))
        return self._ptr(lin.bias.detach().float().contiguous(), torch.float32)  # the kernel adds an fp32 bias

    @classmethod
    def build(cls, model: nn.Module, linears: tuple[type, ...], scaled: tuple[type, ...],
              inv_freq: torch.Tensor, packed: tuple[type, ...] = ()) -> "NativeDecoder | None":
        """A decoder for `model` (an Lfm2VlModel on CPU), or None when its layers or dtypes are not supported.
        linears: the accepted linear layer types; scaled: those among them with a `scale` (quantized weights);
        packed: those holding bf16 weights packed in 12 bits (`packed`, `out_features`, `in_features`);
        inv_freq: the language model's RoPE frequencies, (head_dim / 2,) float32."""
        if not available():
            return None
        _count_registrations()
        self = cls(linears, scaled, inv_freq, packed)
        try:
            self._describe(model)
        except _Unsupported:
            return None
        self._lib = _load()
        return self

    def _describe(self, model: nn.Module) -> None:
        lm = model.model.language_model
        cfg = lm.config
        act = lm.embed_tokens.weight.dtype
        if act not in _ACT:
            raise _Unsupported(f"activation dtype {act}")
        if cfg.conv_L_cache > _MAX_CONV_K or cfg.head_dim > _MAX_HEAD_DIM or cfg.head_dim % 2:
            raise _Unsupported("conv kernel or head size")
        if self._inv_freq is None or tuple(self._inv_freq.shape) != (cfg.head_dim // 2,):
            raise _Unsupported(f"RoPE frequencies for head_dim {cfg.head_dim}")
        layers = (DLayer * len(lm.layers))()
        for i in range(len(lm.layers)):
            layer, d = self._sub(lm.layers, str(i)), layers[i]
            d.op_norm = self._tensor(self._sub(layer, "operator_norm"), "weight", act)
            d.ffn_norm = self._tensor(self._sub(layer, "ffn_norm"), "weight", act)
            ff = self._sub(layer, "feed_forward")
            for j, name in enumerate(("w1", "w3", "w2")):
                d.ff[j] = self._lin(ff, name)
            if layer.is_attention:
                a = self._sub(layer, "self_attn")
                d.is_attn = 1
                for j, name in enumerate(("q_proj", "k_proj", "v_proj", "out_proj")):
                    d.mix[j] = self._lin(a, name)
                d.q_norm = self._tensor(self._sub(a, "q_layernorm"), "weight", act)
                d.k_norm = self._tensor(self._sub(a, "k_layernorm"), "weight", act)
            else:
                c = self._sub(layer, "conv")
                d.mix[0], d.mix[1] = self._lin(c, "in_proj"), self._lin(c, "out_proj")
                conv = self._sub(c, "conv")
                self._checks.append((conv, "weight", conv.weight))
                d.conv_w = self._ptr(conv.weight.detach().reshape(cfg.hidden_size, -1), act)
                if conv.bias is not None:
                    d.conv_b = self._tensor(conv, "bias", act)
        self.layers = layers
        self.desc = DModel(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                           cfg.conv_L_cache, len(lm.layers), _ACT[act], cfg.norm_eps,
                           self._tensor(self._sub(lm, "embedding_norm"), "weight", act), self._lin(model, "lm_head"),
                           layers, self._ptr(self._inv_freq, torch.float32))
        self.dtype, self.cfg, self.vocab = act, cfg, model.lm_head.out_features

    # ---- calling ----------------------------------------------------------------------------------------------
    def matches(self) -> bool:
        """The modules still hold the tensors the descriptors point into (no swap or reassignment since)."""
        if self._checked_at == _registrations[0]:
            return True
        if not all(getattr(m, a) is t for m, a, t in self._checks):
            return False
        self._checked_at = _registrations[0]
        return True

    def _cache_array(self, cache):
        """The cache buffers' addresses as a C array (rebuilt when the buffers change), or None if unusable."""
        flat = [t.data_ptr() if t is not None else None
                for k, v, c in zip(cache.k, cache.v, cache.conv) for t in ((c, None) if k is None else (k, v))]
        if self._cache_flat != flat:  # a new cache, or its buffers were replaced: check them once
            usable = all(t is None or (t.dtype == self.dtype and t.is_contiguous() and t.device.type == "cpu")
                         for t in cache.k + cache.v + cache.conv)
            self._cache_flat, self._cache_arr = flat, (ctypes.c_void_p * len(flat))(*flat) if usable else None
        return self._cache_arr

    def __deepcopy__(self, memo):
        return None  # raw pointers into the original's tensors: a copied model rebuilds its own (optimize_for_cpu)

    def __call__(self, embeds: torch.Tensor, cache, start_pos: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """(b, V) logits of one step, or None when this step is not one it takes (more than one token, another
        dtype or device, a cache it cannot use, layers swapped since it was built): the caller runs torch then."""
        if (embeds.dim() != 3 or embeds.shape[1] != 1 or embeds.dtype != self.dtype or embeds.device.type != "cpu"
                or not self.matches()):
            return None
        caches = self._cache_array(cache)
        if caches is None:
            return None
        B = embeds.shape[0]
        n_rows = cache.batch_size if rows is None else rows.shape[0]
        if start_pos.shape != (n_rows,) or B != n_rows:
            raise ValueError(f"start_pos must have shape ({B},) for {B} rows, got {tuple(start_pos.shape)}")
        pos = start_pos.to(torch.int64).contiguous()
        host = pos.tolist()  # the native code indexes the cache with these: check them on the host
        if max(host) >= cache.max_seq_len or min(host) < 0:
            raise ValueError(f"decode position {host} is outside the cache (max_seq_len={cache.max_seq_len})")
        if rows is not None:
            rows = rows.to(torch.int64).contiguous()
            r = rows.tolist()
            if min(r) < 0 or max(r) >= cache.batch_size:
                raise ValueError(f"rows {r} must be below the cache's {cache.batch_size} rows")
        threads = torch.get_num_threads()
        h = embeds.reshape(B, -1).contiguous()
        logits = torch.empty(B, self.vocab, dtype=self.dtype)
        self._lib.lfm2vl_decode_step(ctypes.addressof(self.desc), caches, cache.max_seq_len,
                                     h.data_ptr(), None if rows is None else rows.data_ptr(), pos.data_ptr(),
                                     logits.data_ptr(), B, threads)
        return logits
