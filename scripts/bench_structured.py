"""Decode speed with and without a JSON schema, at the 450M shapes (random bf16 weights, a 65,536-token tokenizer).

    python scripts/bench_structured.py [--rows 1 8] [--tokens 96] [--reps 3] [--json out.json]

Each round runs the same prompt free and constrained (the ~10-field schema of scripts/bench_grammar.py: nested
object, enum, array, number ranges), single row and a batch of rows, interleaved; decode tokens/s is the engine's
own (completion tokens after the first / decode seconds, per row, summed over the batch). Random weights: the
free answer is garbage that runs to --tokens; the constrained one is valid JSON that may end earlier, so tokens/s
(not time) is compared. Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grammar  # noqa: E402


def checkpoint(folder: Path) -> Path:
    from lfm2vl.bench.data import random_checkpoint

    return random_checkpoint("450M", folder, corpus=bench_grammar.corpus(60000), vocab_size=bench_grammar.VOCAB)


def tps(results) -> float:
    """Decode tokens/s of a batch: tokens after each row's first over the longest row's decode time."""
    tokens = sum(max(r.completion_tokens - 1, 0) for r in results)
    return tokens / max(r.decode_s for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import lfm2vl

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        engine = lfm2vl.load(str(checkpoint(Path(tmp) / "450m")))
        print(f"random 450M checkpoint with a {bench_grammar.VOCAB}-token tokenizer: {time.perf_counter() - t:.0f} s")
        prompt = [{"role": "user", "content": "Extract the order as JSON."}]
        opts = dict(max_new_tokens=args.tokens, temperature=0.7, repetition_penalty=1.0, min_p=0.0)
        engine.generate(prompt, **opts)  # warm-up
        engine.generate(prompt, json_schema=bench_grammar.SCHEMA, **opts)
        table = {}
        for n in args.rows:
            free, con, lengths = [], [], []
            for rep in range(args.reps):
                batch = [prompt] * n  # a list of conversations: a list of results, even for one row
                r_free = engine.generate(batch, seed=rep, **opts)
                r_con = engine.generate(batch, json_schema=bench_grammar.SCHEMA, seed=rep, **opts)
                free.append(tps(r_free))
                con.append(tps(r_con))
                lengths += [r.completion_tokens for r in r_con]
            f, c = statistics.median(free), statistics.median(con)
            table[n] = {"free_tps": f, "schema_tps": c, "cost_pct": 100 * (f / c - 1),
                        "schema_tokens_median": statistics.median(lengths), "free_runs": free, "schema_runs": con}
    print(f"{'rows':>5}{'free tok/s':>12}{'schema tok/s':>14}{'cost per token':>16}{'JSON tokens':>13}")
    for n, r in table.items():
        print(f"{n:>5}{r['free_tps']:>12.1f}{r['schema_tps']:>14.1f}{r['cost_pct']:>15.1f}%"
              f"{r['schema_tokens_median']:>13.0f}")
    print(json.dumps(table, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
