"""The easy-vqa suites (PyPI `easy-vqa`, MIT): its test split as rows in VLMEvalKit's TSV layout.

- easy-vqa-open: every test question as easy-vqa asks it (lower case, no instruction suffix), answered with one word
  (a shape, a colour, yes or no) and scored by exact match: the package's own task. Category: shape, color or yes/no.
- easy-vqa-yesno: the yes/no questions, balanced (every "no" question and as many "yes" ones, drawn with the seed;
  with n, n // 2 of each), answers Yes / No (POPE rules). The category is the question's kind: "color" or "shape",
  with ",negated" for the negated questions ("is there not a ...", "is no ... present") - comma-joined, as POPE
  categories may be.
- easy-vqa-mc: the colour and shape questions as 4-option multiple choice; distractors come from easy-vqa's answer
  list, of the same kind first (other colours; the two other shapes plus one colour, as easy-vqa has three shapes).

Rows keep easy-vqa's order; the first row of an image carries it (the package's PNG, base64) and later rows name that
row's index. Each row also keeps `image_id` (easy-vqa's test image number) so the answer can be checked at the source.
"""
from __future__ import annotations

import base64
import random
import re
from pathlib import Path

SHAPE_WORDS = ("circle", "rectangle", "triangle")


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the easy-vqa suites need the easy-vqa package: pip install easy-vqa") from None
    return easy_vqa


def _question_kind(question: str) -> str:
    kind = "shape" if any(w in question for w in SHAPE_WORDS) else "color"
    return kind + (",negated" if re.search(r"\bnot\b|^is no\b", question) else "")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _test_split():
    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_test_questions()
    return ev, list(zip(texts, answers, image_ids)), ev.get_test_image_paths()


def _rows(items, paths, extra, capitalize: bool = True):
    rows, first = [], {}
    for index, (text, answer, image_id) in enumerate(items):
        if image_id in first:
            image = str(first[image_id])
        else:
            first[image_id] = index
            image = base64.b64encode(Path(paths[image_id]).read_bytes()).decode("ascii")
        row = {"index": index, "image": image, "question": _cap(text) if capitalize else text}
        row.update(extra(text, answer))
        row["image_id"] = image_id
        rows.append(row)
    return rows


def open_questions(rng: random.Random, n: int | None) -> list[dict]:
    _, items, paths = _test_split()
    if n is not None and n < len(items):
        keep = set(rng.sample(range(len(items)), n))
        items = [it for i, it in enumerate(items) if i in keep]

    def extra(text, answer):
        kind = "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPE_WORDS else "color"
        return {"answer": answer, "category": kind}

    return _rows(items, paths, extra, capitalize=False)


def yesno(rng: random.Random, n: int | None) -> list[dict]:
    _, items, paths = _test_split()
    yes = [i for i, it in enumerate(items) if it[1] == "yes"]
    no = [i for i, it in enumerate(items) if it[1] == "no"]
    half = min(len(yes), len(no)) if n is None else min(n // 2, len(yes), len(no))
    chosen = [items[i] for i in sorted(rng.sample(yes, half) + rng.sample(no, half))]
    return _rows(chosen, paths, lambda text, answer: {"answer": _cap(answer), "category": _question_kind(text)})


def multiple_choice(rng: random.Random, n: int | None) -> list[dict]:
    ev, items, paths = _test_split()
    answers = [a for a in ev.get_answers() if a not in ("yes", "no")]
    shapes = [a for a in answers if a in SHAPE_WORDS]
    colors = [a for a in answers if a not in SHAPE_WORDS]
    items = [it for it in items if it[1] not in ("yes", "no")]
    if n is not None and n < len(items):
        keep = set(rng.sample(range(len(items)), n))
        items = [it for i, it in enumerate(items) if i in keep]

    def extra(text, answer):
        same, other = (shapes, colors) if answer in shapes else (colors, shapes)
        pool = [a for a in same if a != answer]
        distractors = rng.sample(pool, min(3, len(pool)))
        distractors += rng.sample(other, 3 - len(distractors))
        options = [answer] + distractors
        rng.shuffle(options)
        row = dict(zip("ABCD", options))
        row.update({"answer": "ABCD"[options.index(answer)], "category": "shape" if answer in shapes else "color"})
        return row

    return _rows(items, paths, extra)
