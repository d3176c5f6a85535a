"""HybridCache invariants of `Lfm2VlModel.forward_cached` (float32, tiny random checkpoints).

- full no-cache forward == prefill + N single-token decode steps (last-position logits);
- chunked prefill (conv state carried across chunks) == one-shot prefill;
- a prefill of rows [k] into a batch-4 cache == a batch-1 run, other rows untouched;
- batched decode with different per-row lengths == separate runs; a reused row starts clean;
- several prompts right-padded into one prefill pass (`lengths`) == each prompt's own prefill, then decode;
- a call that keeps only the last position runs the layers after the last attention layer on a few rows, with the
  same result and cache.
The no-cache forward itself is checked against transformers in test_model_parity.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from checkpoints import cached_checkpoint, make_pixels, image_placeholder
from lfm2vl.loading import load_model
from lfm2vl.model.cache import HybridCache
from lfm2vl.model.text import TextModel

TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny-lfm2vl", "tiny-lfm25vl"])
def model(request, tmp_path_factory):
    folder, _ = cached_checkpoint(tmp_path_factory, request.param)
    return load_model(folder, dtype=torch.float32)[0]


def _prompt(model, n_text=20, seed=0, with_image=True):
    """(ids (1, T), embeds (1, T, D)) of a chat-like prompt, optionally with one 16x24-patch image."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(510, 1000, (n,), generator=g).tolist()  # noqa: E731
    if not with_image:
        ids = torch.tensor([[1, 6] + words(n_text)])
        return ids, model.embed(ids)
    shapes = [(16, 24)]
    pv, pm, ss = make_pixels(shapes, seed)
    ids = torch.tensor([[1, 6] + words(3) + image_placeholder(shapes) + words(n_text)])
    return ids, model.embed(ids, model.image_features(pv, pm, ss))


def _step(model, cache, tokens, rows=None):
    """One decode step for `rows` (default all) with next tokens (b,); advances their lengths."""
    sel = slice(None) if rows is None else rows
    start = cache.lengths[sel].clone()
    logits = model.forward_cached(model.embed(tokens[:, None]), cache, start, rows=rows)
    cache.lengths[sel] += 1
    return logits


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model):
    ids, emb = _prompt(model)
    new = torch.randint(510, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, new], 1)
    h = model.model.language_model(torch.cat([emb, model.embed(new)], 1), torch.arange(full_ids.shape[1])[None])
    full = model.lm_head(h)[0]
    P = ids.shape[1]
    cache = model.make_cache(1, P + 16)
    out = model.forward_cached(emb, cache, torch.zeros(1, dtype=torch.long))
    cache.lengths += P
    assert (out[0] - full[P - 1]).abs().max() <= TOL
    for t in range(new.shape[1]):
        out = _step(model, cache, new[:, t])
        assert (out[0] - full[P + t]).abs().max() <= TOL, f"decode step {t}"
    assert int(cache.lengths) == full_ids.shape[1]


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model):
    _, emb = _prompt(model, n_text=30)
    T = emb.shape[1]
    one = model.make_cache(1, T + 4)
    ref = model.forward_cached(emb, one, torch.zeros(1, dtype=torch.long), last_only=False)
    chunked = model.make_cache(1, T + 4)
    outs = []
    for s in range(0, T, 7):  # uneven chunks, the last one shorter than the conv kernel is possible
        outs.append(model.forward_cached(emb[:, s:s + 7], chunked, torch.tensor([s]), last_only=False))
    assert (torch.cat(outs, 1) - ref).abs().max() <= TOL
    for a, b in zip(one.conv + one.k + one.v, chunked.conv + chunked.k + chunked.v):
        if a is not None:
            assert (a - b).abs().max() <= 1e-5


@torch.no_grad()
def test_row_subset_prefill_into_big_cache(model):
    _, emb = _prompt(model, seed=3)
    T = emb.shape[1]
    small = model.make_cache(1, 64 + T)
    ref = model.forward_cached(emb, small, torch.zeros(1, dtype=torch.long), last_only=False)
    big = model.make_cache(4, 64 + T)
    rows = torch.tensor([2])
    out = model.forward_cached(emb, big, torch.zeros(1, dtype=torch.long), rows=rows, last_only=False)
    assert (out - ref).abs().max() <= TOL
    for a, b in zip(small.conv + small.k, big.conv + big.k):
        if a is not None:
            assert (b[2:3] - a).abs().max() <= 1e-5
            assert b[[0, 1, 3]].abs().max() == 0, "rows outside `rows` must stay untouched"
    small.lengths += T
    big.lengths[2] += T
    tok = torch.tensor([777])
    assert (_step(model, big, tok, rows=rows) - _step(model, small, tok)).abs().max() <= TOL


@torch.no_grad()
def test_batched_decode_with_different_lengths_equals_separate_runs(model):
    prompts = [_prompt(model, n_text=n, seed=10 + n, with_image=n != 9)[1] for n in (5, 17, 9)]
    steps = torch.randint(510, 1000, (3, 6), generator=torch.Generator().manual_seed(2))
    cache = model.make_cache(3, 128)
    # stale content first: row 1 held a longer sequence before; reset lengths only, prefill must start clean
    junk = torch.randn(1, 40, prompts[0].shape[-1])
    model.forward_cached(junk, cache, torch.zeros(1, dtype=torch.long), rows=torch.tensor([1]))
    for r, emb in enumerate(prompts):
        model.forward_cached(emb, cache, torch.zeros(1, dtype=torch.long), rows=torch.tensor([r]))
        cache.lengths[r] = emb.shape[1]
    batched = torch.stack([_step(model, cache, steps[:, t]) for t in range(steps.shape[1])], 1)  # (3, 6, V)
    for r, emb in enumerate(prompts):
        one = model.make_cache(1, 128)
        model.forward_cached(emb, one, torch.zeros(1, dtype=torch.long))
        one.lengths += emb.shape[1]
        alone = torch.cat([_step(model, one, steps[r:r + 1, t]) for t in range(steps.shape[1])])
        assert (batched[r] - alone).abs().max() <= TOL, f"row {r}"


