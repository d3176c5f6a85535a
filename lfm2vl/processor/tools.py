"""LFM2's tool-call format: the tool list in the system turn, calls as a Python-style list, responses wrapped.

- The tools are listed in the system turn as `List of tools: <|tool_list_start|>[{...}, {...}]<|tool_list_end|>`
  (each tool as JSON). A checkpoint template that renders `tools` does it itself (LFM2.5's); for one that does not
  (LFM2-VL-450M's), `prepare` writes that line into the system message.
- The model calls tools with `<|tool_call_start|>[name(arg="v", n=1), other()]<|tool_call_end|>`: keyword
  arguments whose values are Python literals (strings in double quotes with JSON escapes, numbers, True / False /
  None, lists, dicts). `parse_calls` reads that list with `ast` (literals only; anything else is not a call) into
  OpenAI's `tool_calls`; `call_text` writes OpenAI's `tool_calls` back into the model's own text, so a conversation
  sent back shows the model exactly what it wrote (the round trip is exact for the calls the tool grammar produces).
- A `tool` message's content is wrapped `<|tool_response_start|>...<|tool_response_end|>` (by the template when it
  does so, else by `prepare`).
`prepare` runs inside the chat-template render after the client's text was escaped (escape.py), so the markers it
writes are control tokens while everything the client sent stays text.
"""
from __future__ import annotations

import ast
import json
import math
import uuid
from functools import lru_cache
from typing import Any, Mapping

from lfm2vl.files import jsontext

TOOL_LIST = ("<|tool_list_start|>", "<|tool_list_end|>")
TOOL_CALL = ("<|tool_call_start|>", "<|tool_call_end|>")
TOOL_RESPONSE = ("<|tool_response_start|>", "<|tool_response_end|>")
_PROBE = "lfm2vl_probe_7f3a"


# ---- the tools a request lists ------------------------------------------------------------------------------
def function_of(tool: Any, where: str) -> dict:
    """The function spec {"name", "description"?, "parameters"?} of one tool: OpenAI's {"type": "function",
    "function": {...}} or the bare function dict. ValueError naming `where` when it is malformed: parameters are a
    JSON schema of type "object" (the type may be left out; absent or empty parameters: no arguments) whose
    properties are schemas and whose required names are among them; no field nests more than jsontext.MAX_DEPTH
    levels (the template and the call grammar recurse per level)."""
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where} must be an object like {{'type': 'function', 'function': {{'name': ...}}}}, got "
                         f"{type(tool).__name__}")
    fn, at = tool, where
    if "function" in tool or tool.get("type") is not None:
        if tool.get("type", "function") != "function":
            raise ValueError(f"{where}.type is {tool.get('type')!r}; only 'function' tools are supported")
        fn, at = tool.get("function"), f"{where}.function"
        if not isinstance(fn, Mapping):
            raise ValueError(f"{at} must be an object with a 'name', got {type(fn).__name__}")
        for k, v in tool.items():
            if k != "function":
                jsontext.check_depth(v, f"{where}.{k}")
    for k, v in fn.items():
        jsontext.check_depth(v, f"{at}.{k}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{at}.name is missing; every tool needs a function name")
    if not name.isidentifier():
        raise ValueError(f"{at}.name={name!r} is invalid; LFM2 writes calls as name(...), so a tool name must be a "
                         "Python identifier (letters, digits and underscores, not starting with a digit)")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, Mapping):
            raise ValueError(f"{at}.parameters must be a JSON schema object, got {type(params).__name__}")
        if params.get("type", "object") != "object":
            raise ValueError(f"{at}.parameters.type is {params['type']!r}; a tool's parameters are its keyword "
                             "arguments, a JSON schema of type 'object' (absent or empty: no arguments)")
        props = params.get("properties")
        if props is not None and not isinstance(props, Mapping):
            raise ValueError(f"{at}.parameters.properties must be an object, got {type(props).__name__}")
        for k, v in (props or {}).items():
            if not isinstance(v, (Mapping, bool)):
                raise ValueError(f"{at}.parameters.properties.{k} must be a JSON schema (an object), got "
                                 f"{type(v).__name__}")
        required = params.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{at}.parameters.required must be a list of property names")
        missing = [r for r in required if r not in (props or {})]
        if missing:
            raise ValueError(f"{at}.parameters.required names {missing[0]!r}, which is not in its properties")
    return dict(fn)


def check_tools(tools, where: str = "tools") -> list[dict]:
    """The function specs of a tools list (see function_of); ValueError naming the bad entry."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"{where} must be a list of tools, got {type(tools).__name__}")
    fns = [function_of(t, f"{where}[{i}]") for i, t in enumerate(tools)]
    seen = set()
    for i, f in enumerate(fns):
        if f["name"] in seen:
            raise ValueError(f"{where}[{i}] repeats the function name {f['name']!r}")
        seen.add(f["name"])
    return fns


# ---- calls: the model's text <-> OpenAI's tool_calls ---------------------------------------------------------
class _NotLiteral(ValueError):
    pass


def _literal(node: ast.AST):
    """A JSON-like Python literal; anything else (names, calls, tuples, sets, bytes, non-finite numbers) raises."""
    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, float)) and math.isfinite(v):
            return v
        raise _NotLiteral(f"{v!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _NotLiteral("a sign before a non-number")
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            key = _literal(k) if k is not None else None
            if not isinstance(key, str):
                raise _NotLiteral("a dict key that is not a string")
            out[key] = _literal(v)
        return out
    raise _NotLiteral(type(node).__name__)


def parse_calls(text: str) -> list[dict] | None:
    """The calls in the text between <|tool_call_start|> and <|tool_call_end|>: [{"name", "arguments": dict}], or
    None when it is not a list of name(key=literal, ...) calls."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        if any(k.arg is None for k in node.keywords):  # **kwargs
            return None
        try:
            args = {k.arg: _literal(k.value) for k in node.keywords}
        except (_NotLiteral, RecursionError):
            return None
        calls.append({"name": node.func.id, "arguments": args})
    return calls or None


