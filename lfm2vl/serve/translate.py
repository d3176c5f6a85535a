"""Translation between OpenAI's chat-completions JSON and the engine.

- `to_engine(body, policy, max_images, fetched)`: messages with text and image_url parts -> engine messages (images
  decoded to PIL, see media.py; remote images come already fetched, see `remote_images`) and engine options (OpenAI
  names -> engine names; unset fields keep the engine's defaults, which follow the model card);
- `completion(...)`, `chunk(...)`: response bodies exactly as OpenAI shapes them (usage, finish_reason, the
  streamed `chat.completion.chunk` objects and the final usage chunk).
"""
from __future__ import annotations

from lfm2vl.processor.chat import check_role

from .errors import APIError
from .media import MediaPolicy, decode_remote, is_remote, load_image
from .schemas import ChatCompletionRequest

# OpenAI fields passed through unchanged when the client sets them: each is the engine option of the same name
# (tests/test_server_app.py checks them against generate/options.py ENGINE_OPTIONS)
_PASS_THROUGH = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "min_image_tokens", "max_image_tokens", "do_image_splitting")


def count_images(body: ChatCompletionRequest) -> int:
    return sum(1 for m in body.messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")


def check_image_budget(body: ChatCompletionRequest, ceiling: int) -> None:
    """The image-token knobs stay within the checkpoint's budget: beyond it, padding and vision work grow with the
    number asked for, not with the image, so one request could take the server's memory."""
    for name in ("min_image_tokens", "max_image_tokens"):
        value = getattr(body, name)
        if value is not None and not 1 <= value <= ceiling:
            raise APIError(400, f"{name}={value} is out of range: this model takes 1 to {ceiling} image tokens per "
                                "image or tile.", param=name, code="invalid_value")


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
        if msg.content is None or isinstance(msg.content, str):
            messages.append({"role": role, "content": msg.content or ""})
            continue
        if role != "user":  # text parts only (checked by the schema): the engine's templates expect a string
            messages.append({"role": role, "content": "".join(p.text for p in msg.content)})
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
    return opts


def requested_max_tokens(body: ChatCompletionRequest) -> int | None:
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:  # prompt tokens whose cache was reused (OpenAI reports them the same way)
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def logprob_entry(token_id: int, logprob: float, top: list[tuple[int, float]] | None, token_text) -> dict:
    """OpenAI's per-token logprobs item; `token_text(id)` decodes one token id."""
    def item(tid, lp):
        text = token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {**item(token_id, logprob), "top_logprobs": [item(t, lp) for t, lp in (top or [])]}


def logprobs_block(entries: list[dict] | None) -> dict | None:
    return None if entries is None else {"content": entries}


def completion(cid: str, created: int, model: str, text: str, finish_reason: str, use: dict,
               logprobs: list[dict] | None = None) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs_block(logprobs), "finish_reason": finish_reason}],
            "usage": use, "system_fingerprint": None}


def chunk(cid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          use: dict | None = None, with_usage_field: bool = False,
          logprobs: list[dict] | None = None) -> dict:
    """One `chat.completion.chunk`; delta None = the usage-only chunk (empty choices), as OpenAI sends it last."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None, "choices": []}
    if delta is not None:
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs_block(logprobs),
                           "finish_reason": finish_reason}]
    if with_usage_field or use is not None:
        out["usage"] = use  # null on every chunk but the last when include_usage is set
    return out