@torch.no_grad()
def test_right_padded_prefill_of_several_prompts_equals_each_alone(model):
    """Prompts of 5 (+ an image), 17 and 9 text tokens in one pass padded to the longest: each row's logits at its
    last real token, and the decode steps after it (the conv state taken before the padding, the padding's keys
    never seen), equal the prompt's own prefill."""
    prompts = [_prompt(model, n_text=n, seed=20 + n, with_image=n == 5)[1] for n in (5, 17, 9)]
    n = torch.tensor([e.shape[1] for e in prompts])
    T = int(n.max())
    padded = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, T - e.shape[1]), value=7.0) for e in prompts])
    steps = torch.randint(510, 1000, (3, 4), generator=torch.Generator().manual_seed(3))
    cache = model.make_cache(4, 128)
    rows, start = torch.tensor([2, 0, 3]), torch.zeros(3, dtype=torch.long)
    first = model.forward_cached(padded, cache, start, rows=rows, lengths=n)
    cache.lengths[rows] = n
    later = torch.stack([_step(model, cache, steps[:, t], rows=rows) for t in range(steps.shape[1])], 1)
    for r, emb in enumerate(prompts):
        one = model.make_cache(1, 128)
        want = model.forward_cached(emb, one, torch.zeros(1, dtype=torch.long))
        one.lengths += emb.shape[1]
        alone = torch.cat([_step(model, one, steps[r:r + 1, t]) for t in range(steps.shape[1])])
        assert (first[r] - want[0]).abs().max() <= TOL, f"row {r}: prefill logits"
        assert (later[r] - alone).abs().max() <= TOL, f"row {r}: decode after the padded prefill"
    with pytest.raises(ValueError, match="lengths"):
        model.forward_cached(padded, cache, start, rows=rows, lengths=torch.tensor([T + 1, 1, 1]))


C, A = "conv", "full_attention"


@pytest.mark.parametrize("layout,rows", [([C, A, C, C], 5), ([C, C, C], 7), ([A, C, A], 1)])
@torch.no_grad()
def test_last_only_runs_the_layers_after_the_last_attention_on_few_rows(model, layout, rows):
    """Past the last attention layer's mixer a cached call that keeps only the last position runs 1 + (K-1) rows per
    later conv layer (K = 3), with each row's last output and the whole cache as a call over every row; for whole
    rows and for right-padded ones (`lengths`)."""
    cfg = dataclasses.replace(model.config.text_config, layer_types=layout, num_hidden_layers=len(layout))
    torch.manual_seed(0)
    lm = TextModel(cfg).eval()
    seen = []
    lm.layers[-1].feed_forward.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    h = torch.randn(2, 12, cfg.hidden_size)
    for lengths in (None, torch.tensor([12, 9])):
        caches, outs = [], []
        for last_only in (False, True):
            cache = HybridCache(cfg, 2, 16)
            view = cache.view(torch.zeros(2, dtype=torch.long), 12, None, lengths)
            outs.append(lm(h, view.positions, view.mask, cache=view, last_only=last_only))
            caches.append(cache)
        last = torch.tensor([11, 11]) if lengths is None else lengths - 1
        assert (outs[1] - outs[0][torch.arange(2), last]).abs().max() <= TOL
        for a, b in zip(caches[0].conv + caches[0].k + caches[0].v, caches[1].conv + caches[1].k + caches[1].v):
            if a is not None:
                assert (a - b).abs().max() <= 1e-5
        assert seen[-2:] == [12, rows], seen


@torch.no_grad()
def test_reset_and_bad_start_pos(model):
    cache = model.make_cache(2, 16)
    _, emb = _prompt(model, n_text=10, with_image=False)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model.forward_cached(emb.expand(2, -1, -1), cache, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"start_pos must have shape \(2,\)"):
        model.forward_cached(emb.expand(2, -1, -1), cache, torch.tensor([0]))
    model.forward_cached(emb.expand(2, -1, -1), cache, torch.zeros(2, dtype=torch.long))
    cache.lengths += emb.shape[1]
    cache.reset([1])
    assert int(cache.lengths[1]) == 0 and int(cache.lengths[0]) == emb.shape[1]
    assert all(t[1].abs().max() == 0 for t in cache.conv + cache.k if t is not None)
    assert any(t[0].abs().max() > 0 for t in cache.conv if t is not None)


@torch.no_grad()
def test_decode_step_is_one_graph(model):
    """T == 1 with per-row start positions traces as a single graph: no .item(), no data-dependent branches."""
    cache = model.make_cache(2, 32)
    cache.lengths[:] = torch.tensor([3, 5])
    emb = model.embed(torch.tensor([[600], [601]]))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model.forward_cached)(emb, cache, cache.lengths.clone())
    assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
