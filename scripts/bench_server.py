"""Benchmark the OpenAI-compatible server: throughput with 1, 4 and 16 concurrent clients vs one by one.

    python scripts/bench_server.py --tiny                       # builds a tiny random checkpoint (needs transformers)
    python scripts/bench_server.py --model PATH [--image] [--format no-bf16-packed]   # a local checkpoint folder
    python scripts/bench_server.py --url http://127.0.0.1:8000  # an already running server (--served-name NAME)

The same set of requests (distinct prompts, greedy, fixed max_tokens) is sent (a) one by one, then (b) by C
concurrent streaming clients for each C. Reported per run: wall time, completion tokens (from usage), aggregate
completion tokens/s, mean time to first token, and the speedup over (a). Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _image_url() -> str:
    from PIL import Image

    img = Image.new("RGB", (320, 240), (30, 120, 200))
    for x in range(0, 320, 3):
        img.putpixel((x, (x * 7) % 240), (255, x % 256, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(i: int, image: str | None) -> list[dict]:
    text = f"Request {i}: describe what you see and count to {10 + i}."
    if image is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": text}]}]


def _one(client: httpx.Client, url: str, model: str, messages, max_tokens: int) -> tuple[int, float, float]:
    """Stream one request; returns (completion tokens, time to first content, total time)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if ttft is None and obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return tokens, ttft or 0.0, time.perf_counter() - t0


def run(url: str, model: str, n_requests: int, max_tokens: int, concurrency: int, image: str | None) -> dict:
    requests = [_messages(i, image) for i in range(n_requests)]
    with httpx.Client(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(lambda m: _one(client, url, model, m, max_tokens), requests))
        wall = time.perf_counter() - t0
    tokens = sum(o[0] for o in out)
    return {"concurrency": concurrency, "requests": n_requests, "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "mean_ttft_s": sum(o[1] for o in out) / len(out)}


def _start_server(model_dir: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lfm2vl.serve.cli", "--model", model_dir, "--port", "0", "--served-model-name",
           "bench", "--max-batch", str(max(args.concurrency)), "--max-seq-len", str(args.max_seq_len),
           "--log-level", "warning"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.format:
        cmd += ["--" + args.format]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT)
    for line in proc.stdout:
        print("  server:", line.rstrip(), file=sys.stderr)
        if " at http://" in line:
            url = line.split(" at ")[1].split()[0].removesuffix("/v1")
            return proc, url
    raise SystemExit(f"the server exited with status {proc.wait()} before it was ready")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder to serve")
    src.add_argument("--tiny", nargs="?", const="tiny-lfm2vl", metavar="LAYOUT",
                     help="serve a random checkpoint built by tests/checkpoints.py "
                          "(layout: tiny-lfm2vl, full_450m, ...)")
    src.add_argument("--url", help="benchmark a running server")
    p.add_argument("--served-name", default="bench", help="model name to send with --url")
    p.add_argument("--requests", type=int, default=16, help="requests per run")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--image", action="store_true", help="attach a 320x240 image to every request")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--dtype", default=None)
    p.add_argument("--format", choices=["int8", "int4", "bf16-packed", "no-bf16-packed"], default=None,
                   help="the served model's CPU weight format (lfm2vl serve's --int8 / --int4 / --bf16-packed / "
                        "--no-bf16-packed; default: lfm2vl serve's own)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)

    proc, tmp = None, None
    if args.url:  # the server's root; a trailing /v1 (the API's base URL) is accepted too
        url, model = args.url.rstrip("/").removesuffix("/v1"), args.served_name
    else:
        model_dir = args.model
        if args.tiny:
            sys.path.insert(0, str(ROOT / "tests"))
            from checkpoints import make_checkpoint

            tmp = tempfile.TemporaryDirectory()
            model_dir = str(make_checkpoint(Path(tmp.name) / args.tiny, args.tiny))
        proc, url = _start_server(model_dir, args)
        model = "bench"
    image = _image_url() if args.image else None
    try:
        run(url, model, 2, 4, 2, image)  # warm-up
        base = run(url, model, args.requests, args.max_tokens, 1, image)
        results = [base] + [run(url, model, args.requests, args.max_tokens, c, image)
                            for c in args.concurrency if c != 1]
    except httpx.HTTPStatusError as e:
        body = e.response.text[:300]
        print(f"bench_server: {e.request.url} answered {e.response.status_code}: {body}", file=sys.stderr)
        return 1
    except httpx.TransportError as e:
        print(f"bench_server: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if tmp is not None:
            tmp.cleanup()
    for r in results:
        r["speedup_vs_one_by_one"] = r["tokens_per_s"] / base["tokens_per_s"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'clients':>7} {'requests':>8} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'TTFT s':>7} {'speedup':>7}")
        for r in results:
            print(f"{r['concurrency']:>7} {r['requests']:>8} {r['wall_s']:>8.2f} {r['completion_tokens']:>7} "
                  f"{r['tokens_per_s']:>8.1f} {r['mean_ttft_s']:>7.3f} {r['speedup_vs_one_by_one']:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
