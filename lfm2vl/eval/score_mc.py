"""Multiple-choice answer extraction and scoring (VLMEvalKit's exact-matching rules, our implementation).

Extraction of a prediction against the options {letter: text}:
1. a refusal (one of REFUSALS) -> "Z" (never right); a failed row -> None;
2. option letter: the punctuation in PUNCT becomes spaces, the text splits on whitespace; when exactly one option
   letter is among the tokens and it sits among the last four tokens, that letter; no letter but a "Z" token -> "Z";
   failing that, "answer is X" with X an option letter;
3. option text: unless the prediction is longer than twice the options' texts together, the one option whose
   text (lower-cased) the lower-cased prediction contains;
4. else None (unreadable: wrong).
MMBench scores circularly: copies of a question share index mod 1e6 (the copy whose index equals that is the
group's main row); a group counts only when every copy is right, so one unreadable copy fails the group.
"""
from __future__ import annotations

import re

from lfm2vl.eval.tsv import FAILED_PREFIX, Row

REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
PUNCT = ".()[],:;!*#{}"
_PUNCT_TABLE = str.maketrans({c: " " for c in PUNCT})
_ANSWER_IS = re.compile(r"\banswer is:?\s*\(?([A-Z])\b")
GROUP_MOD = 1_000_000


def is_failed(prediction) -> bool:
    return prediction is None or str(prediction).startswith(FAILED_PREFIX)


def infer_letter(prediction: str, options: dict[str, str]):
    """Rule 2: an option letter, "Z", or None."""
    tokens = prediction.translate(_PUNCT_TABLE).split()
    found = [c for c in options if c in tokens]
    if len(found) == 1:
        letter = found[0]
        if tokens.index(letter) > len(tokens) - 5:
            return letter
    elif not found and "Z" in tokens:
        return "Z"
    m = _ANSWER_IS.search(prediction)
    if m and m.group(1) in options:
        return m.group(1)
    return None


def infer_text(prediction: str, options: dict[str, str]):
    """Rule 3: the one option whose text the prediction contains, or None."""
    pred = prediction.lower()
    if len(pred) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [k for k, v in options.items() if str(v).lower() in pred]
    return hits[0] if len(hits) == 1 else None


def extract_choice(prediction, options: dict[str, str]):
    """The chosen option letter, "Z" for a refusal, or None when nothing can be read."""
    if is_failed(prediction):
        return None
    prediction = str(prediction).strip()
    if any(r in prediction for r in REFUSALS):
        return "Z"
    return infer_letter(prediction, options) or infer_text(prediction, options)


def mc_hits(rows: list[Row], predictions: list) -> list[bool]:
    """Per row: is the extracted letter the answer."""
    return [extract_choice(p, r.options) == (r.answer or "").strip() for r, p in zip(rows, predictions)]


def circular_groups(rows: list[Row]) -> dict[int, list[int]]:
    """Main index -> positions of the group's rows (main row first). Indices must be integers."""
    groups: dict[int, list[int]] = {}
    for pos, r in enumerate(rows):
        try:
            idx = int(r.index)
        except ValueError:
            raise ValueError(f"{r.where()}: circular scoring needs integer indices") from None
        groups.setdefault(idx % GROUP_MOD, []).append(pos)
    mains = {int(r.index) for r in rows if int(r.index) < GROUP_MOD}
    for g, members in list(groups.items()):
        if g not in mains:
            raise ValueError(f"{rows[members[0]].where()}: circular copy of index {g}, which is not in the file")
        members.sort(key=lambda p: int(rows[p].index))
    return groups
