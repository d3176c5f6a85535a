"""Tool calls in generation: tool_choice -> what the answer may be, and the finished answer -> OpenAI tool_calls.

tool_choice (OpenAI's values): "auto" (the default with tools: free text; a call the model writes is parsed),
"none" (the answer is text, never parsed as a call), "required" (the grammar forces
`<|tool_call_start|>[` one or more calls of the listed functions `]<|tool_call_end|>`), or
{"type": "function", "function": {"name": N}} (the same, calls of N only).
The forced forms are a grammar (callgrammar.py) whose calls are valid against their functions' schemas and whose
text survives parse -> OpenAI -> render exactly (processor/tools.py).
"""
from __future__ import annotations

from typing import Mapping

from ..processor.tools import TOOL_CALL, check_tools, parse_calls, to_openai
from .callgrammar import call_grammar
from .constraints import Constraint

TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls")


def check_tool_choice(tool_choice, fns: list[dict]) -> tuple[str, list[str]]:
    """(mode, function names): mode "auto", "none" or "forced"; ValueError naming tool_choice when it is
    malformed or names a function the tools do not list."""
    if tool_choice is None:
        tool_choice = "auto" if fns else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice={tool_choice!r} is invalid; expected 'auto', 'none', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if tool_choice != "none" and not fns:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        if tool_choice == "required":
            return "forced", [f["name"] for f in fns]
        return tool_choice, []
    if not isinstance(tool_choice, Mapping):
        raise ValueError(f"tool_choice must be a string or an object, got {type(tool_choice).__name__}")
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ValueError("tool_choice must look like {'type': 'function', 'function': {'name': ...}}")
    known = [f["name"] for f in fns]
    if name not in known:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                         f"({', '.join(known) or 'none given'})")
    return "forced", [name]


def tool_options(tools=None, tool_choice=None, parallel_tool_calls=None) -> tuple[list | None, Constraint | None, bool]:
    """Engine options -> (tools for the prompt, the constraint of a forced tool_choice, whether calls in the
    answer are parsed). parallel_tool_calls=False: a forced answer holds one call. ValueError names the option."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls={parallel_tool_calls!r} is invalid; expected True or False")
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        return None, None, False
    fns = check_tools(tools)
    mode, names = check_tool_choice(tool_choice, fns)
    if mode != "forced":
        return list(tools), None, mode == "auto"
    grammar = call_grammar(fns, names, parallel_tool_calls is not False)
    try:
        constraint = Constraint.from_options(grammar=grammar)
    except ValueError as e:
        raise ValueError(f"tools: the call grammar of the tools is invalid ({e})") from None
    return list(tools), constraint, True


def split_answer(token_ids: list[int], tokenizer, eos_ids=()) -> tuple[str, list[dict]] | None:
    """(content, OpenAI tool_calls) of an answer holding `<|tool_call_start|>[...]<|tool_call_end|>`; None when
    it holds no call or the call text does not parse. Content is the text around the call."""
    start, end = (tokenizer.token_to_id(t) for t in TOOL_CALL)
    if start is None or start not in token_ids:
        return None
    ids = [t for t in token_ids if t not in eos_ids]
    i = ids.index(start)
    j = ids.index(end, i + 1) if end in ids[i + 1:] else len(ids)
    calls = parse_calls(tokenizer.decode(ids[i + 1:j], skip_special_tokens=True))
    if calls is None:
        return None
    content = tokenizer.decode(ids[:i], skip_special_tokens=True) + tokenizer.decode(ids[j + 1:],
                                                                                     skip_special_tokens=True)
    return content, to_openai(calls)
