"""Interleaved rounds of the inference bench (`--rounds N`): every engine runs once per round, in turn, so a drift of
the machine's speed (common on shared VMs: the same run can differ by 20% minutes apart) reaches all engines alike.
`merge` folds the rounds into one result per engine."""
from __future__ import annotations

import statistics

_PER_RUN = ("load_s", "rss_after_load_mb")


def _median_dicts(ds: list[dict]) -> dict:
    out = dict(ds[0])
    for k, v in ds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [d[k] for d in ds if isinstance(d.get(k), (int, float))]
            ints = all(isinstance(x, int) for x in vals)  # counts (tokens, patches) stay whole numbers
            out[k] = (statistics.median_low(vals) if ints else statistics.median(vals)) if vals else v
    return out


def merge(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Results of several rounds ({label: result} each) -> one {label: result}: every scenario metric and the load
    figures the median over the rounds, the peak RSS the largest; per scenario `ttft_x` and `decode_x`, the median
    over the rounds of the ratio to the same round's transformers row (what the table prints), and `rounds`. An
    entry only the first round has (a deterministic check such as quality) is taken as it is."""
    if len(rounds) == 1:
        return rounds[0]
    merged = {}
    for label, first in rounds[0].items():
        runs = [r[label] for r in rounds if label in r]
        bad = next((r for r in runs if "error" in r), None)
        if bad is not None or first.get("engine") not in ("ours", "transformers"):
            merged[label] = bad or first  # a failure, or a check run once
            continue
        out = {**first, **_median_dicts([{k: r[k] for k in _PER_RUN if k in r} for r in runs])}
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        out["rounds"] = len(runs)
        out["scenarios"] = {sc: _median_dicts([r["scenarios"][sc] for r in runs]) for sc in first["scenarios"]}
        merged[label] = out
    base = next((k for k in merged if k.startswith("transformers") and "error" not in merged[k]), None)
    if base is not None:
        for label, out in merged.items():
            if "error" in out or "rounds" not in out:
                continue
            for sc, m in out["scenarios"].items():
                pairs = [(r[base]["scenarios"][sc], r[label]["scenarios"][sc]) for r in rounds]
                m["ttft_x"] = statistics.median(b["ttft_s"] / o["ttft_s"] for b, o in pairs)
                m["decode_x"] = statistics.median(o["decode_tps"] / b["decode_tps"] for b, o in pairs)
    return merged
