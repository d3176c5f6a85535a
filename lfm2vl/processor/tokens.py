"""Image-token counts and placeholder expansion: the ONE place that says how many `<image>` tokens a unit takes.

The batch generator (generate/batch.py) imports `unit_tokens` to check a request's `<image>` count against the
features its pixel inputs give, so text and features can never disagree. Counts are taken from the units the image
side actually produces. This deliberately differs from transformers in one case: with min_tiles=1 a "too large"
image can get a 1x1 grid, i.e. one tile_size x tile_size unit, for which the reference counts smart_resize's size
(e.g. 752x688 -> 240 placeholders for 256 features, and the model then fails). We count the tile (256), the same
expansion the reference uses for any single unit.
"""
from __future__ import annotations

from dataclasses import dataclass


def unit_tokens(h_patches: int, w_patches: int, factor: int) -> int:
    """Tokens of a unit with an h x w patch grid after pixel-unshuffle by `factor`: ceil(h/f) * ceil(w/f)."""
    return -(-h_patches // factor) * -(-w_patches // factor)


@dataclass(frozen=True)
class ImageTokens:
    """Marker strings (read from the tokenizer files, with transformers' literal fallbacks)."""
    image: str = "<image>"
    start: str = "<|image_start|>"
    end: str = "<|image_end|>"
    thumbnail: str = "<|img_thumbnail|>"

    @staticmethod
    def tile(row: int, col: int) -> str:
        return f"<|img_row_{row}_col_{col}|>"


def layout_token_counts(layout, patch: int, factor: int) -> list[int]:
    """Placeholder count of every unit of an ImageLayout, in unit order."""
    return [unit_tokens(h // patch, w // patch, factor) for h, w in layout.unit_sizes()]


def expand_image(layout, patch: int, factor: int, marks: ImageTokens, special: bool = True) -> str:
    """The text that replaces one `<image>` sentinel: start, per-tile row/col marker + run, thumbnail marker + run,
    end (markers only when `special`). Mirrors `Lfm2VlProcessor._build_image_tokens`."""
    counts = layout_token_counts(layout, patch, factor)
    parts = [marks.start] if special else []
    if layout.tiled and layout.rows * layout.cols > 1:
        for i in range(layout.rows * layout.cols):
            if special:
                parts.append(marks.tile(i // layout.cols + 1, i % layout.cols + 1))
            parts.append(marks.image * counts[i])
        if layout.thumbnail:
            if special:
                parts.append(marks.thumbnail)
            parts.append(marks.image * counts[-1])
    else:
        parts.append(marks.image * counts[0])  # a single unit: the resized image, or a 1x1 grid's tile (see above)
    if special:
        parts.append(marks.end)
    return "".join(parts)
