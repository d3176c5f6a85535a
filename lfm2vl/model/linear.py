"""`linear(layer, x, gelu, residual)`: a linear layer, then optional GELU, then an optional residual add.

The vision tower and the projector call their linears through this one signature (as each module's `linear`), so
the CPU layer (lfm2vl/cpu/vision.py) can swap in a version that fuses the three steps; here it is plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(layer: nn.Module, x: torch.Tensor, gelu: str | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(x)`, then optional GELU (approximate="tanh"/"none"), then `+ residual`."""
    y = layer(x)
    y = y if gelu is None else F.gelu(y, approximate=gelu)
    return y if residual is None else y + residual
