"""Speed of `lfm2vl eval`: rows per second on the easy-vqa yes/no suite, where the time goes, and what the harness
adds to the engine's own time.

    python scripts/bench_eval.py                      # 200 rows, 450M shapes (random weights), bf16, 2 threads
    python scripts/bench_eval.py --n 120 --reps 2 --json

Three runs per rep, interleaved so that machine load affects them alike (the fastest rep reported):
- `lfm2vl eval` end to end (`lfm2vl.eval.cli.main`, in process: read the TSV, build the prompts, continuous batching
  with --batch-size 16, the progress bar, the predictions file, the scores), on a model loaded once beforehand (the
  load is the same for every run and is reported apart);
- the engine alone: `Engine.generate` on the same conversations (built beforehand), the same batch size and options;
  the harness's overhead is the first over the second, less one (goal: under 5%);
- `lfm2vl eval --batch-size 1`: one row at a time (goal: continuous batching is never slower).
The breakdown comes from timers wrapped around the engine's own stages in every run: `Engine.prepare` (chat template,
image decoding, processor), the vision encoder (`model.image_features`), prefill and decode steps (the generation
loop's `prefill` / `decode_step`), scoring, and the predictions file (reading the TSV, writing predictions); "other"
is the rest of the wall time (sampling, detokenizing, scheduling; for `lfm2vl eval` also prompts and progress bar).
"outside the engine calls" is the wall time not spent in `Engine.prepare` or the generation loop's `add` / `step`:
for `lfm2vl eval` that is the harness's own time, free of the noise that the wall-time ratio carries.
The timers cost microseconds per call. Random weights never emit the end token, so every row decodes exactly
--max-new-tokens tokens: the decode share is that of answers of that length. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("prepare", "vision", "prefill", "decode", "scoring", "tsv_io")
STAGE_LABELS = {"prepare": "image prep + prompt (processor)", "vision": "vision encoder", "prefill": "prefill",
                "decode": "decode", "scoring": "scoring", "tsv_io": "TSV read/write", "other": "other"}


class Timers:
    """Seconds spent inside wrapped callables, by stage."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.s = dict.fromkeys(STAGES, 0.0)
        self.engine_s = 0.0  # inside Engine.prepare or a generation step (overlaps the stages)

    def engine(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.engine_s += time.perf_counter() - t

        return timed

    def wrap(self, stage: str, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[stage] += time.perf_counter() - t

        return timed


def instrument(engine, timers: Timers) -> None:
    """Wrap the engine's stages and the harness's file and scoring functions (module attributes the callers look up
    at call time)."""
    import lfm2vl.eval.run as run
    import lfm2vl.eval.scoring as scoring
    import lfm2vl.eval.tsv as tsv
    import lfm2vl.generate.batch as batch

    engine.prepare = timers.engine(timers.wrap("prepare", engine.prepare))
    for name in ("add", "step"):  # queueing a request, one generation step
        setattr(batch.BatchGenerator, name, timers.engine(getattr(batch.BatchGenerator, name)))
    engine.model.image_features = timers.wrap("vision", engine.model.image_features)
    batch.prefill = timers.wrap("prefill", batch.prefill)
    batch.decode_step = timers.wrap("decode", batch.decode_step)
    scoring.score = timers.wrap("scoring", scoring.score)
    tsv.read_rows = timers.wrap("tsv_io", tsv.read_rows)
    run.write_predictions = timers.wrap("tsv_io", run.write_predictions)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="rows of the easy-vqa yes/no suite")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16, help="the batched runs' --batch-size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--reps", type=int, default=1, help="interleaved repetitions (the fastest reported)")
    ap.add_argument("--shape", default="450M", help="random-weight shape (lfm2vl.bench.data.SHAPES)")
    ap.add_argument("--model", default=None, help="a checkpoint folder instead of random weights")
    ap.add_argument("--cache-dir", default=None, help="random checkpoints (default: ~/.cache/lfm2vl/bench, as "
                                                      "`lfm2vl bench`)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON (after the table)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import lfm2vl.cli.commands
    from lfm2vl.bench.data import random_checkpoint
    from lfm2vl.engine import load
    from lfm2vl.eval import cli as eval_cli
    from lfm2vl.eval.benchmarks import benchmark_for
    from lfm2vl.eval.prompts import build_messages
    from lfm2vl.eval.run import GREEDY
    from lfm2vl.eval.tsv import read_predictions, read_rows

    if args.model:
        folder = Path(args.model)
    else:
        root = Path(args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lfm2vl", "bench"))
        folder = random_checkpoint(args.shape, root / f"random-{args.shape}-seed0")
    t = time.perf_counter()
    engine = load(str(folder), dtype="bfloat16", device="cpu")
    load_s = time.perf_counter() - t
    lfm2vl.cli.commands.load_engine = lambda _args: engine  # `lfm2vl eval` gets the loaded model (make_predictor's import)

    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    with contextlib.redirect_stdout(io.StringIO()):
        eval_cli.main(["make-suite", "easy-vqa-yesno", "--out", str(work / "suite"), "--n", str(args.n)])
    data = work / "suite" / "easy-vqa-yesno.tsv"
    bench = benchmark_for(data)
    rows = read_rows(data)
    convs = [build_messages(bench, r) for r in rows]
    n_images = sum(len(r.images) for r in rows)
    prompt_tokens = statistics.mean(len(engine.prepare(c).input_ids) for c in convs[:8])

    timers = Timers()
    instrument(engine, timers)
    engine.generate(convs[:4], max_batch=4, max_new_tokens=args.max_new_tokens, **GREEDY)  # warm-up

    def run_eval(batch_size: int) -> dict:
        out = work / f"pred-b{batch_size}.tsv"
        for p in (out, eval_cli.scores_path(out)):
            p.unlink(missing_ok=True)  # an existing file would be resumed
        argv = ["--model", str(folder), "--data", str(data), "--output", str(out), "--json",
                "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(batch_size)]
        with contextlib.redirect_stdout(io.StringIO()) as so, contextlib.redirect_stderr(io.StringIO()):
            t = time.perf_counter()
            rc = eval_cli.main(argv)
            wall = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"lfm2vl eval exited with status {rc}")
        return {"wall_s": wall, "texts": read_predictions(out)[1], "overall": json.loads(so.getvalue())["overall"]}

    def run_engine(batch_size: int) -> dict:
        t = time.perf_counter()
        res = engine.generate(convs, max_batch=batch_size, max_new_tokens=args.max_new_tokens, **GREEDY)
        wall = time.perf_counter() - t
        return {"wall_s": wall, "texts": [r.text for r in res], "tokens": sum(r.completion_tokens for r in res)}

    runs = {"eval": lambda: run_eval(args.batch_size), "engine": lambda: run_engine(args.batch_size),
            "eval_b1": lambda: run_eval(1)}
    samples: dict[str, list[dict]] = {k: [] for k in runs}
    for rep in range(args.reps):
        for name, fn in runs.items():
            timers.reset()
            r = fn()
            r["stages"], r["engine_s"] = dict(timers.s), timers.engine_s
            samples[name].append(r)
            print(f"rep {rep + 1}/{args.reps} {name}: {r['wall_s']:.1f} s", file=sys.stderr)
    tmp.cleanup()

    def agree(a: str, b: str) -> int:  # rows with the same prediction in the first rep of two runs
        return sum(x == y for x, y in zip(samples[a][0]["texts"], samples[b][0]["texts"]))

    same = {"eval_vs_engine": agree("eval", "engine"), "eval_vs_eval_b1": agree("eval", "eval_b1")}
    results = {}
    for name, ss in samples.items():
        r = min(ss, key=lambda s: s["wall_s"])  # the fastest rep (least disturbed by other load), its own breakdown
        stages = dict(r["stages"])
        stages["other"] = r["wall_s"] - sum(stages.values())
        results[name] = {"wall_s": r["wall_s"], "rows_per_s": len(rows) / r["wall_s"], "stages_s": stages,
                         "outside_engine_s": r["wall_s"] - r["engine_s"], "walls_s": [s["wall_s"] for s in ss]}
    overhead = results["eval"]["wall_s"] / results["engine"]["wall_s"] - 1
    # The same question without the run-to-run noise of the engine's compute: the eval run's time outside the
    # engine's calls (prepare, generation steps) over its time inside them.
    ev = results["eval"]
    harness_share = ev["outside_engine_s"] / (ev["wall_s"] - ev["outside_engine_s"])
    batching = results["eval_b1"]["wall_s"] / results["eval"]["wall_s"]
    summary = {"rows": len(rows), "images": n_images, "mean_prompt_tokens": prompt_tokens,
               "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "threads": args.threads,
               "dtype": "bf16", "model": "random " + args.shape if not args.model else str(folder),
               "load_s": load_s, "reps": args.reps, "load_average": os.getloadavg()[0],
               "same_predictions": same, "pope_f1": samples["eval"][0]["overall"],
               "harness_overhead": overhead, "harness_time_share": harness_share, "batching_speedup": batching,
               "runs": results}

    cols = [("eval", f"lfm2vl eval, batch {args.batch_size}"), ("engine", f"engine alone, batch {args.batch_size}"),
            ("eval_b1", "lfm2vl eval, batch 1")]
    print(f"easy-vqa yes/no, {len(rows)} rows ({n_images} images, ~{prompt_tokens:.0f} prompt tokens), "
          f"{summary['model']}, bf16, {args.threads} threads, --max-new-tokens {args.max_new_tokens} "
          f"(random weights never stop early), fastest of {args.reps}, load average {summary['load_average']:.2f}")
    print(f"{'':<34}" + "".join(f"{label:>26}" for _, label in cols))
    print(f"{'wall s':<34}" + "".join(f"{results[k]['wall_s']:>26.1f}" for k, _ in cols))
    print(f"{'rows/s':<34}" + "".join(f"{results[k]['rows_per_s']:>26.2f}" for k, _ in cols))
    for stage, label in STAGE_LABELS.items():
        cells = []
        for k, _ in cols:
            s, w = results[k]["stages_s"][stage], results[k]["wall_s"]
            cells.append(f"{s:>8.2f} s ({100 * s / w:4.1f}%)")
        print(f"{'  ' + label:<34}" + "".join(f"{c:>26}" for c in cells))
    cells = [f"{r['outside_engine_s']:>8.2f} s ({100 * r['outside_engine_s'] / r['wall_s']:4.1f}%)"
             for r in (results[k] for k, _ in cols)]
    print(f"{'outside the engine calls':<34}" + "".join(f"{c:>26}" for c in cells))
    print(f"harness overhead (eval / engine - 1): {100 * overhead:+.1f}% (goal < 5%); eval's time outside the "
          f"engine calls / inside them: {100 * harness_share:.1f}%")
    print(f"batching speedup "
          f"(batch 1 / batch {args.batch_size} wall): x{batching:.2f} (goal >= 1); same predictions (rows): "
          f"eval/engine {same['eval_vs_engine']}, batch {args.batch_size}/1 {same['eval_vs_eval_b1']} of {len(rows)}; "
          f"model load {load_s:.1f} s (not in the runs)")
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
