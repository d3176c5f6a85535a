"""OCRBench scoring: a row scores 1 when any of its answers is a substring of the prediction.

Answers come as a list literal (or one string). Both sides are stripped with newlines as spaces; case is ignored,
except for handwritten mathematical expressions, which compare with every space removed and case kept. Category
counts sum into OCRBench's five groups and a total out of 1000 on the full file.
"""
from __future__ import annotations

import ast

from lfm2vl.eval.score_mc import is_failed

HMER = "Handwritten Mathematical Expression Recognition"
TEXT_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
GROUPS = {"Text Recognition": TEXT_RECOGNITION, "Scene Text-centric VQA": ("Scene Text-centric VQA",),
          "Doc-oriented VQA": ("Doc-oriented VQA",), "Key Information Extraction": ("Key Information Extraction",),
          HMER: (HMER,)}


def answers_of(answer: str | None) -> list[str]:
    if answer is None:
        return []
    text = answer.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            items = ast.literal_eval(text)
            if isinstance(items, (list, tuple)):
                return [str(x) for x in items]
        except (ValueError, SyntaxError):
            pass
    return [answer]


def ocr_hit(prediction, answer: str | None, category: str | None) -> bool:
    if is_failed(prediction):
        return False
    pred = str(prediction)
    for ans in answers_of(answer):
        if category == HMER:
            a = ans.strip().replace("\n", " ").replace(" ", "")
            p = pred.strip().replace("\n", " ").replace(" ", "")
        else:
            a = ans.lower().strip().replace("\n", " ")
            p = pred.lower().strip().replace("\n", " ")
        if a in p:
            return True
    return False
