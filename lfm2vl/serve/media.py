"""image_url parts -> RGB PIL images, under the server's media policy.

Accepted sources:
- `data:image/{png,jpeg,webp,gif};base64,...` URLs (the common case for API clients);
- `http(s)://` URLs, fetched with a byte limit and a total time limit (off with `--no-remote-images`); only http(s)
  handlers are installed, so a redirect cannot reach file:// or ftp://;
- local files (`file://` URLs or plain paths) only when `--allowed-media-dir` is set, and only inside it: the path is
  resolved with symlinks followed and must stay under the resolved folder.
Every image is checked for format (PNG, JPEG, WebP, GIF; GIF/animated: first frame) and pixel count before it is
decoded, so a decompression bomb is refused from its header. Every failure is an APIError 400 naming the part
(`messages[i].content[j]`).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

from .errors import APIError

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
MIME_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}


@dataclass
class MediaPolicy:
    allow_remote: bool = True
    allowed_dir: str | None = None   # local files only under this folder; None = no local files
    max_bytes: int = 20 * 1024 * 1024  # per image, encoded
    max_pixels: int = 32 * 1024 * 1024  # per image, width * height
    fetch_timeout_s: float = 10.0  # total time for one remote fetch


def load_image(url: str, policy: MediaPolicy, where: str) -> Image.Image:
    """Resolve one image_url to an RGB image; `where` (e.g. 'messages[0].content[1]') names the part in errors."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _from_data_url(url, policy, where)
    elif scheme in ("http", "https"):
        data = _fetch(url, policy, where)
    elif scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        data = _read_local(url, policy, where)
    else:
        raise APIError(400, f"{where}: unsupported image URL scheme {scheme!r}; use a data: URL, http(s) or a "
                            "local path under --allowed-media-dir.", param=where, code="invalid_image_url")
    return decode_image(data, policy, where)


def decode_image(data: bytes, policy: MediaPolicy, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt not in FORMATS:
            raise APIError(400, f"{where}: image format {fmt} is not supported (PNG, JPEG, WebP or GIF).",
                           param=where, code="invalid_image_format")
        w, h = img.size
        if w * h > policy.max_pixels:
            raise APIError(400, f"{where}: image is {w}x{h} = {w * h} pixels, over the limit of {policy.max_pixels}.",
                           param=where, code="image_too_large")
        if w < 1 or h < 1:
            raise APIError(400, f"{where}: image has an empty size {w}x{h}.", param=where, code="invalid_image")
        img.seek(0)  # animated GIF/WebP: the first frame
        img.load()
        return img.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard fires in open() for extreme sizes
        raise APIError(400, f"{where}: image is too large to decode ({e}).", param=where,
                       code="image_too_large") from None
    except Exception as e:  # decoders of damaged files raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise APIError(400, f"{where}: the image could not be decoded ({type(e).__name__}: {e}).",
                       param=where, code="invalid_image") from None


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


def _opener() -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _fetch(url: str, policy: MediaPolicy, where: str) -> bytes:
    if not policy.allow_remote:
        raise APIError(400, f"{where}: remote image URLs are disabled on this server (--no-remote-images); send the "
                            "image as a data: URL.", param=where, code="remote_images_disabled")
    deadline = time.monotonic() + policy.fetch_timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "lfm2vl-server", "Accept": "image/*"})
    try:
        with _opener().open(request, timeout=policy.fetch_timeout_s) as resp:
            size = resp.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > policy.max_bytes:
                raise APIError(400, f"{where}: remote image is {size} bytes, over the limit of {policy.max_bytes}.",
                               param=where, code="image_too_large")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise APIError(400, f"{where}: fetching the image took longer than {policy.fetch_timeout_s:g} s.",
                                   param=where, code="image_fetch_timeout")
                chunk = resp.read1(65536)  # returns what has arrived, so a trickling server meets the deadline
                if not chunk:
                    break
                total += len(chunk)
                if total > policy.max_bytes:
                    raise APIError(400, f"{where}: remote image is over the limit of {policy.max_bytes} bytes.",
                                   param=where, code="image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except APIError:
        raise
    except urllib.error.HTTPError as e:
        raise APIError(400, f"{where}: fetching the image failed with HTTP {e.code}.", param=where,
                       code="image_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
            raise APIError(400, f"{where}: fetching the image took longer than {policy.fetch_timeout_s:g} s.",
                           param=where, code="image_fetch_timeout") from None
        raise APIError(400, f"{where}: the image could not be fetched ({reason}).", param=where,
                       code="image_fetch_failed") from None


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
