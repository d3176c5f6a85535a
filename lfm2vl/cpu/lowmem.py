"""The low-memory mode: the vision tower's and the language model's mapped weights never stay resident together.

`set_low_memory(model)` (`lfm2vl.load(..., low_memory=True)`, `--low-memory`) makes a loaded Lfm2VlModel a
`LowMemoryModel`, whose image_features makes room for the tower from the language model's last-read weights before
the tower runs and drops the tower afterwards (memory.py explains the mechanism and its cost).
"""
from __future__ import annotations

import torch

from ..model.lfm2vl import Lfm2VlModel
from .memory import populate, release_tail, release_weights, trim_heap, weights


class LowMemoryModel(Lfm2VlModel):
    """Lfm2VlModel whose image_features drops idle mapped weights around the vision pass while `low_memory`."""

    low_memory = False  # room for the tower from the language model's last-read weights (memory.py)

    def _lm_weights_in_use_order(self) -> list[torch.Tensor]:
        """The language model's weights in the order a prefill reads them: layers, final norm, output head (quantized
        ones are anonymous memory: never dropped)."""
        lm = self.model.language_model
        return weights(*lm.layers, lm.embedding_norm, self.lm_head)

    def _tower_room(self) -> int:
        """Bytes the vision pass adds to RSS: the tower's and projector's weights, and the activations of one
        encoder batch (a dozen (batch_patches, width) bf16 buffers, width up to the MLP's)."""
        tower, vc = self.model.vision_tower, self.config.vision_config
        held = sum(t.numel() * t.element_size() for t in weights(tower, self.model.multi_modal_projector))
        return held + 2 * tower.batch_patches * (vc.intermediate_size + 4 * vc.hidden_size) * 2

    def image_features(self, pixel_values, pixel_attention_mask, spatial_shapes) -> torch.Tensor:
        if not self.low_memory:
            return super().image_features(pixel_values, pixel_attention_mask, spatial_shapes)
        tower, projector = self.model.vision_tower, self.model.multi_modal_projector
        idle = release_tail(self._lm_weights_in_use_order(), self._tower_room())
        populate(weights(tower, projector))  # dropped after the last image
        feats = super().image_features(pixel_values, pixel_attention_mask, spatial_shapes)
        release_weights(tower, projector)
        trim_heap()  # the tower's temporaries
        populate(idle)  # the prefill reads the language model next
        return feats


def set_low_memory(model: Lfm2VlModel, on: bool = True) -> Lfm2VlModel:
    """Turn the low-memory mode on (or off) for a loaded model, in place; returns it."""
    if type(model) is Lfm2VlModel:
        model.__class__ = LowMemoryModel
    if not isinstance(model, LowMemoryModel):
        raise TypeError(f"the low-memory mode needs an Lfm2VlModel, got {type(model).__name__}")
    model.low_memory = bool(on)
    return model
