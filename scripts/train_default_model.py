"""Train the bundled default model from nothing with lfm2vl's own training code, evaluate it, write its model card.

    python scripts/train_default_model.py --output DIR [--scale 1.0] [--seed 0]

A small LFM2-VL (same config layout and code path as the published checkpoints: SigLIP2 NaFlex tower, 2x2 pixel
unshuffle + MLP projector, LFM2 conv + attention backbone; a byte-level BPE tokenizer with LFM2's special tokens at
their real ids; the real chat template) is trained in the stages the LFM2-VL model card describes, each one a
`lfm2vl.finetune(full=True)` run starting from the previous stage's checkpoint:

1. text + captions: text-only rows (pictures stated in words, questions about them) and image captions;
2. joint mid-training in three parts whose share of image rows grows (text-to-image ratio 1:1, 1:3, 1:9);
3. SFT: question/answer conversations about pictures (easy-vqa's training split, drawn single shapes, scenes),
   asked the ways `lfm2vl eval` asks; the loss is on the assistant's tokens.

The data comes from scripts/default_model_data.py (offline, seeded). DIR/model holds the result (bfloat16 weights,
Hugging Face layout), DIR/work the data, stage checkpoints, metrics and evaluation files. The script ends with the
evaluation (`lfm2vl eval` on the easy-vqa and synth suites), DIR/model/training.png (loss curves and scores) and
DIR/model/README.md (the model card). --scale multiplies every stage's data (0.01 runs end to end in about a
minute: the CI test's setting).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import default_model_data as D  # noqa: E402

C, A = "conv", "full_attention"
# The architecture: text hidden size, layer pattern, MLP width; vision hidden size, layers, heads, MLP width;
# projector width; vocabulary.
ARCH = dict(text=(256, [C, C, A, C, C, A], 1024), vision=(192, 4, 3, 768), projector=512, vocab=1024)
# Image knobs: no tiling; a 64x64 picture is upscaled to 16 image tokens, a 256x256 scene gets 64.
IMAGE_KNOBS = {"do_image_splitting": False, "min_image_tokens": 16, "max_image_tokens": 64}
# (name, data parts, epochs, learning rate). Data parts at --scale 1: counts of rows per source. The rates are low on
# purpose: at 1e-3 (batch 16) the from-scratch vision tower learns colours but never shapes; at 6e-5 to 1e-4 it
# learns both.
STAGES = [
    ("1-text-captions", dict(text=4000, single_captions=24000, scene_captions=1500), 1, 1e-4),
    ("2a-joint", dict(text=2500, single=2500, scenes=500), 1, 8e-5),
    ("2b-joint", dict(text=1250, single=3750, scenes=700), 1, 8e-5),
    ("2c-joint", dict(text=500, single=4500, scenes=900), 1, 8e-5),
    ("3-sft", dict(text=500, easyvqa=4000, single=6000, scenes=1500), 1, 6e-5),
]
TURNS = 6  # questions per conversation about one picture
BATCH = 16


def model_config() -> dict:
    from lfm2vl.bench.data import CONFIGS

    (d_text, layers, ff), (d_vis, n_vis, h_vis, ff_vis) = ARCH["text"], ARCH["vision"]
    d = json.loads((CONFIGS / "450M.json").read_text())
    d["text_config"].update(hidden_size=d_text, block_dim=d_text, conv_dim=d_text, conv_dim_out=d_text,
                            intermediate_size=ff, block_ff_dim=ff, num_attention_heads=4, num_heads=4,
                            num_key_value_heads=2, layer_types=layers, num_hidden_layers=len(layers),
                            vocab_size=ARCH["vocab"], torch_dtype="float32", _name_or_path="lfm2vl-bundled")
    d["vision_config"].update(hidden_size=d_vis, intermediate_size=ff_vis, num_hidden_layers=n_vis,
                              num_attention_heads=h_vis, torch_dtype="float32")
    d.pop("auto_map")  # transformers has the architecture built in (model_type lfm2_vl): no remote code
    d.update(projector_hidden_size=ARCH["projector"], torch_dtype="float32", model_type="lfm2_vl", **IMAGE_KNOBS)
    return d


def stage_data(work: Path, name: str, parts: dict, seed: int, scale: float) -> Path:
    """Write work/data/<stage>.jsonl from the stage's parts (row counts x scale)."""
    store = D.ImageStore(work / "data")
    rng = random.Random(f"{name}:{seed}")
    n = {k: max(1, round(v * scale)) for k, v in parts.items()}
    rows = []
    if "text" in n:
        rows += D.text_rows(rng, n["text"])
    if "single_captions" in n:
        rows += D.single_rows(store, rng, n["single_captions"], TURNS, caption_share=1.0)
    if "single" in n:
        rows += D.single_rows(store, rng, n["single"], TURNS, caption_share=0.1)
    if "scene_captions" in n or "scenes" in n:
        k = n.get("scene_captions", 0) or n["scenes"]
        captions_only = "scene_captions" in n
        for suite, share in (("synth-pope", 0.4), ("synth-mc", 0.3), ("synth-ocr", 0.2), ("synth-multi", 0.1)):
            if captions_only and suite == "synth-multi":
                continue  # multi-image rows have no captions
            rows += D.suite_rows(store, suite, seed, max(1, round(k * share)), TURNS, captions=True,
                                 questions=not captions_only)
    if "easyvqa" in n:
        rows += D.easyvqa_rows(store, rng, TURNS, captions=True, qa=True, limit=n["easyvqa"])
    return D.write_jsonl(work / "data" / f"{name}.jsonl", rows, rng)


