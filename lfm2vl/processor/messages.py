"""Messages: what lfm2vl accepts as a conversation, normalised in one place.

A conversation is a prompt string or a list of {"role", "content"} dicts in the OpenAI / transformers format:
content is a string or a list of parts {"type": "text"}, {"type": "image", "image" | "url" | "path" | "base64": ...}
or {"type": "image_url", "image_url": {"url": ...}}; roles as in chat.py ROLES. `to_messages` turns one into
messages whose image parts are {"type": "image"} plus the images in order (the engine, the CLI and, through the
engine, the server use it); `collect_images` is the processor's lenient reading of image parts for
apply_chat_template(tokenize=True) and render_for_training. `normalize` is to_messages plus where each image came
from, so that an image that fails to load is named by its place. The rules every caller shares (the server's
request models too) live here: text is valid Unicode (`check_text`), and only an assistant message may go without
content (`content_problem`). Nothing here needs a model.
"""
from __future__ import annotations

from typing import NamedTuple

from lfm2vl.files import jsontext
from lfm2vl.processor import chat

# The keys of an {"type": "image"} part that hold its image, in the order they are looked up.
IMAGE_KEYS = ("image", "url", "path", "base64")
_TAKE = object()  # marks an image part without an image, filled from to_messages' `images`


class Conversation(NamedTuple):
    """A normalised conversation: messages whose image parts are {"type": "image"}, their images in order, and
    where each image came from, for error messages: its number among several and its part ("image 2 of 3
    (messages[0].content[1])", "image 2 of 3" for an `images` argument, "messages[0].content[0]" for a single
    one; None for the single image of an `images` argument)."""
    messages: list[dict]
    images: list
    places: list


