"""image_url parts -> RGB PIL images, under the server's media policy.

Accepted sources:
- `data:image/{png,jpeg,webp,gif};base64,...` URLs (the common case for API clients);
- `http(s)://` URLs only when the server runs with `--allow-remote-images` (off by default). Then remote.py fetches
  them: only public addresses (checked after DNS, on the address actually connected to, again after every redirect),
  a byte limit, and one deadline covering DNS, connect, TLS, redirects and body. The server fetches them on a pool
  of its own (FetchPool), so a slow image server never holds the threads that serve other requests. Every failure
  of a remote image, whatever its cause (refused address, connection, HTTP status, time, size, not an image), is one
  uniform error, so a client learns nothing about the server's network; the reason goes to the server's log;
- local files (`file://` URLs or plain paths) only when `--allowed-media-dir` is set, and only inside it: the path is
  resolved with symlinks followed and must stay under the resolved folder.
Every image is checked for format (PNG, JPEG, WebP, GIF; GIF/animated: first frame) and pixel count before it is
decoded, so a decompression bomb is refused from its header (processor/io.py's decode_image_bytes, the engine's own
decoder, does both). Every failure is an APIError 400 naming the part
(`messages[i].content[j]`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from lfm2vl.processor.io import ImageFormatError, ImageTooLargeError, decode_image_bytes, error_detail

from . import remote
from .errors import APIError

log = logging.getLogger("lfm2vl.serve")

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
MIME_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}


@dataclass
class MediaPolicy:
    allow_remote: bool = False          # http(s) image URLs (--allow-remote-images)
    allowed_dir: str | None = None   # local files only under this folder; None = no local files
    max_bytes: int = 20 * 1024 * 1024  # per image, encoded
    max_pixels: int = 32 * 1024 * 1024  # per image, width * height
    fetch_timeout_s: float = 10.0  # one deadline for a request's remote images: DNS, connect, TLS, redirects, body
    fetch_workers: int = 16        # threads of the server's own fetch pool (remote images fetched at once)
    max_redirects: int = 5
    # networks whose addresses count as public: for tests that stand a local server in for an outside one; never
    # set from the command line or a request
    allowed_networks: tuple[str, ...] = ()


def load_image(url: str, policy: MediaPolicy, where: str) -> Image.Image:
    """Resolve one image_url to an RGB image; `where` (e.g. 'messages[0].content[1]') names the part in errors."""
    scheme = _scheme(url)
    if scheme == "data":
        data = _from_data_url(url, policy, where)
    elif scheme in ("http", "https"):
        return decode_remote(fetch_remote(url, policy, where), policy, where)
    elif scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        data = _read_local(url, policy, where)
    else:
        raise APIError(400, f"{where}: unsupported image URL scheme {scheme!r}; use a data: URL, http(s) or a "
                            "local path under --allowed-media-dir.", param=where, code="invalid_image_url")
    return decode_image(data, policy, where)


def decode_image(data: bytes, policy: MediaPolicy, where: str) -> Image.Image:
    """Image bytes -> RGB image, under the policy's formats and pixel limit (processor/io.py's decoder, which checks
    both from the header before decoding); a refusal is an APIError 400 naming the part."""
    try:
        return decode_image_bytes(data, max_pixels=policy.max_pixels, formats=FORMATS).convert("RGB")
    except ImageFormatError as e:
        raise APIError(400, f"{where}: {e}.", param=where, code="invalid_image_format") from None
    except ImageTooLargeError as e:
        raise APIError(400, f"{where}: {_sentence(e)}", param=where, code="image_too_large") from None
    except ValueError as e:
        raise APIError(400, f"{where}: the image could not be decoded: {_sentence(e)}", param=where,
                       code="invalid_image") from None
    except Exception as e:  # the RGB conversion of a damaged image
        raise APIError(400, f"{where}: the image could not be decoded{error_detail(e)}.",
                       param=where, code="invalid_image") from None


def _sentence(e: Exception) -> str:
    """The message ending in one full stop (PIL's own messages bring theirs)."""
    return str(e).rstrip(".") + "."


def _from_data_url(url: str, policy: MediaPolicy, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise APIError(400, f"{where}: malformed data URL (no comma).", param=where, code="invalid_image_url")
    meta = head[5:].split(";")
    mime = meta[0].strip().lower()
    if mime not in MIME_TYPES:
        raise APIError(400, f"{where}: data URL media type {mime or '(none)'!r} is not an accepted image type "
                            f"({', '.join(sorted(MIME_TYPES))}).", param=where, code="invalid_image_format")
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise APIError(400, f"{where}: only base64 data URLs are accepted (data:{mime};base64,...).",
                       param=where, code="invalid_image_url")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise APIError(400, f"{where}: image data is about {len(payload) * 3 // 4} bytes, over the limit of "
                            f"{policy.max_bytes}.", param=where, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: the data URL is not valid base64 ({e}).", param=where,
                       code="invalid_image") from None


def _scheme(url: str) -> str:
    return urllib.parse.urlsplit(url).scheme.lower() if ":" in url[:12] else ""


def is_remote(url: str) -> bool:
    return _scheme(url) in ("http", "https")


def fetch_remote(url: str, policy: MediaPolicy, where: str, deadline: float | None = None) -> bytes:
    """The bytes behind an http(s) image URL; any failure is the one uniform APIError, its reason logged here."""
    if not policy.allow_remote:
        raise APIError(400, f"{where}: remote image URLs are disabled on this server; send the image as a data: URL, "
                            "or start the server with --allow-remote-images.", param=where,
                       code="remote_images_disabled")
    if deadline is None:
        deadline = time.monotonic() + policy.fetch_timeout_s
    try:
        return remote.fetch(url, deadline=deadline, max_bytes=policy.max_bytes, max_redirects=policy.max_redirects,
                            allowed_networks=policy.allowed_networks)
    except remote.FetchError as e:
        log.warning("%s: image URL not fetched: %s", where, e)
        raise fetch_failed(where) from None
    except Exception:  # not foreseen: the client still learns nothing, the log gets the traceback
        log.warning("%s: image URL not fetched", where, exc_info=True)
        raise fetch_failed(where) from None


def decode_remote(data: bytes, policy: MediaPolicy, where: str) -> Image.Image:
    """decode_image for fetched bytes: a refusal is the uniform fetch error too (its reason logged here)."""
    try:
        return decode_image(data, policy, where)
    except APIError as e:
        log.warning("%s: fetched image refused: %s", where, e.message)
        raise fetch_failed(where) from None


def fetch_failed(where: str) -> APIError:
    """The one error for every failed remote image, so a client learns nothing about what the server can reach."""
    return APIError(400, f"{where}: the image URL could not be fetched.", param=where, code="image_fetch_failed")


class FetchPool:
    """Fetches the remote images of requests on threads of its own (`policy.fetch_workers`), so slow image servers
    never hold the threads that serve other requests. One deadline per request covers its images, from the moment
    they are queued."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy
        self._pool = ThreadPoolExecutor(max_workers=policy.fetch_workers, thread_name_prefix="lfm2vl-fetch")

    async def fetch_all(self, parts: list[tuple[str, str]]) -> dict[str, bytes | APIError]:
        """{where: bytes or the APIError to raise} for (where, url) pairs; nothing is fetched when remote images are
        off (load_image then refuses them in order)."""
        if not parts or not self.policy.allow_remote:
            return {}
        deadline = time.monotonic() + self.policy.fetch_timeout_s
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(self._pool, self._outcome, url, where, deadline)
                                         for where, url in parts))
        return {where: result for (where, _), result in zip(parts, results)}

    def _outcome(self, url: str, where: str, deadline: float) -> bytes | APIError:
        try:
            return fetch_remote(url, self.policy, where, deadline)
        except APIError as e:
            return e

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read_local(url: str, policy: MediaPolicy, where: str) -> bytes:
    if policy.allowed_dir is None:
        raise APIError(400, f"{where}: local image paths are disabled; start the server with --allowed-media-dir "
                            "DIR to allow files under DIR, or send a data: URL.", param=where,
                       code="local_images_disabled")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.lower().startswith("file:") else url
    root = os.path.realpath(policy.allowed_dir)
    real = os.path.realpath(os.path.join(root, path))  # an absolute `path` replaces root in the join
    if os.path.commonpath([real, root]) != root:
        raise APIError(400, f"{where}: the path is outside the allowed media folder.", param=where,
                       code="path_not_allowed")
    if not os.path.isfile(real):
        raise APIError(400, f"{where}: no such image file under the allowed media folder.", param=where,
                       code="invalid_image_url")
    size = os.path.getsize(real)
    if size > policy.max_bytes:
        raise APIError(400, f"{where}: image file is {size} bytes, over the limit of {policy.max_bytes}.",
                       param=where, code="image_too_large")
    with open(real, "rb") as f:
        return f.read()