def to_openai(calls: list[dict]) -> list[dict]:
    """Parsed calls -> OpenAI's tool_calls (arguments as a JSON string, a fresh id each)."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def py_literal(value) -> str:
    """A JSON value written as the Python literal LFM2 writes (strings with JSON escapes in double quotes)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {py_literal(v)}"
                               for k, v in value.items()) + "}"
    raise ValueError(f"{value!r} is not a JSON value")


def call_arguments(args, where: str) -> Mapping:
    """A call's arguments (a JSON object or its text; empty text: none) as a mapping of keyword arguments; a
    ValueError naming `where` for text that is not JSON, a value that is not an object, a key that is no Python
    identifier, or nesting deeper than jsontext.MAX_DEPTH levels."""
    if isinstance(args, str):
        try:
            args = jsontext.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(args, Mapping):
        raise ValueError(f"{where} must be a JSON object")
    jsontext.check_depth(args, where)
    bad = [k for k in args if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ValueError(f"{where} has the key {bad[0]!r}, which cannot be a keyword argument")
    return args


def call_text(tool_calls, where: str = "tool_calls") -> str:
    """OpenAI's tool_calls (arguments as a JSON string or a dict) -> `<|tool_call_start|>[...]<|tool_call_end|>`."""
    if not isinstance(tool_calls, (list, tuple)) or not tool_calls:
        raise ValueError(f"{where} must be a non-empty list of calls")
    parts = []
    for i, tc in enumerate(tool_calls):
        at = f"{where}[{i}]"
        fn = tc.get("function", tc) if isinstance(tc, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"].isidentifier():
            raise ValueError(f"{at} needs function.name, a Python identifier")
        args = call_arguments(fn.get("arguments", {}), f"{at}.function.arguments")
        parts.append(f"{fn['name']}(" + ", ".join(f"{k}={py_literal(v)}" for k, v in args.items()) + ")")
    return TOOL_CALL[0] + "[" + ", ".join(parts) + "]" + TOOL_CALL[1]


# ---- the template's input ------------------------------------------------------------------------------------
def _probe(template, special_tokens: Mapping[str, str], **kw) -> str:
    try:
        return template.render(add_generation_prompt=False, **{**special_tokens, **kw})
    except Exception:  # a template that refuses the probe does not do it
        return ""


@lru_cache(maxsize=16)
def _template_does(template, special: tuple) -> tuple[bool, bool]:
    """(renders `tools`, wraps tool responses) for a compiled template, found by rendering two probe
    conversations."""
    tok = dict(special)
    user = [{"role": "user", "content": "hi"}]
    lists = _PROBE in _probe(template, tok, messages=user, tools=[{"name": _PROBE}])
    wraps = (TOOL_RESPONSE[0] + _PROBE) in _probe(template, tok, messages=user + [{"role": "tool", "content": _PROBE}],
                                                   tools=None)
    return lists, wraps


def tool_list_line(tools) -> str:
    """The system-prompt line that lists the tools (each as JSON, as LFM2's templates write them)."""
    items = [t if isinstance(t, str) else json.dumps(t, ensure_ascii=False) for t in tools]
    return "List of tools: " + TOOL_LIST[0] + "[" + ", ".join(items) + "]" + TOOL_LIST[1]


def prepare(template, messages: list[dict], tools, special_tokens: Mapping[str, str]):
    """(messages, tools) as the template should get them: assistant tool_calls become the model's call text after
    the content; tool responses are wrapped and the tool list goes into the system turn unless the template does
    it. `template` is the compiled Jinja template (chat.compile_template); messages are plain dicts
    (chat.normalize_messages), already escaped."""
    lists, wraps = _template_does(template, tuple(sorted((k, v) for k, v in special_tokens.items()
                                                          if isinstance(v, str))))
    out = []
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            m = dict(m)
            text = call_text(m.pop("tool_calls"), f"messages[{i}].tool_calls")
            content = m.get("content") or ""
            if not isinstance(content, str):
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            m["content"] = content + text
        elif m.get("tool_calls") is not None:
            m = {k: v for k, v in m.items() if k != "tool_calls"}
        if m.get("role") == "tool" and not wraps:
            content = m.get("content") or ""
            if not isinstance(content, str):
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            m = {**m, "content": TOOL_RESPONSE[0] + content + TOOL_RESPONSE[1]}
        out.append(m)
    if tools and not lists:
        line = tool_list_line(tools)
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            first = out[0]["content"]
            out[0] = {**out[0], "content": first + ("\n" if first else "") + line}
        else:
            out.insert(0, {"role": "system", "content": line})
        tools = None
    return out, tools
