"""One request inside BatchGenerator (batch.py): where it runs, what it still has to prefill, and what it produced
so far (tokens, text through the detokenizer and stop strings, logprobs, timings)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .detok import StreamDetokenizer
from .request import Event, Request, Result
from .sampling import Sampler, greedy_token, token_logprobs
from .stops import StopMatcher
from .toolcall import split_answer


@dataclass
class Active:
    rid: int
    req: Request
    sampler: Sampler
    detok: StreamDetokenizer
    stops: StopMatcher
    slot: int = -1  # its cache row, -1 while queued
    embeds: torch.Tensor | None = None  # (1, T, D) prompt embeddings still to prefill
    offset: int = 0  # next index into `embeds`
    cached: int = 0  # reused prompt tokens
    image_tokens: int = 0  # prompt tokens that carry image embeddings
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

    def emit(self, tok: torch.Tensor, t: int, logits: torch.Tensor, full: bool) -> Event:
        """Record the sampled token `tok` (`t` on the host) drawn from `logits`; full: the row has no room to feed
        it. Returns its Event, with a finish_reason when the request ends here (the caller adds the Result)."""
        self.sampler.observe(tok, t)
        p = self.req.params
        lp = top = None
        if p.logprobs or p.top_logprobs:
            chosen, tv, ti = token_logprobs(logits, tok, p.top_logprobs)
            lp = float(chosen)
            top = list(zip(ti.tolist(), tv.tolist())) if tv is not None else None
            self.logprobs.append(lp)
            if top is not None:
                self.top_logprobs.append(top)
        self.next_token, self.next_id = tok, t
        self.generated.append(t)
        reason = None
        if t in self.req.eos_ids:
            text, hit = self.stops.feed(self.detok.flush())
            m = self.sampler.matcher
            reason = "error" if m is not None and m.is_dead() else "stop"  # a dead end forced that eos
        else:
            text, hit = self.stops.feed(self.detok.add(t))
            if hit:
                reason = "stop"
            elif (self.req.max_new_tokens is not None and len(self.generated) >= self.req.max_new_tokens) or full:
                more, hit = self.stops.feed(self.detok.flush())
                text += more
                reason = "stop" if hit else "length"
        if reason is not None and not hit:
            text += self.stops.flush()
        self.text.append(text)
        return Event(self.rid, t, text, reason, lp, top)

    def result(self, reason: str) -> Result:
        now = time.perf_counter()
        p = self.req.params
        text, calls = "".join(self.text), None
        if self.req.parse_tool_calls and reason == "stop":
            found = split_answer(self.generated, self.detok.tokenizer, self.req.eos_ids)
            if found is not None:
                (text, calls), reason = found, "tool_calls"
        return Result(
            text=text, token_ids=list(self.generated), finish_reason=reason, tool_calls=calls,
            error=self.sampler.matcher.dead_end() if reason == "error" else None,
            prompt_tokens=len(self.req.input_ids), completion_tokens=len(self.generated), cached_tokens=self.cached,
            image_tokens=self.image_tokens,
            logprobs=list(self.logprobs) if (p.logprobs or p.top_logprobs) else None,
            top_logprobs=list(self.top_logprobs) if p.top_logprobs else None,
            ttft_s=self.t_first - self.t_add, prefill_s=self.prefill_s, decode_s=now - self.t_first,
            parsed=self.parsed(reason) if calls is None else None)

    def parsed(self, reason: str):
        """The constrained answer as an object once its grammar completed it (constraints.Constraint.parse)."""
        c, m = self.req.constraint, self.sampler.matcher
        if c is None or m is None or reason != "stop" or not m.is_finished():
            return None
        try:
            return c.parse("".join(self.text))
        except ValueError:
            return None


def sample_rows(acts: list[Active], logits: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The next token of each request from its row of logits (b, V): (token on the device, the same on the host).
    Plain greedy rows share one argmax; the others use their own Sampler. One host sync for all rows."""
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
    return list(zip(toks, host))
