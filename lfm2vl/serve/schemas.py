"""Pydantic models of the OpenAI chat-completions API subset lfm2vl serves.

Requests are validated here (types, ranges, n == 1, at most 4 stop strings, the shape of response_format and
tools); anything that fails becomes a 400 in OpenAI's error shape (errors.py). Types are strict, JSON's own: true is
no integer, "yes" no boolean, 5 no string. `user` (a string) is accepted and ignored, and so are unknown top-level
fields that OpenAI clients commonly send (`metadata`, `store`, ...); features lfm2vl does not have
(audio, n > 1, logit_bias) are refused clearly rather than silently ignored. Extras beyond OpenAI's fields use
vLLM's names (guided_json, guided_regex, guided_choice, guided_grammar, ...). Responses are plain dicts built in translate.py; their models live here only
for the OpenAPI schema.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lfm2vl.generate.sampling import SEED_RANGE
from lfm2vl.generate.stops import check_stops
from lfm2vl.processor.messages import check_text, content_problem
from lfm2vl.processor.tools import call_arguments, check_tools


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _utf8(s: str) -> str:
    """JSON admits lone surrogates (\\ud800) that no tokenizer can encode: refused here as a 400 naming the field,
    by the rule the engine applies to every message (processor/messages.py check_text)."""
    return check_text(s, "text")


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    _check = field_validator("text")(lambda cls, v: _utf8(v))


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_string(cls, v):
        return {"url": v} if isinstance(v, str) else v  # some clients send the URL itself


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, v):
        call_arguments(v, "arguments")  # the render's rule (processor/tools.py), checked before the request runs
        return v


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # `name` and friends are accepted and ignored
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        return _utf8(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _content(self):
        problem = content_problem(self.role, self.content)
        if problem is not None:
            raise ValueError(problem)
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are only allowed in assistant messages, not in {self.role} messages")
        if self.role != "user" and isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ValueError(f"image_url parts are only allowed in user messages, not in {self.role} messages")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # strict: JSON's own types only (true is no integer, "yes" no boolean); NaN / Infinity: "should be a finite number"
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    min_tokens: int | None = Field(default=None, ge=0)  # extra (vLLM's name): eos is ignored before this many
    # lfm2vl extras (vLLM spells them the same way)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_image_tokens: int | None = Field(default=None, ge=1)
    max_image_tokens: int | None = Field(default=None, ge=1)
    do_image_splitting: bool | None = None
    # tools (LFM2's tool-call format, processor/tools.py) and structured output (generate/constraints.py)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    guided_json: dict | str | None = None  # extras, vLLM's names: constrain the answer like response_format does
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # OpenAI features lfm2vl does not offer: accepted only when empty so that clients sending defaults still work
    logit_bias: dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    user: str | None = None  # OpenAI's end-user id: accepted and ignored

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v is not None and v != 1:
            raise ValueError(f"n={v} is not supported: lfm2vl returns exactly one choice per request (n must be 1)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = check_stops(v)  # the engine's rule: non-empty strings of valid Unicode
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        return v


    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v is not None:
            check_tools(v)  # ValueError naming tools[i]...
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is None:
            return v
        kind = v.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type={kind!r} is invalid; expected 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("type 'json_schema' needs json_schema: {'name': ..., 'schema': {...}}")
            for key, want, what in (("name", str, "a non-empty string naming the schema"),
                                    ("schema", dict, "a JSON schema object")):
                if not isinstance(spec.get(key), want) or not spec[key] and want is str:
                    got = f"is {spec[key]!r}" if key in spec else "is missing"
                    raise ValueError(f"json_schema.{key} {got}; expected {what}, as in json_schema: "
                                     "{'name': ..., 'schema': {...}}")
            for key, want in (("strict", bool), ("description", str)):
                if spec.get(key) is not None and not isinstance(spec[key], want):
                    raise ValueError(f"json_schema.{key} is {spec[key]!r}; expected a {want.__name__}")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("logit_bias", "audio"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by lfm2vl")
        if self.modalities and set(self.modalities) != {"text"}:
            raise ValueError("only the 'text' output modality is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.min_image_tokens and self.max_image_tokens and self.min_image_tokens > self.max_image_tokens:
            raise ValueError(f"min_image_tokens={self.min_image_tokens} exceeds max_image_tokens={self.max_image_tokens}")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: dict | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
