"""The generated suites: questions over procedural scenes (scenes.py), one builder per benchmark kind.

Each builder takes a seeded random.Random and a size n and returns rows (dicts of TSV columns). Beside VLMEvalKit's
columns every row keeps `scene` (the JSON description, a list of them for multi-image rows) and `query` (JSON of what
is asked), so the answer can be recomputed from the description alone. Rows of one scene after the first reuse its
image by index (VLMEvalKit's short-string reference).

- synth-pope     existence questions, one yes and one no per scene and split; the split (also the category) names how
                 the absent object was chosen: random (any absent colour/shape), popular (among the suite's most
                 frequent objects), adversarial (shares the colour or the shape of an object in the scene).
- synth-mc       counting, colour, relative position and size as 4-option questions, each in 4 circular copies
                 (index + k * 1e6, options rotated by k, the answer letter following the answer's text).
- synth-ocr      short rendered strings to read (words, digit strings, random letters; OCRBench's category names).
- synth-multi    multi-image questions (image = list literal of base64 PNGs): which image holds more shapes, which
                 image contains a named object.
- synth-ifeval   a question about the scene plus one or two rule-checked constraints, in MM-IFEval's `constraints`
                 layout (JSON list of {"key", "value", "judge": {"method": "rule_based", "verify_funcs": [{"func",
                 "params"}]}}): exactly N words, starts with / ends with a given text, no commas.
"""
from __future__ import annotations

import base64
import json
import math
import random
from collections import Counter

from .scenes import CELL, COLORS, SHAPES, describe, random_scene, render, text_scene

PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
POSITIONS = ("To the left", "To the right", "Above", "Below")
ORDINALS = ("The first image", "The second image", "The third image")
WORDS = ("apple", "river", "garden", "window", "yellow", "planet", "silver", "market", "forest", "summer", "castle",
         "bridge", "pencil", "rocket", "violet", "button", "candle", "island", "mirror", "orange", "tunnel", "wallet",
         "hammer", "jacket", "kitten", "lemon", "magnet", "noodle", "pepper", "rabbit", "saddle", "tomato")
LETTERS = "ACDEFHJKLMNPRTUVWXY"  # no look-alikes (B/8, G/6, I/1, O/0, Q, S/5, Z/2)
STARTS = ("Answer:", "In this image", "Well,", "I see")
ENDS = ("Done.", "That is all.", "Thank you.")


