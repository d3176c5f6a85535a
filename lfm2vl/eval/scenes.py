"""Procedural scenes for the offline suites: a seeded description (shapes on a grid, or a short string) and its
PIL rendering as PNG bytes.

A shapes scene is {"size": [w, h], "objects": [{"shape", "color", "x", "y", "r"}, ...]}: each object sits in its own
cell of a 4 x 4 grid of 64-pixel cells (centre jittered by a few pixels, so objects never overlap and two objects in
the same row or column are unambiguously left/right or above/below of each other), r is its half-extent in pixels,
and no two objects share both colour and shape (so "the red circle" names one object). A text scene is
{"size": [w, h], "text", "x", "y", "font_size"}. Every suite question is answerable from these descriptions alone.
"""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20),
          "purple": (140, 60, 180), "orange": (245, 130, 20), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
# Colours are drawn with unequal weights so some objects are more frequent than others (POPE's "popular" negatives).
COLOR_WEIGHTS = (6, 5, 4, 3, 2, 2, 1)
CELL, GRID = 64, 4
SIZE = CELL * GRID
JITTER = 6
BACKGROUND = (255, 255, 255)
TEXT_SIZE = (320, 96)
TEXT_COLOR = (20, 20, 20)


def random_scene(rng: random.Random, n_objects: int, r_range: tuple[int, int] = (10, 24)) -> dict:
    """A shapes scene with n_objects distinct (colour, shape) objects in distinct grid cells."""
    if not 1 <= n_objects <= GRID * GRID:
        raise ValueError(f"n_objects={n_objects}; expected 1..{GRID * GRID}")
    cells = rng.sample(range(GRID * GRID), n_objects)
    used, objects = set(), []
    for cell in cells:
        while True:
            color = rng.choices(list(COLORS), weights=COLOR_WEIGHTS)[0]
            shape = rng.choice(SHAPES)
            if (color, shape) not in used:
                break
        used.add((color, shape))
        row, col = divmod(cell, GRID)
        objects.append({"shape": shape, "color": color,
                        "x": col * CELL + CELL // 2 + rng.randint(-JITTER, JITTER),
                        "y": row * CELL + CELL // 2 + rng.randint(-JITTER, JITTER),
                        "r": rng.randint(*r_range)})
    return {"size": [SIZE, SIZE], "objects": objects}


def text_scene(rng: random.Random, text: str) -> dict:
    """A text scene: `text` in the default font at a random size and position that keeps it inside the canvas."""
    w, h = TEXT_SIZE
    for font_size in range(rng.randint(28, 40), 8, -2):
        left, top, right, bottom = _font(font_size).getbbox(text)
        if right - left <= w - 16 and bottom - top <= h - 16:
            break
    else:
        raise ValueError(f"text {text!r} does not fit a {w}x{h} image")
    x = rng.randint(8 - left, w - 8 - right)
    y = rng.randint(8 - top, h - 8 - bottom)
    return {"size": [w, h], "text": text, "x": x, "y": y, "font_size": font_size}


def describe(obj: dict) -> str:
    """The words that name an object: "red circle"."""
    return f"{obj['color']} {obj['shape']}"


def render(scene: dict) -> bytes:
    """The scene as PNG bytes (deterministic for a description)."""
    img = Image.new("RGB", tuple(scene["size"]), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if "text" in scene:
        draw.text((scene["x"], scene["y"]), scene["text"], fill=TEXT_COLOR, font=_font(scene["font_size"]))
    for o in scene.get("objects", ()):
        x, y, r, fill = o["x"], o["y"], o["r"], COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}; expected one of {', '.join(SHAPES)}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _font(size: int):
    return ImageFont.load_default(size=size)
