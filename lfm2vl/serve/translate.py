"""Translation between OpenAI's chat-completions JSON and the engine.

- `to_engine(body, policy, max_images, fetched)`: messages with text and image_url parts -> engine messages (images
  decoded to PIL, see media.py; remote images come already fetched, see `remote_images`) and engine options (OpenAI
  names -> engine names; unset fields keep the engine's defaults, which follow the model card);
- `completion(...)`, `chunk(...)`: response bodies exactly as OpenAI shapes them (usage, finish_reason, the
  streamed `chat.completion.chunk` objects and the final usage chunk).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lfm2vl.generate.constraints import Constraint
from lfm2vl.generate.toolcall import tool_options
from lfm2vl.processor.chat import check_role
from lfm2vl.processor.config import check_image_budget as budget_check

from .errors import APIError
from .media import MediaPolicy, decode_remote, is_remote, load_image
from .schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from lfm2vl.generate.request import Result

# OpenAI fields passed through unchanged when the client sets them: each is the engine option of the same name
# (tests/test_server_app.py checks them against generate/options.py ENGINE_OPTIONS)
_PASS_THROUGH = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "min_image_tokens", "max_image_tokens", "do_image_splitting")


def count_images(body: ChatCompletionRequest) -> int:
    return sum(1 for m in body.messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")


def check_image_budget(body: ChatCompletionRequest, ceiling: int) -> None:
    """The image-token knobs stay within the checkpoint's budget (processor/config.py check_image_budget): a 400
    naming the field, before any image is fetched or decoded."""
    for name in ("min_image_tokens", "max_image_tokens"):
        try:
            budget_check({name: getattr(body, name)}, ceiling)
        except ValueError as e:
            raise APIError(400, f"{e}.", param=name, code="invalid_value") from None


def check_image_count(body: ChatCompletionRequest, max_images: int) -> None:
    n_images = count_images(body)
    if n_images > max_images:
        raise APIError(400, f"The request has {n_images} images; this server accepts at most {max_images} per "
                            "request (--max-images).", param="messages", code="too_many_images")


def remote_images(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(where, url) of the http(s) image parts, `where` as to_engine names them."""
    return [(f"messages[{i}].content[{j}]", p.image_url.url) for i, m in enumerate(body.messages)
            if isinstance(m.content, list) for j, p in enumerate(m.content)
            if p.type == "image_url" and is_remote(p.image_url.url)]