def _js(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _cell(obj: dict) -> tuple[int, int]:
    return obj["y"] // CELL, obj["x"] // CELL


class Images:
    """Base64 PNGs for the rows: the first row showing a picture carries it, later rows name that row's index."""

    def __init__(self):
        self.first: dict[str, int] = {}

    def column(self, key: str, index: int, scene: dict) -> str:
        if key in self.first:
            return str(self.first[key])
        self.first[key] = index
        return _b64(render(scene))


# ---- POPE-style existence -------------------------------------------------------------------------------------------

def pope(rng: random.Random, n: int) -> list[dict]:
    """ceil(n / 6) scenes, six questions each (a yes and a no per split)."""
    scenes = [random_scene(rng, rng.randint(3, 6)) for _ in range(math.ceil(n / 6))]
    freq = Counter((o["color"], o["shape"]) for s in scenes for o in s["objects"])
    combos = [(c, s) for c in COLORS for s in SHAPES]
    by_popularity = sorted(combos, key=lambda k: (-freq[k], combos.index(k)))
    rows, images = [], Images()
    for i, scene in enumerate(scenes):
        present = {(o["color"], o["shape"]) for o in scene["objects"]}
        absent = [k for k in combos if k not in present]
        near = [k for k in absent if any(k[0] == c or k[1] == s for c, s in present)]
        negatives = {"adversarial": rng.choice(near),
                     "popular": rng.choice([k for k in by_popularity if k in absent][:3]),
                     "random": rng.choice(absent)}
        positives = rng.sample(sorted(present, key=combos.index), 3)
        for split, pos in zip(("adversarial", "popular", "random"), positives):
            pair = [(pos, "Yes"), (negatives[split], "No")]
            rng.shuffle(pair)
            for (color, shape), answer in pair:
                index = len(rows)
                rows.append({"index": index, "image": images.column(f"s{i}", index, scene),
                             "question": f"Is there a {color} {shape} in the image?", "answer": answer,
                             "category": split, "split": split,
                             "query": _js({"kind": "exists", "color": color, "shape": shape}), "scene": _js(scene)})
    return rows


# ---- 4-option questions with circular copies ------------------------------------------------------------------------

def _count_item(rng):
    scene = random_scene(rng, rng.randint(4, 8))
    if rng.random() < 0.5:
        color = rng.choice(list(COLORS))
        query, question = {"kind": "count", "color": color}, f"How many {color} shapes are there in the image?"
        answer = sum(o["color"] == color for o in scene["objects"])
    else:
        shape = rng.choice(SHAPES)
        query, question = {"kind": "count", "shape": shape}, f"How many {PLURAL[shape]} are there in the image?"
        answer = sum(o["shape"] == shape for o in scene["objects"])
    options = [str(answer)] + [str(v) for v in rng.sample([v for v in range(9) if v != answer], 3)]
    return scene, query, question, options


def _color_item(rng):
    while True:
        scene = random_scene(rng, rng.randint(3, 6))
        counts = Counter(o["shape"] for o in scene["objects"])
        unique = [o for o in scene["objects"] if counts[o["shape"]] == 1]
        if unique:
            break
    obj = rng.choice(unique)
    options = [obj["color"]] + rng.sample([c for c in COLORS if c != obj["color"]], 3)
    return scene, {"kind": "color", "shape": obj["shape"]}, f"What color is the {obj['shape']}?", options


def _position_item(rng):
    while True:
        scene = random_scene(rng, rng.randint(4, 7))
        objs = scene["objects"]
        pairs = [(a, b) for a in objs for b in objs
                 if a is not b and (_cell(a)[0] == _cell(b)[0] or _cell(a)[1] == _cell(b)[1])]
        if pairs:
            break
    a, b = rng.choice(pairs)
    (ra, ca), (rb, cb) = _cell(a), _cell(b)
    answer = POSITIONS[0 if ca < cb else 1] if ra == rb else POSITIONS[2 if ra < rb else 3]
    options = [answer] + [p for p in POSITIONS if p != answer]
    query = {"kind": "position", "a": [a["color"], a["shape"]], "b": [b["color"], b["shape"]]}
    return scene, query, f"Where is the {describe(a)} relative to the {describe(b)}?", options


def _size_item(rng):
    scene = random_scene(rng, rng.randint(4, 7), r_range=(8, 14))
    objs = scene["objects"]
    big = rng.choice(objs)
    big["r"] = rng.randint(24, 28)
    others = rng.sample([o for o in objs if o is not big], 3)
    options = [_cap(describe(o)) for o in [big] + others]
    return scene, {"kind": "largest"}, "Which shape is the largest?", options


MC_KINDS = {"counting": (_count_item, "perception"), "color": (_color_item, "perception"),
            "position": (_position_item, "reasoning"), "size": (_size_item, "perception")}


def mmbench(rng: random.Random, n: int) -> list[dict]:
    """n questions (kinds in turn), each followed by its 3 rotated copies."""
    rows, images, kinds = [], Images(), list(MC_KINDS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        build, l2 = MC_KINDS[kind]
        scene, query, question, options = build(rng)
        answer_text = options[0]
        rng.shuffle(options)
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            index = i + k * 1_000_000
            row = {"index": index, "image": images.column(f"s{i}", index, scene), "question": question,
                   "hint": ""}
            row.update(zip("ABCD", rotated))
            row.update({"answer": "ABCD"[rotated.index(answer_text)], "category": kind, "l2-category": l2,
                        "split": "dev", "query": _js(query), "scene": _js(scene)})
            rows.append(row)
    return rows


# ---- reading rendered strings ---------------------------------------------------------------------------------------

def ocr(rng: random.Random, n: int) -> list[dict]:
    """n strings to read: words, digit strings and random letters in turn."""
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            text, category = rng.choice(WORDS), "Regular Text Recognition"
        elif kind == 1:
            text, category = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7))), \
                "Digit String Recognition"
        else:
            text, category = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 7))), \
                "Non-Semantic Text Recognition"
        scene = text_scene(rng, text)
        rows.append({"index": i, "image": _b64(render(scene)),
                     "question": "What is written in the image?", "answer": text, "category": category,
                     "query": _js({"kind": "read"}), "scene": _js(scene)})
    return rows


