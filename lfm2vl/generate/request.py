"""What goes into the BatchGenerator (Request) and what comes out (Event per token, Result per finished request)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .constraints import Constraint
from ..processor.config import plain_number
from .sampling import SamplingParams
from .stops import check_stops


@dataclass
class Request:
    """A prepared prompt: token ids (image placeholders expanded), the pixel inputs of its images, sampling
    options and stop conditions. Built by `Engine.prepare`."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # (units, L, 3*p*p)
    pixel_attention_mask: torch.Tensor | None = None  # (units, L)
    spatial_shapes: torch.Tensor | None = None  # (units, 2) patch grid (h, w)
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int | None = 512  # None: until the context is full
    min_new_tokens: int = 0  # eos is suppressed until this many tokens were generated (transformers semantics)
    stop: list[str] = field(default_factory=list)
    eos_ids: tuple[int, ...] = ()
    constraint: Constraint | None = None  # the answer follows this grammar (constraints.py)
    parse_tool_calls: bool = False  # a tool call in the answer becomes Result.tool_calls (toolcall.py)

    def __post_init__(self):
        if isinstance(self.input_ids, torch.Tensor):
            self.input_ids = self.input_ids.flatten().tolist()
        self.input_ids = [int(i) for i in self.input_ids]
        if not self.input_ids:
            raise ValueError("the prompt is empty (0 tokens); give at least one token")
        if self.max_new_tokens is not None:
            n = plain_number(self.max_new_tokens, integer=True)
            if n is None or n < 1:
                raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid; expected an integer >= 1 or "
                                 "None")
            self.max_new_tokens = n
        n = plain_number(self.min_new_tokens, integer=True)
        if n is None or n < 0:
            raise ValueError(f"min_new_tokens={self.min_new_tokens!r} is invalid; expected an integer >= 0")
        self.min_new_tokens = n
        self.stop = check_stops(self.stop)
        self.eos_ids = tuple(int(i) for i in self.eos_ids)
        if self.pixel_values is not None and (self.pixel_attention_mask is None or self.spatial_shapes is None):
            raise ValueError("pixel_values needs pixel_attention_mask and spatial_shapes as well")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint={self.constraint!r} is invalid; expected a Constraint")


@dataclass
class Result:
    """One finished generation. token_ids are the new tokens only (an eos token that ended it included)."""

    text: str
    token_ids: list[int]
    # "stop" (eos or a stop string), "length" (max_new_tokens or the context is full), "tool_calls" (the answer
    # is a tool call, parsed into tool_calls), or "error" (the constraint reached a dead end: no token could continue
    # the unfinished answer; `error` says why)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose cache was reused instead of prefilled
    image_tokens: int = 0  # prompt tokens that carry image embeddings
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    ttft_s: float = 0.0  # from add() to the first token
    prefill_s: float = 0.0  # image encoding + prompt prefill
    decode_s: float = 0.0  # from the first token to the last
    # a constrained answer that its grammar completed, as an object: the pydantic instance of a json_schema given
    # as a pydantic class, the JSON value of a json_schema / json_object, the text of a regex / choices / grammar;
    # None when unconstrained or cut short (finish_reason "length" or a stop string)
    parsed: Any = None
    # the tool calls of the answer in OpenAI's shape ([{"id", "type": "function", "function": {"name",
    # "arguments": JSON text}}]) when tools were given and it called them; `text` is then the text around the call
    tool_calls: list[dict] | None = None
    error: str | None = None  # why the request failed (finish_reason "error")

    def checked(self) -> "Result":
        """This Result; ValueError with its `error` when the request failed (finish_reason "error")."""
        if self.finish_reason == "error":
            raise ValueError(self.error or "the generation failed")
        return self

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Event:
    """One generated token of one request. `text` is the newly completed text (may be ""); the last event of a
    request has its finish_reason and the whole Result."""

    rid: int
    token_id: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    result: Result | None = None
