"""Image loading: whatever a user has (PIL, numpy, torch, path, URL, data: URI, base64, raw bytes) -> uint8 RGB.

Output is always a uint8 torch tensor (3, H, W); it may be a channels-last view of an (H, W, 3) buffer, which
the resize kernel reads without a transposing copy. Files are opened the way transformers' `load_image`
does (EXIF orientation applied); PIL images, arrays and tensors are taken as given (transformers does not
transpose them either). Every mode becomes RGB; alpha is composited onto white, as transformers'
`convert_to_rgb` does. Deliberate differences, each a case where the reference gives garbage or crashes:
16-bit images are scaled to 8 bits (PIL's convert clips them to 255), float arrays are read as [0, 1]. For file
paths transformers decodes with torchvision, which drops alpha instead of compositing it; we composite on white for
every input kind, so a transparent PNG gives the same pixels as a path, as bytes, or as a PIL image. Opaque RGB
files (PNG, JPEG, EXIF-rotated JPEG) decode identically (tests/test_processor_parity.py).

Encoded bytes (files, URLs, data: URIs, base64, raw bytes) are decoded by `decode_image_bytes`, the one decoder
of image files in lfm2vl: the server's image_url parts go through it too (serve/media.py, with its own formats and
pixel limit). It checks format and pixel count from the header before decoding, so a decompression bomb is refused
unread.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.request
import warnings
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Same default as PIL: larger images are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
URL_TIMEOUT_S = 30.0


def load_image(image, max_pixels: int | None = None) -> torch.Tensor:
    """Any supported image input -> uint8 (3, H, W) RGB tensor. Raises ValueError with the reason otherwise; an
    encoded image is named by its path or URL (or as raw bytes / base64 data), never by a Python object."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(image, Image.Image):
        out = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        out = _array_to_rgb(_numpy_to_torch(image))
    elif isinstance(image, torch.Tensor):
        if image.is_meta or image.layout != torch.strided:
            raise ValueError(f"an image tensor must hold its values in dense memory; got a "
                             f"{'meta-device' if image.is_meta else str(image.layout)} tensor")
        out = _array_to_rgb(image.detach().cpu())
    elif isinstance(image, (bytes, bytearray, memoryview)):
        out = _decoded(decode_image_bytes(bytes(image), "raw bytes", limit), "raw bytes")
    elif isinstance(image, (str, os.PathLike)):
        out = _decoded(*_open_source(image, limit))
    else:
        raise ValueError(f"unsupported image input of type {type(image).__name__}: expected a PIL image, numpy "
                         "array, torch tensor, path, URL, data: URI, base64 string or raw bytes")
    if out.shape[1] == 0 or out.shape[2] == 0:
        raise ValueError(f"zero-sized image ({out.shape[2]}x{out.shape[1]} pixels)")
    if out.shape[1] * out.shape[2] > limit:
        raise ValueError(f"image of {out.shape[2]}x{out.shape[1]} pixels exceeds the limit of {limit} pixels "
                         "(possible decompression bomb)")
    return out


