"""Pixel-unshuffle projector, mirroring transformers 5.24 `Lfm2VlMultiModalProjector` + `get_image_features`.

- `pixel_unshuffle`: each factor x factor block of a unit's (h, w) patch grid becomes one token whose feature is the
  block's patches concatenated row-major (row offset slow, column offset fast); tokens are row-major over the
  (h/f, w/f) grid.
- `Projector`: optional LayerNorm(f*f*Dv, eps 1e-5) -> linear_1 -> exact erf-GELU -> linear_2 (to the text width).
- `image_features`: tower -> per-unit unshuffle -> projector, one encoder batch at a time, concatenated in unit
  order.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Lfm2VlConfig
from .linear import linear


def pixel_unshuffle(x: torch.Tensor, h: int, w: int, factor: int = 2) -> torch.Tensor:
    """x (h*w, Dv) row-major patch features -> (h/f * w/f, f*f*Dv) tokens in the order above."""
    if h % factor or w % factor:
        raise ValueError(f"patch grid {h}x{w} is not divisible by downsample_factor {factor}; the processor must "
                         f"produce grids that are multiples of the factor")
    if x.shape[0] != h * w:
        raise ValueError(f"pixel_unshuffle got {x.shape[0]} patch rows for a {h}x{w} grid ({h * w} expected)")
    D = x.shape[-1]
    x = x.reshape(h // factor, factor, w // factor, factor, D)  # (Gh/f, f, Gw/f, f, Dv)
    return x.permute(0, 2, 1, 3, 4).reshape(-1, factor * factor * D)  # (Gh/f * Gw/f, f*f*Dv)


class Projector(nn.Module):
    """`model.multi_modal_projector`: {layer_norm (if projector_use_layernorm), linear_1, linear_2}."""

    linear = staticmethod(linear)

    def __init__(self, config: Lfm2VlConfig):
        super().__init__()
        if config.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act {config.projector_hidden_act!r} is not supported; "
                             f"LFM2-VL uses 'gelu' (exact erf)")
        d_in = config.vision_config.hidden_size * config.downsample_factor ** 2
        # nn.LayerNorm's default eps 1e-5 (as transformers builds it), not the vision tower's 1e-6
        self.layer_norm = nn.LayerNorm(d_in) if config.projector_use_layernorm else None
        self.linear_1 = nn.Linear(d_in, config.projector_hidden_size, bias=config.projector_bias)
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size,
                                  bias=config.projector_bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (n, f*f*Dv) unshuffled tokens -> (n, D_text)."""
        if self.layer_norm is not None:
            feats = self.layer_norm(feats)
        return self.linear(self.linear_2, self.linear(self.linear_1, feats, gelu="none"))  # exact erf-GELU


def image_features(tower: nn.Module, projector: Projector, pixel_values: torch.Tensor,
                   pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor, factor: int) -> torch.Tensor:
    """Run tower + unshuffle + projector: (sum over units of h/f*w/f, D_text), units concatenated in order.

    Each encoder batch is projected as soon as the tower has it, so a tiled image's patch features and the
    projector's wide activations (f*f*Dv and projector_hidden_size columns) exist one batch at a time; rows are
    independent throughout, so this equals projecting all units at once."""
    for u, (h, w) in enumerate(spatial_shapes.tolist()):  # fail before the expensive tower runs
        if h % factor or w % factor:
            raise ValueError(f"unit {u}: patch grid {h}x{w} is not divisible by downsample_factor {factor}")
    shapes = tower.check(pixel_values, pixel_attention_mask, spatial_shapes)
    out: list[torch.Tensor] = [None] * len(shapes)  # type: ignore[list-item]
    for units in tower.batches(shapes):
        x = tower.encode(pixel_values, units, shapes)  # (n, L, Dv)
        tokens = [pixel_unshuffle(piece, *shapes[u], factor) for u, piece in zip(units, x)]
        y = projector(tokens[0] if len(tokens) == 1 else torch.cat(tokens))
        for u, part in zip(units, y.split([t.shape[0] for t in tokens])):
            out[u] = part
    return out[0] if len(out) == 1 else torch.cat(out)
