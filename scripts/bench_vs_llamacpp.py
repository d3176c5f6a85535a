"""Decode speed of lfm2vl beside llama.cpp, interleaved round by round (the machine's memory bandwidth drifts).

    python scripts/bench_vs_llamacpp.py --llama-bench PATH/llama-bench --gguf-bf16 LM-bf16.gguf \
        [--gguf-q8 LM-q8_0.gguf] [--gguf-q4 LM-q4_0.gguf] [--bf16-packed] [--model FOLDER] [--rounds 8] \
        [--depths 0,512]

Each round, at each depth D: lfm2vl bf16 through its public API (`engine.generate` on a prompt of D tokens — at
depth 0 the shortest chat prompt, a few tokens —, `--new-tokens` greedy steps; the Result's decode rate, first token
to last), llama-bench on the bf16 GGUF (`-p 0 -n N -d D`: the same steps after the same depth), then lfm2vl int8
beside the Q8_0 GGUF and lfm2vl int4 beside the Q4_0 one, when given; with --bf16-packed also lfm2vl with its bf16
weights packed losslessly in 12 bits, beside the same round's llama.cpp bf16 figure.
Both use `--threads`. Medians, ranges and per-round ratios are printed, then JSON. llama.cpp and the GGUF files of
the same checkpoint are yours to provide (llama.cpp's convert_hf_to_gguf.py; this project ships neither).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
from pathlib import Path

import torch

import lfm2vl
from lfm2vl.bench import pagecache

DEPTHS = (0, 512)


def prompt_of(engine, tokens: int) -> str:
    """A user message whose chat prompt is `tokens` tokens or just over (random words, seeded)."""
    rng = random.Random(0)
    text = ""
    while len(engine.prepare(text).input_ids) < tokens:
        text += " " + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
    return text


def ours(engine, prompt: str, n: int) -> float:
    """Decode tok/s through the public API: engine.generate, greedy, exactly n new tokens (eos ignored until then)."""
    r = engine.generate(prompt, temperature=0, repetition_penalty=1.0, max_new_tokens=n, min_new_tokens=n)
    return r.decode_tps


def llama(binary: str, gguf: str, n: int, threads: int, depth: int) -> float:
    cmd = [binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(n), "-d", str(depth), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed ({' '.join(cmd)}): {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", required=True, help="path to llama.cpp's llama-bench binary")
    ap.add_argument("--gguf-bf16", required=True, help="the checkpoint's language model as a bf16 GGUF")
    ap.add_argument("--gguf-q8", help="the same as Q8_0 (adds lfm2vl int8 beside it)")
    ap.add_argument("--gguf-q4", help="the same as Q4_0 (adds lfm2vl int4 beside it)")
    ap.add_argument("--bf16-packed", action="store_true",
                    help="add lfm2vl bf16_packed=True beside llama.cpp bf16 (the same bf16 values, 12 bits a weight)")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/lfm2vl/bench/random-450M-seed0"),
                    help="the checkpoint folder the GGUFs were converted from (default: lfm2vl bench's random 450M)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                    help="comma-separated context depths to decode after (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        ap.error(f"--depths must be comma-separated whole numbers, got {args.depths!r}")
    if not depths or min(depths) < 0:
        ap.error(f"--depths must list depths >= 0, got {args.depths!r}")
    for p in (args.llama_bench, args.gguf_bf16, args.gguf_q8, args.gguf_q4, args.model):
        if p is not None and not Path(p).exists():
            ap.error(f"{p} does not exist")
    # every engine's weight files start from the page-cache state a fresh read from disk leaves (bench/pagecache.py)
    ggufs = [g for g in (args.gguf_bf16, args.gguf_q8, args.gguf_q4) if g]
    pagecache.reread([*pagecache.weight_files(args.model), *ggufs])
    torch.set_num_threads(args.threads)
    pairs = [("lfm2vl bf16", {"bf16_packed": False}, "llama.cpp bf16", args.gguf_bf16)]
    if args.bf16_packed:
        pairs.append(("lfm2vl bf16 packed", {"bf16_packed": True}, "llama.cpp bf16", args.gguf_bf16))
    if args.gguf_q8:
        pairs.append(("lfm2vl int8", {"int8": True}, "llama.cpp q8_0", args.gguf_q8))
    if args.gguf_q4:
        pairs.append(("lfm2vl int4", {"int4": True}, "llama.cpp q4_0", args.gguf_q4))
    engines = {name: lfm2vl.load(args.model, dtype="bfloat16", **fmt) for name, fmt, _, _ in pairs}
    prompts = {d: prompt_of(engines["lfm2vl bf16"], d) for d in depths}
    res: dict[int, dict[str, list[float]]] = {d: {k: [] for a, _, b, _ in pairs for k in (a, b)} for d in depths}
    for r in range(args.rounds):
        for d in depths:
            measured = set()  # llama.cpp runs each GGUF once a round, whichever lfm2vl formats it is beside
            for name, _, other, gguf in pairs:
                res[d][name].append(ours(engines[name], prompts[d], args.new_tokens))
                if other not in measured:
                    res[d][other].append(llama(args.llama_bench, gguf, args.new_tokens, args.threads, d))
                    measured.add(other)
            print(f"round {r}, depth {d}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res[d].items()),
                  file=sys.stderr, flush=True)
    for d in depths:
        print(f"decode tok/s at depth {d}, {args.new_tokens} steps, {args.threads} threads, {args.rounds} rounds")
        print(f"{'engine':<16} {'median':>7} {'min':>7} {'max':>7}")
        for k, v in res[d].items():
            print(f"{k:<16} {statistics.median(v):>7.1f} {min(v):>7.1f} {max(v):>7.1f}")
        for name, _, other, _ in pairs:
            ratios = [a / b for a, b in zip(res[d][name], res[d][other])]
            print(f"{name} / {other} per round: " + " ".join(f"{x:.2f}" for x in ratios)
                  + f" (median {statistics.median(ratios):.2f})")
    print(json.dumps({"depths": depths, "new_tokens": args.new_tokens, "threads": args.threads,
                      "results": {str(d): res[d] for d in depths}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
