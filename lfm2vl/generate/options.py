"""Engine options: the names a generate / stream / chat call takes, split by who consumes them."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..processor.config import KNOBS
from .constraints import CONSTRAINT_OPTIONS, Constraint
from .sampling import SamplingParams
from .toolcall import TOOL_OPTIONS, tool_options

SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))
REQUEST_OPTIONS = ("max_new_tokens", "min_new_tokens", "stop")
# How the conversation becomes a prompt. continue_final_message=True leaves the final assistant message open.
# parse_special=True: special-token strings in message text (<|im_start|>, <image>, ...) become control tokens, as
# in transformers; by default (False) they are plain text, so client text cannot forge turns or image slots.
PROMPT_OPTIONS = ("continue_final_message", "parse_special")
# Every option name a generate / stream / chat call takes.
# What the answer must follow (constraints.py): json_schema (a dict, its JSON text or a pydantic class), json_object
# (True), regex, choices (a list of strings), grammar (Lark / GBNF); at most one. They become Request.constraint.
# Tools (toolcall.py): tools (OpenAI's tool list; they go into the prompt) and tool_choice ("auto", "none",
# "required" or {"type": "function", "function": {"name": ...}}); a forced choice becomes the constraint;
# parallel_tool_calls=False: a forced answer holds a single call.
ENGINE_OPTIONS = SAMPLING_OPTIONS + REQUEST_OPTIONS + CONSTRAINT_OPTIONS + TOOL_OPTIONS + PROMPT_OPTIONS + KNOBS

# Batching defaults shared by the engine, the server and the batch loop: rows decoded together, and prompt tokens
# prefilled per step (so a long prompt does not stall the rows already answering).
MAX_BATCH = 16
PREFILL_CHUNK = 512


def split_options(options: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Engine options -> (SamplingParams fields, Request fields, processor knobs, prompt options); unknown names
    are an error. The constraint options become the Request's `constraint`, compiled and checked here; `tools`
    goes to the prompt options (checked), a forced tool_choice to the constraint."""
    sampling, request, knobs, prompt, constraint, tooling = {}, {}, {}, {}, {}, {}
    for k, v in options.items():
        if k in SAMPLING_OPTIONS:
            if v is not None:
                sampling[k] = v
        elif k in REQUEST_OPTIONS:
            request[k] = v
        elif k in CONSTRAINT_OPTIONS:
            constraint[k] = v
        elif k in TOOL_OPTIONS:
            tooling[k] = v
        elif k in KNOBS:
            knobs[k] = v
        elif k in PROMPT_OPTIONS:
            if not isinstance(v, bool):
                raise ValueError(f"{k}={v!r} is invalid; expected True or False")
            prompt[k] = v
        else:
            raise ValueError(f"unknown option {k!r}; valid options: {', '.join(ENGINE_OPTIONS)}")
    c = Constraint.from_options(**constraint)
    tools, forced, parse = tool_options(**tooling)
    if forced is not None:
        if c is not None:
            raise ValueError(f"tool_choice={tooling['tool_choice']!r} forces a tool call, which excludes "
                             f"{c.kind}; give one of the two")
        c = forced
    if tools is not None:
        prompt["tools"] = tools
    if parse:
        request["parse_tool_calls"] = True
    if c is not None:
        request["constraint"] = c
    if request.get("stop") is None:
        request.pop("stop", None)
    return sampling, request, knobs, prompt
