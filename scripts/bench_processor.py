"""Preprocessing time for one large photo with tiling: lfm2vl.Processor vs transformers' Lfm2VlProcessor.

Runs in .venv-oracle (transformers' image processor needs torchvision); lfm2vl is imported from the repo.
Both sides get the same PIL image and the same prompt; timings are the median of --repeat runs, interleaved so
machine load affects both alike. Outputs are checked to be equal before timing.

    .venv-oracle/bin/python scripts/bench_processor.py --width 4000 --height 3000 --repeat 7
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--jpeg", action="store_true", help="pass a JPEG file path instead of a PIL image (includes decoding)")
    args = ap.parse_args()
    import torch
    from PIL import Image

    import processor_cases as pc
    from lfm2vl.processor import Processor
    from oracle_processor import build_reference
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pc.write_checkpoint(Path(tmp) / "ck", "v25")
        ours = Processor.from_pretrained(folder)
        ref = build_reference(folder, "v25", (pc.FIXTURE / "chat_template.jinja").read_text())
        image = Image.fromarray(pc.make_array(args.width, args.height, 0))
        if args.jpeg:
            image.save(Path(tmp) / "photo.jpg", quality=92)
            image = str(Path(tmp) / "photo.jpg")
        text = ours.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "Describe."}]}],
                                        add_generation_prompt=True)

        def run_ours():
            return ours(text=text, images=[image])

        def run_ref():
            return ref(text=text, images=[image], return_tensors="pt", do_convert_rgb=True)

        a, b = run_ours(), run_ref()
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["spatial_shapes"], b["spatial_shapes"])
        diff = (a["pixel_values"] - b["pixel_values"]).abs().max().item()
        t_ours, t_ref = [], []
        for _ in range(args.repeat):
            t = time.perf_counter(); run_ours(); t_ours.append(time.perf_counter() - t)
            t = time.perf_counter(); run_ref(); t_ref.append(time.perf_counter() - t)
        mo, mr = statistics.median(t_ours), statistics.median(t_ref)
        print(f"{args.width}x{args.height} {'JPEG path' if args.jpeg else 'PIL image'}: {a['pixel_values'].shape[0]} "
              f"units, {a['input_ids'].shape[1]} ids, max|pv diff| {diff:.2e}, torch threads {torch.get_num_threads()}")
        print(f"  lfm2vl       median {mo * 1e3:8.1f} ms  (min {min(t_ours) * 1e3:.1f})")
        print(f"  transformers median {mr * 1e3:8.1f} ms  (min {min(t_ref) * 1e3:.1f})   speedup x{mr / mo:.2f}")


if __name__ == "__main__":
    main()