def _open_source(src, limit: int) -> tuple[Image.Image, str]:
    """A path, URL, data: URI or base64 string -> (opened image, its name for errors)."""
    s = os.fspath(src)
    if not s.strip():
        raise ValueError("the image path is empty")
    if s.startswith(("http://", "https://")):
        return decode_image_bytes(fetch_url(s), s, limit), s
    if isinstance(src, Path) or os.path.isfile(s) or os.path.isdir(s):
        if os.path.isdir(s):
            raise ValueError(f"{s} is a folder, not an image file")
        if not os.path.isfile(s):
            raise ValueError(f"image file not found: {s}")
        return decode_image_bytes(Path(s).read_bytes(), s, limit), s
    if s.startswith("data:"):
        head, comma, payload = s.partition(",")
        if not comma or "base64" not in (m.strip().lower() for m in head[5:].split(";")[1:]):
            raise ValueError(f"the data: URI {s[:40]!r}... is not base64 data: expected "
                             "'data:<type>;base64,<payload>'")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"the data: URI's base64 payload is invalid ({e}): {payload[:40]!r}") from None
        if not data:
            raise ValueError("the data: URI's base64 payload is empty")
        return decode_image_bytes(data, "data URI", limit), "data URI"
    what = (f"image string {s[:80]!r} is not an existing file, an http(s) URL or a data: URI, and not base64 data "
            "of a supported image")
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(what) from e
    try:
        return decode_image_bytes(data, "base64 string", limit), "base64 string"
    except (ImageFormatError, ImageTooLargeError):
        raise
    except ValueError as e:
        raise ValueError(f"{what} ({e})") from None


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S) -> bytes:
    """The bytes at an http(s) URL; an unreachable URL or a timeout is a ValueError naming it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (OSError, ValueError) as e:
        raise ValueError(f"could not fetch image URL {url!r}: {e}") from e


class ImageFormatError(ValueError):
    """Encoded image bytes in a format the caller does not accept."""


class ImageTooLargeError(ValueError):
    """An image over the pixel limit, refused from its header before its pixels are decoded (a possible
    decompression bomb)."""


def decode_image_bytes(data: bytes, name: str | None = None, max_pixels: int | None = None,
                       formats: Collection[str] | None = None) -> Image.Image:
    """Encoded image bytes -> the decoded PIL image (its first frame), in the file's own mode.

    Checked from the header before any pixel is decoded: the format (one of `formats`, PIL's names such as "PNG";
    None: any PIL reads), the pixel count (at most `max_pixels`, default MAX_IMAGE_PIXELS) and a non-empty size.
    Conversion to RGB is the caller's: load_image applies EXIF orientation and composites alpha on white. Raises
    ImageFormatError, ImageTooLargeError, or ValueError for empty, unreadable or truncated data; `name` (a path,
    URL, "raw bytes", ...) names the image in the message."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    image, at = (f"image {name}", f": {name}") if name else ("image", "")
    if not data:
        raise ValueError(f"empty image file{at}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below decides
            im = Image.open(io.BytesIO(data))  # lazy: only the header is read here
    except Image.DecompressionBombError as e:  # PIL's own guard, for sizes far over its default limit
        raise ImageTooLargeError(f"{image} is too large (possible decompression bomb): {e}") from e
    except UnidentifiedImageError as e:  # its message shows the BytesIO object, not the image
        raise ValueError(f"unsupported or corrupt image format{at}") from e
    except Exception as e:  # decoders of damaged headers raise OSError, SyntaxError, struct.error, ...
        raise ValueError(f"unsupported or corrupt image file{at}{error_detail(e)}") from e
    if formats is not None and im.format not in formats:
        raise ImageFormatError(f"{image} is in format {im.format}, not one of {', '.join(sorted(formats))}")
    w, h = im.size
    if w * h > limit:
        raise ImageTooLargeError(f"{image} is {w}x{h} = {w * h} pixels, over the limit of {limit} "
                                 "(possible decompression bomb)")
    if w < 1 or h < 1:
        raise ValueError(f"{image} has an empty size {w}x{h}")
    try:
        im.seek(0)  # animated GIF/WebP: the first frame
        im.load()
    except Exception as e:
        raise ValueError(f"truncated or corrupt image file{at}{error_detail(e)}") from e
    return im


def error_detail(e: Exception) -> str:
    """ " (the decoder's message)", without object reprs such as <_io.BytesIO object at 0x...>."""
    msg = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip()
    return f" ({msg})" if msg else ""


def _decoded(im: Image.Image, name: str) -> torch.Tensor:
    """An opened file's pixels as RGB, EXIF orientation applied; a decoder failure names the image."""
    try:
        return _pil_to_rgb(im, exif=True)
    except ValueError as e:
        raise ValueError(f"image {name}: {e}") from e
    except Exception as e:
        raise ValueError(f"truncated or corrupt image file: {name}{error_detail(e)}") from e


def _pil_to_rgb(im: Image.Image, exif: bool = False) -> torch.Tensor:
    if exif:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "I" and a.max(initial=0) <= 255:
            a8 = a  # 8-bit data stored as 32-bit ints
        else:
            a8 = np.clip(a, 0, 65535) / 257.0
        return _array_to_rgb(torch.from_numpy(np.rint(a8).astype(np.uint8)))
    if im.mode == "F":
        return _array_to_rgb(torch.from_numpy(np.array(im, dtype=np.float32)))  # a copy: PIL's buffer is read-only
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # one copy, writable
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _numpy_to_torch(a: np.ndarray) -> torch.Tensor:
    """A numpy image -> a tensor over its values (copied where the array is not contiguous or not writable, which
    torch cannot share); dtypes other than bool, integers and reals are a ValueError."""
    if a.dtype.kind not in "biuf":
        raise ValueError(f"an image array of dtype {a.dtype} is not supported: expected bool, integer or real "
                         "float values")
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    try:
        return torch.from_numpy(a)
    except TypeError as e:  # a numpy dtype torch has no counterpart of
        raise ValueError(f"an image array of dtype {a.dtype} is not supported ({e})") from None


def _array_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(H, W), (H, W, C) or (C, H, W) with C in 1..4 -> uint8 (3, H, W). The channel axis is inferred as
    transformers does: first if it has 1, 3 or 4 entries, else last."""
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"an image array needs 2 or 3 dimensions, got shape {tuple(x.shape)}")
    if x.shape[0] in (1, 3, 4):
        pass
    elif x.shape[-1] in (1, 2, 3, 4):
        x = x.permute(2, 0, 1)
    elif x.shape[0] == 2:
        pass
    else:
        raise ValueError(f"cannot find the channel axis of an image of shape {tuple(x.shape)} (expected 1-4 channels)")
    x = _to_uint8(x)
    c = x.shape[0]
    if c in (2, 4):  # alpha over white, with torchvision's float math so arrays match transformers exactly
        f = x.to(torch.float32) * (1.0 / 255)
        color, alpha = f[:-1], f[-1:]
        x = (color * alpha + (1 - alpha)).mul(256.0 - 1e-3).to(torch.uint8)
        c -= 1
    if c == 1:
        x = x.expand(3, -1, -1)
    return x


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    if x.is_complex():
        raise ValueError(f"an image of complex values ({x.dtype}) is not supported: expected real values")
    if x.is_floating_point():
        if x.numel() and x.isnan().any():
            raise ValueError("float image values must lie in [0, 1], got NaN")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"float image values must lie in [0, 1], got [{x.min().item()}, {x.max().item()}]")
        return (x.to(torch.float64) * 255).round().to(torch.uint8)
    if x.dtype in (torch.uint16, torch.int32, torch.int64, torch.int16) and x.numel() and x.max() > 255:
        return (x.to(torch.float64).clamp(0, 65535) / 257.0).round().to(torch.uint8)
    if x.numel() and x.min() < 0:
        raise ValueError("integer image values must be non-negative")
    return x.to(torch.uint8)
