"""Processor settings: the image knobs, their defaults, and how they are read from a checkpoint folder.

Defaults are `Lfm2VlImageProcessor`'s class attributes. A checkpoint may spread the values over three
files; later sources win: top-level fields of config.json (old repos) < preprocessor_config.json (flat) <
processor_config.json (flat fields of custom-era repos) < processor_config.json["image_processor"] (LFM2.5).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from lfm2vl.config import json_number, need_object, read_json
from lfm2vl.resolve import LoadError

# What counts as a number in lfm2vl's options (sampling, request limits, image knobs): Python's and numpy's real
# scalars (np.float32(0.5), np.int64(4)), never a bool. Every option check reads numbers through `plain_number`, so
# they all accept the same values and hand Python ints and floats on.
def plain_number(value, integer: bool = False) -> int | float | None:
    """`value` as a Python int (an integral value) or float (another real one), or None when it is not a number
    (a bool, a string, a complex number, ...). integer=True: None for anything but an integral value."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if not integer and isinstance(value, numbers.Real):
        return float(value)
    return None


KNOBS = ("min_image_tokens", "max_image_tokens", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail",
         "max_pixels_tolerance", "tile_size", "resample")


@dataclass(frozen=True)
class ImageOptions:
    """Everything that decides how an image becomes units and patches. Field names are the checkpoint's keys."""
    min_image_tokens: int = 64
    max_image_tokens: int = 256
    do_image_splitting: bool = True
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    max_pixels_tolerance: float = 2.0
    tile_size: int = 512
    resample: int = 2
    encoder_patch_size: int = 16
    downsample_factor: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def with_knobs(self, **knobs) -> "ImageOptions":
        """A copy with per-call knobs applied (None means keep), validated."""
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown image option(s) {sorted(unknown)}; the knobs are {list(KNOBS)}")
        opts = replace(self, **{k: _plain(k, v) for k, v in knobs.items() if v is not None})
        opts.validate()
        return opts

    @property
    def max_num_patches(self) -> int:
        """Rows per unit after padding, recomputed as the reference does (a JSON max_num_patches is ignored)."""
        tile = (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0
        return max(self.max_image_tokens * self.downsample_factor ** 2, tile)

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: expected {what}")
        for name in ("do_image_splitting", "use_thumbnail", "do_rescale", "do_normalize"):
            need(isinstance(getattr(self, name), bool), name, "a bool")
        for name in ("min_image_tokens", "max_image_tokens", "min_tiles", "max_tiles", "tile_size", "resample",
                     "encoder_patch_size", "downsample_factor"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), name, "an int")
        need(self.encoder_patch_size >= 1, "encoder_patch_size", ">= 1")
        need(self.downsample_factor >= 1, "downsample_factor", ">= 1")
        need(self.min_image_tokens >= 1, "min_image_tokens", ">= 1")
        need(self.max_image_tokens >= self.min_image_tokens, "max_image_tokens",
             f">= min_image_tokens ({self.min_image_tokens})")
        need(self.min_tiles >= 1, "min_tiles", ">= 1")
        need(self.max_tiles >= self.min_tiles, "max_tiles", f">= min_tiles ({self.min_tiles})")
        need(self.max_tiles <= 100, "max_tiles", "<= 100 (the vocabulary has row/column markers up to 10x10)")
        f = self.encoder_patch_size * self.downsample_factor
        need(self.tile_size >= f and self.tile_size % f == 0, "tile_size", f"a positive multiple of {f}")
        need(isinstance(self.max_pixels_tolerance, (int, float)) and not isinstance(self.max_pixels_tolerance, bool)
             and self.max_pixels_tolerance > 0, "max_pixels_tolerance", "a number > 0")
        need(self.resample in (0, 2, 3), "resample", "0 (nearest), 2 (bilinear) or 3 (bicubic)")
        need(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean", "3 values (and 3 for image_std)")


_INT_KNOBS = ("min_image_tokens", "max_image_tokens", "min_tiles", "max_tiles", "tile_size", "resample")


def _plain(name: str, value):
    """A knob given as a numpy scalar or any real number -> its Python value; anything else as given, for
    validate to name."""
    if isinstance(value, np.bool_):
        return bool(value)
    if name in _INT_KNOBS or name == "max_pixels_tolerance":
        n = plain_number(value, integer=name in _INT_KNOBS)
        return value if n is None else n
    return value


def check_image_budget(knobs: dict, ceiling: int) -> None:
    """Per-request min_image_tokens / max_image_tokens lie in 1..ceiling, the checkpoint's own max_image_tokens:
    beyond it, padding and vision work grow with the number asked for, not with the image, so one request could
    take minutes and the memory. The engine applies it to every call, the server to every request (as a 400)."""
    for name in ("min_image_tokens", "max_image_tokens"):
        value = plain_number(knobs.get(name), integer=True)
        if value is not None and not 1 <= value <= ceiling:
            raise ValueError(f"{name}={value} is out of range: this model takes 1 to {ceiling} image tokens per "
                             "image or tile")


@dataclass(frozen=True)
class ProcessorSettings:
    image: ImageOptions = field(default_factory=ImageOptions)
    use_image_special_tokens: bool = True


def _pick(src: dict, where: str) -> dict:
    """The image fields of one source; a LoadError naming `where` for a mean, std or tolerance that is not numbers
    (the other fields are checked, with their values, by ImageOptions.validate)."""
    names = {f.name for f in fields(ImageOptions)}
    out = {k: v for k, v in src.items() if k in names and v is not None}
    for k in ("image_mean", "image_std"):
        if k in out:
            v = out[k]
            v = v if isinstance(v, (list, tuple)) else [v] * 3
            if not all(map(json_number, v)):
                raise LoadError(f"{where}: {k} must be a number or a list of 3 numbers, got {out[k]!r}")
            out[k] = tuple(float(x) for x in v)
    if "max_pixels_tolerance" in out:
        if not json_number(out["max_pixels_tolerance"]):
            raise LoadError(f"{where}: max_pixels_tolerance must be a number, got {out['max_pixels_tolerance']!r}")
        out["max_pixels_tolerance"] = float(out["max_pixels_tolerance"])
    return out


def load_settings(folder: str | Path) -> ProcessorSettings:
    """Merge the processor fields of a checkpoint folder (see the module docstring for the order)."""
    folder = Path(folder)
    paths = [folder / name for name in ("config.json", "preprocessor_config.json", "processor_config.json")]
    sources = [(read_json(p), str(p)) for p in paths]
    proc, proc_path = sources[-1]
    nested = need_object(proc.get("image_processor"), f"{proc_path}: image_processor", optional=True)
    merged: dict = {}
    for src, where in sources + [(nested, f"{proc_path}: image_processor")]:
        merged.update(_pick(src, where))
    special = True
    for src, _ in sources:
        if src.get("use_image_special_tokens") is not None:
            special = bool(src["use_image_special_tokens"])
    opts = replace(ImageOptions(), **merged)
    try:
        opts.validate()
    except ValueError as e:  # a value out of range: say which files it may come from
        raise LoadError(f"the processor settings of {folder} ({', '.join(p.name for p in paths)}): {e}") from None
    return ProcessorSettings(image=opts, use_image_special_tokens=special)
