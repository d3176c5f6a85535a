"""`lfm2vl bench`: speed benchmark of lfm2vl beside transformers on the same weights and inputs.

    lfm2vl bench                         # random weights at the published 450M shapes, bf16, 2 threads
    lfm2vl bench --shape 1.6B --int8     # + weight-only int8 and its quality against bf16 (--int4 likewise)
    lfm2vl bench --model ./LFM2-VL-450M  # a real checkpoint folder
    lfm2vl bench --device cuda --compile # on a GPU, the decode step compiled with CUDA graphs

Measures preprocessing, vision encoding, prefill tokens/s, time to first token, decode tokens/s, load time and
peak RSS for four scenarios (text-only 512-token prompt, one 512x512 image, one 1024x768 image tiled + thumbnail,
two images). Each engine runs in a fresh subprocess (bench/worker.py) so its peak RSS is its own; transformers is
measured when it is importable. Warm-up, then `--reps` runs, median reported. Prints a table with ratios and JSON.
Random weights (bench/data.py) give the real shapes' timings; they say nothing about output quality beyond the
int8/int4-vs-bf16 agreement that --int8 / --int4 report.

    lfm2vl bench --train                 # LoRA training samples/s and peak RSS, lfm2vl beside transformers + peft

--train measures training steps instead (bench/train.py): a batch of --batch-size conversations (one 512x512 image,
a question and a 64-token answer each), LoRA on the "text" targets, gradient checkpointing, AdamW; --warmup
untimed steps, then --reps timed steps (median step time reported).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from ..files.atomic import write_text
from . import pagecache, rounds
from .report import fmt as _fmt
from .report import shares_table, table
from .data import random_checkpoint
from .options import parse_args


def _folder(args) -> Path:
    if args.model:
        folder = Path(args.model)
        if not (folder / "config.json").is_file():
            raise SystemExit(f"lfm2vl bench: {folder} has no config.json (expected a checkpoint folder)")
        return folder
    root = Path(args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lfm2vl", "bench"))
    if args.config:
        shape = Path(args.config)
        tag = "config-" + hashlib.sha256(shape.read_bytes()).hexdigest()[:12]
    else:
        shape, tag = args.shape, args.shape
    folder = root / f"random-{tag}-seed{args.seed}"
    print(f"random weights ({tag}): {folder}", file=sys.stderr)
    return random_checkpoint(shape, folder, seed=args.seed)


# Runs the worker with torch imported before lfm2vl (a program that imports torch itself first).
TORCH_FIRST = "import sys, runpy, torch; runpy.run_module('lfm2vl.bench.worker', run_name='__main__')"


def run_worker(spec: dict, timeout: float) -> dict:
    """Run one engine in a fresh interpreter with the user's environment unchanged (each engine as its users run
    it; the worker sets the thread count through torch); returns its result dict or {"error": ...}."""
    start = ["-c", TORCH_FIRST] if spec.get("torch_first") else ["-m", spec.get("module", "lfm2vl.bench.worker")]
    cmd = [sys.executable, *start, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": spec["engine"], "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return {"engine": spec["engine"], "error": (proc.stderr or proc.stdout).strip()[-1500:]}


def _probe_machine(args, short: str) -> dict | None:
    """One measurement of the machine's ceilings (bench/machine.py) in its own process; None off the CPU or on
    failure."""
    if args.device != "cpu":
        return None
    print("measuring the machine (read bandwidth, GEMM rate) ...", file=sys.stderr, flush=True)
    r = run_worker({"engine": "machine", "module": "lfm2vl.bench.machine", "threads": args.threads, "dtype": short},
                   args.timeout)
    if "error" in r:
        print(f"lfm2vl bench: the machine probe failed ({r['error']})", file=sys.stderr)
        return None
    return r


def _machine(probes: list) -> dict | None:
    """The ceilings as the mean of the given probes (those before and after a round, or all of a run: a VM's memory
    bandwidth drifts; the range is kept beside it)."""
    got = [p for p in probes if p]
    if not got:
        return None
    out = dict(got[0])
    for k in ("read_gbps", "gemm_gflops", "int8_gops"):
        vals = [p[k] for p in got if p.get(k) is not None]
        if vals:
            out[k], out[k + "_range"] = sum(vals) / len(vals), [min(vals), max(vals)]
    return out


def _add_shares(results: dict, specs: dict, folder: Path, machine: dict | None) -> None:
    """Each timed scenario gets its achieved GB/s and GFLOP/s and their shares of the machine's ceilings."""
    from .work import add_shares, model_work

    work = model_work(folder)
    for label, r in results.items():
        spec = specs[label]
        if "error" in r or r.get("engine") not in ("ours", "transformers"):
            continue
        fmt = next((f for f in ("int8", "int4", "bf16_packed") if spec.get(f)), spec["dtype"])
        for m in r["scenarios"].values():
            add_shares(m, work, fmt, spec.get("quantize_head", True), machine, spec.get("int8_vision", False))


def _write_json(path: str | None, payload: dict) -> int:
    """Write --json's file (atomically); 1 with a one-line error where that fails (the results are printed above)."""
    if path:
        try:
            write_text(path, json.dumps(payload, indent=2))
        except OSError as e:
            print(f"lfm2vl bench: error: --json {path}: cannot write it ({e.strerror or e})", file=sys.stderr)
            return 1
    return 0