def check_text(text: str, where: str) -> str:
    """`text` if every character of it can be encoded: JSON escapes and undecodable bytes (a non-UTF-8 terminal or
    file read with surrogateescape) give lone surrogates that no tokenizer can encode. A ValueError naming `where`
    otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} has an unpaired surrogate at index {e.start} and is not valid Unicode (text "
                         "that was not UTF-8?)") from None
    return text


def content_problem(role: str, content) -> str | None:
    """Why a message's content is unacceptable as such (None: it is fine): only an assistant message (one that
    holds tool calls, say) may go without content."""
    if content is None and role != "assistant":
        return f"a {role} message needs content"
    return None


def image_list(images) -> list:
    """An `images` argument (None, one image, or a list or tuple of them) -> a list."""
    return [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])


def part_image(part: dict):
    """The image an {"type": "image"} part holds (the first of IMAGE_KEYS that is set), or None."""
    return next((part[k] for k in IMAGE_KEYS if part.get(k) is not None), None)


def collect_images(messages) -> list:
    """Images of a conversation in order, from content parts {"type": "image", "image"|"url"|"path": ...}."""
    out = []
    for m in chat.normalize_messages(messages):
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    src = part_image(part)
                    if src is not None:
                        out.append(src)
    return out


def is_batch(messages) -> bool:
    """A list of conversations (lists of messages) or of prompt strings."""
    return isinstance(messages, (list, tuple)) and len(messages) > 0 and all(
        isinstance(m, (list, tuple, str)) for m in messages)


def to_messages(messages, images=None) -> tuple[list[dict], list]:
    """normalize without the places: (messages, images)."""
    return normalize(messages, images)[:2]


def normalize(messages, images=None) -> Conversation:
    """Normalise a prompt string or a message list -> (messages whose image parts are {"type": "image"}, images in
    order). `images` given with a prompt string go before its text; given with messages whose image parts have no
    image (TRL's dataset layout), they fill those parts in order; given with messages that have no image parts,
    they go at the start of the last user message. Roles are checked (processor/chat.py check_role: developer
    becomes system); every malformed message or part is a ValueError naming it (messages[i].content[j]), and so
    is text that is not valid Unicode (check_text) and a message without content that needs some
    (content_problem), and so is a field nested more than jsontext.MAX_DEPTH levels (templates recurse per
    level)."""
    extra = image_list(images)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": check_text(messages, "the prompt")}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a prompt string or a non-empty list of {'role', 'content'} dicts")
    out, found, places = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
        for k, v in m.items():
            jsontext.check_depth(v, f"messages[{i}].{k}")
        role = chat.check_role(m["role"], f"messages[{i}]")
        content = m.get("content")
        problem = content_problem(role, content)
        if problem is not None:
            raise ValueError(f"messages[{i}] has no content: {problem} (a string or a list of parts)")
        if content is None or isinstance(content, str):
            out.append({**m, "role": role, "content": check_text(content or "", f"messages[{i}].content")})
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got "
                             f"{type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, str):
                parts.append({"type": "text", "text": check_text(part, where)})
                continue
            if not isinstance(part, dict):
                raise ValueError(f"{where} must be a string or a dict part like {{'type': 'text', 'text': ...}}, "
                                 f"got {type(part).__name__}")
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{where} is a text part whose 'text' must be a string, got "
                                     f"{type(text).__name__}")
                parts.append({"type": "text", "text": check_text(text, f"{where}.text")})
            elif kind == "image" and part_image(part) is None and extra:
                found.append(_TAKE)  # a placeholder (TRL's layout): takes the next of `images`
                places.append(where)
                parts.append({"type": "image"})
            elif kind in ("image", "image_url"):
                found.append(image_source(part, where))
                places.append(where)
                parts.append({"type": "image"})
            elif "type" not in part:
                raise ValueError(f"{where} has no 'type'; expected 'text', 'image' or 'image_url'")
            else:
                raise ValueError(f"{where} has type {kind!r}; expected 'text', 'image' or 'image_url'")
        out.append({**m, "role": role, "content": parts})
    if _TAKE in found:
        n = found.count(_TAKE)
        if n != len(extra):
            raise ValueError(f"the messages have {n} image parts without an image but {len(extra)} images were "
                             "given to fill them")
        it = iter(extra)
        return Conversation(out, [next(it) if src is _TAKE else src for src in found], _numbered(places))
    if extra:
        if found:
            raise ValueError("images were passed both inside the messages and as `images`; use one of the two")
        users = [i for i, m in enumerate(out) if m["role"] == "user"]
        if not users:
            raise ValueError("`images` needs a user message to attach to")
        last = out[users[-1]]
        text = last["content"] if isinstance(last["content"], str) else None
        parts = [{"type": "image"} for _ in extra]
        parts += [{"type": "text", "text": text}] if text is not None else list(last["content"])
        out[users[-1]] = {**last, "content": parts}
        found = extra
        places = [None] * len(extra)
    return Conversation(out, found, _numbered(places))


def _numbered(places: list) -> list:
    """Each image's place with its number among several: "image 2 of 3 (messages[0].content[1])"."""
    if len(places) < 2:
        return places
    return [f"image {k + 1} of {len(places)}" + (f" ({p})" if p else "") for k, p in enumerate(places)]


def text_chars(messages: list[dict]) -> int:
    """Characters of text in normalised messages (string contents and text parts)."""
    n = 0
    for m in messages:
        content = m["content"]
        n += len(content) if isinstance(content, str) else sum(len(p.get("text", "")) for p in content)
    return n


def conversation(messages, images=None, continue_final_message: bool = False) -> tuple[list[dict], list]:
    """checked_conversation without the places: (messages, images)."""
    return checked_conversation(messages, images, continue_final_message)[:2]


def checked_conversation(messages, images=None, continue_final_message: bool = False) -> Conversation:
    """normalize, plus the check that a conversation to continue ends with an assistant message. Needs no
    model: the CLI runs it before loading one."""
    conv = normalize(messages, images)
    if continue_final_message and conv.messages[-1]["role"] != "assistant":
        raise ValueError(f"continue_final_message=True continues the final assistant message, but the "
                         f"conversation ends with a {conv.messages[-1]['role']} message")
    return conv


def image_source(part: dict, where: str):
    """The image of an image or image_url part; a part without one is a ValueError naming it (`where`)."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url  # some clients send the URL itself
        if not url:
            raise ValueError(f"{where} is an image_url part without a url; expected "
                             "{'type': 'image_url', 'image_url': {'url': ...}}")
        if not isinstance(url, str):
            raise ValueError(f"{where} has an image_url whose url must be a string, got {type(url).__name__}")
        return check_text(url, f"{where}.image_url.url")
    src = part_image(part)
    if src is None:
        raise ValueError(f"{where} is an image part without an image; give one of {IMAGE_KEYS}")
    return src
