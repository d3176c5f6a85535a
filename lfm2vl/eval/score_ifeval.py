"""MM-IFEval's rule-checked constraints (a partial score, not comparable with published numbers).

A row's `constraints` column is a JSON list of {"key", "value", "judge": {"method", "verify_funcs": [{"func",
"params"}]}}; only "rule_based" constraints whose every function is in CHECKS are checked here (the rest need a
judge model). A constraint holds when all its functions hold; a row scores the share of its checked constraints
that hold; rows with infer_type other than "main" (inputs for the judge's comparisons) are left out.
"""
from __future__ import annotations

import json
import re

from lfm2vl.config import json_kind
from lfm2vl.eval.score_mc import is_failed
from lfm2vl.files import jsontext


def _paragraphs(text: str) -> list[str]:
    text = "\n".join(line.strip() for line in text.splitlines()).strip()
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _words(text: str) -> int:
    return len(re.sub(r"[^\w\s.-]", "", text).split())


def _mentions(text: str, keyword: str) -> int:
    return len(re.findall(r"\b" + re.escape(keyword.lower()) + r"\b", text.lower()))


NUMBER, TEXT, TEXTS = "a number", "a string", "a list of strings"  # the kinds of a check's params

# func name -> (the check of response r, the kinds of its params in order)
CHECKS = {
    "check_whether_response_paragraph_number_in_range":
        (lambda r, lo, hi: lo <= len(_paragraphs(r)) <= hi, (NUMBER, NUMBER)),
    "check_whether_response_word_count_in_range": (lambda r, lo, hi: lo <= _words(r) <= hi, (NUMBER, NUMBER)),
    "check_whether_each_paragraph_word_count_in_range":
        (lambda r, lo, hi: all(lo <= _words(p) <= hi for p in _paragraphs(r)), (NUMBER, NUMBER)),
    "check_whether_whole_response_not_contain_certain_substrings":
        (lambda r, subs: all(s not in r for s in subs), (TEXTS,)),
    "check_whether_whole_response_not_contain_certain_substring": (lambda r, s: s not in r, (TEXT,)),
    "check_whether_each_paragraph_begin_with_certain_substring":
        (lambda r, s: all(p.startswith(s) for p in _paragraphs(r)), (TEXT,)),
    "check_whether_each_paragraph_end_with_certain_substring":
        (lambda r, s: all(p.endswith(s) for p in _paragraphs(r)), (TEXT,)),
    "check_whether_whole_response_begin_with_certain_substring":
        (lambda r, s: r.strip().startswith(s), (TEXT,)),
    "check_whether_whole_response_end_with_certain_substring": (lambda r, s: r.strip().endswith(s), (TEXT,)),
    "check_whether_each_keyword_in_list_metioned_in_range":
        (lambda r, kws, lo, hi: all(lo <= _mentions(r, k) <= hi for k in kws), (TEXTS, NUMBER, NUMBER)),
    "check_whether_total_keyword_in_list_metioned_in_range":
        (lambda r, kws, lo, hi: lo <= sum(_mentions(r, k) for k in kws) <= hi, (TEXTS, NUMBER, NUMBER)),
}


def _is(kind: str, value) -> bool:
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == TEXT:
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def parse_constraints(raw: str | None, where: str) -> list[dict]:
    """A row's constraints column -> its constraints, checked: a ValueError naming `where` (the file and row) and
    the constraint for text that is not a JSON list of objects, a judge or verify_funcs of the wrong shape, or a
    rule-checked function whose params do not fit it."""
    if not raw:
        return []
    try:
        items = jsontext.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: constraints column is not JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{where}: constraints column should be a JSON list")
    for k, c in enumerate(items):
        _check_constraint(c, f"{where}: constraint {k}")
    return items


def _check_constraint(c, where: str) -> None:
    if not isinstance(c, dict):
        raise ValueError(f"{where} must be a JSON object, got {json_kind(c)}")
    judge = c.get("judge")
    if judge is not None and not isinstance(judge, dict):
        raise ValueError(f"{where}: judge must be a JSON object, got {json_kind(judge)}")
    funcs = (judge or {}).get("verify_funcs")
    bad = funcs if not isinstance(funcs, (list, type(None))) else next(
        (f for f in funcs or [] if not isinstance(f, dict)), {})
    if not isinstance(bad, dict):
        raise ValueError(f"{where}: verify_funcs must be a JSON list of objects like {{\"func\": ..., \"params\": "
                         f"[...]}}, {'holding' if bad is not funcs else 'got'} {json_kind(bad)}")
    if not checkable(c):
        return
    for f in funcs:
        kinds = CHECKS[f["func"]][1]
        params = f.get("params", [])
        if not isinstance(params, list) or len(params) != len(kinds) or not all(map(_is, kinds, params)):
            got = f"got {json.dumps(params)[:80]}" if "params" in f else "they are missing"
            raise ValueError(f"{where}: params of {f['func']} must be [{', '.join(kinds)}]; {got}")


def checkable(constraint: dict) -> bool:
    judge = constraint.get("judge") or {}
    funcs = judge.get("verify_funcs") or []
    return judge.get("method") == "rule_based" and bool(funcs) and all(
        isinstance(f.get("func"), str) and f["func"] in CHECKS for f in funcs)


def check(constraint: dict, prediction) -> bool:
    if is_failed(prediction):
        return False
    text = str(prediction)
    return all(CHECKS[f["func"]][0](text, *f.get("params", [])) for f in constraint["judge"]["verify_funcs"])
