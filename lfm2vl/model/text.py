"""LFM2 hybrid text backbone (gated short convolutions + GQA attention).

Mirrors transformers 5.24 `models/lfm2/modeling_lfm2.py`; parameter names equal the checkpoint keys under
`model.language_model.`. Notable points:
- RMSNorm: normalise in fp32, cast back, then multiply by the weight (no 1+w offset).
- ShortConv: in_proj chunks in the order B, C, x; conv input u = B*x; causal depthwise kernel whose last tap
  multiplies the current token; output gated by C; no activation.
- Attention: per-head RMSNorm on q and k *before* NeoX RoPE; GQA through SDPA's enable_gqa.
- `embedding_norm` is the FINAL norm, applied after the last layer.
One forward serves both paths: without a cache (whole sequence, optional left padding) and with a
`CacheView` (model/cache.py) that supplies past K/V and conv state for explicit positions; a cached call that keeps
only the last position runs the layers after the last attention layer's mixer on a few last rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class ShortConv(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        D, K = cfg.hidden_size, cfg.conv_L_cache
        self.in_proj = nn.Linear(D, 3 * D, bias=cfg.conv_bias)
        self.conv = nn.Conv1d(D, D, K, groups=D, bias=cfg.conv_bias, padding=K - 1)
        self.out_proj = nn.Linear(D, D, bias=cfg.conv_bias)

    def forward(self, x, pad_mask=None, cache=None, layer_idx: int = 0):
        """x (B, T, D). pad_mask (B, T): zero padded inputs first (as transformers does for multi-token calls).
        cache: a CacheView whose conv state (B, D, K-1) is prepended and then updated."""
        if pad_mask is not None:
            x = x * pad_mask[:, :, None].to(x.dtype)
        Bg, Cg, xs = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)  # each (B, D, T)
        u = Bg * xs
        K = self.conv.kernel_size[0]
        if cache is not None:
            u_ext = cache.conv_extend(layer_idx, u)  # (B, D, K-1+T), state written back inside
        else:
            u_ext = F.pad(u, (K - 1, 0))  # empty state = zeros
        y = F.conv1d(u_ext, self.conv.weight, self.conv.bias, groups=u.shape[1])  # (B, D, T), valid conv
        return self.out_proj((Cg * y).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.Dh = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.out_proj = nn.Linear(H * Dh, D, bias=False)
        self.q_layernorm = RMSNorm(Dh, cfg.norm_eps)
        self.k_layernorm = RMSNorm(Dh, cfg.norm_eps)

    def qkv(self, x, cos, sin):
        """Projections, per-head q/k RMSNorm, then RoPE: (B, H, T, Dh), (B, Hkv, T, Dh), (B, Hkv, T, Dh)."""
        B, T, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).view(B, T, self.H, self.Dh)).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_layernorm(self.k_proj(x).view(B, T, self.Hkv, self.Dh)).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.Hkv, self.Dh).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask=None, cache=None, layer_idx: int = 0):
        """x (B, T, D); cos/sin (B, 1, T, Dh); mask (B, 1, T, S) bool or None (plain causal)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.kv_update(layer_idx, k, v)  # (B, Hkv, S, Dh) incl. the past
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.H * self.Dh))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.ff_dim, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.ff_dim, bias=False)
        self.w2 = nn.Linear(cfg.ff_dim, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.is_attention = cfg.layer_types[idx] == "full_attention"
        if self.is_attention:
            self.self_attn = Attention(cfg)
        else:
            self.conv = ShortConv(cfg)
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, h, cos, sin, mask=None, pad_mask=None, cache=None, keep=None):
        """keep: picks the rows of (B, T, D) states that go on after the mixer (the rest are dropped: TextModel's
        last_only); None keeps all."""
        x = self.operator_norm(h)
        if self.is_attention:
            x = self.self_attn(x, cos, sin, mask, cache, self.idx)
        else:
            x = self.conv(x, pad_mask, cache, self.idx)
        if keep is not None:
            h, x = keep(h), keep(x)
        h = h + x
        return h + self.feed_forward(self.ffn_norm(h))


class TextModel(nn.Module):
    """Embedding + hybrid layers + final norm. Returns hidden states; the output head lives in the top module."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.embedding_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # Past the last attention layer's mixer, only a few last rows reach anything a cached call keeps: the last
        # real position's output and each later conv layer's state (its last K-1 inputs). Each of those conv layers
        # mixes K-1 earlier rows into a row, so 1 + (K-1) per layer suffice.
        attn = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
        self.last_attention = attn[-1] if attn else -1
        self.tail_rows = 1 + (cfg.num_hidden_layers - 1 - self.last_attention) * (cfg.conv_L_cache - 1)

    def forward(self, h, positions, mask=None, pad_mask=None, cache=None, last_only: bool = False):
        """h (B, T, D) input embeddings; positions (B, T) long; mask (B, 1, T, S) bool or None (causal);
        pad_mask (B, T) for left-padded no-cache batches; cache: CacheView for the cached path. Returns (B, T, D), or
        with last_only (cached path) each row's last real position (B, D): the layers after the last attention
        layer's mixer then run on `tail_rows` rows instead of T (the same cache, the same last state; a 286-token
        prefill of the 450M model skips 11% of its products)."""
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        cut = cache.last_inputs(self.tail_rows) if last_only and cache is not None else None
        if cut is not None and self.last_attention < 0:
            h, cache = cut[0](h), cut[1]
        for layer in self.layers:
            keep = cut[0] if cut is not None and layer.idx == self.last_attention else None
            h = layer(h, cos, sin, mask, pad_mask, cache, keep)
            if keep is not None:  # conv layers follow: no positions or mask needed
                cache, cos, sin, mask = cut[1], None, None, None
        if last_only:
            if cache is None or cache.lengths is None:
                h = h[:, -1]
            else:
                h = h[torch.arange(h.shape[0], device=h.device), cache.lengths - 1]
        return self.embedding_norm(h)


def padded_inputs(attention_mask: torch.Tensor):
    """Left/right padding (B, T) 1/0 -> positions (cumsum-1, pads 0), attention mask (B, 1, T, T) bool.

    A padded query may attend to itself only, so its row never is all -inf (its output is discarded)."""
    valid = attention_mask.bool()
    T = valid.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    mask = (causal & valid[:, None, :]) | eye  # (B, T, T)
    return positions, mask[:, None]