def to_engine(body: ChatCompletionRequest, policy: MediaPolicy, max_images: int,
              fetched: dict | None = None) -> tuple[list[dict], dict]:
    """(engine messages, engine options). `fetched` holds the outcome of remote images fetched beforehand
    ({where: bytes or APIError}, see media.FetchPool); one not there is fetched here. Blocking (image decoding, maybe
    a fetch): run it in a worker thread."""
    check_image_count(body, max_images)
    fetched = fetched or {}
    messages = []
    for i, msg in enumerate(body.messages):
        role = check_role(msg.role, f"messages[{i}]")  # developer -> system
        extra = {}
        if msg.tool_calls:  # written back as the model's call text by the chat template render
            extra["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
        if msg.tool_call_id is not None:
            extra["tool_call_id"] = msg.tool_call_id
        if msg.content is None or isinstance(msg.content, str):
            messages.append({"role": role, "content": msg.content or "", **extra})
            continue
        if role != "user":  # text parts only (checked by the schema): the engine's templates expect a string
            messages.append({"role": role, "content": "".join(p.text for p in msg.content), **extra})
            continue
        parts = []
        for j, part in enumerate(msg.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                where = f"messages[{i}].content[{j}]"
                if where not in fetched:
                    image = load_image(part.image_url.url, policy, where)
                elif isinstance(fetched[where], APIError):
                    raise fetched[where]
                else:
                    image = decode_remote(fetched[where], policy, where)
                parts.append({"type": "image", "image": image})
        messages.append({"role": role, "content": parts})
    return messages, options(body)


def options(body: ChatCompletionRequest) -> dict:
    opts = {name: getattr(body, name) for name in _PASS_THROUGH if getattr(body, name) is not None}
    if body.stop is not None:
        opts["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if body.logprobs:
        opts["logprobs"] = True
        if body.top_logprobs:
            opts["top_logprobs"] = body.top_logprobs
    if body.min_tokens:
        opts["min_new_tokens"] = body.min_tokens
    opts.update(structured(body))
    return opts


def structured(body: ChatCompletionRequest) -> dict:
    """The engine options of response_format, the guided_* extras and the tools, checked here so that a bad one is
    a 400 naming its field (the engine compiles each grammar once: these checks fill its cache)."""
    given = {}  # field -> (engine option, value)
    rf = body.response_format or {}
    if rf.get("type") == "json_schema":
        given["response_format.json_schema.schema"] = ("json_schema", rf["json_schema"].get("schema", {}))
    elif rf.get("type") == "json_object":
        given["response_format"] = ("json_object", True)
    for name, option in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choices"),
                         ("guided_grammar", "grammar")):
        if getattr(body, name) is not None:
            given[name] = (option, getattr(body, name))
    if len(given) > 1:
        raise APIError(400, f"{' and '.join(given)} each constrain the answer; give one of them.",
                       param=list(given)[1], code="invalid_value")
    opts = {option: value for option, value in given.values()}
    for where, (option, value) in given.items():
        try:
            Constraint.from_options(**{option: value})
        except ValueError as e:
            raise APIError(400, f"{where} is invalid: {_detail(str(e), option)}", param=where,
                           code="invalid_value") from None
    tooling = {k: getattr(body, k) for k in ("tools", "tool_choice", "parallel_tool_calls")
               if getattr(body, k) is not None}
    if tooling:
        if body.tools is None and tooling.get("tool_choice") in ("none", None):
            return opts  # clients that send tool_choice "none" without tools
        try:
            _, forced, _ = tool_options(**tooling)
        except ValueError as e:
            param = "tool_choice" if str(e).startswith("tool_choice") else "tools"
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        if forced is not None and given:
            raise APIError(400, f"tool_choice={body.tool_choice!r} forces a tool call, which excludes "
                                f"{list(given)[0]}; give one of the two.", param="tool_choice", code="invalid_value")
        opts.update(tooling)
    return opts


def _detail(message: str, option: str) -> str:
    """The engine's reason without its own option name ("json_schema is invalid: X" -> "X")."""
    for lead in (f"{option} is invalid: ", f"{option}="):
        if message.startswith(lead) and lead.endswith(": "):
            return message[len(lead):]
    return message


def requested_max_tokens(body: ChatCompletionRequest) -> int | None:
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
          image_tokens: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    details = {}
    if cached_tokens is not None:  # prompt tokens whose cache was reused (OpenAI reports them the same way)
        details["cached_tokens"] = cached_tokens
    if image_tokens is not None:  # prompt tokens that carry image embeddings
        details["image_tokens"] = image_tokens
    if details:
        out["prompt_tokens_details"] = details
    return out


def timings(result: Result) -> dict:
    """How long the answer took, in llama.cpp's server field names (its web page and clients read them): the prompt
    tokens prefilled (cached ones not counted), their time and rate, the completion tokens, the decode time (first
    token to last) and rate (Result.decode_tps: the tokens after the first), and the time to the first token."""
    return {"prompt_n": result.prompt_tokens - result.cached_tokens, "prompt_ms": round(result.prefill_s * 1e3, 2),
            "prompt_per_second": round(result.prefill_tps, 2), "predicted_n": result.completion_tokens,
            "predicted_ms": round(result.decode_s * 1e3, 2), "predicted_per_second": round(result.decode_tps, 2),
            "ttft_ms": round(result.ttft_s * 1e3, 2)}


def logprob_entry(token_id: int, logprob: float, top: list[tuple[int, float]] | None, token_text) -> dict:
    """OpenAI's per-token logprobs item; `token_text(id)` decodes one token id."""
    def item(tid, lp):
        text = token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {**item(token_id, logprob), "top_logprobs": [item(t, lp) for t, lp in (top or [])]}


def logprobs_block(entries: list[dict] | None) -> dict | None:
    return None if entries is None else {"content": entries}


def completion(cid: str, created: int, model: str, text: str, finish_reason: str, use: dict,
               logprobs: list[dict] | None = None, tool_calls: list[dict] | None = None,
               timing: dict | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": logprobs_block(logprobs), "finish_reason": finish_reason}],
            "usage": use, "system_fingerprint": None, **({"timings": timing} if timing else {})}


def chunk(cid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          use: dict | None = None, with_usage_field: bool = False,
          logprobs: list[dict] | None = None, timing: dict | None = None) -> dict:
    """One `chat.completion.chunk`; delta None = the usage-only chunk (empty choices), as OpenAI sends it last;
    `timing` rides on the finish chunk (as llama.cpp's server sends it)."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None, "choices": []}
    if delta is not None:
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs_block(logprobs),
                           "finish_reason": finish_reason}]
    if with_usage_field or use is not None:
        out["usage"] = use  # null on every chunk but the last when include_usage is set
    if timing is not None:
        out["timings"] = timing
    return out
