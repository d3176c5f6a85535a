"""The training loss (finetune/loss.py) and gradient checkpointing (finetune/recompute.py) on the tiny checkpoint."""
from __future__ import annotations

import pytest
import torch

from finetune_util import conversations, reference_batch
from lfm2vl.finetune import recompute
from lfm2vl.finetune.loss import loss_sum
from lfm2vl.loading import load_model
from lfm2vl.processor import Processor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    processor = Processor.from_pretrained(tiny_checkpoint)
    batch, hf_labels = reference_batch(processor, conversations(3))
    return processor, batch, hf_labels


def test_loss_equals_transformers_masked_loss(tiny_checkpoint, setup):
    """Our CE over the trained tokens (head at those positions only) = transformers' loss with the same labels."""
    from transformers import Lfm2VlForConditionalGeneration

    _, batch, hf_labels = setup
    assert 0 < batch.n_tokens < int(batch.attention_mask.sum()) // 2  # assistant tokens only, a minority
    model, _, _ = load_model(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        total, n = loss_sum(model, batch)
    hf = Lfm2VlForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                 pixel_attention_mask=batch.pixel_attention_mask, spatial_shapes=batch.spatial_shapes,
                 labels=hf_labels).loss
    assert n == batch.n_tokens
    assert total.dtype == torch.float32
    assert abs(total.item() / n - ref.item()) <= 1e-5, (total.item() / n, ref.item())


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    total, n = loss_sum(model, batch)
    (total / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_gradients(tiny_checkpoint, setup):
    """Recomputing the text and vision layers in the backward pass changes no gradient (and no module path)."""
    _, batch, _ = setup
    model, _, _ = load_model(tiny_checkpoint, dtype=torch.float32)
    model.train()
    for p in model.parameters():
        p.data = p.data.clone()
        p.requires_grad_(True)
    keys = list(model.state_dict())
    plain = _grads(model, batch)
    assert recompute.checkpoint_layers(model, vision=True) == (len(model.model.language_model.layers)
                                                                + len(model.model.vision_tower.encoder.layers))
    assert list(model.state_dict()) == keys
    again = _grads(model, batch)
    assert plain.keys() == again.keys() and any("vision_tower.encoder" in k for k in plain)
    for k in plain:
        torch.testing.assert_close(again[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    recompute.undo(model)
    assert type(model.model.language_model.layers[0]).__name__ == "DecoderLayer"


def test_frozen_vision_tower_keeps_no_graph(tiny_checkpoint, setup):
    """With the tower frozen, its output carries no autograd graph and the text gradients are unchanged."""
    _, batch, _ = setup
    model, _, _ = load_model(tiny_checkpoint, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.data = p.data.clone()
        p.requires_grad_("vision_tower" not in name)
    plain = _grads(model, batch)
    recompute.freeze_vision_tower(model)
    units = model.model.vision_tower(batch.pixel_values, batch.pixel_attention_mask, batch.spatial_shapes)
    assert not units[0].requires_grad
    frozen = _grads(model, batch)
    for k in plain:
        torch.testing.assert_close(frozen[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)
