"""A fake Engine and BatchGenerator for server logic tests: no weights, the real types at the boundary.

What the server uses of the engine is faked with the engine's own types: `FakeEngine.prepare(messages, context=,
**options)` routes the options like `Engine.prepare` (lfm2vl.engine.split_options) and returns a real
`lfm2vl.generate.request.Request`; `engine.tokenizer.decode` decodes ids. `FakeBatchGenerator` has the
BatchGenerator's add / cancel / has_work / step and emits real `Event`s, the last one of a request carrying its
real `Result`.

A "token" is one character; the next character is a pure function of the prompt and the position (greedy) or of a
seeded torch-free RNG (temperature > 0), so the same request always gives the same text whatever else is in the
batch. Each step prefills at most `prefill_chunk` prompt tokens of one waiting request and decodes one token for
every running row, like the real generator. It records what the scheduler did (adds, cancels, the batch size of
each step) so tests can check continuous batching and cancellation.
"""
from __future__ import annotations

import random
import threading
import time
import zlib
from dataclasses import dataclass, field

from lfm2vl.engine import split_options
from lfm2vl.generate.request import Event, Request, Result
from lfm2vl.generate.sampling import SamplingParams

ALPHABET = "abcdefghij klmnopqrstuvwxyz.,é🙂"
LOGPROB = -0.5  # the logprob of every chosen character; the runners-up follow it in the alphabet at RUNNER_UP
RUNNER_UP = -3.0


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Renders messages to characters; `<image>` counts as 16 tokens."""

    tokenizer = _CharTokenizer()

    def __init__(self, step_delay_s: float = 0.0, reply: str | None = None):
        self.step_delay_s = step_delay_s
        self.reply = reply  # when set, every answer is this text (repeated up to max_tokens), one character a step
        self.generators: list[FakeBatchGenerator] = []
        self.prepared: list[dict] = []

    def release_memory(self) -> None:
        pass

    def prepare(self, messages, images=None, *, context: int | None = None, **options) -> Request:
        sampling, request, _knobs, _prompt = split_options(options)  # unknown options: ValueError, as the engine
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
        if context is not None and len(text) >= context:  # the engine's check, in the engine's words
            raise ValueError(f"the prompt has {len(text)} tokens but the context holds {context} tokens")
        return Request([ord(c) for c in text], params=SamplingParams(**sampling), **request)


@dataclass
class _Row:
    rid: int
    req: Request
    prefilled: int = 0
    out: str = ""
    emitted: int = 0   # characters of `out` already sent
    sent: str = ""     # the text of the events so far
    rng: random.Random | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def _row(rid: int, req: Request) -> _Row:
    p = req.params
    return _Row(rid, req, rng=None if p.greedy else random.Random(p.seed))


class FakeBatchGenerator:
    def __init__(self, engine: FakeEngine, max_batch: int = 16, max_seq_len: int | None = None,
                 prefill_chunk: int = 512):
        self.engine, self.max_batch = engine, max_batch
        self.max_seq_len, self.prefill_chunk = max_seq_len, prefill_chunk
        self.waiting: list[_Row] = []
        self.running: dict[int, _Row] = {}
        self.next_rid = 0
        self.cancelled: list[int] = []
        self.batch_sizes: list[int] = []
        self.thread_ids: set[int] = set()
        engine.generators.append(self)

    def add(self, req: Request) -> int:
        self.thread_ids.add(threading.get_ident())
        if self.max_seq_len is not None and len(req.input_ids) + req.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt {len(req.input_ids)} + {req.max_new_tokens} > {self.max_seq_len}")
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        self.waiting.append(_row(rid, req))
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
            row.prefilled = min(len(row.req.input_ids), row.prefilled + self.prefill_chunk)
            if row.prefilled == len(row.req.input_ids):
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
        if self.engine.reply:
            ch = self.engine.reply[pos % len(self.engine.reply)]
        elif row.rng is not None:
            ch = row.rng.choice(ALPHABET)
        else:
            key = bytes(str(row.req.input_ids), "ascii") + pos.to_bytes(4, "little")
            ch = ALPHABET[zlib.crc32(key) % len(ALPHABET)]
        row.out += ch
        p = row.req.params
        lp = top = None
        if p.logprobs or p.top_logprobs:  # as the real generator: a logprob when either is asked for
            lp = LOGPROB
            row.logprobs.append(lp)
        if p.top_logprobs:
            after = ALPHABET[ALPHABET.index(ch) + 1:] + ALPHABET[:ALPHABET.index(ch)]
            top = [(ord(ch), LOGPROB)] + [(ord(c), RUNNER_UP) for c in after[:p.top_logprobs - 1]]
            row.top_logprobs.append(top)
        for s in row.req.stop:
            cut = row.out.find(s)
            if cut >= 0:
                return self._event(row, ch, row.out[row.emitted:cut], "stop", lp, top)
        finish = "length" if len(row.out) >= row.req.max_new_tokens else None
        # hold back a tail that could still become a stop string
        hold = max((k for s in row.req.stop for k in range(1, len(s)) if row.out.endswith(s[:k])), default=0)
        upto = len(row.out) if finish else len(row.out) - hold
        text, row.emitted = row.out[row.emitted:upto], max(row.emitted, upto)
        return self._event(row, ch, text, finish, lp, top)

    @staticmethod
    def _event(row: _Row, ch: str, text: str, finish: str | None, lp, top) -> Event:
        """The Event of one character; a finishing one carries the request's Result."""
        row.sent += text
        ev = Event(row.rid, ord(ch), text, finish, lp, top)
        if finish is not None:
            p = row.req.params
            ev.result = Result(text=row.sent, token_ids=[ord(c) for c in row.out], finish_reason=finish,
                               prompt_tokens=len(row.req.input_ids), completion_tokens=len(row.out),
                               logprobs=list(row.logprobs) if (p.logprobs or p.top_logprobs) else None,
                               top_logprobs=list(row.top_logprobs) if p.top_logprobs else None)
        return ev

    def expected(self, req: Request) -> str:
        """What this generator answers for `req` on its own (for assertions); its state is left alone."""
        row = _row(0, req)
        while True:
            ev = self._decode(row)
            if ev.finish_reason is not None:
                return ev.result.text
