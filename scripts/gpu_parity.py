"""CUDA parity of lfm2vl against transformers on a tiny random checkpoint: logits (float32 and bfloat16, text, an
image, a tiled image) and greedy generation (the static-cache decode loop, eager and compiled).

For a lent GPU machine (scripts/gpu_check.sh runs it); needs torch with CUDA and transformers. Prints one line per
check and exits 1 if any fails. Not part of the CPU test suite (CI has no GPU).
    python scripts/gpu_parity.py [--layout tiny-lfm2vl] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from checkpoints import image_placeholder, make_checkpoint_with_oracle, make_pixels  # noqa: E402
from lfm2vl.generate.reference import reference_generate  # noqa: E402
from lfm2vl.loading import load_model  # noqa: E402


def _inputs(units, dev):
    ids = [1, 6] + (image_placeholder(units) if units else []) + list(range(600, 640)) + [7]
    batch = {"input_ids": torch.tensor([ids], device=dev)}
    if units:
        pv, pm, ss = make_pixels(units, seed=1)
        batch.update(pixel_values=pv.to(dev), pixel_attention_mask=pm.to(dev), spatial_shapes=ss.to(dev))
    return batch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="tiny-lfm2vl")
    ap.add_argument("--device", default="cuda", help="cuda (what it is for); cpu to try the script itself")
    args = ap.parse_args()
    dev = torch.device(args.device)
    print("device:", torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch", torch.__version__)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder, oracle = make_checkpoint_with_oracle(Path(tmp) / "ckpt", args.layout)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, None)):
            ours = load_model(folder, dtype=dtype, device=dev)[0].eval()
            ref = oracle.to(dev, dtype).eval()
            for name, units in (("text", []), ("image", [(16, 24)]), ("tiled", [(32, 32), (32, 32), (16, 16)])):
                batch = _inputs(units, dev)
                with torch.inference_mode():
                    a = ours(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}).float()
                    b = ref(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}).logits.float()
                diff = (a - b).abs().max().item()
                agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
                good = diff <= tol if tol else agree >= 0.9
                ok &= good
                print(f"{'PASS' if good else 'FAIL'} logits {str(dtype)[6:]:<9} {name:<6} max|diff| {diff:.2e} "
                      f"argmax agreement {agree:.3f}")
            # greedy decode through the static cache, eager and compiled, against the cache-free reference
            if dtype == torch.float32:
                batch = _inputs([(16, 24)], dev)
                want = reference_generate(ours, batch["input_ids"][0].tolist(), 24, batch["pixel_values"],
                                          batch["pixel_attention_mask"], batch["spatial_shapes"])
                with torch.inference_mode():
                    feats = ours.image_features(batch["pixel_values"], batch["pixel_attention_mask"],
                                                batch["spatial_shapes"])
                for label, step in (("eager", ours.forward_cached),
                                    ("compiled", torch.compile(ours.forward_cached, dynamic=False,
                                                               mode="reduce-overhead" if dev.type == "cuda"
                                                               else None))):
                    with torch.inference_mode():
                        emb = ours.embed(batch["input_ids"], feats)
                        T = emb.shape[1]
                        cache = ours.make_cache(1, T + 32)
                        logits = ours.forward_cached(emb, cache, torch.tensor([0], device=dev))
                        got = [int(logits.argmax(-1))]
                        for i in range(23):
                            tok = torch.tensor([[got[-1]]], device=dev)
                            logits = step(ours.embed(tok), cache, torch.tensor([T + i], device=dev))
                            got.append(int(logits.argmax(-1)))
                    good = got == want
                    ok &= good
                    print(f"{'PASS' if good else 'FAIL'} greedy decode {label}: {got[:8]}... vs reference")
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
