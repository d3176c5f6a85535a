"""score(benchmark, rows, predictions) -> the scores dict for a benchmark's kind.

Every result has "benchmark", "kind", "overall" (the published unit: percent accuracy (exact match for open questions); MMBench circular percent;
POPE F1 x 100; OCRBench total of hits, out of 1000 on the full file; MM-IFEval percent of constraints met: the
rule-checked ones, plus the rest with a judge model; marked partial while some go unchecked), "n" (rows scored),
"failed" (rows whose prediction is missing or marks a failed row), and breakdowns "categories", "l2_categories",
"splits" (name -> number in the headline's unit), plus kind-specific numbers. A prediction of None counts as failed.
"""
from __future__ import annotations

from collections import defaultdict

from lfm2vl.eval import score_ifeval, score_mc, score_ocr, score_pope
from lfm2vl.eval.benchmarks import Benchmark
from lfm2vl.eval.tsv import Row


def _check(benchmark: Benchmark, rows: list[Row], predictions: list, needs_answer: bool = True) -> None:
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    if needs_answer:
        for r in rows:
            if r.answer is None:
                if "answer" not in r.raw:
                    raise ValueError(f"{r.source}: no 'answer' column, needed to score {benchmark.name}")
                raise ValueError(f"{r.where()}: empty answer, needed to score {benchmark.name}")


def _percent_by(rows: list[Row], hits: list[bool], attr: str) -> dict[str, float]:
    acc = defaultdict(list)
    for r, h in zip(rows, hits):
        key = getattr(r, attr)
        if key is not None:
            acc[key].append(h)
    return {k: 100 * sum(v) / len(v) for k, v in sorted(acc.items())}


def _accuracy_result(benchmark, rows, hits, failed, **extra) -> dict:
    return {"benchmark": benchmark.name, "kind": benchmark.kind,
            "overall": 100 * sum(hits) / len(hits) if hits else 0.0, "n": len(hits), "failed": failed,
            "categories": _percent_by(rows, hits, "category"),
            "l2_categories": _percent_by(rows, hits, "l2_category"),
            "splits": _percent_by(rows, hits, "split"), **extra}


def _failed(predictions) -> int:
    return sum(score_mc.is_failed(p) for p in predictions)


def score_mcq(benchmark, rows, predictions, circular: bool | None = None) -> dict:
    _check(benchmark, rows, predictions)
    hits = score_mc.mc_hits(rows, predictions)
    vanilla = 100 * sum(hits) / len(hits) if hits else 0.0
    if circular is None:
        circular = benchmark.kind == "mmbench"
    if not circular:
        return _accuracy_result(benchmark, rows, hits, _failed(predictions), circular=False)
    groups = score_mc.circular_groups(rows)
    mains = [rows[members[0]] for members in groups.values()]
    group_hits = [all(hits[p] for p in members) for members in groups.values()]
    return _accuracy_result(benchmark, mains, group_hits, _failed(predictions), circular=True,
                            groups=len(groups), vanilla=vanilla, copies=len(rows))


def score_yes_no(benchmark, rows, predictions) -> dict:
    _check(benchmark, rows, predictions)
    extracted = [score_pope.extract_yes_no(p) for p in predictions]
    pairs, by_cat = [], defaultdict(list)
    for r, e in zip(rows, extracted):
        answer = r.answer.strip().capitalize()
        for cat in score_pope.explode(r.category):
            pairs.append((answer, e))
            if cat is not None:
                by_cat[cat].append((answer, e))
    stats = score_pope.f1_stats(pairs)
    details = {c: score_pope.f1_stats(v) for c, v in sorted(by_cat.items())}
    return {"benchmark": benchmark.name, "kind": benchmark.kind, "overall": stats["f1"], "n": len(rows),
            "failed": _failed(predictions), "accuracy": stats["accuracy"], "precision": stats["precision"],
            "recall": stats["recall"], "unknown": extracted.count("Unknown"),
            "categories": {c: d["f1"] for c, d in details.items()}, "category_details": details,
            "l2_categories": {}, "splits": _percent_by(rows, [r.answer.strip().capitalize() == e
                                                               for r, e in zip(rows, extracted)], "split")}


def score_ocrbench(benchmark, rows, predictions) -> dict:
    _check(benchmark, rows, predictions)
    hits = [score_ocr.ocr_hit(p, r.answer, r.category) for r, p in zip(rows, predictions)]
    counts = defaultdict(int)
    for r, h in zip(rows, hits):
        counts[r.category or "none"] += int(h)
    groups = {g: sum(counts.get(c, 0) for c in cats) for g, cats in score_ocr.GROUPS.items()}
    return {"benchmark": benchmark.name, "kind": benchmark.kind, "overall": sum(hits), "n": len(rows),
            "failed": _failed(predictions), "percent": 100 * sum(hits) / len(hits) if hits else 0.0,
            "categories": dict(sorted(counts.items())), "groups": groups, "l2_categories": {},
            "splits": _percent_by(rows, hits, "split")}