def train_main(args, folder: Path) -> int:
    from . import train

    common = {"folder": str(folder), "dtype": args.short_dtype, "threads": args.threads, "steps": args.reps,
              "warmup": args.warmup, "batch_size": args.batch_size, "answer_tokens": args.answer_tokens,
              "image_size": args.image_size, "image_knobs": args.image_knobs, "targets": args.targets,
              "gradient_checkpointing": not args.no_gradient_checkpointing, "module": "lfm2vl.bench.train"}
    labels = {"ours": f"lfm2vl {args.short_dtype}", "transformers": f"transformers+peft {args.short_dtype}"}
    results = {}
    for engine in args.engines:
        print(f"running {labels[engine]} (training) ...", file=sys.stderr, flush=True)
        results[labels[engine]] = run_worker({**common, "engine": engine}, args.timeout)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"lfm2vl bench --train: {args.model or 'random ' + (args.config or args.shape)}, {args.dtype}, "
          f"{args.threads} threads, batch {args.batch_size} x (one {args.image_size}x{args.image_size} image + "
          f"{args.answer_tokens}-token answer), LoRA r {train.LORA['r']} on {args.targets!r}, gradient checkpointing "
          f"{'off' if args.no_gradient_checkpointing else 'on'}, {args.warmup} warm-up + {args.reps} timed steps "
          f"(median), load average {_fmt(load)} (other processes on the CPU skew timings)")
    print(train.table(results))
    payload = {"model": args.model or f"random-{args.config or args.shape}", "mode": "train",
               **{k: v for k, v in common.items() if k not in ("folder", "module")}, "load_average": load,
               "results": results}
    print(json.dumps(payload))
    failed = any("error" in r for r in results.values())
    return _write_json(args.json, payload) or int(failed)


def main(argv=None) -> int:
    from ..engine import default_bf16_packed

    args = parse_args(argv)
    folder = _folder(args)
    if not args.keep_page_cache:
        pagecache.reread(pagecache.weight_files(folder))
    if args.train:
        return train_main(args, folder)
    short = args.short_dtype
    common = {"folder": str(folder), "dtype": short, "device": args.device, "threads": args.threads,
              "reps": args.reps, "warmup": args.warmup, "new_tokens": args.new_tokens, "scenarios": args.scenarios,
              "image_knobs": args.image_knobs, "adapter": args.adapter}
    runs = []
    if "ours" in args.engines:
        runs.append((f"lfm2vl {short}", {**common, "engine": "ours", "optimize": not args.no_optimize,
                                          "compile": args.compile}))
        if args.torch_first:
            runs.append((f"lfm2vl {short} torch 1st", {**common, "engine": "ours", "optimize": not args.no_optimize,
                                                        "torch_first": True}))
        if args.low_memory:
            runs.append((f"lfm2vl {short} low-mem", {**common, "engine": "ours",
                                                      "optimize": not args.no_optimize, "low_memory": True}))
        if args.bf16_packed or default_bf16_packed(short, args.device, optimize=not args.no_optimize):
            runs.append(("lfm2vl bf16 packed", {**common, "dtype": "bf16", "engine": "ours", "bf16_packed": True}))
        for fmt in ("int8", "int4"):
            if getattr(args, fmt):
                runs.append((f"lfm2vl {fmt}", {**common, "dtype": "bf16", "engine": "ours", fmt: True,
                                               "quantize_head": not args.int8_float_head}))
        if args.int8_vision:
            runs.append(("lfm2vl int8+vision", {**common, "dtype": "bf16", "engine": "ours", "int8": True,
                                                 "int8_vision": True, "quantize_head": not args.int8_float_head}))
    if "transformers" in args.engines:
        runs.append((f"transformers {short}", {**common, "engine": "transformers"}))
    for fmt in ("int8", "int4", "int8_vision"):
        if getattr(args, fmt) and "ours" in args.engines:
            label = "int8+vision" if fmt == "int8_vision" else fmt
            runs.append((f"{label} quality", {**common, "engine": "quality", "format": fmt.removesuffix("_vision"),
                                              "int8_vision": fmt == "int8_vision",
                                              "quantize_head": not args.int8_float_head,
                                              "new_tokens": min(args.new_tokens, 16)}))
    probes = [_probe_machine(args, short)]
    per_round = []
    for r in range(args.rounds):
        results = {}
        for label, spec in runs:
            if r and spec["engine"] == "quality":
                continue  # deterministic: once is enough
            print(f"running {label}{f' (round {r + 1} of {args.rounds})' if args.rounds > 1 else ''} ...",
                  file=sys.stderr, flush=True)
            results[label] = run_worker(spec, args.timeout)
        probes.append(_probe_machine(args, short))
        _add_shares(results, dict(runs), folder, _machine(probes[-2:]))  # the ceilings around this round
        per_round.append(results)
    results = rounds.merge(per_round)  # each share: the median of the rounds' own shares
    machine = _machine(probes)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"lfm2vl bench: {args.model or 'random ' + (args.config or args.shape)}, {args.dtype}, {args.device}, "
          f"{args.threads} threads, {args.reps} reps (median)"
          + (f" x {args.rounds} interleaved rounds (medians; ratios: median of the rounds')"
             if args.rounds > 1 else "")
          + f", {args.new_tokens} decode steps, load average "
          f"{_fmt(load)} (other processes on the CPU skew timings)"
          + (f", image options {args.image_knobs}" if args.image_knobs else ""))
    print(table(results, args.scenarios))
    print(shares_table(results, args.scenarios, machine))
    payload = {"model": args.model or f"random-{args.config or args.shape}", "dtype": short,
               "device": args.device, "threads": args.threads, "machine": machine,
               "reps": args.reps, "rounds": args.rounds, "new_tokens": args.new_tokens,
               "image_knobs": args.image_knobs,
               "load_average": load, "results": results}
    print(json.dumps(payload))
    failed = any("error" in r for r in results.values())
    return _write_json(args.json, payload) or int(failed)


if __name__ == "__main__":
    sys.exit(main())
