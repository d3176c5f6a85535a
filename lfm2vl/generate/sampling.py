"""Token sampling: pure functions on logits, composed once per request into a `Sampler`.

Semantics follow transformers 5.24 `generation/logits_process.py` and the order `generate` applies them in:
repetition penalty (prompt + generated tokens, `RepetitionPenaltyLogitsProcessor`) -> temperature -> top_k ->
top_p -> min_p. OpenAI's presence/frequency penalties (generated tokens only, as vLLM does) are applied with the
repetition penalty, before temperature. A constrained row's grammar mask (constraints.py) comes right after the
penalties, so no later filter can bring back a token the grammar forbids; a token the grammar forces is taken
without sampling. Temperature 0 means greedy: argmax of the penalised logits, seed ignored.
Sampling draws with a per-request seeded `torch.Generator` through the exponential race
(argmax(p / E), E ~ Exp(1)), which needs no host sync (gpt-fast's `multinomial_sample_one_no_sync`).
All math runs in float32, like transformers' `generate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..processor.config import plain_number


NEG_INF = float("-inf")
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed accepts (negative seeds wrap modulo 2**64)

# option -> (int or float, the valid values, what is expected); seed may also be None
RULES = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0 (1 = off)"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "a number in [-2, 2] (0 = off)"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "a number in [-2, 2] (0 = off)"),
    "seed": (int, lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1],
             "an integer in [-2**63, 2**64 - 1] (what torch.Generator.manual_seed accepts)"),
    "top_logprobs": (int, lambda v: 0 <= v <= 20, "an integer in [0, 20]"),
}


def option_problem(name: str, value) -> str | None:
    """What is wrong with `value` for the sampling option `name` (e.g. "must be a finite number"), or None."""
    kind, valid, expected = RULES[name]
    if value is None and name == "seed":
        return None
    value = plain_number(value, integer=kind is int)
    if value is None:
        return f"expected {expected}"
    if kind is float and not math.isfinite(value):
        return "must be a finite number"
    return None if valid(value) else f"expected {expected}"


@dataclass
class SamplingParams:
    """Per-request sampling options. Defaults are the LFM2-VL model card's (temperature 0.1, min_p 0.15,
    repetition_penalty 1.05). Invalid values raise ValueError naming the option (rules: RULES)."""

    temperature: float = 0.1
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.15  # 0 = off
    repetition_penalty: float = 1.05  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: bool = False  # report the chosen token's logprob (under the model's raw distribution)
    top_logprobs: int = 0  # also report the n most likely tokens and their logprobs

    def __post_init__(self):
        for name in RULES:
            value = getattr(self, name)
            problem = option_problem(name, value)
            if problem is not None:
                raise ValueError(f"{name}={value!r} is invalid; {problem}")
            if value is not None:  # numpy scalars become Python numbers
                setattr(self, name, plain_number(value, integer=RULES[name][0] is int))
        if not isinstance(self.logprobs, (bool, np.bool_)):
            raise ValueError(f"logprobs={self.logprobs!r} is invalid; expected True or False")
        self.logprobs = bool(self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalties: an argmax over raw logits (batched across rows)."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty)


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim; bf16/fp16 logits are widened first (exact; torch's bf16 argmax is slower)."""
    x = logits.float()
    if x.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(x.numpy().argmax(axis=-1)))
    return x.argmax(dim=-1)


