"""Image side of the LFM2-VL processor: size rules, tile grid, uint8 resize, patchify.

Every function mirrors one step of transformers' `Lfm2VlImageProcessor` (torchvision backend) and is pure:
it takes sizes or a uint8 (3, H, W) tensor and returns sizes or tensors. `plan_image` decides the layout of one
image (single unit, or a grid of tiles plus an optional thumbnail); `image_units` produces the uint8 units;
`patchify_into` turns them into the padded patch rows the vision tower reads.
"""
from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

# PIL resampling codes -> torch interpolate modes. torchvision maps PIL NEAREST to "nearest-exact".
RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def round_by_factor(n: float, factor: int) -> int:
    """Closest multiple of `factor`; Python's round, so halves go to even (400/32 = 12.5 -> 12 -> 384)."""
    return round(n / factor) * factor


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(new_h, new_w): multiples of `factor` with min_pixels <= area <= max_pixels, aspect kept.

    Mirrors `Lfm2VlImageProcessor.smart_resize` (which returns (w, h); we return (h, w)): round first; if the area is
    too big shrink with floor, if too small grow with ceil.
    """
    h = max(factor, round_by_factor(height, factor))
    w = max(factor, round_by_factor(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def is_too_large(height: int, width: int, patch: int, factor: int, max_pixels: int, tolerance: float) -> bool:
    """True when the image should be tiled. The floor is one *patch* (16), not factor (32), as in the reference."""
    h = max(patch, round_by_factor(height, factor))
    w = max(patch, round_by_factor(width, factor))
    return h * w > max_pixels * tolerance


@lru_cache(maxsize=64)
def target_ratios(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) grids with min_tiles <= cols*rows <= max_tiles, stably sorted by area (reference order)."""
    grids = [(w, h) for n in range(min_tiles, max_tiles + 1)
             for w in range(1, n + 1) for h in range(1, n + 1) if min_tiles <= w * h <= max_tiles]
    # Same construction as the reference (list -> set -> stable sort by area): equal-area grids keep the set's
    # iteration order, which decides exact aspect ties between them.
    return tuple(sorted(set(grids), key=lambda r: r[0] * r[1]))


def tile_grid(height: int, width: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(cols, rows) whose aspect is closest to width/height; on an exact tie a later (larger) grid wins iff the
    image area exceeds half the grid's pixel area. Mirrors `find_closest_aspect_ratio`."""
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in target_ratios(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class ImageLayout:
    """How one image becomes units: `rows` x `cols` tiles of tile_size (1x1 = a single resized unit) plus an
    optional thumbnail; `size` = smart_resize (h, w) used for the single unit or the thumbnail."""
    rows: int
    cols: int
    tiled: bool
    thumbnail: bool
    size: tuple[int, int]
    tile_size: int

    def unit_sizes(self) -> list[tuple[int, int]]:
        """Pixel (h, w) of every unit in order: tiles row-major, then the thumbnail."""
        if not self.tiled:
            return [self.size]
        units = [(self.tile_size, self.tile_size)] * (self.rows * self.cols)
        return units + ([self.size] if self.thumbnail else [])


def plan_image(height: int, width: int, o) -> ImageLayout:
    """Layout of an image of height x width pixels under the options `o` (an ImageOptions)."""
    factor = o.encoder_patch_size * o.downsample_factor
    px = o.encoder_patch_size ** 2 * o.downsample_factor ** 2
    max_pixels, min_pixels = o.max_image_tokens * px, o.min_image_tokens * px
    size = smart_resize(height, width, factor, min_pixels, max_pixels)
    min_tiles, max_tiles = (o.min_tiles, o.max_tiles) if o.do_image_splitting else (1, 1)
    splitting = not (min_tiles == max_tiles == 1)
    if splitting and is_too_large(height, width, o.encoder_patch_size, factor, max_pixels, o.max_pixels_tolerance):
        cols, rows = tile_grid(height, width, min_tiles, max_tiles, o.tile_size)
        thumb = o.use_thumbnail and cols * rows != 1
        return ImageLayout(rows, cols, True, thumb, size, o.tile_size)
    return ImageLayout(1, 1, False, False, size, o.tile_size)


def _native_uint8(mode: str) -> bool:
    """torchvision resizes uint8 natively on CPU for bicubic always, for bilinear only where torch has its vector
    uint8 kernel (AVX2/AVX512 or ARM); elsewhere it resizes in float32 and rounds. We follow the same rule."""
    if mode != "bilinear":
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_u8(image: torch.Tensor, size: tuple[int, int], resample: int = 2) -> torch.Tensor:
    """Resize a uint8 (C, H, W) tensor to (h, w) in uint8, antialiased, as torchvision's tensor `resize` does on
    CPU: torch's uint8 kernels round inside; the float fallback rounds explicitly. Channels-last input is fine (and
    saves the kernel a copy); results do not depend on the memory layout."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    mode = RESAMPLE_MODES[resample]
    kwargs = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
    if image.device.type != "cpu" or not _native_uint8(mode):
        out = F.interpolate(image[None].to(torch.float32), size=list(size), mode=mode, **kwargs)[0]
        if mode == "bicubic":
            out = out.clamp_(0, 255)
        return out.round_().to(torch.uint8)
    return F.interpolate(image[None], size=list(size), mode=mode, **kwargs)[0]


def image_units(image: torch.Tensor, layout: ImageLayout, resample: int = 2) -> list[torch.Tensor]:
    """The uint8 (3, h, w) units of one image as resized pieces: for a grid, ONE tensor holding all tiles (the
    resize to (rows*T, cols*T); `patchify_into` cuts it), then the thumbnail resized from the original; otherwise
    the single smart-resized image."""
    if not layout.tiled:
        return [resize_u8(image, layout.size, resample)]
    t = layout.tile_size
    units = [resize_u8(image, (layout.rows * t, layout.cols * t), resample)]
    if layout.thumbnail:
        units.append(resize_u8(image, layout.size, resample))
    return units


def patchify_into(out: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor, tiles: tuple[int, int] | None,
                  patch: int, mean: torch.Tensor, std: torch.Tensor, scale: float | None) -> list[tuple[int, int]]:
    """Normalize a uint8 (3, H, W) piece and write its patch rows into out[0..n) (rows in (py, px, c) order, the
    rest left zero) and mask; `tiles` = (rows, cols) cuts the piece into a grid of equal tiles first.

    Normalization is the reference's float32 (x - mean) / std with its fused constants (mean, std already scaled
    by 1/rescale_factor), or x * scale when normalization is off. Returns the (h, w) patch grid of every unit.
    """
    rows, cols = tiles or (1, 1)
    h, w = unit.shape[1] // rows, unit.shape[2] // cols
    gh, gw = h // patch, w // patch
    n = gh * gw
    if n > out.shape[1]:
        raise ValueError(f"an image unit of {h}x{w} pixels has {n} patches, more than max_num_patches="
                         f"{out.shape[1]}; the aspect ratio is too extreme for these settings")
    # One pass: gather the uint8 patches into the float32 output, then normalize there in place.
    src = unit.permute(1, 2, 0).reshape(rows, gh, patch, cols, gw, patch, 3).permute(0, 3, 1, 4, 2, 5, 6)
    dst = out[: rows * cols, :n].view(rows, cols, gh, gw, patch, patch, 3)
    dst.copy_(src)
    if scale is None:
        dst.sub_(mean).div_(std)
    else:
        dst.mul_(scale)
    mask[: rows * cols, :n] = 1
    return [(gh, gw)] * (rows * cols)
