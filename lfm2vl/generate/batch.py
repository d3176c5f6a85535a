"""BatchGenerator: the one generation loop (continuous batching over a shared HybridCache).

Every path (Engine.generate / stream / chat, batched generate, the server) drives this loop:
- `add(request)` queues a request; `step()` admits queued requests into free cache rows, prefills them in chunks
  (at most `prefill_chunk` tokens per step over all rows, the conv state carried across chunks), then runs ONE
  batched decode step over the running rows, each at its own position. Requests join and leave between steps.
- Images are encoded once, at admission; decode embeds the new token only.
- Prefix reuse: a finished request leaves its tokens in its row. A new request placed in that row skips the
  longest common token prefix (same image pixels included) that ends at a point where the row's conv state is
  known: the end of the row's content, or a snapshot taken at the end of an earlier prompt. Conv layers keep a
  rolling state, so an arbitrary prefix cannot be resumed; attention K/V can.
- Each row samples with its own Sampler (composed once per request); rows that are plain greedy share one argmax.
  One host sync per step (the new token ids), needed for detokenizing and stop checks.
- A step cut short by an exception (Ctrl-C's KeyboardInterrupt, a failing forward) may leave a row's conv state
  ahead of its tokens: the requests it was running are dropped and their rows roll back to their last snapshot.
"""
from __future__ import annotations

import hashlib
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..processor.tokens import unit_tokens
from ..cpu.threads import one_thread
from .detok import StreamDetokenizer
from .request import Event, Request, Result
from .sampling import Sampler, greedy_token, token_logprobs
from .stops import StopMatcher

DEFAULT_CAPACITY = 256  # initial cache length per row; grows to fit requests, up to max_position_embeddings
CAPACITY_STEP = 256  # capacities are multiples of this (few distinct shapes for compiled decode steps)
MAX_SNAPSHOTS = 8  # conv-state snapshots kept per row (prompt ends of earlier requests)


@dataclass
class _Row:
    """What one cache row holds: the tokens whose state is stored, the image units among them, and conv-state
    snapshots {position: [state per conv layer]} taken at the end of earlier prompts."""

    tokens: list[int] = field(default_factory=list)
    units: list[tuple[tuple[int, int], bytes]] = field(default_factory=list)  # ((h, w), digest of the patches)
    snaps: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    active: "_Active | None" = None
    last_used: int = 0


@dataclass
class _Active:
    rid: int
    req: Request
    sampler: Sampler
    detok: StreamDetokenizer
    stops: StopMatcher
    slot: int = -1
    embeds: torch.Tensor | None = None  # (1, T, D) prompt embeddings still to prefill
    offset: int = 0  # next index into `embeds`
    cached: int = 0  # reused prompt tokens
    next_token: torch.Tensor | None = None  # sampled, not yet fed (0-d, on device)
    next_id: int = -1  # the same token on the host
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    t_add: float = 0.0
    t_first: float = 0.0
    prefill_s: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.embeds is not None


def _digest(pixels: torch.Tensor) -> bytes:
    """A content hash of one unit's patch rows (dtype and shape included)."""
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.digest()


