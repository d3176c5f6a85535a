"""Rotary position embedding, NeoX / rotate-half layout, as used by the LFM2 attention layers.

cos/sin are computed in float32 from explicit integer positions and cast to the activation dtype, like
transformers 5.24's `Lfm2RotaryEmbedding`. Nothing is cached in a buffer, so the module tree holds no
non-persistent state that meta-device construction would leave unset.
"""
from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """The rotation frequencies (Dh/2,) float32: position p turns pair i by the angle float32(p) * inv_freq[i]."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, T) integer -> cos, sin (B, 1, T, Dh) in `dtype`, ready to broadcast over heads."""
    freqs = positions[..., None].float() * rope_inv_freq(head_dim, theta, positions.device)  # (B, T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh): x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
