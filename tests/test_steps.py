"""generate/steps.py, the model steps shared by BatchGenerator and the benchmark (float32, a tiny random checkpoint):
prefill in chunks, decode steps at the cache's lengths, rows other than those fed left alone."""
from __future__ import annotations

import pytest
import torch

from checkpoints import cached_checkpoint, image_placeholder, make_pixels
from lfm2vl.generate.reference import reference_generate
from lfm2vl.generate.steps import decode_step, prefill
from lfm2vl.loading import load_model

TOL = 1e-4
SHAPES = [(16, 24)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder, _ = cached_checkpoint(tmp_path_factory, "tiny-lfm2vl")
    return load_model(folder, dtype=torch.float32)[0]


def _prompt(model):
    """(ids, pixel inputs, embeds (1, T, D)) of a prompt with one image."""
    words = torch.randint(510, 1000, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [1, 6] + words[:3] + image_placeholder(SHAPES) + words[3:]
    pix = make_pixels(SHAPES, 0)
    return ids, pix, model.embed(torch.tensor([ids]), model.image_features(*pix))


@torch.inference_mode()
def test_chunked_prefill_equals_one_piece_and_sets_lengths(model):
    _, _, emb = _prompt(model)
    T = emb.shape[1]
    whole, chunked = model.make_cache(1, T + 4), model.make_cache(1, T + 4)
    a = prefill(model, whole, emb, None, 0, T)
    b = prefill(model, chunked, emb, None, 0, 3)  # the conv state crosses chunk ends
    assert (a - b).abs().max() <= TOL
    assert whole.lengths.tolist() == chunked.lengths.tolist() == [T]


@torch.inference_mode()
def test_prefill_then_decode_steps_give_the_reference_greedy_tokens(model):
    ids, pix, emb = _prompt(model)
    n = 6
    cache = model.make_cache(1, len(ids) + n)
    tok = prefill(model, cache, emb, None, 0, 5).argmax(-1, keepdim=True)
    out = [int(tok)]
    for _ in range(n - 1):
        tok = decode_step(model, cache, tok).argmax(-1, keepdim=True)
        out.append(int(tok))
    assert out == reference_generate(model, ids, n, *pix)
    assert cache.lengths.tolist() == [len(ids) + n - 1]


@torch.inference_mode()
def test_steps_on_one_row_leave_the_other_rows_alone(model):
    _, _, emb = _prompt(model)
    T = emb.shape[1]
    single = model.make_cache(1, T + 2)
    expect = decode_step(model, single, prefill(model, single, emb, None, 0, 4).argmax(-1, keepdim=True))
    shared = model.make_cache(3, T + 2)
    row = torch.tensor([2])
    got = decode_step(model, shared, prefill(model, shared, emb, row, 0, 4).argmax(-1, keepdim=True), row)
    assert (got - expect).abs().max() <= TOL
    assert shared.lengths.tolist() == [0, 0, T + 1]


def test_prefill_of_nothing_is_a_clear_error(model):
    with pytest.raises(ValueError, match="at least one token"):
        prefill(model, model.make_cache(1, 4), torch.zeros(1, 0, model.config.text_config.hidden_size), None, 0, 4)
