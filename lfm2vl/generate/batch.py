"""BatchGenerator: the one generation loop (continuous batching over a shared HybridCache).

Every path (Engine.generate / stream / chat, batched generate, the server) drives this loop:
- `add(request)` queues a request; `step()` admits queued requests into free cache rows, prefills them in chunks
  (at most `prefill_chunk` tokens per step over all rows, the conv state carried across chunks; prompts of similar
  length share one pass, right-padded, so a burst of requests reads the weights once), then runs ONE batched
  decode step over the running rows, each at its own position. Requests join and leave between steps.
- Images are encoded once, at admission (those of requests admitted together in one vision pass); decode embeds
  the new token only.
- The model calls are steps.prefill and steps.decode_step; the rows (prefix reuse, conv snapshots, cache growth)
  are rows.RowCache's; a request's own state and per-token bookkeeping are active.Active's.
- Each row samples with its own Sampler (composed once per request); rows that are plain greedy share one argmax.
  A constrained row's Sampler masks its logits with the row's grammar (constraints.py); other rows pay nothing.
  One host sync per step (the new token ids), needed for detokenizing and stop checks.
- Thread safety: add / cancel / step / run / follow hold the engine's `lock` (an RLock every generator of one engine
  shares), so generators of one engine step one at a time and requests from several threads interleave as they
  would in one thread; run() holds it until its requests finished, follow() only while it steps (never between
  the events it yields, so an abandoned iterator holds nothing).
- A step cut short by an exception (Ctrl-C's KeyboardInterrupt, a failing forward) may leave a row's conv state
  ahead of its tokens: the requests it was running are dropped and their rows roll back to their last snapshot.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Iterator

import torch
import torch.nn.functional as F

from .threads import one_thread
from .active import Active, sample_rows
from .detok import StreamDetokenizer
from .options import MAX_BATCH, PREFILL_CHUNK
from .passes import prefill_group
from .request import Event, Request, Result
from .rows import RowCache
from .sampling import Sampler
from .steps import decode_step, prefill
from .stops import StopMatcher
from .units import check_images, features_from, image_units

DEFAULT_CAPACITY = 256  # initial cache length per row; grows to fit requests, up to max_position_embeddings


class BatchGenerator:
    def __init__(self, engine, max_batch: int = MAX_BATCH, max_seq_len: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        """engine: anything with .model (make_cache / embed / image_features / forward_cached), .config
        (Lfm2VlConfig) and .tokenizer (decode), optionally .lock (the engine's RLock; default: the generator's
        own). max_seq_len: fixed cache length per row (default: sized to the requests, growing up to the model's
        context; decode attends over the whole capacity, so it stays small)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer, self.config = engine.model, engine.tokenizer, engine.config
        tc = self.config.text_config
        self.max_context, self.vocab_size = tc.max_position_embeddings, tc.vocab_size
        self.image_token_id, self.factor = self.config.image_token_id, self.config.downsample_factor
        self.device = next(self.model.parameters()).device
        dtype = getattr(engine, "dtype", None)  # the cache's; an int8 output head does not carry it
        self.decode_forward = getattr(engine, "decode_forward", None) or self.model.forward_cached
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.lock = getattr(engine, "lock", None) or threading.RLock()
        self.fixed = max_seq_len is not None
        if self.fixed and not 1 <= max_seq_len <= self.max_context:
            raise ValueError(f"max_seq_len={max_seq_len} must be in [1, {self.max_context}] (the model's context)")
        self.limit = max_seq_len if self.fixed else self.max_context  # tokens a row can ever hold
        self.rows = RowCache(self.model, max_batch, max_seq_len or min(DEFAULT_CAPACITY, self.max_context),
                             self.max_context, dtype, self.device)
        self.pending: deque[Active] = deque()
        self.actives: dict[int, Active] = {}
        self._mail: dict[int, deque[Event]] = {}  # events kept for run() / follow() callers
        self._next_rid = 0

    # ---- public API -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.rows.capacity

    def add(self, req: Request) -> int:
        """Queue a request; returns its id. Raises ValueError if it can never fit."""
        n = len(req.input_ids)
        if n >= self.limit:
            raise ValueError(f"the prompt has {n} tokens but the context holds {self.limit} "
                             f"(prompt plus at least one new token must fit)")
        bad = [i for i in req.input_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        check_images(req, self.image_token_id, self.factor)
        with self.lock:
            rid = self._next_rid
            self._next_rid += 1
        matcher = None
        if req.constraint is not None:
            from .constraints import TokenMatcher

            matcher = TokenMatcher(req.constraint, self.tokenizer, self.vocab_size, req.eos_ids)
        sampler = Sampler(req.params, self.vocab_size, req.input_ids, self.device, req.eos_ids, req.min_new_tokens,
                          matcher)
        act = Active(rid, req, sampler, StreamDetokenizer(self.tokenizer), StopMatcher(req.stop),
                     t_add=time.perf_counter(), image_tokens=req.input_ids.count(self.image_token_id))
        with self.lock:
            self.pending.append(act)
            self.actives[rid] = act
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request; its row becomes free (its content stays reusable)."""
        with self.lock:
            act = self.actives.pop(rid, None)
            if act is None:
                return
            if act in self.pending:
                self.pending.remove(act)
            elif act.slot >= 0:
                self.rows.release(act.slot)

    def has_work(self) -> bool:
        return bool(self.actives)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit queued requests into free rows, prefill up to `prefill_chunk` tokens, then one decode step."""
        events: list[Event] = []
        with self.lock:
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
        unknown) and roll their rows back to their last conv-state snapshot, so later requests reuse only known
        state."""
        for act in list(self.actives.values()):
            if act.slot < 0:
                if act not in self.pending:  # taken from the queue, never placed
                    self.actives.pop(act.rid)
                continue
            self.actives.pop(act.rid)
            self.rows.roll_back(act.slot)

    def run(self, rids=None) -> dict[int, Result]:
        """Step until the given requests (default: all) finished; returns their Results (cancelled ones absent).
        Holds the lock throughout: a run from another thread waits for this one."""
        with self.lock:
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
                if not box:
                    with self.lock:  # held while stepping, never while a yielded event waits for its reader
                        if not box and rid not in self.actives:
                            return  # cancelled
                        if not box:
                            self._pump()
                    continue
                ev = box.popleft()
                yield ev
                if ev.result is not None:
                    return
        finally:
            self._mail.pop(rid, None)

    def _pump(self) -> None:
        for ev in self.step():
            box = self._mail.get(ev.rid)
            if box is not None:
                box.append(ev)

    # ---- the step: admission, prefill, decode -----------------------------------------------------------------
    def _admit(self) -> None:
        """Place queued requests in free rows (the one reusing the longest prefix) and embed what they prefill; the
        images of all requests placed in one step are encoded in one vision pass."""
        placed = []
        t0 = time.perf_counter()
        while self.pending:
            free = self.rows.free()
            if not free:
                break
            act = self.pending.popleft()
            req, ids = act.req, act.req.input_ids
            if not self.fixed:
                want = len(ids) + (req.max_new_tokens or 1)
                if want > self.capacity:
                    self.rows.grow(want)
            units = image_units(req, self.image_token_id, self.factor)
            act.slot = self.rows.pick(free, ids, units)
            act.cached = self.rows.claim(act.slot, act, units, ids)
            placed.append((act, units))
        if not placed:
            return
        feats = features_from(self.model, [(a.req, units, a.cached) for a, units in placed], self.factor,
                              self.device)
        for (act, _), f in zip(placed, feats):
            tail = torch.tensor([act.req.input_ids[act.cached:]], dtype=torch.long, device=self.device)
            act.embeds = self.model.embed(tail, f)
            act.offset = 0
        spent = time.perf_counter() - t0
        for act, _ in placed:
            act.prefill_s += spent

    def _prefill(self, events: list[Event]) -> None:
        """Prefill the placed requests' prompts, at most `prefill_chunk` tokens per step (padding included), in passes
        that each take several prompts at once (passes.prefill_group); a finished prompt gets its first token."""
        budget = self.prefill_chunk
        while budget > 0:
            todo = [a for a in self.actives.values() if a.slot >= 0 and a.prefilling]
            if not todo:
                return
            picked, T = prefill_group([a.embeds.shape[1] - a.offset for a in todo],
                                      [len(self.rows[a.slot].tokens) for a in todo], budget, self.capacity)
            group = [todo[i] for i in picked]
            self._prefill_pass(group, T, events)
            budget -= T * len(group)

    def _prefill_pass(self, group: list[Active], T: int, events: list[Event]) -> None:
        """One forward over the group's next T prompt tokens (shorter prompts right-padded)."""
        t0 = time.perf_counter()
        fed = [min(T, a.embeds.shape[1] - a.offset) for a in group]
        chunks = [a.embeds[:, a.offset:a.offset + n] for a, n in zip(group, fed)]
        embeds = chunks[0] if len(chunks) == 1 else torch.cat([F.pad(c, (0, 0, 0, T - c.shape[1])) for c in chunks])
        lengths = None if min(fed) == T else torch.tensor(fed, device=self.device)
        starts = [len(self.rows[a.slot].tokens) for a in group]
        logits = prefill(self.model, self.rows.cache, embeds, self.rows.rows_arg([a.slot for a in group]),
                         torch.tensor(starts, device=self.device), self.prefill_chunk, lengths)
        done = []
        for i, (a, n, pos) in enumerate(zip(group, fed, starts)):
            self.rows[a.slot].tokens.extend(a.req.input_ids[pos:pos + n])
            a.offset += n
            if a.offset == a.embeds.shape[1]:
                a.embeds = None
                self.rows.snapshot(a.slot)
                done.append((i, a))
        t1 = time.perf_counter()
        for a in group:
            a.prefill_s += t1 - t0
        with one_thread():
            for i, a in done:
                tok = a.sampler(logits[i])
                a.t_first = time.perf_counter()
                self._emit(a, tok, int(tok), logits[i], events)

    def _decode(self, events: list[Event]) -> None:
        """One decode step over every running row that has a token to feed."""
        acts = sorted((a for a in self.actives.values() if a.slot >= 0 and not a.prefilling
                       and a.next_token is not None), key=lambda a: a.slot)
        if not acts:
            return
        need = max(len(self.rows[a.slot].tokens) for a in acts) + 1
        if need > self.capacity and not self.fixed and self.capacity < self.max_context:
            self.rows.grow(need)
        ids = torch.stack([a.next_token for a in acts])[:, None]  # (b, 1)
        logits = decode_step(self.model, self.rows.cache, ids, self.rows.rows_arg([a.slot for a in acts]),
                             forward=self.decode_forward)
        for a in acts:
            self.rows[a.slot].tokens.append(a.next_id)
        with one_thread():
            for a, (tok, t), row_logits in zip(acts, sample_rows(acts, logits), logits):
                self._emit(a, tok, t, row_logits, events)

    def _emit(self, act: Active, tok: torch.Tensor, t: int, logits: torch.Tensor, events: list[Event]) -> None:
        ev = act.emit(tok, t, logits, full=len(self.rows[act.slot].tokens) >= self.limit)
        if ev.finish_reason is not None:
            ev.result = act.result(ev.finish_reason)
            self.rows.release(act.slot)
            self.actives.pop(act.rid, None)
        events.append(ev)
