"""Tool calls in generation: tool_choice -> what the answer may be, and the finished answer -> OpenAI tool_calls.

tool_choice (OpenAI's values): "auto" (the default with tools: free text; a call the model writes is parsed),
"none" (the answer is text, never parsed as a call), "required" (the grammar forces
`<|tool_call_start|>[` one or more calls of the listed functions `]<|tool_call_end|>`), or
{"type": "function", "function": {"name": N}} (the same, calls of N only).
The forced forms are a Lark grammar for llguidance (constraints.py): each call is the function's name literal and
its keyword arguments in the order of the schema's properties, required ones always present, optional ones
maybe; each value follows its property's schema written as a Python literal: enum / const as alternatives; string
(minLength / maxLength), integer, number, boolean, null, arrays (items, minItems / maxItems) and objects
(properties, required) by type; anyOf / oneOf and type lists as alternatives. Other keywords (minimum, pattern,
format, $ref, ...) are not enforced: such a value is any literal of its type, or any literal at all.
Numbers are written so they read back unchanged (no exponent, at most 4 decimals), strings with the escapes
json.dumps writes, so a forced call's text survives parse -> OpenAI -> render exactly (processor/tools.py).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from ..processor.tools import TOOL_CALL, check_tools, parse_calls, py_literal, to_openai
from .constraints import Constraint

TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls")

_TERMINALS = r"""
STRING: /"([^"\\\x00-\x1f]|\\["\\bfnrt])*"/
INT: /0|-?[1-9][0-9]{0,14}/
NUMBER: /0|-?[1-9][0-9]{0,14}|-?(0|[1-9][0-9]{0,8})\.[0-9]{0,3}[1-9]/
any_value: STRING | NUMBER | "True" | "False" | "None" | any_list | any_dict
any_list: "[" (any_value (", " any_value)*)? "]"
any_dict: "{" (STRING ": " any_value (", " STRING ": " any_value)*)? "}"
"""


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


class _Grammar:
    """Builds the Lark rules of the forced call list; one rule per schema node."""

    def __init__(self):
        self.rules: list[str] = []
        self.n = 0

    def rule(self, body: str) -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, schema: Any) -> str:
        if not isinstance(schema, Mapping):
            return "any_value"
        if "const" in schema:
            return self._alts([schema["const"]])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self._alts(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.rule(" | ".join(self.value(s) for s in schema[key]))
        t = schema.get("type")
        if isinstance(t, list) and t:
            return self.rule(" | ".join(self.value({**schema, "type": x}) for x in t))
        if t == "string":
            lo, hi = schema.get("minLength"), schema.get("maxLength")
            if isinstance(lo, int) or isinstance(hi, int):
                lo = lo if isinstance(lo, int) and lo >= 0 else 0
                hi = f"{hi}" if isinstance(hi, int) and hi >= lo else ""
                return self.rule(f'/"([^"\\\\\\x00-\\x1f]|\\\\["\\\\bfnrt]){{{lo},{hi}}}"/')
            return "STRING"
        if t == "integer":
            return "INT"
        if t == "number":
            return "NUMBER"
        if t == "boolean":
            return self.rule('"True" | "False"')
        if t == "null":
            return '"None"'
        if t == "array":
            item = self.value(schema.get("items"))
            lo = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
            hi = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
            return self.rule(self._repeat(item, lo, hi))
        if t == "object" or "properties" in schema:
            return self.rule('"{" ' + self.fields(schema, lambda k: json.dumps(json.dumps(k) + ": ")) + ' "}"')
        return "any_value"

    def _alts(self, values: list) -> str:
        try:
            texts = list(dict.fromkeys(py_literal(v) for v in values))
        except ValueError:
            return "any_value"
        return self.rule(" | ".join(json.dumps(t) for t in texts))

    @staticmethod
    def _repeat(item: str, lo: int, hi: int | None) -> str:
        """`[` lo..hi items `]` separated by ", "."""
        if hi is not None and hi < lo:
            hi = lo
        if hi == 0:
            return '"[" "]"'
        rest = f'(", " {item})'
        more = (f"{rest}~{max(lo - 1, 0)}..{hi - 1}" if hi is not None else
                (f"{rest}~{lo - 1}" + f" {rest}*" if lo > 1 else f"{rest}*"))
        body = f"{item} {more}"
        return f'"[" {body} "]"' if lo >= 1 else f'"[" ({body})? "]"'

    def fields(self, schema: Mapping, key_literal) -> str:
        """Keyword arguments (or dict entries) of an object schema, in property order, separated by ", ": required
        ones always, optional ones maybe. An object without properties takes none (arguments) or any (dicts)."""
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        items = [(k, key_literal(k) + " " + self.value(v)) for k, v in props.items()]
        if not items:
            return "" if key_literal is _kwarg else '(STRING ": " any_value (", " STRING ": " any_value)*)?'
        # first: the entries from one on, the first written without ", " before it; rest: each with ", " before
        # it; None past the end (nothing). A rule whose entries are all optional may be empty.
        first = rest = None
        nullable = True  # every entry after this one is optional
        for k, kv in reversed(items):
            tail = f"{kv} {rest}" if rest else kv
            if k in required:
                rest, first = self.rule(f'", " {tail}'), self.rule(tail)
                nullable = False
            elif rest is None:
                rest, first = self.rule(f'(", " {kv})?'), self.rule(f"({kv})?")
            else:
                opt = "?" if nullable else ""
                rest, first = (self.rule(f'((", " {tail}) | {rest}){opt}'),
                               self.rule(f"(({tail}) | {first}){opt}"))
        return first


def _kwarg(k: str) -> str:
    return json.dumps(f"{k}=")


def call_grammar(fns: list[dict], names: list[str], parallel: bool = True) -> str:
    """The Lark grammar of `<|tool_call_start|>[` calls of `names` `]<|tool_call_end|>` (fns: check_tools); one
    call only unless `parallel`."""
    g = _Grammar()
    by_name = {f["name"]: f for f in fns}
    calls = []
    for name in names:
        params = by_name[name].get("parameters") or {}
        bad = [k for k in (params.get("properties") or {}) if not k.isidentifier()]
        if bad:
            raise ValueError(f"the parameter {bad[0]!r} of the function {name!r} cannot be a keyword argument; "
                             "LFM2's call format needs Python identifiers")
        args = g.fields(params, _kwarg)
        calls.append(g.rule(json.dumps(f"{name}(") + (f" {args}" if args else "") + ' ")"'))
    call = g.rule(" | ".join(calls))
    more = f' (", " {call})*' if parallel else ""
    start = f'start: {TOOL_CALL[0]} "[" {call}{more} "]" {TOOL_CALL[1]}'
    return "\n".join([start, *g.rules]) + _TERMINALS


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