# On CPU, argmax and the indices where a condition holds go through numpy, whose vectorised argmax and flatnonzero
# are several times faster than torch's over a 65536-token vocabulary (both keep the first index of the maximum,
# NaN counting as the maximum).
def _argmax_cpu(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(int(x.numpy().argmax()))


def _at_least(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The indices (ascending) where x >= threshold, x 1-D float32 on CPU."""
    return torch.from_numpy(np.flatnonzero(x.numpy() >= np.float32(threshold)))


# ---- pure filters on logits (..., V); each returns a new tensor ----

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: tokens in `seen` (bool, ..., V) get logit/penalty if the
    logit is positive, logit*penalty if negative."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI: logit - presence * [count > 0] - frequency * count, over generated tokens."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept, as in transformers)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose cumulative probability is <= 1 - p; keep at least one."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability; keep the top one."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) without a host sync: argmax(p / E), E ~ Exp(1)."""
    probs = logits.softmax(dim=-1)
    if probs.dim() == 1 and probs.device.type == "cpu":
        # race over the tokens that can win only: after temperature/min_p that is a handful, and drawing 65536
        # exponentials every step would cost far more than the race itself (the host sync is free on CPU)
        return _race(probs, None, generator)
    e = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_(min=1e-30)
    return (probs / e).argmax(dim=-1)


def _race(probs: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """The exponential race over the tokens of nonzero probability in `probs` (1-D, CPU), which are the
    probabilities of token ids `ids` (ascending; None: of tokens 0..V-1). One exponential per such token, drawn in
    ascending token order."""
    pn = probs.numpy()
    nonzero = np.flatnonzero(pn)
    e = torch.empty(len(nonzero), dtype=probs.dtype).exponential_(1.0, generator=generator).clamp_(min=1e-30)
    win = int(nonzero[(pn[nonzero] / e.numpy()).argmax()])
    return torch.tensor(win if ids is None else int(ids[win]))


# ---- per-request composition ----

class Sampler:
    """The filters of one request, composed once, plus its state: penalty counts and a seeded generator.

    `__call__(logits (V,))` returns the next token as a 0-d long tensor on the logits' device (no sync);
    `observe(token, token_id)` records a generated token for the penalties and the constraint.
    matcher: the row's constraints.TokenMatcher (None: unconstrained, no cost)."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: torch.Tensor | list[int] | None = None,
                 device: torch.device | str = "cpu", eos_ids: tuple[int, ...] = (), min_new_tokens: int = 0,
                 matcher=None):
        self.params = params
        self.matcher = matcher
        device = torch.device(device)
        self.device = device
        # transformers' MinNewTokensLengthLogitsProcessor: eos logits are -inf until min_new_tokens were generated
        self.n_generated, self.min_new_tokens = 0, min_new_tokens
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device) if min_new_tokens else None
        self.seen = None  # prompt + generated tokens (repetition penalty)
        self.counts = None  # generated tokens only (presence / frequency)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids is not None and len(prompt_ids):
                ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
                self.seen[ids[ids < vocab_size]] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        filters = []
        # on CPU, the tokens the repetition penalty touches as a list too (the CPU path edits only those)
        self.seen_ids = self.seen.nonzero().squeeze(-1) if self.seen is not None and device.type == "cpu" else None
        if self.seen is not None:
            filters.append(lambda x: apply_repetition_penalty(x, self.seen, params.repetition_penalty))
        if self.counts is not None:
            filters.append(lambda x: apply_presence_frequency(x, self.counts, params.presence_penalty,
                                                              params.frequency_penalty))
        if matcher is not None:
            filters.append(matcher.apply)
        self.generator = None
        if not params.greedy:
            if params.temperature != 1.0:
                filters.append(lambda x: apply_temperature(x, params.temperature))
            if params.top_k:
                filters.append(lambda x: apply_top_k(x, params.top_k))
            if params.top_p < 1.0:
                filters.append(lambda x: apply_top_p(x, params.top_p))
            if params.min_p:
                filters.append(lambda x: apply_min_p(x, params.min_p))
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.filters = filters
        self.trivial = self.generator is None and not filters  # argmax of the raw logits while eos is allowed

    @property
    def plain(self) -> bool:
        """This step is a plain argmax of the raw logits (the caller may batch it across rows)."""
        return self.trivial and (self.eos is None or self.n_generated >= self.min_new_tokens)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The filtered float32 logits the token is drawn from."""
        x = logits.float()
        if self.eos is not None and self.n_generated < self.min_new_tokens:
            x = x.index_fill(-1, self.eos, NEG_INF)
        for f in self.filters:
            x = f(x)
        return x

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.matcher is not None:
            forced = self.matcher.forced()  # also wins over min_new_tokens' eos suppression
            if forced is not None:
                return torch.tensor(forced, dtype=torch.long, device=logits.device)
        if self.matcher is None and logits.dim() == 1 and logits.device.type == "cpu":
            return self._draw_cpu(logits)
        x = self.process(logits)
        if self.generator is None:
            return x.argmax(dim=-1)  # float32 already
        return sample_from_logits(x, self.generator)

    def _draw_cpu(self, logits: torch.Tensor) -> torch.Tensor:
        """The token `process` + argmax / `sample_from_logits` would give, in far fewer passes over the vocabulary
        (a CPU decode step of a small model is a few milliseconds; the full-vocabulary filters would take up to a
        tenth of it): the repetition penalty edits only the seen tokens; top_k, top_p and min_p narrow a candidate list
        and work on it alone (softmax over the candidates equals softmax over the vocabulary with the others at
        -inf). Only top_p without top_k still sorts the whole vocabulary."""
        p = self.params
        x = logits.to(torch.float32, copy=True)
        if self.seen_ids is not None and self.seen_ids.numel():
            v = x.index_select(0, self.seen_ids)
            x.index_copy_(0, self.seen_ids, torch.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty))
        if self.counts is not None:
            x = apply_presence_frequency(x, self.counts, p.presence_penalty, p.frequency_penalty)
        if self.eos is not None and self.n_generated < self.min_new_tokens:
            x.index_fill_(0, self.eos, NEG_INF)
        if self.generator is None:
            return _argmax_cpu(x)
        if p.temperature != 1.0:
            x.div_(p.temperature)  # apply_temperature, in place on this copy
        ids = None  # the candidates, ascending; None: the whole vocabulary
        if p.top_k:
            kth = float(torch.topk(x, min(p.top_k, x.numel())).values[-1])
            ids = _at_least(x, kth)  # ties with the k-th stay, as in apply_top_k
        if p.top_p < 1.0:
            if ids is None:
                x = apply_top_p(x, p.top_p)
            else:
                ids = ids[apply_top_p(x[ids], p.top_p) > NEG_INF]
        if p.min_p:
            if ids is None:
                # p_i >= min_p * p_max means x_i - max(x) >= log(min_p): a margin wider than any rounding keeps
                # every survivor, and the exact test below on the candidates drops the rest
                ids = _at_least(x, float(x.numpy().max()) + (math.log(p.min_p) - 1e-3))
            if ids.numel():
                probs = x[ids].softmax(dim=-1)
                ids = ids[probs >= p.min_p * probs.max()]
        if ids is None:
            return sample_from_logits(x, self.generator)
        probs = x[ids].softmax(dim=-1)
        if not bool((probs > 0).any()):  # NaN logits leave no candidate: the full-vocabulary path decides
            return sample_from_logits(self.process(logits), self.generator)
        return _race(probs, ids, self.generator)

    def observe(self, token: torch.Tensor, token_id: int | None = None) -> None:
        """token: the sampled token on the device; token_id: the same on the host (needed by a constraint)."""
        self.n_generated += 1
        if self.matcher is not None:
            self.matcher.advance(int(token) if token_id is None else token_id)
        if self.seen_ids is not None:
            t = int(token) if token_id is None else token_id
            if not self.seen[t]:
                self.seen[t] = True
                self.seen_ids = torch.cat((self.seen_ids, self.seen_ids.new_tensor([t])))
        elif self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def token_logprobs(logits: torch.Tensor, token: torch.Tensor, top_n: int = 0):
    """log p(token) under the raw model distribution, and the top_n (logprobs, ids); tensors, no sync."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, token.reshape(*lp.shape[:-1], 1)).squeeze(-1)
    if top_n:
        top = torch.topk(lp, top_n, dim=-1)
        return chosen, top.values, top.indices
    return chosen, None, None
