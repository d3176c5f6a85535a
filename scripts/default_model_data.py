"""Training data of the bundled model: conversations in lfm2vl's fine-tuning JSONL, built offline and seeded.

Sources
- easy-vqa's training split (the `easy-vqa` package: 4,000 64x64 images of one shape, 38,575 questions). Its test
  split is never read here: it is what the model is evaluated on.
- Single shapes drawn by `single_shape` in easy-vqa's style (one circle, rectangle or triangle of one of its eight
  colours on a pale background) with questions from easy-vqa's 24 question templates: unlimited fresh pictures of
  the same kind, so the small vision tower learns shapes rather than the 4,000 training pictures.
- The procedural scenes of lfm2vl/eval/scenes.py (several shapes on a grid, short rendered strings) through the
  offline suites' own builders (lfm2vl/eval/scene_suites.py) with training seeds (the suites use seed 0): existence,
  counting, colour, position, size, reading and multi-image questions, phrased exactly as `lfm2vl eval` asks them.
- Captions ("Describe this image." -> "A red circle on a light background.") and text-only rows that state a picture
  in words and ask about it (the language model learns the questions' logic before it sees pixels).

Every image is written once as a PNG under the data folder; rows name it by a path relative to the JSONL file.
A picture's several questions become one multi-turn conversation (the image in the first user turn): the vision
tower runs once for all of them.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

from lfm2vl.eval import scene_suites, scenes
from lfm2vl.eval.benchmarks import get_benchmark
from lfm2vl.eval.prompts import ANSWER_DIRECTLY, prompt_text
from lfm2vl.eval.tsv import rows_from_records

# easy-vqa's palette (CSS colour names, as its generator draws them) and shapes.
EASY_COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
               "black": (0, 0, 0), "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42)}
EASY_SHAPES = ("circle", "rectangle", "triangle")
# easy-vqa's question templates: (text, what the answer is). "yes-color" / "yes-shape": yes when the named colour /
# shape is the picture's; "no-...": the negated questions (yes when it is not).
TEMPLATES = [
    ("what color is the shape?", "color"), ("what color is the {shape}?", "color"),
    ("what is the color of the shape?", "color"), ("what is the color of the {shape}?", "color"),
    ("what is the {color} shape?", "shape"), ("what shape does the image contain?", "shape"),
    ("what shape is in the image?", "shape"), ("what shape is present?", "shape"),
    ("does the image contain a {color} shape?", "yes-color"), ("does the image contain a {shape}?", "yes-shape"),
    ("is a {color} shape present?", "yes-color"), ("is a {shape} present?", "yes-shape"),
    ("is there a {color} shape in the image?", "yes-color"), ("is there a {color} shape?", "yes-color"),
    ("is there a {shape} in the image?", "yes-shape"), ("is there a {shape}?", "yes-shape"),
    ("does the image not contain a {color} shape?", "no-color"), ("does the image not contain a {shape}?", "no-shape"),
    ("is no {color} shape present?", "no-color"), ("is no {shape} present?", "no-shape"),
    ("is there not a {color} shape in the image?", "no-color"), ("is there not a {color} shape?", "no-color"),
    ("is there not a {shape} in the image?", "no-shape"), ("is there not a {shape}?", "no-shape"),
]
CAPTION_PROMPTS = ("Describe this image.", "What is in this image?", "What do you see?", "Describe the picture.")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MC_LETTERS = "ABCD"


class ImageStore:
    """PNG files under folder/images, named by content (a picture used twice is stored once)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)

    def add(self, png: bytes) -> str:
        name = f"images/{hashlib.sha1(png).hexdigest()[:16]}.png"
        path = self.folder / name
        if not path.exists():
            path.write_bytes(png)
        return name


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---- single shapes in easy-vqa's style ------------------------------------------------------------------------------