# ---- multi-image comparisons ----------------------------------------------------------------------------------------

def _more_item(rng):
    n1, n2 = rng.sample(range(2, 9), 2)
    scenes = [random_scene(rng, n1), random_scene(rng, n2)]
    return scenes, {"kind": "more_shapes"}, "Which image contains more shapes?", list(ORDINALS[:2]), "Counting"


def _find_item(rng):
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    target = rng.randrange(3)
    scenes = []
    for j in range(3):
        while True:
            scene = random_scene(rng, rng.randint(3, 6))
            has = any((o["color"], o["shape"]) == (color, shape) for o in scene["objects"])
            if j == target and not has:
                scene["objects"][0].update(color=color, shape=shape)
                has = True
            if has == (j == target):
                break
        scenes.append(scene)
    return scenes, {"kind": "find", "color": color, "shape": shape}, \
        f"Which image contains a {color} {shape}?", list(ORDINALS), "Visual_Search"


def blink(rng: random.Random, n: int) -> list[dict]:
    """n multi-image questions, the two kinds in turn; options name the images in order."""
    rows = []
    for i in range(n):
        scenes, query, question, options, category = (_more_item if i % 2 == 0 else _find_item)(rng)
        if query["kind"] == "more_shapes":
            counts = [len(s["objects"]) for s in scenes]
            answer = counts.index(max(counts))
        else:
            answer = next(j for j, s in enumerate(scenes)
                          if any((o["color"], o["shape"]) == (query["color"], query["shape"]) for o in s["objects"]))
        row = {"index": i, "image": str([_b64(render(s)) for s in scenes]),
               "question": question}
        row.update(zip("ABCD", options))
        row.update({"answer": "ABCD"[answer], "category": category, "query": _js(query), "scene": _js(scenes)})
        rows.append(row)
    return rows


# ---- instruction following ------------------------------------------------------------------------------------------

def _rule(key, value, func, *params):
    return {"key": key, "value": value,
            "judge": {"method": "rule_based", "verify_funcs": [{"func": func, "params": list(params)}]}}


def _constraint(rng, kind):
    """(constraint in MM-IFEval's layout, the sentence that asks for it)."""
    if kind == "exact_words":
        n = rng.randint(3, 8)
        sentence = f"Answer in exactly {n} words."
        return _rule("length", sentence, "check_whether_response_word_count_in_range", n, n), sentence
    if kind == "starts_with":
        text = rng.choice(STARTS)
        sentence = f'Start your answer with "{text}".'
        return _rule("format", sentence, "check_whether_whole_response_begin_with_certain_substring", text), sentence
    if kind == "ends_with":
        text = rng.choice(ENDS)
        sentence = f'End your answer with "{text}".'
        return _rule("format", sentence, "check_whether_whole_response_end_with_certain_substring", text), sentence
    sentence = "Do not use any commas."
    return _rule("format", sentence, "check_whether_whole_response_not_contain_certain_substrings", [","]), sentence


IF_KINDS = ("exact_words", "starts_with", "ends_with", "no_commas")


def ifeval(rng: random.Random, n: int) -> list[dict]:
    """n items: a counting or colour question with one or two constraints (kinds in turn, a second one at random)."""
    rows = []
    for i in range(n):
        scene, query, question, options = (_count_item if i % 2 == 0 else _color_item)(rng)
        kinds = [IF_KINDS[i % len(IF_KINDS)]]
        if rng.random() < 0.5:
            kinds.append(rng.choice([k for k in IF_KINDS if k != kinds[0]]))
        constraints, sentences = zip(*(_constraint(rng, k) for k in kinds))
        rows.append({"index": i, "image": _b64(render(scene)),
                     "question": " ".join((question,) + sentences), "answer": options[0], "category": "C-Level",
                     "l2-category": ",".join(kinds), "constraints": _js(list(constraints)), "query": _js(query),
                     "scene": _js(scene)})
    return rows
