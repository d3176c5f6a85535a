"""The last steps of scripts/train_default_model.py: export the trained checkpoint, evaluate it with `lfm2vl eval`,
plot its training, and write its model card.

    python scripts/default_model_card.py RUN_DIR     # again on a finished run: re-export, re-evaluate, re-write

- export: the last stage's checkpoint as bfloat16 safetensors (config's torch_dtype too) with its tokenizer,
  processor, chat template and generation config files, written to a temporary folder and renamed into place.
- run_evaluation: the easy-vqa suites (easy-vqa's test split: open questions scored by exact match, yes/no, multiple
  choice) and the synth suites (seed 0; the training data used other seeds), each with `lfm2vl eval` in a
  subprocess, greedy as VLMEvalKit decodes.
- training.png: every stage's training loss (one curve, stages marked) and the scores as bars.
- README.md: what the model is, what it knows, its data and training, its scores, and that real use wants a real
  checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

EASY = ("easy-vqa-open", "easy-vqa-yesno", "easy-vqa-mc")
SYNTH = ("synth-pope", "synth-mc", "synth-ocr", "synth-multi", "synth-ifeval")
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "generation_config.json")
# transformers' own Lfm2VlImageProcessor settings (the LFM2.5-VL checkpoints' layout: processor_config.json with an
# "image_processor" object), with the image knobs of the run's config.
IMAGE_PROCESSOR = {"image_processor_type": "Lfm2VlImageProcessor", "min_tiles": 2, "max_tiles": 10,
                   "use_thumbnail": True, "encoder_patch_size": 16, "tile_size": 512, "max_pixels_tolerance": 2.0,
                   "downsample_factor": 2, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
                   "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
REFERENCE_CNN = 87.6  # easy-vqa's own reference model (CNN + LSTM question encoder), per its README


def export(checkpoint: Path, out: Path) -> Path:
    """checkpoint (a full-SFT output folder) -> out: bfloat16 weights and the files that load it."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("auto_map", None)  # the architecture is in transformers itself: no remote code is shipped
    config["model_type"] = "lfm2_vl"
    config["torch_dtype"] = "bfloat16"
    for sub in ("text_config", "vision_config"):
        config[sub]["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, tmp / name)
            if name.endswith(".json"):
                d = json.loads((tmp / name).read_text())
                if d.pop("auto_map", None) is not None:
                    (tmp / name).write_text(json.dumps(d, indent=2) + "\n")
    knobs = {k: config[k] for k in ("do_image_splitting", "min_image_tokens", "max_image_tokens")}
    processor = {"image_processor": {**IMAGE_PROCESSOR, **knobs}, "processor_class": "Lfm2VlProcessor",
                 "use_image_special_tokens": True}
    (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run_evaluation(model: Path, work: Path, suites=EASY + SYNTH, limit: int | None = None) -> dict[str, dict]:
    """{suite: scores dict} from `lfm2vl eval` on each suite (files made once under work/suites)."""
    data, preds = work / "suites", work / "eval"
    preds.mkdir(parents=True, exist_ok=True)
    scores = {}
    for suite in suites:
        tsv = data / f"{suite}.tsv"
        if not tsv.is_file():
            _run(["eval", "make-suite", suite, "--out", str(data)])
        out = preds / f"{suite}.tsv"
        if out.exists():
            out.unlink()  # a new model: no resuming from an older run's predictions
        cmd = ["eval", "--model", str(model), "--data", str(tsv), "--output", str(out), "--json", "--no-progress",
               "--max-new-tokens", "24", "--batch-size", "32"]
        if limit:
            cmd += ["--limit", str(limit)]
        scores[suite] = json.loads(_run(cmd))
    return scores


def _run(args: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lfm2vl", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lfm2vl {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def losses(work: Path, stages: list[str]) -> list[tuple[str, list[float]]]:
    """[(stage, training losses by step)] from each stage's metrics.jsonl."""
    out = []
    for stage in stages:
        f = work / stage / "metrics.jsonl"
        if f.is_file():
            rows = [json.loads(line) for line in open(f)]
            out.append((stage, [r["loss"] for r in rows if "loss" in r and "step" in r]))
    return out


def headline(scores: dict[str, dict]) -> list[tuple[str, str, float]]:
    """[(suite, what the number is, value)] in the card's order."""
    what = {"exact": "accuracy %", "pope": "F1", "mc": "accuracy %", "mmbench": "circular accuracy %",
            "ocr": "strings read", "ifeval": "constraints met %"}
    return [(s, what.get(v["kind"], ""), float(v["overall"])) for s, v in scores.items()]


def plot(path: Path, curves: list[tuple[str, list[float]]], scores: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    start = 0
    for stage, ys in curves:
        xs = range(start, start + len(ys))
        smooth = [sum(ys[max(0, i - 19):i + 1]) / len(ys[max(0, i - 19):i + 1]) for i in range(len(ys))]
        a.plot(xs, smooth, label=stage)
        start += len(ys)
    a.set_yscale("log")
    a.set_xlabel("optimizer step (all stages)")
    a.set_ylabel("training loss (20-step mean)")
    a.set_title("Training, stage by stage")
    a.legend(fontsize=8)
    names = [s for s, _, _ in headline(scores)]
    values = [v if k != "strings read" else 100 * v / max(scores[s]["n"], 1) for s, k, v in headline(scores)]
    b.barh(names, values, color="tab:blue")
    for i, v in enumerate(values):
        b.text(v + 1, i, f"{v:.1f}", va="center", fontsize=8)
    b.set_xlim(0, 110)
    b.invert_yaxis()
    b.set_title("lfm2vl eval (OCR: % of strings read)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def card(model: Path, scores: dict[str, dict], info: dict) -> str:
    """The model card (README.md) text."""
    n_params = info.get("parameters", 0)
    rows = "\n".join(f"| {s} | {k} | {v:.1f} |" for s, k, v in headline(scores))
    easy = scores.get("easy-vqa-open", {})
    cats = easy.get("categories", {})
    by_cat = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cats.items()))
    return f"""---
license: other
library_name: lfm2vl
pipeline_tag: image-text-to-text
tags: [lfm2-vl, demo, toy]
---
# lfm2vl bundled demo model

A {n_params / 1e6:.1f}M-parameter model with the LFM2-VL architecture, trained from scratch on this machine class
(2 CPU cores) by lfm2vl's own training code, and shipped inside the `lfm2vl` package so its commands answer a
question about a picture on a machine without network. **It knows only toy pictures of coloured shapes; for real
use, load a real checkpoint** (`hf download LiquidAI/LFM2-VL-450M`, then `--model` the folder).

## What it knows
- single shapes (circle, rectangle, triangle) in easy-vqa's eight colours (red, green, blue, yellow, black, gray,
  teal, brown) on a pale background: what shape, what colour, yes/no questions ("is there a red shape?", "does the
  image not contain a circle?"), multiple choice, and a one-line caption ("Describe this image." -> "A blue triangle
  on a light background.");
- hardly anything else: grids of several shapes, rendered strings and multi-image questions were in its training
  mix, but it did not learn them in this budget (the synth scores below are at or under chance), and any other
  picture gets a confident wrong answer.

## Architecture (config.json; the same layout and code path as LiquidAI/LFM2-VL-450M)
- SigLIP2 NaFlex vision tower: {info.get('vision', '')}
- 2x2 pixel unshuffle + 2-layer MLP projector (width {info.get('projector', '')})
- LFM2 language model: {info.get('text', '')}
- byte-level BPE tokenizer of {info.get('vocab', '')} tokens, LFM2's special tokens at their real ids, the real chat
  template; no image splitting, {info.get('image_tokens', '')} image tokens per picture.

## Training (`python scripts/train_default_model.py --output DIR`, seed {info.get('seed', 0)})
The stages the LFM2-VL model card describes, each a full fine-tuning run of `lfm2vl finetune` (AdamW, warm-up and
cosine schedule, loss on the assistant's tokens) starting from the previous stage:
{info.get('stages', '')}
Data (offline, seeded): easy-vqa's training split (4,000 pictures, 38,575 questions; its test split is only used
for evaluation); single shapes drawn in easy-vqa's style by lfm2vl's generator with easy-vqa's question templates;
procedural scenes (shapes on a grid, short strings) with the offline suites' question builders under training seeds;
captions; text-only rows that state a picture in words and ask about it. Questions come in the forms `lfm2vl eval`
asks (a bare question, POPE's answer-directly yes/no, VLMEvalKit's multiple choice). Training took
{info.get('train_minutes', 0):.0f} minutes on 2 CPU cores.

## Scores (`lfm2vl eval`, greedy; easy-vqa: its test split; synth: the suites of `lfm2vl eval make-suite`, seed 0)
| suite | metric | score |
|---|---|---|
{rows}

easy-vqa-open is easy-vqa's own task (every test question, exact match): by question type {by_cat}. The reference
model in easy-vqa's README (a CNN with a bag-of-words question encoder) reaches {REFERENCE_CNN}%.

![training](training.png)
"""


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Export, evaluate and describe a finished training run.")
    ap.add_argument("run", help="the --output folder of scripts/train_default_model.py")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N rows of each suite only")
    ap.add_argument("--no-eval", action="store_true", help="export and describe the model without evaluating it")
    ap.add_argument("--card-only", action="store_true", help="only re-write training.png and README.md from the "
                                                              "run's scores")
    args = ap.parse_args(argv)
    finish(Path(args.run), limit=args.limit, evaluate=not args.no_eval, card_only=args.card_only)
    return 0


def finish(run: Path, limit: int | None = None, evaluate: bool = True, card_only: bool = False) -> dict:
    """Export, evaluate, plot, write the card; card_only re-writes the plot and card from work/scores.json."""
    work = run / "work"
    info = json.loads((work / "info.json").read_text())
    if card_only:
        model, scores = run / "model", json.loads((work / "scores.json").read_text())
    else:
        model = export(work / info["stage_names"][-1], run / "model")
        scores = run_evaluation(model, work, limit=limit) if evaluate else {}
        (work / "scores.json").write_text(json.dumps(scores, indent=2))
    plot(model / "training.png", losses(work, info["stage_names"]), scores)
    (model / "README.md").write_text(card(model, scores, info))
    for s, k, v in headline(scores):
        print(f"{s:<16} {k:<22} {v:7.1f}")
    return scores


if __name__ == "__main__":
    sys.exit(main())
