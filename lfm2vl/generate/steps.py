"""The two model steps of generation, with no scheduling state: `prefill` a prompt's embeddings into cache rows,
then `decode_step` one token per row. BatchGenerator (batch.py) and the benchmark (bench/worker.py) both call them.

Both advance `cache.lengths` of the rows they feed (forward_cached itself never does), so a cache driven only by
these functions always knows how many tokens each row holds. `rows` is None for every row of the cache in order
(no gather), else a (b,) long tensor of row indices.
"""
from __future__ import annotations

import torch

from ..model.cache import HybridCache


def prefill(model, cache: HybridCache, embeds: torch.Tensor, rows: torch.Tensor | None, start_pos,
            chunk: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Feed embeds (b, T, D) into cache rows `rows` from position start_pos (an int, or a (b,) long tensor), at most
    `chunk` tokens per forward; the conv state carries from chunk to chunk through the cache. lengths (b,): the real
    tokens of right-padded rows (several prompts in one pass; then T <= chunk). Sets the rows' lengths to start_pos +
    T (+ lengths) and returns the logits (b, V) of each row's last real position."""
    T = embeds.shape[1]
    if T < 1 or chunk < 1:
        raise ValueError(f"prefill needs at least one token and chunk >= 1 (got {T} tokens, chunk={chunk})")
    if lengths is not None and T > chunk:
        raise ValueError(f"right-padded rows are prefilled in one pass: {T} tokens exceed chunk={chunk}")
    start = torch.as_tensor(start_pos, dtype=torch.long, device=cache.lengths.device).reshape(-1)
    for s in range(0, T, chunk):
        logits = model.forward_cached(embeds[:, s:s + chunk], cache, start + s, rows=rows, last_only=True,
                                      lengths=lengths)
    end = start + (T if lengths is None else lengths)
    if rows is None:
        cache.lengths.copy_(end.expand_as(cache.lengths))
    else:
        cache.lengths[rows] = end
    return logits


def decode_step(model, cache: HybridCache, tokens: torch.Tensor, rows: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, forward=None) -> torch.Tensor:
    """Feed one token per row: tokens (b, 1) ids at `positions` (b,) (default: the rows' lengths), through
    `forward` (default model.forward_cached; compiled_decode's for the compiled step). Advances the rows' lengths
    by one and returns the logits (b, V)."""
    if positions is None:
        positions = cache.lengths if rows is None else cache.lengths[rows]
    logits = (forward or model.forward_cached)(model.embed(tokens), cache, positions, rows=rows, last_only=True)
    if rows is None:
        cache.lengths += 1
    else:
        cache.lengths[rows] += 1
    return logits


def compiled_decode(model, mode: str | None = None):
    """model.forward_cached compiled for the decode step, which has static shapes per (rows, cache capacity); the
    prefill stays eager. mode: torch.compile's ("reduce-overhead" replays a CUDA graph on a GPU)."""
    return torch.compile(model.forward_cached, dynamic=False, mode=mode)
