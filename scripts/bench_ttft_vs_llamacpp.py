"""Time to first token with one image: lfm2vl beside llama.cpp's llama-mtmd-cli, interleaved round by round.

    python scripts/bench_ttft_vs_llamacpp.py --mtmd-cli PATH/llama-mtmd-cli --gguf LM-bf16.gguf \
        --mmproj MMPROJ-bf16.gguf [--model FOLDER] [--size 512x512] [--rounds 5]

lfm2vl: `lfm2vl.load(FOLDER)` (bf16, the CPU path; packed in 12 bits where that is the default, which its label
says), then per round a fresh cache (`engine.reset()`) and
`engine.generate(image + prompt, max_new_tokens=1)`, timed around the call: preprocessing, vision, prefill and the
first token. llama.cpp: `llama-mtmd-cli -n 1 --temp 0` as its users run it (its own default environment, the
given thread count), timed from its own log: the "prompt eval time" of llama_perf, which covers the image's
encoding and the evaluation of all prompt tokens (text and image); model loading is excluded on both sides, and
lfm2vl's figure also holds its image preprocessing. The image is bench.data's test image at --size, the same file for
both. Medians and ranges are printed, then JSON. The GGUFs are yours to make (llama.cpp's convert_hf_to_gguf.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lfm2vl
from lfm2vl.bench import pagecache
from lfm2vl.bench.data import test_image

PROMPT = "Describe this image."


def ours(engine, image_path: str) -> tuple[float, int]:
    engine.reset()  # no prefix reuse between rounds
    t = time.perf_counter()
    res = engine.generate([{"role": "user", "content": [{"type": "image", "image": image_path},
                                                        {"type": "text", "text": PROMPT}]}],
                          max_new_tokens=1, temperature=0)
    return time.perf_counter() - t, res.prompt_tokens


def llama(cli: str, gguf: str, mmproj: str, image_path: str, threads: int) -> tuple[float, int]:
    cmd = [cli, "-m", gguf, "--mmproj", mmproj, "--image", image_path, "-p", PROMPT, "-n", "1", "--temp", "0",
           "-t", str(threads), "-c", "4096", "-v"]  # -v: llama_perf timings are logged only then
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama-mtmd-cli failed ({' '.join(cmd)}): {out.stderr.strip()[-800:]}")
    log = out.stderr + out.stdout
    prompt = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
    if prompt is None:
        raise SystemExit(f"no prompt eval time in llama-mtmd-cli's log:\n{log[-1500:]}")
    return float(prompt.group(1)) / 1000, int(prompt.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mtmd-cli", required=True, help="path to llama.cpp's llama-mtmd-cli")
    ap.add_argument("--gguf", required=True, help="the checkpoint's language model as a GGUF (bf16 for a like pair)")
    ap.add_argument("--mmproj", required=True, help="the checkpoint's vision tower + projector as a GGUF")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/lfm2vl/bench/random-450M-seed0"),
                    help="the checkpoint folder the GGUFs were converted from (default: lfm2vl bench's random 450M)")
    ap.add_argument("--size", default="512x512", help="test image WIDTHxHEIGHT")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for p in (args.mtmd_cli, args.gguf, args.mmproj, args.model):
        if not Path(p).exists():
            ap.error(f"{p} does not exist")
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    import torch

    # every engine's weight files start from the page-cache state a fresh read from disk leaves (bench/pagecache.py)
    pagecache.reread([*pagecache.weight_files(args.model), args.gguf, args.mmproj])
    torch.set_num_threads(args.threads)
    engine = lfm2vl.load(args.model)
    from lfm2vl.engine import default_bf16_packed

    ours_name = "lfm2vl bf16 packed" if default_bf16_packed() else "lfm2vl bf16"
    with tempfile.TemporaryDirectory() as tmp:
        image = str(Path(tmp) / "image.png")
        test_image(w, h).save(image)
        ours(engine, image)  # warm-up (kernels built, caches sized)
        res: dict[str, list[float]] = {ours_name: [], "llama.cpp": []}
        tokens = {}
        for r in range(args.rounds):
            t, tokens[ours_name] = ours(engine, image)
            res[ours_name].append(t)
            t, tokens["llama.cpp"] = llama(args.mtmd_cli, args.gguf, args.mmproj, image, args.threads)
            res["llama.cpp"].append(t)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in res.items()), file=sys.stderr,
                  flush=True)
    print(f"time to first token, one {w}x{h} image, {args.threads} threads, {args.rounds} rounds")
    print(f"{'engine':<14} {'prompt tokens':>13} {'median s':>9} {'min':>7} {'max':>7}")
    for k, v in res.items():
        print(f"{k:<14} {tokens[k]:>13} {statistics.median(v):>9.3f} {min(v):>7.3f} {max(v):>7.3f}")
    print(json.dumps({"size": [w, h], "threads": args.threads, "tokens": tokens, "results": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
