"""A deliberately naive, cache-free greedy generator: the oracle for the fast path (nanochat's GPT.generate).

Every step runs the whole sequence through `model.forward` (images re-encoded each time) and takes the argmax of
the last position. Slow by design; only tests and debugging use it.
"""
from __future__ import annotations

import torch


@torch.inference_mode()
def reference_generate(model, input_ids: list[int], max_new_tokens: int, pixel_values=None,
                       pixel_attention_mask=None, spatial_shapes=None, eos_ids=(), min_new_tokens: int = 0) -> list[int]:
    """Greedy new token ids (an eos that ends generation included), recomputing everything at each step."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    eos = set(eos_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.forward(ids, pixel_values, pixel_attention_mask, spatial_shapes)[0, -1].float()
        if len(out) < min_new_tokens and eos:
            logits[list(eos)] = float("-inf")
        t = int(logits.argmax())
        out.append(t)
        if t in eos:
            break
        ids = torch.cat([ids, torch.tensor([[t]], device=device)], dim=1)
    return out
