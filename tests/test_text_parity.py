"""Parity of the LFM2 text backbone (lfm2vl.model.text) with transformers 5.24's Lfm2Model, text-only inputs.

- hidden states and logits of long text sequences, every layout (float32, <= 1e-4);
- a left-padded batch with three different pad lengths (positions from the mask, pads zeroed before the convs);
- bfloat16 against transformers' own bfloat16 run: the dtype handling (fp32 RMSNorm math cast before the
  weight, fp32 rotary tables) follows the reference, so the two bf16 runs stay close.
"""
from __future__ import annotations

import copy

import pytest
import torch

from checkpoints import LAYOUTS, cached_checkpoint
from lfm2vl.loading import load_model

TOL = 1e-4


@pytest.fixture(scope="module", params=LAYOUTS)
def pair(request, tmp_path_factory):
    folder, hf = cached_checkpoint(tmp_path_factory, request.param)
    model, config, _ = load_model(folder, dtype=torch.float32)
    return request.param, model, hf


def _ids(vocab, B, T, seed=0):
    return torch.randint(2, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_long_text_hidden_states_and_logits(pair):
    layout, model, hf = pair
    ids = _ids(model.config.text_config.vocab_size, 2, 300)
    ours_h = model.model.language_model(model.embed(ids), torch.arange(300).expand(2, 300))
    ref_h = hf.model.language_model(input_ids=ids).last_hidden_state
    ours, ref = model(ids), hf(input_ids=ids).logits
    dh, dl = (ours_h - ref_h).abs().max().item(), (ours - ref).abs().max().item()
    print(f"[text fp32] layout={layout} T=300 max|dhidden|={dh:.2e} max|dlogit|={dl:.2e}")
    assert dh <= TOL and dl <= TOL


@torch.no_grad()
def test_left_padded_text_batch(pair):
    layout, model, hf = pair
    T, pads = 40, [0, 7, 23]
    ids = _ids(model.config.text_config.vocab_size, 3, T, seed=1)
    mask = torch.ones(3, T, dtype=torch.long)
    for r, p in enumerate(pads):
        ids[r, :p], mask[r, :p] = 0, 0
    ours = model(ids, attention_mask=mask)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    keep = mask.bool()
    diff = (ours - ref).abs()[keep].max().item()
    print(f"[text fp32] layout={layout} left-padded batch max|dlogit|={diff:.2e}")
    assert diff <= TOL
    assert torch.isfinite(ours).all(), "padded positions must not produce NaN"
    for r, p in enumerate(pads):  # each row equals its unpadded run
        alone = model(ids[r:r + 1, p:])[0]
        assert (ours[r, p:] - alone).abs().max() <= TOL


@torch.no_grad()
def test_bfloat16_as_accurate_as_transformers_bfloat16(pair):
    """Our bf16 run is as close to the float32 reference as transformers' own bf16 run is."""
    layout, model, hf = pair
    ours_bf = copy.deepcopy(model).to(torch.bfloat16)
    ref_bf = copy.deepcopy(hf).to(torch.bfloat16)
    ids = _ids(model.config.text_config.vocab_size, 2, 128, seed=2)
    ref32 = hf(input_ids=ids).logits
    ours = (ours_bf(ids).float() - ref32).abs()
    theirs = (ref_bf(input_ids=ids).logits.float() - ref32).abs()
    print(f"[text bf16] layout={layout} |bf16 - fp32 ref| mean/max: ours {ours.mean():.4f}/{ours.max():.3f}, "
          f"transformers {theirs.mean():.4f}/{theirs.max():.3f}")
    assert ours.mean() <= 1.25 * theirs.mean() + 1e-3
    assert ours.max() <= 1.5 * theirs.max() + 0.05