class BatchGenerator:
    def __init__(self, engine, max_batch: int = 16, max_seq_len: int | None = None, prefill_chunk: int = 512):
        """engine: anything with .model (make_cache / embed / image_features / forward_cached), .config
        (Lfm2VlConfig) and .tokenizer (decode). max_seq_len: fixed cache length per row (default: sized to the
        requests, growing up to the model's context; decode attends over the whole capacity, so it stays small)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer, self.config = engine.model, engine.tokenizer, engine.config
        tc = self.config.text_config
        self.max_context, self.vocab_size = tc.max_position_embeddings, tc.vocab_size
        self.image_token_id, self.factor = self.config.image_token_id, self.config.downsample_factor
        self.device = next(self.model.parameters()).device
        self.dtype = getattr(engine, "dtype", None)  # the cache's; an int8 output head does not carry it
        self.decode_forward = getattr(engine, "decode_forward", None) or self.model.forward_cached
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.fixed = max_seq_len is not None
        if self.fixed and not 1 <= max_seq_len <= self.max_context:
            raise ValueError(f"max_seq_len={max_seq_len} must be in [1, {self.max_context}] (the model's context)")
        self.cache = self.model.make_cache(max_batch, max_seq_len or min(DEFAULT_CAPACITY, self.max_context),
                                          dtype=self.dtype, device=self.device)
        self.rows = [_Row() for _ in range(max_batch)]
        self.pending: deque[_Active] = deque()
        self.actives: dict[int, _Active] = {}
        self._mail: dict[int, deque[Event]] = {}  # events kept for run() / follow() callers
        self._next_rid = 0
        self._clock = 0

    # ---- public API -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.cache.max_seq_len

    def add(self, req: Request) -> int:
        """Queue a request; returns its id. Raises ValueError if it can never fit."""
        n = len(req.input_ids)
        limit = self.capacity if self.fixed else self.max_context
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens but the context holds {limit} "
                             f"(prompt plus at least one new token must fit)")
        bad = [i for i in req.input_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        self._check_images(req)
        rid = self._next_rid
        self._next_rid += 1
        sampler = Sampler(req.params, self.vocab_size, req.input_ids, self.device, req.eos_ids, req.min_new_tokens)
        act = _Active(rid, req, sampler, StreamDetokenizer(self.tokenizer), StopMatcher(req.stop),
                      t_add=time.perf_counter())
        self.pending.append(act)
        self.actives[rid] = act
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request; its row becomes free (its content stays reusable)."""
        act = self.actives.pop(rid, None)
        if act is None:
            return
        if act in self.pending:
            self.pending.remove(act)
        elif act.slot >= 0:
            self.rows[act.slot].active = None

    def has_work(self) -> bool:
        return bool(self.actives)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit queued requests into free rows, prefill up to `prefill_chunk` tokens, then one decode step."""
        events: list[Event] = []
        try:
            self._admit()
            self._prefill(events)
            self._decode(events)
        except BaseException:
            self._abort_step()
            raise
        return events

    def _abort_step(self) -> None:
        """After an exception inside step(): drop the requests taken out of the queue (their rows' states are
        unknown) and roll each of their rows back to its last conv-state snapshot, whose tokens' K/V are intact
        (a forward writes only past the row's tokens), so later requests reuse only known state."""
        for act in list(self.actives.values()):
            if act.slot < 0:
                if act not in self.pending:  # taken from the queue, never placed
                    self.actives.pop(act.rid)
                continue
            self.actives.pop(act.rid)
            row = self.rows[act.slot]
            row.active = None
            p = max(row.snaps, default=0)
            row.tokens = row.tokens[:p]
            if p:
                for state, saved in zip((c for c in self.cache.conv if c is not None), row.snaps[p]):
                    state[act.slot] = saved

    def run(self, rids=None) -> dict[int, Result]:
        """Step until the given requests (default: all) finished; returns their Results (cancelled ones absent)."""
        rids = list(self.actives) if rids is None else list(rids)
        boxes = {r: self._mail.setdefault(r, deque()) for r in rids}
        out: dict[int, Result] = {}
        try:
            while True:
                for r, box in boxes.items():
                    while box:
                        ev = box.popleft()
                        if ev.result is not None:
                            out[r] = ev.result
                if not any(r in self.actives for r in rids if r not in out):
                    return out
                self._pump()
        finally:
            for r in rids:
                self._mail.pop(r, None)

    def follow(self, rid: int) -> Iterator[Event]:
        """The events of one request as they come, stepping the generator when needed. Events of other requests
        followed (or run) at the same time are kept for them, so several streams can be interleaved. Events are
        kept from this call on, even before the iterator is first advanced."""
        return self._follow(rid, self._mail.setdefault(rid, deque()))

    def _follow(self, rid: int, box: deque) -> Iterator[Event]:
        try:
            while True:
                if box:
                    ev = box.popleft()
                    yield ev
                    if ev.result is not None:
                        return
                elif rid in self.actives:
                    self._pump()
                else:
                    return  # cancelled
        finally:
            self._mail.pop(rid, None)

    def _pump(self) -> None:
        for ev in self.step():
            box = self._mail.get(ev.rid)
            if box is not None:
                box.append(ev)

    # ---- admission and prefix reuse ---------------------------------------------------------------------------
    def _check_images(self, req: Request) -> None:
        n_img = sum(1 for i in req.input_ids if i == self.image_token_id)
        counts = self._unit_counts(req)
        if n_img != sum(counts):
            raise ValueError(f"the prompt has {n_img} <image> tokens but its pixel inputs give {sum(counts)} "
                             f"features ({len(counts)} image units); prompt and images disagree")

    def _unit_counts(self, req: Request) -> list[int]:
        if req.spatial_shapes is None:
            return []
        return [unit_tokens(int(h), int(w), self.factor) for h, w in req.spatial_shapes.tolist()]

    def _admit(self) -> None:
        while self.pending:
            free = [i for i, r in enumerate(self.rows) if r.active is None]
            if not free:
                return
            act = self.pending.popleft()
            t0 = time.perf_counter()
            ids = act.req.input_ids
            if not self.fixed:
                want = len(ids) + (act.req.max_new_tokens or 1)
                if want > self.capacity:
                    self._grow(want)
            units = self._units(act.req)
            best = max(free, key=lambda s: (self._reuse_point(self.rows[s], ids, units)[0], -self.rows[s].last_used
                                            if self.rows[s].tokens else 1))
            p, snap = self._reuse_point(self.rows[best], ids, units)
            self._place(act, best, p, snap, units)
            act.prefill_s += time.perf_counter() - t0

    def _units(self, req: Request) -> list[tuple[int, int, tuple[int, int], bytes]]:
        """Per image unit: (first token position, token count, (h, w) patches, digest of its valid patch rows).
        Rows keep the digests, not the pixels, so a finished request's pixel tensors are freed with it."""
        counts = self._unit_counts(req)
        if not counts:
            return []
        pos = [i for i, t in enumerate(req.input_ids) if t == self.image_token_id]
        out, c = [], 0
        for u, (n, (h, w)) in enumerate(zip(counts, req.spatial_shapes.tolist())):
            out.append((pos[c], n, (int(h), int(w)), _digest(req.pixel_values[u, :int(h) * int(w)])))
            c += n
        return out

    def _reuse_point(self, row: _Row, ids: list[int], units) -> tuple[int, list[torch.Tensor] | None]:
        """Longest reusable prefix of `ids` in `row` -> (length p, conv snapshot to restore or None)."""
        if row.active is not None or not row.tokens:
            return 0, None
        n = min(len(row.tokens), len(ids) - 1)  # at least one prompt token is prefilled to get logits
        L = 0
        while L < n and row.tokens[L] == ids[L]:
            L += 1
        for u, (start, _, hw, digest) in enumerate(units):  # same placeholder tokens, but the same pixels?
            if start >= L:
                break
            if u >= len(row.units) or row.units[u] != (hw, digest):
                L = start
                break
        if len(row.tokens) <= L:
            return len(row.tokens), None
        p = max((s for s in row.snaps if s <= L), default=0)
        return p, (row.snaps[p] if p else None)

    def _place(self, act: _Active, slot: int, p: int, snap, units) -> None:
        row, req = self.rows[slot], act.req
        self._clock += 1
        row.active, row.last_used, act.slot, act.cached = act, self._clock, slot, p
        if snap is not None:
            for state, saved in zip((c for c in self.cache.conv if c is not None), snap):
                state[slot] = saved
        row.tokens = row.tokens[:p]
        row.snaps = {s: v for s, v in row.snaps.items() if s <= p}
        row.units = [(hw, digest) for _, _, hw, digest in units]
        self.cache.lengths[slot] = p
        ids = torch.tensor([req.input_ids[p:]], dtype=torch.long, device=self.device)
        act.embeds = self.model.embed(ids, self._features(req, units, p))
        act.offset = 0

    def _features(self, req: Request, units, p: int) -> torch.Tensor | None:
        """Image features of the placeholder tokens at positions >= p (units entirely before p are not encoded)."""
        first = next((u for u, (s, n, _, _) in enumerate(units) if s + n > p), None)
        if first is None:
            return None
        sel = slice(first, len(units))
        feats = self.model.image_features(req.pixel_values[sel].to(self.device),
                                          req.pixel_attention_mask[sel].to(self.device),
                                          req.spatial_shapes[sel].to(self.device))
        return feats[max(0, p - units[first][0]):]  # a unit split by p: keep the tokens after p

    def _grow(self, needed: int) -> None:
        """Reallocate the cache with room for `needed` tokens per row, keeping every row's content."""
        cap = max(needed, min(2 * self.capacity, needed + 4 * CAPACITY_STEP))
        cap = min(self.max_context, -(-cap // CAPACITY_STEP) * CAPACITY_STEP)
        new = self.model.make_cache(self.max_batch, cap, dtype=self.dtype, device=self.device)
        old_len = self.capacity
        for dst, src in zip(new.k + new.v, self.cache.k + self.cache.v):
            if src is not None:
                dst[:, :, :old_len] = src
        for dst, src in zip(new.conv, self.cache.conv):
            if src is not None:
                dst.copy_(src)
        new.lengths.copy_(self.cache.lengths)
        self.cache = new

    # ---- prefill ----------------------------------------------------------------------------------------------
    def _rows_arg(self, slots: list[int]) -> torch.Tensor | None:
        """None when the call covers every row in order (no gather of the cache), else the row indices."""
        if slots == list(range(self.max_batch)):
            return None
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def _prefill(self, events: list[Event]) -> None:
        budget = self.prefill_chunk
        for act in [a for a in self.actives.values() if a.slot >= 0 and a.prefilling]:
            if budget <= 0:
                break
            t0 = time.perf_counter()
            row, ids = self.rows[act.slot], act.req.input_ids
            total = act.embeds.shape[1]
            logits = None
            while budget > 0 and act.offset < total:
                n = min(budget, total - act.offset)
                pos = len(row.tokens)
                start = torch.tensor([pos], dtype=torch.long, device=self.device)
                logits = self.model.forward_cached(act.embeds[:, act.offset:act.offset + n], self.cache, start,
                                                   rows=self._rows_arg([act.slot]), last_only=True)
                self.cache.lengths[act.slot] = pos + n
                row.tokens.extend(ids[pos:pos + n])
                act.offset += n
                budget -= n
            if act.offset == total:
                act.embeds = None
                self._snapshot(row, act.slot)
                with one_thread():
                    tok = act.sampler(logits[0])
                    t = int(tok)
                    act.t_first = time.perf_counter()
                    act.prefill_s += act.t_first - t0
                    self._emit(act, tok, t, logits[0], events)
            else:
                act.prefill_s += time.perf_counter() - t0

    def _snapshot(self, row: _Row, slot: int) -> None:
        row.snaps[len(row.tokens)] = [c[slot].clone() for c in self.cache.conv if c is not None]
        while len(row.snaps) > MAX_SNAPSHOTS:
            del row.snaps[min(row.snaps)]

    # ---- decode -----------------------------------------------------------------------------------------------
    def _decode(self, events: list[Event]) -> None:
        acts = sorted((a for a in self.actives.values() if a.slot >= 0 and not a.prefilling
                       and a.next_token is not None), key=lambda a: a.slot)
        if not acts:
            return
        need = max(len(self.rows[a.slot].tokens) for a in acts) + 1
        if need > self.capacity and not self.fixed and self.capacity < self.max_context:
            self._grow(need)
        slots = [a.slot for a in acts]
        ids = torch.stack([a.next_token for a in acts])[:, None]  # (b, 1)
        rows = self._rows_arg(slots)
        start = self.cache.lengths if rows is None else self.cache.lengths[rows]
        logits = self.decode_forward(self.model.embed(ids), self.cache, start, rows=rows, last_only=True)
        if rows is None:
            self.cache.lengths += 1
        else:
            self.cache.lengths[rows] += 1
        for a in acts:
            self.rows[a.slot].tokens.append(a.next_id)
        with one_thread():
            self._sample(acts, logits, events)

    def _sample(self, acts: list[_Active], logits: torch.Tensor, events: list[Event]) -> None:
        plain = [i for i, a in enumerate(acts) if a.sampler.plain]
        toks = [None] * len(acts)
        if plain:
            am = greedy_token(logits[plain])
            for j, i in enumerate(plain):
                toks[i] = am[j]
        for i, a in enumerate(acts):
            if toks[i] is None:
                toks[i] = a.sampler(logits[i])
        host = torch.stack(toks).tolist()  # the step's one host sync
        for i, a in enumerate(acts):
            self._emit(a, toks[i], host[i], logits[i], events)

    # ---- per-token bookkeeping --------------------------------------------------------------------------------
    def _emit(self, act: _Active, tok: torch.Tensor, t: int, logits: torch.Tensor, events: list[Event]) -> None:
        act.sampler.observe(tok)
        p = act.req.params
        lp = top = None
        if p.logprobs or p.top_logprobs:
            chosen, tv, ti = token_logprobs(logits, tok, p.top_logprobs)
            lp = float(chosen)
            top = list(zip(ti.tolist(), tv.tolist())) if tv is not None else None
            act.logprobs.append(lp)
            if top is not None:
                act.top_logprobs.append(top)
        act.next_token, act.next_id = tok, t
        act.generated.append(t)
        reason = None
        if t in act.req.eos_ids:
            text, hit = act.stops.feed(act.detok.flush())
            reason = "stop"
        else:
            text, hit = act.stops.feed(act.detok.add(t))
            if hit:
                reason = "stop"
            elif (act.req.max_new_tokens is not None and len(act.generated) >= act.req.max_new_tokens) or \
                    len(self.rows[act.slot].tokens) >= self._limit():  # no room to feed this token
                more, hit = act.stops.feed(act.detok.flush())
                text += more
                reason = "stop" if hit else "length"
        if reason is not None and not hit:
            text += act.stops.flush()
        act.text.append(text)
        ev = Event(act.rid, t, text, reason, lp, top)
        if reason is not None:
            ev.result = self._finish(act, reason)
        events.append(ev)

    def _limit(self) -> int:
        return self.capacity if self.fixed else self.max_context

    def _finish(self, act: _Active, reason: str) -> Result:
        now = time.perf_counter()
        self.rows[act.slot].active = None
        self.actives.pop(act.rid, None)
        p = act.req.params
        return Result(
            text="".join(act.text), token_ids=list(act.generated), finish_reason=reason,
            prompt_tokens=len(act.req.input_ids), completion_tokens=len(act.generated), cached_tokens=act.cached,
            logprobs=list(act.logprobs) if (p.logprobs or p.top_logprobs) else None,
            top_logprobs=list(act.top_logprobs) if p.top_logprobs else None,
            ttft_s=act.t_first - act.t_add, prefill_s=act.prefill_s, decode_s=now - act.t_first)
