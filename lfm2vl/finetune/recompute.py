"""What autograd keeps for the backward pass: gradient checkpointing and the frozen vision tower.

Both work by swapping a module's `__class__` for a subclass that changes only `forward`, so module paths, state-dict
keys and LoRA wrappers inside the layers are untouched, and `undo` restores the original classes.
- `checkpoint_layers(model, vision)`: each text DecoderLayer (and each vision EncoderLayer when vision) keeps only
  its input; its activations are recomputed in the backward pass (torch.utils.checkpoint, non-reentrant, which
  replays the RNG so dropout draws the same mask). Gradients equal those without checkpointing.
- `freeze_vision_tower(model)`: the vision tower runs under no_grad (it trains nothing, so nothing of it is kept).
Outside training (no grad, or the inference cache path) the layers run as before.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.text import DecoderLayer
from ..model.vision import EncoderLayer, VisionTower


class CheckpointedDecoderLayer(DecoderLayer):
    def forward(self, h, cos, sin, mask=None, pad_mask=None, cache=None, keep=None):
        if cache is not None or not torch.is_grad_enabled():
            return super().forward(h, cos, sin, mask, pad_mask, cache, keep)
        return checkpoint(DecoderLayer.forward, self, h, cos, sin, mask, pad_mask, None, use_reentrant=False)


class CheckpointedEncoderLayer(EncoderLayer):
    def forward(self, x, n):
        if not torch.is_grad_enabled():
            return super().forward(x, n)
        return checkpoint(EncoderLayer.forward, self, x, n, use_reentrant=False)


class FrozenVisionTower(VisionTower):
    def encode(self, pixel_values, units, shapes):
        with torch.no_grad():
            return super().encode(pixel_values, units, shapes)


_SWAPS = {DecoderLayer: CheckpointedDecoderLayer, EncoderLayer: CheckpointedEncoderLayer,
          VisionTower: FrozenVisionTower}
_BACK = {v: k for k, v in _SWAPS.items()}


def _swap(modules, cls_from, cls_to) -> int:
    n = 0
    for m in modules:
        if type(m) is cls_from:
            m.__class__ = cls_to
            n += 1
    return n


def checkpoint_layers(model: nn.Module, vision: bool = True) -> int:
    """Turn on gradient checkpointing for the text layers (and the vision layers); returns the layers swapped."""
    n = _swap(model.model.language_model.layers, DecoderLayer, CheckpointedDecoderLayer)
    if vision:
        n += _swap(model.model.vision_tower.encoder.layers, EncoderLayer, CheckpointedEncoderLayer)
    return n


def freeze_vision_tower(model: nn.Module) -> None:
    """Run the vision tower without autograd (its parameters must not require grad)."""
    _swap([model.model.vision_tower], VisionTower, FrozenVisionTower)


def undo(model: nn.Module) -> None:
    """Restore the original classes of every swapped module."""
    for m in model.modules():
        if type(m) in _BACK:
            m.__class__ = _BACK[type(m)]
