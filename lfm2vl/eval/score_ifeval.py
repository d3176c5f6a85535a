"""MM-IFEval's rule-checked constraints (a partial score, not comparable with published numbers).

A row's `constraints` column is a JSON list of {"key", "value", "judge": {"method", "verify_funcs": [{"func",
"params"}]}}; only "rule_based" constraints whose every function is in CHECKS are checked here (the rest need a
judge model). A constraint holds when all its functions hold; a row scores the share of its checked constraints
that hold; rows with infer_type other than "main" (inputs for the judge's comparisons) are left out.
"""
from __future__ import annotations

import json
import re

from lfm2vl.eval.score_mc import is_failed


def _paragraphs(text: str) -> list[str]:
    text = "\n".join(line.strip() for line in text.splitlines()).strip()
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _words(text: str) -> int:
    return len(re.sub(r"[^\w\s.-]", "", text).split())


def _mentions(text: str, keyword: str) -> int:
    return len(re.findall(r"\b" + re.escape(keyword.lower()) + r"\b", text.lower()))


CHECKS = {
    "check_whether_response_paragraph_number_in_range": lambda r, lo, hi: lo <= len(_paragraphs(r)) <= hi,
    "check_whether_response_word_count_in_range": lambda r, lo, hi: lo <= _words(r) <= hi,
    "check_whether_each_paragraph_word_count_in_range":
        lambda r, lo, hi: all(lo <= _words(p) <= hi for p in _paragraphs(r)),
    "check_whether_whole_response_not_contain_certain_substrings": lambda r, subs: all(s not in r for s in subs),
    "check_whether_whole_response_not_contain_certain_substring": lambda r, s: s not in r,
    "check_whether_each_paragraph_begin_with_certain_substring":
        lambda r, s: all(p.startswith(s) for p in _paragraphs(r)),
    "check_whether_each_paragraph_end_with_certain_substring":
        lambda r, s: all(p.endswith(s) for p in _paragraphs(r)),
    "check_whether_whole_response_begin_with_certain_substring": lambda r, s: r.strip().startswith(s),
    "check_whether_whole_response_end_with_certain_substring": lambda r, s: r.strip().endswith(s),
    "check_whether_each_keyword_in_list_metioned_in_range":
        lambda r, kws, lo, hi: all(lo <= _mentions(r, k) <= hi for k in kws),
    "check_whether_total_keyword_in_list_metioned_in_range":
        lambda r, kws, lo, hi: lo <= sum(_mentions(r, k) for k in kws) <= hi,
}


def parse_constraints(raw: str | None, where: str) -> list[dict]:
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: constraints column is not JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{where}: constraints column should be a JSON list")
    return items


def checkable(constraint: dict) -> bool:
    judge = constraint.get("judge") or {}
    funcs = judge.get("verify_funcs") or []
    return judge.get("method") == "rule_based" and bool(funcs) and all(f.get("func") in CHECKS for f in funcs)


def check(constraint: dict, prediction) -> bool:
    if is_failed(prediction):
        return False
    text = str(prediction)
    return all(CHECKS[f["func"]](text, *f.get("params", [])) for f in constraint["judge"]["verify_funcs"])