def corpus(files: list[Path]) -> list[str]:
    """Every text of the training data (the tokenizer's training text) plus the chat roles."""
    texts = {"user", "assistant", "system"}
    for f in files:
        for line in open(f):
            for m in json.loads(line)["messages"]:
                c = m["content"]
                texts.update([c] if isinstance(c, str) else [p["text"] for p in c if p.get("type") == "text"])
    return sorted(texts)


def build_base(work: Path, files: list[Path], seed: int) -> Path:
    from lfm2vl.bench.data import random_checkpoint

    cfg = work / "base-config.json"
    cfg.write_text(json.dumps(model_config()))
    return random_checkpoint(cfg, work / "base", seed=seed, corpus=corpus(files), vocab_size=ARCH["vocab"],
                             processor_config=IMAGE_KNOBS)


def run_stage(model: Path, data: Path, out: Path, epochs: int, lr: float, seed: int, progress: bool) -> dict:
    import lfm2vl

    return lfm2vl.finetune(model=str(model), data=str(data), output=str(out), full=True, epochs=epochs, lr=lr,
                           batch_size=BATCH, warmup=0.05, weight_decay=0.01, seed=seed, dtype="auto",
                           gradient_checkpointing=False, overwrite=True, max_seq_len=1024, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="result folder (model/ and work/ are written in it)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's number of rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=None, help="comma list of stage names to run (default: all)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N rows of each suite only")
    ap.add_argument("--no-eval", action="store_true", help="export and describe the model without evaluating it")
    args = ap.parse_args(argv)
    out = Path(args.output)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = [stage_data(work, name, parts, args.seed, args.scale) for name, parts, _, _ in STAGES]
    model = build_base(work, files, args.seed)
    print(f"data and base model: {time.perf_counter() - t0:.0f} s", flush=True)
    summaries = {}
    for (name, _, epochs, lr), data in zip(STAGES, files):
        if args.stages and name not in args.stages.split(","):
            if (work / name / "model.safetensors").is_file():
                model = work / name  # a stage run earlier: the next one starts from it
            continue
        t = time.perf_counter()
        summaries[name] = run_stage(model, data, work / name, epochs, lr, args.seed, not args.no_progress)
        model = work / name
        print(f"stage {name}: {time.perf_counter() - t:.0f} s, final loss "
              f"{summaries[name].get('final_loss')}", flush=True)
    done = work / "summaries.json"  # every stage's summary, also those of earlier invocations (--stages)
    summaries = {**(json.loads(done.read_text()) if done.is_file() else {}), **summaries}
    done.write_text(json.dumps(summaries, indent=2, default=str))
    write_info(work, args.seed, sum(float(s.get("seconds", 0)) for s in summaries.values()) / 60)
    if not args.stages:
        import default_model_card

        default_model_card.finish(out, limit=args.eval_limit, evaluate=not args.no_eval)
    return 0


def write_info(work: Path, seed: int, minutes: float) -> dict:
    """work/info.json: what the model card says about the architecture and the training."""
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(str(work / "base" / "model.safetensors")).values())
    (d_text, layers, ff), (d_vis, n_vis, h_vis, ff_vis) = ARCH["text"], ARCH["vision"]
    stages = "\n".join(f"{i + 1}. {name}: {describe_parts(parts)}; {epochs} epoch{'s' * (epochs > 1)}, peak lr {lr:g}"
                       for i, (name, parts, epochs, lr) in enumerate(STAGES))
    info = {"parameters": n_params, "seed": seed, "train_minutes": minutes, "stage_names": [s[0] for s in STAGES],
            "text": f"hidden {d_text}, {len(layers)} layers ({layers.count(C)} gated short-convolution, "
                    f"{layers.count(A)} GQA attention: 4 heads, 2 KV heads), SwiGLU MLP {ff}",
            "vision": f"hidden {d_vis}, {n_vis} layers, {h_vis} heads, MLP {ff_vis}, 16x16 patches",
            "projector": ARCH["projector"], "vocab": ARCH["vocab"],
            "image_tokens": f"{IMAGE_KNOBS['min_image_tokens']}-{IMAGE_KNOBS['max_image_tokens']}",
            "stages": stages}
    (work / "info.json").write_text(json.dumps(info, indent=2))
    return info


PART_NAMES = {"text": "text-only rows", "single_captions": "captions of drawn single shapes",
              "scene_captions": "scene captions (of the scenes behind that many suite questions)",
              "single": "drawn single shapes (10% captions)", "scenes": "scene questions",
              "easyvqa": "easy-vqa training pictures (all their questions, and captions)"}


def describe_parts(parts: dict) -> str:
    return ", ".join(f"{v:,} {PART_NAMES[k]}" for k, v in parts.items())


if __name__ == "__main__":
    sys.exit(main())
