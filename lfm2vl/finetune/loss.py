"""The training loss: cross-entropy on the trained tokens only, the output head applied only where it is needed.

A batch carries `labels` (B, T) already shifted to next-token targets, -100 where nothing is trained. The backbone
runs once (`model.hidden_states`, no head); the head (a vocabulary-wide matmul) runs on the hidden states of the
trained positions only, never on the full (B, T, V) logits, and the cross-entropy is taken in float32.
`TokenLoss` wraps the model as a module whose forward returns the loss sum, so DistributedDataParallel can wrap it
(its gradient hooks need the wrapped module's forward to be the one that runs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batches import IGNORE


def loss_sum(model, batch) -> tuple[torch.Tensor, int]:
    """-> (sum of the token cross-entropies as a float32 scalar, number of trained tokens)."""
    h = model.hidden_states(batch.input_ids, batch.pixel_values, batch.pixel_attention_mask, batch.spatial_shapes,
                            batch.attention_mask)
    return head_loss(model.lm_head, h, batch.labels)


def head_loss(head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy sum of head(h) at the positions where labels != -100."""
    trained = labels != IGNORE
    targets = labels[trained]
    logits = head(h[trained])  # (n, V): only the trained positions
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


class TokenLoss(nn.Module):
    """forward(batch) -> loss_sum(model, batch)[0]; `model` stays reachable as .model (state dict keys model.*)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        return loss_sum(self.model, batch)[0]
