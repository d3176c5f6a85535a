"""Benchmark: lfm2vl's packed VisionTower vs transformers' padded Siglip2VisionModel (random weights, 450M shapes).

Scenarios: (a) one 512x512 image = one 32x32 unit; (b) a 1024x768 image tiled = 6 tiles of 32x32 + a 26x36 thumbnail.
Each in float32 and bfloat16. Warm-up, then the median of several repetitions. A benchmark, never a test.
Usage: .venv/bin/python scripts/bench_vision.py [--threads 2] [--reps 5] [--no-hf]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lfm2vl.config import VisionConfig
from lfm2vl.model.vision import VisionTower

VISION_450M = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   patch_size=16, num_patches=256, vision_use_head=False)
SCENARIOS = {"512x512 (1 unit)": [(32, 32)], "1024x768 tiled (6 tiles + thumb)": [(32, 32)] * 6 + [(26, 36)]}


def inputs(shapes: list[tuple[int, int]], L: int = 1024):
    pv = torch.randn(len(shapes), L, 768)
    mask = torch.zeros(len(shapes), L, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
        pv[i, h * w:] = 0
    return pv, mask, torch.tensor(shapes)


def median_time(fn, reps: int) -> float:
    fn()  # warm-up (also fills the position-embedding cache, as in steady-state serving)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = VisionTower(VisionConfig.from_hf(VISION_450M)).eval()
    ref = None
    if not args.no_hf:
        from transformers import Siglip2VisionConfig, Siglip2VisionModel
        ref = Siglip2VisionModel(Siglip2VisionConfig(**VISION_450M)).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        if ref is not None:
            ref.to(dtype)
        for name, shapes in SCENARIOS.items():
            pv, mask, ss = inputs(shapes)
            pv = pv.to(dtype)
            with torch.inference_mode():
                t_ours = median_time(lambda: ours(pv, mask, ss), args.reps)
                t_ref = (median_time(lambda: ref(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss),
                                     args.reps) if ref is not None else None)
            rows.append(dict(scenario=name, dtype=str(dtype).removeprefix("torch."), lfm2vl_s=round(t_ours, 4),
                             transformers_s=None if t_ref is None else round(t_ref, 4),
                             speedup=None if t_ref is None else round(t_ref / t_ours, 2)))
            print(f"{name:34s} {rows[-1]['dtype']:9s} lfm2vl {t_ours:7.3f} s"
                  + ("" if t_ref is None else f"   transformers {t_ref:7.3f} s   x{t_ref / t_ours:.2f}"), flush=True)
    print(json.dumps(dict(threads=args.threads, reps=args.reps, torch=torch.__version__, results=rows), indent=1))


if __name__ == "__main__":
    main()
