"""What one `lfm2vl serve` allows and answers with: the settings the routes, the page and the guard read."""
from __future__ import annotations

from dataclasses import dataclass, field

from .media import MediaPolicy


@dataclass
class ServerSettings:
    model_id: str                       # the name clients put in "model"
    aliases: tuple[str, ...] = ()        # other accepted names (e.g. the --model path as typed)
    api_key: str | None = None           # None or "" = no key
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 8
    default_max_tokens: int = 1024       # when the client sets neither max_tokens nor max_completion_tokens
    context_len: int = 4096              # prompt + completion tokens per request (the cache row length)
    max_image_tokens: int = 256          # ceiling of the per-request image-token knobs: the checkpoint's own budget
    min_image_tokens: int = 1            # the checkpoint's own floor (the page keeps min <= max)
    ui: bool = True                      # the chat page at / (page.py)
    media: MediaPolicy = field(default_factory=MediaPolicy)