def single_shape(rng: random.Random, size: int = 64) -> tuple[bytes, str, str]:
    """(PNG, colour, shape): one shape 10-34 px across at a random place on a pale background."""
    color, shape = rng.choice(list(EASY_COLORS)), rng.choice(EASY_SHAPES)
    img = Image.new("RGB", (size, size), tuple(rng.randint(230, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w = rng.randint(10, 34)
    h = w if shape == "circle" else rng.randint(10, 34) if shape == "rectangle" else rng.randint(max(9, w - 8), w)
    x, y = rng.randint(0, size - w), rng.randint(0, size - h)
    fill = EASY_COLORS[color]
    if shape == "circle":
        draw.ellipse((x, y, x + w - 1, y + h - 1), fill=fill)
    elif shape == "rectangle":
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=fill)
    else:
        draw.polygon([(x + (w - 1) / 2, y), (x + w - 1, y + h - 1), (x, y + h - 1)], fill=fill)
    return png_bytes(img), color, shape


def easy_question(rng: random.Random, color: str, shape: str) -> tuple[str, str]:
    """One easy-vqa-style question about a picture of one `color` `shape`, and its answer; yes/no answers are
    balanced (the named colour or shape is the picture's half of the time)."""
    text, kind = rng.choice(TEMPLATES)
    if kind == "color":
        return text.format(shape=shape), color
    if kind == "shape":
        return text.format(color=color), shape
    named_color = color if rng.random() < 0.5 else rng.choice([c for c in EASY_COLORS if c != color])
    named_shape = shape if rng.random() < 0.5 else rng.choice([s for s in EASY_SHAPES if s != shape])
    holds = named_color == color if kind.endswith("color") else named_shape == shape
    if kind.startswith("no-"):
        holds = not holds
    return text.format(color=named_color, shape=named_shape), "yes" if holds else "no"


def easy_answer(question: str, color: str, shape: str) -> str:
    """The answer to an easy-vqa question about a picture of one `color` `shape` (checks the templates' rules
    against the package's own answers)."""
    for text, kind in TEMPLATES:
        pattern = "^" + re.escape(text).replace(r"\{color\}", "(?P<color>\\w+)").replace(r"\{shape\}",
                                                                                      "(?P<shape>\\w+)") + "$"
        m = re.match(pattern, question)
        if not m:
            continue
        if kind == "color":
            return color
        if kind == "shape":
            return shape
        holds = m.group("color") == color if kind.endswith("color") else m.group("shape") == shape
        return "yes" if holds != kind.startswith("no-") else "no"
    raise ValueError(f"not an easy-vqa question: {question!r}")


def single_caption(color: str, shape: str) -> str:
    return f"A {color} {shape} on a light background."


def formatted(rng: random.Random, question: str, answer: str, pool: list[str]) -> tuple[str, str]:
    """A question in one of the forms `lfm2vl eval` asks: as it is (a one-word answer), POPE's (the question
    capitalised plus the answer-directly line, Yes / No), or VLMEvalKit's 4-option multiple choice (a letter)."""
    if answer in ("yes", "no"):
        if rng.random() < 0.5:
            return question, answer
        return question[0].upper() + question[1:] + ANSWER_DIRECTLY, answer.capitalize()
    if rng.random() < 0.5 or len(pool) < 3:
        return question, answer
    options = [answer] + rng.sample([p for p in pool if p != answer], 3)
    rng.shuffle(options)
    record = {"index": "0", "question": question[0].upper() + question[1:], **dict(zip(MC_LETTERS, options))}
    row = rows_from_records([record], "mc.tsv", resolve_images=False)[0]
    return prompt_text(get_benchmark("easy-vqa-mc"), row), MC_LETTERS[options.index(answer)]


def mc_pool(answer: str) -> list[str]:
    """Distractors of easy-vqa's multiple-choice suite: other colours, or the two other shapes plus a colour."""
    if answer in EASY_SHAPES:
        return [s for s in EASY_SHAPES if s != answer] + ["red"]
    return [c for c in EASY_COLORS if c != answer]


# ---- conversations --------------------------------------------------------------------------------------------------

def conversation(images: list[str], turns: list[tuple[str, str]]) -> dict:
    """A multi-turn conversation: the images and the first question in the first user turn."""
    messages = []
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image", "image": p} for p in images] if i == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def text_row(turns: list[tuple[str, str]]) -> dict:
    return {"messages": [m for q, a in turns for m in ({"role": "user", "content": q},
                                                          {"role": "assistant", "content": a})]}


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---- the sources ----------------------------------------------------------------------------------------------------

def easyvqa_train() -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """easy-vqa's training questions by image id, with the image paths: {id: [(question, answer)]}, {id: path}."""
    import easy_vqa

    questions, answers, ids = easy_vqa.get_train_questions()
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, ids):
        by_image.setdefault(int(i), []).append((q, a))
    return by_image, dict(easy_vqa.get_train_image_paths())


def easyvqa_rows(store: ImageStore, rng: random.Random, turns: int, captions: bool, qa: bool,
                 limit: int | None = None) -> list[dict]:
    """easy-vqa's training pictures (the first `limit`): their questions in random forms, `turns` to a
    conversation; with captions, one caption row per picture whose colour and shape its questions tell."""
    by_image, paths = easyvqa_train()
    rows = []
    for i, qas in list(by_image.items())[:limit]:
        path = store.add(Path(paths[i]).read_bytes())
        if qa:
            qas = list(qas)
            rng.shuffle(qas)
            for part in chunks(qas, turns):
                rows.append(conversation([path], [formatted(rng, q, a, mc_pool(a)) for q, a in part]))
        if captions:
            color = next((a for q, a in qas if a in EASY_COLORS), None)
            shape = next((a for q, a in qas if a in EASY_SHAPES), None)
            if color and shape:
                rows.append(conversation([path], [(rng.choice(CAPTION_PROMPTS), single_caption(color, shape))]))
    return rows


def single_rows(store: ImageStore, rng: random.Random, n: int, turns: int, caption_share: float) -> list[dict]:
    """n drawn single-shape pictures: a caption (with probability caption_share) or `turns` questions each."""
    rows = []
    for _ in range(n):
        png, color, shape = single_shape(rng)
        path = store.add(png)
        if rng.random() < caption_share:
            rows.append(conversation([path], [(rng.choice(CAPTION_PROMPTS), single_caption(color, shape))]))
        else:
            qas = [easy_question(rng, color, shape) for _ in range(turns)]
            rows.append(conversation([path], [formatted(rng, q, a, mc_pool(a)) for q, a in qas]))
    return rows


def scene_caption(scene: dict) -> str:
    """"There are three shapes: a red circle, a blue square and a green triangle." (reading order) or the text."""
    if "text" in scene:
        return f'The text "{scene["text"]}".'
    objs = sorted(scene["objects"], key=lambda o: (o["y"] // scenes.CELL, o["x"]))
    names = [f"{'an' if o['color'][0] in 'aeiou' else 'a'} {scenes.describe(o)}" for o in objs]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if len(objs) == 1:
        return f"There is one shape: {listed}."
    return f"There are {NUMBERS[len(objs)] if len(objs) < len(NUMBERS) else len(objs)} shapes: {listed}."


SUITE_BUILDERS = {"synth-pope": scene_suites.pope, "synth-mc": scene_suites.mmbench, "synth-ocr": scene_suites.ocr,
                  "synth-multi": scene_suites.blink}


def suite_rows(store: ImageStore, name: str, seed: int, n: int, turns: int, captions: bool,
               questions: bool = True) -> list[dict]:
    """Rows of an offline suite's builder with a training seed, as conversations asked exactly as `lfm2vl eval`
    asks them (the answer: Yes / No, an option letter, or the text). A picture's questions are packed `turns` to a
    conversation (questions=False leaves them out); with captions, each single picture also gets a caption row."""
    records = SUITE_BUILDERS[name](random.Random(f"train:{name}:{seed}"), n)
    benchmark = get_benchmark(name)
    rows_by_scene: dict[str, list] = {}
    scene_of: dict[str, dict] = {}
    for rec, row in zip(records, rows_from_records([{k: str(v) for k, v in r.items()} for r in records],
                                                   f"{name}.tsv")):
        paths = [store.add(base64.b64decode(b)) for b in row.images]
        key = "|".join(paths)
        scene_of[key] = json.loads(rec["scene"])
        rows_by_scene.setdefault(key, []).append((prompt_text(benchmark, row), row.answer))
    rng = random.Random(f"pack:{name}:{seed}")
    out = []
    for key, qas in rows_by_scene.items():
        paths = key.split("|")
        rng.shuffle(qas)  # also without questions: the caption prompts drawn next stay the same
        if questions:
            out += [conversation(paths, part) for part in chunks(qas, turns)]
        if captions and len(paths) == 1:
            out.append(conversation(paths, [(rng.choice(CAPTION_PROMPTS), scene_caption(scene_of[key]))]))
    return out


def text_rows(rng: random.Random, n: int) -> list[dict]:
    """Text-only conversations: a picture stated in words, then questions about it (answered as with the image)."""
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            color, shape = rng.choice(list(EASY_COLORS)), rng.choice(EASY_SHAPES)
            said = single_caption(color, shape)
            qas = [easy_question(rng, color, shape) for _ in range(3)]
            turns = [formatted(rng, q, a, mc_pool(a)) for q, a in qas]
        else:
            scene = scenes.random_scene(rng, rng.randint(1, 6))
            said = scene_caption(scene)
            objs = scene["objects"]
            o = rng.choice(objs)
            other_color = rng.choice(list(scenes.COLORS))
            other_shape = rng.choice(scenes.SHAPES)
            present = any((x["color"], x["shape"]) == (other_color, other_shape) for x in objs)
            turns = [("How many shapes are there?", str(len(objs))),
                     (f"Is there a {other_color} {other_shape}?", "Yes" if present else "No"),
                     (f"Is there a {scenes.describe(o)}?", "Yes")]
            rng.shuffle(turns)
        turns[0] = (f"Picture: {said}\n{turns[0][0]}", turns[0][1])
        rows.append(text_row(turns))
    return rows


def write_jsonl(path: Path, rows: list[dict], rng: random.Random) -> Path:
    rows = list(rows)
    rng.shuffle(rows)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path
