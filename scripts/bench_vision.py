"""Benchmark: lfm2vl's packed VisionTower vs transformers' padded Siglip2VisionModel (random weights, 450M shapes).

Scenarios: (a) one 512x512 image = one 32x32 unit; (b) a 1024x768 image tiled = 6 tiles of 32x32 + a 26x36 thumbnail.
Each in float32 and bfloat16. Warm-up, then interleaved repetitions; median and min reported. Never a test.
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


def timings(fns: dict, reps: int) -> dict:
    """Interleaved repetitions (A, B, A, B, ...) so that load from other processes hits both alike: (median, min)."""
    for fn in fns.values():
        fn()  # warm-up (also fills the position-embedding cache, as in steady-state serving)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


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
            fns = {"lfm2vl": lambda: ours(pv, mask, ss)}
            if ref is not None:
                fns["transformers"] = lambda: ref(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss)
            with torch.inference_mode():
                t = timings(fns, args.reps)
            row = dict(scenario=name, dtype=str(dtype).removeprefix("torch."))
            for k, (med, best) in t.items():
                row[f"{k}_median_s"], row[f"{k}_min_s"] = round(med, 4), round(best, 4)
            line = f"{name:34s} {row['dtype']:9s} lfm2vl {t['lfm2vl'][0]:7.3f} s (min {t['lfm2vl'][1]:.3f})"
            if ref is not None:
                row["speedup_median"] = round(t["transformers"][0] / t["lfm2vl"][0], 2)
                row["speedup_min"] = round(t["transformers"][1] / t["lfm2vl"][1], 2)
                line += (f"   transformers {t['transformers'][0]:7.3f} s (min {t['transformers'][1]:.3f})"
                         f"   x{row['speedup_median']:.2f} (min/min x{row['speedup_min']:.2f})")
            rows.append(row)
            print(line, flush=True)
    print(json.dumps(dict(threads=args.threads, reps=args.reps, torch=torch.__version__, results=rows), indent=1))


if __name__ == "__main__":
    main()