def normalize_answer(text) -> str:
    """An open answer as the exact scorer compares it: stripped, lower case, without a final full stop."""
    return str(text).strip().lower().rstrip(".").strip()


def score_exact(benchmark, rows, predictions) -> dict:
    _check(benchmark, rows, predictions)
    hits = [not score_mc.is_failed(p) and normalize_answer(p) == normalize_answer(r.answer)
            for r, p in zip(rows, predictions)]
    return _accuracy_result(benchmark, rows, hits, _failed(predictions))


def score_rules(benchmark, rows, predictions, judge=None) -> dict:
    """MM-IFEval: the rule-checked constraints; with `judge` (judge.Judge) also every other constraint, asked of
    the judge model (a malformed verdict counts as unsatisfied and as a judge failure). Without a judge, or with
    constraints left unchecked, the result is marked partial."""
    _check(benchmark, rows, predictions, needs_answer=False)
    plans, asks = [], []  # per row: (row, [rule verdicts], [indices into asks]); asks: judge items
    for r, p in zip(rows, predictions):
        if r.raw.get("infer_type", "main") not in ("main", ""):
            continue
        items = score_ifeval.parse_constraints(r.raw.get("constraints"), r.where())
        rule = [score_ifeval.check(c, p) for c in items if score_ifeval.checkable(c)]
        others = [c for c in items if not score_ifeval.checkable(c)]
        judged = []
        if judge is not None:
            for c in others:
                judged.append(len(asks))
                asks.append((r.question or "", str(c.get("value", c.get("key", ""))), p))
        plans.append((r, rule, judged, len(others) - len(judged)))
    pending = [i for i, (_, _, p) in enumerate(asks) if not score_mc.is_failed(p)]
    verdicts: list = [False] * len(asks)  # a failed prediction satisfies nothing: no need to ask
    if pending:
        for i, v in zip(pending, judge.verdicts([(q, c, str(p)) for q, c, p in (asks[i] for i in pending)])):
            verdicts[i] = v
    row_scores, kept, checked, judged_n, unchecked = [], [], 0, 0, 0
    for r, rule, judged, left in plans:
        unchecked += left
        if not rule and not judged:
            continue
        checked += len(rule)
        judged_n += len(judged)
        met = sum(rule) + sum(verdicts[i] is True for i in judged)
        row_scores.append(met / (len(rule) + len(judged)))
        kept.append(r)
    failures = sum(v is None for v in verdicts)
    partial = judge is None or unchecked > 0
    note = ("rule-checked constraints only; not comparable with published MM-IFEval numbers" if judge is None else
            "rule-checked constraints plus the judge's verdicts on the rest (judge prompt and model differ from "
            "VLMEvalKit's: close to, not the same as, published MM-IFEval numbers)")
    return {"benchmark": benchmark.name, "kind": benchmark.kind,
            "overall": 100 * sum(row_scores) / len(row_scores) if row_scores else 0.0,
            "n": len(row_scores), "failed": _failed(predictions), "partial": partial, "note": note,
            "constraints_checked": checked, "constraints_judged": judged_n, "constraints_unchecked": unchecked,
            "judge_failures": failures, "judge": None if judge is None else {"url": judge.url, "model": judge.model},
            "categories": _percent_by(kept, row_scores, "category"),
            "l2_categories": _percent_by(kept, row_scores, "l2_category"),
            "splits": _percent_by(kept, row_scores, "split")}


def score(benchmark: Benchmark, rows: list[Row], predictions: list, circular: bool | None = None,
          judge=None) -> dict:
    """Score predictions (aligned with rows) by the benchmark's rules; `circular` overrides MMBench's default;
    `judge` (judge.Judge) checks MM-IFEval's constraints that no rule checks."""
    if benchmark.kind in ("mc", "mmbench"):
        return score_mcq(benchmark, rows, predictions, circular)
    if benchmark.kind == "pope":
        return score_yes_no(benchmark, rows, predictions)
    if benchmark.kind == "ocr":
        return score_ocrbench(benchmark, rows, predictions)
    if benchmark.kind == "ifeval":
        return score_rules(benchmark, rows, predictions, judge)
    if benchmark.kind == "exact":
        return score_exact(benchmark, rows, predictions)
    raise ValueError(f"no scorer for kind {benchmark.kind!r}")
