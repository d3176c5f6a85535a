"""Chat templates: render a checkpoint's Jinja template the way transformers does, and the training render.

transformers compiles templates in jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
the loopcontrols extension and a `{% generation %}` tag, a `tojson` filter that does not HTML-escape, and the
globals raise_exception, strftime_now, dict and namespace; it passes messages, tools, documents,
add_generation_prompt and the tokenizer's named special tokens (bos_token, eos_token, ...). We reproduce that
environment so any checkpoint template renders byte-identically.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Mapping

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..files import jsontext
from . import tools as lfm2_tools

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# The message roles lfm2vl accepts (the engine's messages and the server's); "developer" (OpenAI's newer name for
# the system prompt) is rendered as "system"; "tool" holds a tool's result (tools.py).
ROLES = ("system", "developer", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged (templates mark assistant text with it)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore names (no reaching CPython internals from a template)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names, got {name!r}")


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TemplateCompileError(ValueError):
    """A chat template that is not valid Jinja: `line` (1-based, None when unknown) and `reason` say where and why."""

    def __init__(self, line: int | None, reason: str):
        self.line, self.reason = line, reason
        at = f" at line {line}" if line is not None else ""
        super().__init__(f"the chat template has a Jinja syntax error{at}: {reason}")


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template; a TemplateCompileError for a syntax error (jinja's own error never escapes)."""
    if not isinstance(source, str):
        raise TemplateCompileError(None, f"expected the template's text (a string), got {type(source).__name__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateCompileError(e.lineno, e.message or "invalid syntax") from None


def check_templates(template: str | Mapping[str, str] | None) -> None:
    """Compile a template, or every one of a set of named templates: a TemplateCompileError (naming the template
    of a set) for one that is not valid Jinja, so a broken template is found when it is loaded, not at first use."""
    if template is None:
        return
    if not isinstance(template, Mapping):
        compile_template(template)
        return
    for name, source in template.items():
        try:
            compile_template(source)
        except TemplateCompileError as e:
            raise TemplateCompileError(e.line, f"{e.reason} (in the template named {name!r})") from None


def run_template(template: jinja2.Template, **variables) -> str:
    """Render a compiled template. What the template raises (raise_exception, an undefined name, an operation its
    data does not support) is a ValueError saying the template refused these messages: the messages decide it."""
    try:
        return template.render(**variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template rejected these messages: {e.message or type(e).__name__}") from None
    except Exception as e:  # TypeError, KeyError, ... from the template's own expressions
        raise ValueError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None


# plain() recurses once per level, and so do escaping and the template after it. The checks of messages and tools
# (messages.normalize, tools.function_of) bound each field at jsontext.MAX_DEPTH, which sits a few levels inside a
# conversation; deeper data (a caller that skipped them) is a ValueError here, before anything recurses further.
PLAIN_DEPTH = jsontext.MAX_DEPTH + 8


def plain(value: Any, _depth: int = 0) -> Any:
    """What the template may see: JSON-like data only; other objects (images, arrays) become "<TypeName>". A
    ValueError for data nested more than PLAIN_DEPTH levels."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, bool, int, float):
        if isinstance(value, base):
            return base(value)
    if _depth >= PLAIN_DEPTH:
        raise ValueError(f"the chat template's data (messages, tools, documents) is {jsontext.too_deep(PLAIN_DEPTH)}")
    d = _depth + 1
    if isinstance(value, Mapping):
        return {plain(k, d): plain(v, d) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v, d) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v, d) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return plain(value.item(), d)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), d) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain(value.model_dump(), d)
    return f"<{type(value).__name__}>"


def check_role(role, where: str = "message") -> str:
    """A message role -> the role the template sees (developer -> system); anything else is a ValueError naming
    the bad value and the valid roles. `where` names the message in the error (e.g. "messages[2]")."""
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"{where} has role {role!r}; expected one of {', '.join(map(repr, ROLES))} (developer is "
                         "treated as system)")
    return ROLE_ALIASES.get(role, role)


def normalize_messages(messages) -> list[dict]:
    """Message objects -> dicts without None-valued keys, reasoning aliased under every name templates read."""
    out = []
    for m in getattr(messages, "messages", messages):
        if callable(getattr(m, "model_dump", None)):
            m = m.model_dump()
        elif dataclasses.is_dataclass(m) and not isinstance(m, type):
            m = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
        if not isinstance(m, Mapping):
            raise ValueError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render(template: str, messages, special_tokens: Mapping[str, str], add_generation_prompt: bool = False,
           tools=None, documents=None, continue_final_message: bool = False,
           escape: Callable[[Any], Any] | None = None, tool_format: bool = False, **kwargs) -> str:
    """Render one conversation exactly as transformers' apply_chat_template(tokenize=False) does, including
    continue_final_message (the last message left open so generation continues it). `escape`, when given, is
    applied to the messages, tools and documents (the client's data) before rendering (see escape.py).
    tool_format=True (the engine's prompts) applies LFM2's tool format first (tools.py): assistant tool_calls as the
    model's call text, and the tool list and tool-response markers where the template does not write them."""
    if template is None:
        raise ValueError("this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)")
    msgs = normalize_messages(messages)
    if not msgs:
        raise ValueError("cannot apply the chat template to an empty conversation")
    if tools is not None:
        for t in tools:
            if not isinstance(t, Mapping):
                raise ValueError(f"tools must be JSON-schema dicts, got {type(t).__name__}")
    variables = {**special_tokens, **kwargs}
    msgs, tools, documents = plain(msgs), plain(tools), plain(documents)
    if escape is not None:
        msgs, tools, documents = escape(msgs), escape(tools), escape(documents)
    if tool_format and (tools or any(m.get("tool_calls") is not None or m.get("role") == "tool" for m in msgs)):
        # LFM2's tool format (tools.py), written after escaping so its markers are control tokens
        msgs, tools = lfm2_tools.prepare(compile_template(template), msgs, tools, special_tokens)
    if not continue_final_message:
        return run_template(compile_template(template), messages=msgs, tools=tools, documents=documents,
                            add_generation_prompt=add_generation_prompt, **plain(variables))
    # Leave the last message open for the model to continue: mark its text, render, cut at the mark.
    if add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    last = msgs[-1]
    content = last.get("content")
    if isinstance(content, str):
        final, last["content"] = content, content + _CONTINUE_TAG
    else:
        part = next((p for p in reversed(content or []) if isinstance(p, dict) and "text" in p), None)
        if part is None:
            raise ValueError("continue_final_message is set but the final message has no text to continue")
        final, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
    out = run_template(compile_template(template), messages=msgs, tools=tools, documents=documents,
                       add_generation_prompt=False, **plain(variables))
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in out or tag not in out:
        raise ValueError("continue_final_message is set but the template drops the final message's text")
    at = out.rindex(tag)
    return out[:at] if out[at: at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else out[:at].rstrip()


def assistant_spans(template: str, messages, special_tokens: Mapping[str, str], **kwargs) -> tuple[str, list]:
    """The full rendered conversation and the character spans of every assistant turn.

    A turn's span is what rendering messages[:i+1] adds after rendering messages[:i] with the generation prompt,
    without trailing whitespace: the reply and its end-of-turn token, not the role header. Works for any template
    that renders conversations as a growing prefix (the LFM2 templates do); otherwise it raises.
    """
    msgs = normalize_messages(messages)
    full = render(template, msgs, special_tokens, add_generation_prompt=False, **kwargs)
    spans = []
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        before = render(template, msgs[:i], special_tokens, add_generation_prompt=True, **kwargs) if i else ""
        upto = render(template, msgs[: i + 1], special_tokens, add_generation_prompt=False, **kwargs)
        if not upto.startswith(before) or not full.startswith(upto):
            raise ValueError("the chat template does not render the conversation as a growing prefix, so assistant "
                             f"turn {i} cannot be located for the loss mask")
        end = len(upto.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans
