"""A fake engine + BatchGenerator that honour the Engine contract (notes/interfaces.md), for server logic tests.

No weights: a "token" is one character; the next character is a pure function of the prompt and the position
(greedy) or of a seeded torch-free RNG (temperature > 0), so the same request always gives the same text whatever
else is in the batch. Each step prefills at most `prefill_chunk` prompt tokens of one waiting request and decodes
one token for every running row, like the real generator. It records what the scheduler did (adds, cancels, the
batch size of each step) so tests can check continuous batching and cancellation.
"""
from __future__ import annotations

import random
import threading
import time
import zlib
from dataclasses import dataclass, field

ALPHABET = "abcdefghij klmnopqrstuvwxyz.,é🙂"


@dataclass
class FakeRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.1
    seed: int | None = None
    logprobs: bool = False


@dataclass
class Event:
    rid: int
    token_id: int | None
    text: str
    finish_reason: str | None
    logprob: float | None = None


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Renders messages to characters; `<image>` counts as 16 tokens."""

    tokenizer = _CharTokenizer()

    def __init__(self, step_delay_s: float = 0.0):
        self.step_delay_s = step_delay_s
        self.generators: list[FakeBatchGenerator] = []
        self.prepared: list[dict] = []

    def prepare(self, messages, context: int | None = None, **options) -> FakeRequest:
        known = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop", "logprobs", "min_image_tokens", "max_image_tokens",
                 "do_image_splitting", "top_logprobs", "min_new_tokens"}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}")
        self.prepared.append({"messages": messages, **options})
        text = ""
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                for p in content:
                    if p["type"] == "image":
                        w, h = p["image"].size
                        text += "<image>" * 16 + f"{w}x{h}"
                    else:
                        text += p["text"]
            else:
                text += content
            text += "|"
        return FakeRequest(prompt_ids=[ord(c) for c in text], max_new_tokens=options.get("max_new_tokens", 64),
                           stop=options.get("stop") or [], temperature=options.get("temperature", 0.1),
                           seed=options.get("seed"), logprobs=bool(options.get("logprobs")))


@dataclass
class _Row:
    rid: int
    req: FakeRequest
    prefilled: int = 0
    out: str = ""
    emitted: int = 0   # characters of `out` already sent
    rng: random.Random | None = None


class FakeBatchGenerator:
    def __init__(self, engine: FakeEngine, max_batch: int = 16, max_seq_len: int | None = None,
                 prefill_chunk: int = 512):
        self.engine, self.max_batch, self.max_seq_len, self.prefill_chunk = engine, max_batch, max_seq_len, prefill_chunk
        self.waiting: list[_Row] = []
        self.running: dict[int, _Row] = {}
        self.next_rid = 0
        self.cancelled: list[int] = []
        self.batch_sizes: list[int] = []
        self.thread_ids: set[int] = set()
        engine.generators.append(self)

    def add(self, req: FakeRequest) -> int:
        self.thread_ids.add(threading.get_ident())
        if self.max_seq_len is not None and len(req.prompt_ids) + req.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt {len(req.prompt_ids)} + {req.max_new_tokens} > {self.max_seq_len}")
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        rng = random.Random(req.seed) if req.temperature > 0 else None
        self.waiting.append(_Row(rid, req, rng=rng))
        return rid

    def cancel(self, rid: int) -> None:
        self.thread_ids.add(threading.get_ident())
        self.cancelled.append(rid)
        self.running.pop(rid, None)
        self.waiting = [r for r in self.waiting if r.rid != rid]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Event]:
        self.thread_ids.add(threading.get_ident())
        if self.engine.step_delay_s:
            time.sleep(self.engine.step_delay_s)
        if self.waiting and len(self.running) < self.max_batch:
            row = self.waiting[0]
            row.prefilled = min(len(row.req.prompt_ids), row.prefilled + self.prefill_chunk)
            if row.prefilled == len(row.req.prompt_ids):
                self.running[self.waiting.pop(0).rid] = row
        self.batch_sizes.append(len(self.running))
        events = []
        for row in list(self.running.values()):
            ev = self._decode(row)
            events.append(ev)
            if ev.finish_reason is not None:
                del self.running[row.rid]
        return events

    def _decode(self, row: _Row) -> Event:
        pos = len(row.out)
        if row.rng is not None:
            ch = row.rng.choice(ALPHABET)
        else:
            ch = ALPHABET[zlib.crc32(bytes(str(row.req.prompt_ids), "ascii") + pos.to_bytes(4, "little")) % len(ALPHABET)]
        row.out += ch
        lp = -0.5 if row.req.logprobs else None
        for s in row.req.stop:
            cut = row.out.find(s)
            if cut >= 0:
                text = row.out[row.emitted:cut]
                return Event(row.rid, ord(ch), text, "stop", lp)
        finish = "length" if len(row.out) >= row.req.max_new_tokens else None
        # hold back a tail that could still become a stop string
        hold = max((k for s in row.req.stop for k in range(1, len(s)) if row.out.endswith(s[:k])), default=0)
        upto = len(row.out) if finish else len(row.out) - hold
        text, row.emitted = row.out[row.emitted:upto], max(row.emitted, upto)
        return Event(row.rid, ord(ch), text, finish, lp)

    def expected(self, req: FakeRequest) -> str:
        """What this generator answers for `req` on its own (for assertions)."""
        g = FakeBatchGenerator.__new__(FakeBatchGenerator)
        g.engine = FakeEngine()
        row = _Row(0, req, rng=random.Random(req.seed) if req.temperature > 0 else None)
        text = ""
        while True:
            ev = g._decode(row)
            text += ev.text
            if ev.finish_reason:
                return text
