"""POPE-style yes/no scoring: extraction after punctuation removal, F1 of "Yes" as the headline.

Extraction: lower-case, punctuation removed (see strip_punctuation), split into words; "yes" without "no" -> Yes,
"no" without "yes" -> No, else Unknown (wrong). Rows whose category holds several names joined by commas count
once under each (VLMEvalKit explodes the category before computing every number, the overall ones included).
"""
from __future__ import annotations

import re

from lfm2vl.eval.score_mc import is_failed

_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def strip_punctuation(text: str) -> str:
    """VQA-style punctuation handling: a mark next to a space (or any text with a digit comma) is dropped, else it
    becomes a space; periods not inside a number are dropped."""
    out = text
    drop = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        if drop or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def extract_yes_no(prediction) -> str:
    if is_failed(prediction):
        return "Unknown"
    words = strip_punctuation(str(prediction).lower()).split()
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return "Yes"
    if no and not yes:
        return "No"
    return "Unknown"


def f1_stats(pairs: list[tuple[str, str]]) -> dict:
    """pairs of (answer, extracted) -> percent f1, accuracy, precision, recall and n."""
    tp = sum(a == "Yes" and e == "Yes" for a, e in pairs)
    fp = sum(a != "Yes" and e == "Yes" for a, e in pairs)
    fn = sum(a == "Yes" and e != "Yes" for a, e in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(a == e for a, e in pairs) / len(pairs) if pairs else 0.0
    return {"f1": 100 * f1, "accuracy": 100 * acc, "precision": 100 * precision, "recall": 100 * recall,
            "n": len(pairs)}


def explode(category: str | None) -> list[str | None]:
    if category is None:
        return [None]
    return [c for c in category.split(",")]
