"""Learning on real data: a small LFM2-VL-shaped model, trained from scratch on easy-vqa by `lfm2vl finetune --full`,
answers the test split's questions well above chance.

    python scripts/easyvqa_learn.py WORK_DIR [--size small] [--limit-train N] [--limit-test N] [--epochs 3] ...

Steps (each one's output under WORK_DIR):
1. data/: easy-vqa converted to JSONL (scripts/easyvqa_to_jsonl.py).
2. base/: a random checkpoint in LFM2-VL's layout at a small size (SIZES), with a tokenizer trained on easy-vqa's
   questions and answers (every word one token) and a processor config that gives each 64x64 image a few image
   tokens without tiling (--image-tokens).
3. trained/: `python -m lfm2vl finetune --full --model base --data data/train.jsonl --output trained ...`.
4. Evaluation: greedy generation (lfm2vl.load + engine.generate, temperature 0) on the test questions, exact match
   of the reply with the answer, per question type (shape, color, yes/no), beside the chance level of each type:
   always giving the training split's most frequent answer of that type, and "text-only": answering each question
   text with its most frequent training answer, the best a model that ignores the image learns from the data.
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import easyvqa_to_jsonl  # noqa: E402

SHAPES = ("circle", "rectangle", "triangle")
TYPES = ("shape", "color", "yes/no")
C, A = "conv", "full_attention"
# Model sizes: text hidden size, layer pattern, MLP width; vision hidden size, layers, MLP width.
SIZES = {
    "tiny": dict(text=(64, [C, A], 128), vision=(32, 1, 64), projector=64),
    "small": dict(text=(128, [C, A, C, A], 256), vision=(64, 2, 128), projector=128),
}


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def _config(size: str, image_tokens: int) -> dict:
    from lfm2vl.bench.data import CONFIGS

    (d_text, layers, ff), (d_vis, n_vis, ff_vis), proj = (SIZES[size]["text"], SIZES[size]["vision"],
                                                          SIZES[size]["projector"])
    d = json.loads((CONFIGS / "450M.json").read_text())
    d["text_config"].update(hidden_size=d_text, block_dim=d_text, conv_dim=d_text, conv_dim_out=d_text,
                            intermediate_size=ff, block_ff_dim=ff, num_attention_heads=4, num_heads=4,
                            num_key_value_heads=2, layer_types=layers, num_hidden_layers=len(layers),
                            vocab_size=1024, torch_dtype="float32")
    d["vision_config"].update(hidden_size=d_vis, intermediate_size=ff_vis, num_hidden_layers=n_vis,
                              num_attention_heads=2, torch_dtype="float32")
    d.update(projector_hidden_size=proj, torch_dtype="float32", **_knobs(image_tokens))
    return d


def _knobs(image_tokens: int) -> dict:
    """Processor settings: one unit per image (64x64 images are small), `image_tokens` tokens at most."""
    return {"do_image_splitting": False, "min_image_tokens": min(4, image_tokens), "max_image_tokens": image_tokens}


def corpus(limit: int | None = None) -> list[str]:
    """Every distinct question and answer of easy-vqa (both splits) and the chat template's role names: the
    tokenizer's training text."""
    texts = {"user", "assistant", "system"}
    for split in easyvqa_to_jsonl.SPLITS:
        for q, a, _ in easyvqa_to_jsonl.read_split(split, limit):
            texts.update((q, a))
    return sorted(texts)


def build_model(folder: str | Path, size: str = "small", image_tokens: int = 16, seed: int = 0) -> Path:
    """A random checkpoint of `size` in LFM2-VL's layout, its tokenizer trained on easy-vqa's words."""
    from lfm2vl.bench.data import random_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder.parent / f"{folder.name}-config.json"
    cfg.write_text(json.dumps(_config(size, image_tokens)))
    return random_checkpoint(cfg, folder, seed=seed, corpus=corpus(), processor_config=_knobs(image_tokens))


def train(base: Path, data: Path, output: Path, *, epochs: int | None = None, max_steps: int | None = None,
          lr: float = 1e-3, batch_size: int = 32, seed: int = 0, threads: int | None = None,
          eval_data: Path | None = None, progress: bool = True) -> dict:
    """Run `lfm2vl finetune --full` in a subprocess -> the run's summary (the CLI's last JSON line, or {})."""
    cmd = [sys.executable, "-m", "lfm2vl", "finetune", "--full", "--model", str(base), "--data", str(data),
           "--output", str(output), "--overwrite", "--lr", str(lr), "--batch-size", str(batch_size),
           "--seed", str(seed), "--dtype", "float32", "--warmup", "0.05", "--no-gradient-checkpointing"]
    cmd += ["--max-steps", str(max_steps)] if max_steps else ["--epochs", str(epochs or 1)]
    if eval_data:
        cmd += ["--eval-data", str(eval_data)]
    if not progress:
        cmd += ["--no-progress"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lfm2vl finetune failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}")
    lines = proc.stdout.splitlines()
    for i in reversed(range(len(lines))):  # the summary is the last JSON object printed (over several lines)
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                pass
    return {}


def keep_types(path: Path, types) -> Path:
    """Rewrite a converted split keeping the questions of `types` only."""
    lines = [ln for ln in open(path) if question_type(json.loads(ln)["messages"][1]["content"]) in types]
    path.write_text("".join(lines))
    return path


def read_jsonl(path: Path) -> list[tuple[str, str, Path]]:
    """[(question, answer, absolute image path)] of a converted split."""
    out = []
    for line in open(path):
        msgs = json.loads(line)["messages"]
        image, question = msgs[0]["content"]
        out.append((question["text"], msgs[1]["content"], (path.parent / image["image"]).resolve()))
    return out


def chance(train_rows, test_rows) -> dict[str, dict]:
    """Per type: the training split's most frequent answer and the test accuracy of always giving it (chance), and
    "text_only": the test accuracy of answering each question text with its most frequent training answer (what
    a model that ignores the image can learn at best from the training split)."""
    counts, by_question = defaultdict(Counter), defaultdict(Counter)
    for q, a, _ in train_rows:
        counts[question_type(a)][a] += 1
        by_question[q][a] += 1
    out = {}
    for t, c in counts.items():
        majority = c.most_common(1)[0][0]
        rows = [(q, a) for q, a, _ in test_rows if question_type(a) == t]
        n = max(len(rows), 1)
        text_only = sum(a == (by_question[q].most_common(1)[0][0] if q in by_question else majority) for q, a in rows)
        out[t] = {"answer": majority, "accuracy": sum(a == majority for _, a in rows) / n, "text_only": text_only / n}
    return out


def evaluate(model_dir: Path, test_rows, batch: int = 64) -> dict:
    """Greedy answers to the test questions -> {"per_type": {type: {"n", "correct", "accuracy"}}, "samples"}."""
    import torch

    import lfm2vl

    engine = lfm2vl.load(str(model_dir), dtype=torch.float32)
    convs = [[{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": q}]}]
             for q, _, img in test_rows]
    replies = []
    for i in range(0, len(convs), batch):
        res = engine.generate(convs[i:i + batch], max_new_tokens=4, temperature=0.0, repetition_penalty=1.0,
                              min_p=0.0, max_batch=batch)
        replies += [r.text.strip() for r in res]
    per = defaultdict(lambda: {"n": 0, "correct": 0})
    for (q, a, _), r in zip(test_rows, replies):
        p = per[question_type(a)]
        p["n"] += 1
        p["correct"] += int(r == a)
    for p in per.values():
        p["accuracy"] = p["correct"] / p["n"]
    samples = [{"question": q, "answer": a, "reply": r} for (q, a, _), r in list(zip(test_rows, replies))[:8]]
    return {"per_type": dict(per), "samples": samples}


def report(acc: dict, base: dict) -> str:
    hdr = (f"{'question type':<14} {'n':>6} {'accuracy':>9} {'chance':>7} {'chance answer':>14} "
           f"{'text-only':>9}")
    lines = [hdr, "-" * len(hdr)]
    for t in TYPES:
        if t in acc:
            lines.append(f"{t:<14} {acc[t]['n']:>6} {acc[t]['accuracy']:>9.3f} {base[t]['accuracy']:>7.3f} "
                         f"{base[t]['answer']:>14} {base[t]['text_only']:>9.3f}")
    n = sum(a["n"] for a in acc.values())
    overall = sum(a["correct"] for a in acc.values()) / max(n, 1)
    by_chance = sum(base[t]["accuracy"] * acc[t]["n"] for t in acc) / max(n, 1)
    lines.append(f"{'all':<14} {n:>6} {overall:>9.3f} {by_chance:>7.3f}")
    return "\n".join(lines)


def run(work: str | Path, size: str = "small", limit_train: int | None = None, limit_test: int | None = None,
        image_tokens: int = 16, epochs: int | None = 1, max_steps: int | None = None, lr: float = 1e-3,
        batch_size: int = 32, seed: int = 0, types=TYPES, threads: int | None = None, progress: bool = True) -> dict:
    """All four steps -> the result dict (accuracy and chance per type, timings, the training summary)."""
    work = Path(work)
    t0 = time.perf_counter()
    train_path = easyvqa_to_jsonl.convert(work / "data", limit_train, splits=("train",))["train"]
    test_path = easyvqa_to_jsonl.convert(work / "data", limit_test, splits=("test",))["test"]
    if set(types) != set(TYPES):
        train_path, test_path = keep_types(train_path, types), keep_types(test_path, types)
    base = build_model(work / "base", size, image_tokens, seed)
    t1 = time.perf_counter()
    summary = train(base, train_path, work / "trained", epochs=epochs, max_steps=max_steps, lr=lr,
                    batch_size=batch_size, seed=seed, threads=threads, progress=progress)
    t2 = time.perf_counter()
    train_rows, test_rows = read_jsonl(train_path), read_jsonl(test_path)
    result = evaluate(work / "trained", test_rows)
    t3 = time.perf_counter()
    acc = result["per_type"]
    return {"size": size, "types": list(types), "train_questions": len(train_rows), "test_questions": len(test_rows),
            "image_tokens": image_tokens, "epochs": epochs, "max_steps": max_steps, "lr": lr,
            "batch_size": batch_size, "accuracy": acc, "chance": chance(train_rows, test_rows),
            "samples": result["samples"], "seconds": {"prepare": t1 - t0, "train": t2 - t1, "evaluate": t3 - t2},
            "train_summary": summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train a small LFM2-VL-shaped model on easy-vqa with lfm2vl finetune "
                                             "--full and report test accuracy per question type against chance.")
    ap.add_argument("work", help="working folder (data, base model, trained model)")
    ap.add_argument("--size", default="small", choices=tuple(SIZES))
    ap.add_argument("--limit-train", type=int, default=None, help="first N training questions (default: all)")
    ap.add_argument("--limit-test", type=int, default=None, help="first N test questions (default: all)")
    ap.add_argument("--image-tokens", type=int, default=16, help="image tokens per 64x64 image (at most)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=",".join(TYPES),
                    help=f"question types trained and tested (comma list of {', '.join(TYPES)}; default: all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the training process (default: inherited; 1 is fastest for the tiny "
                         "model on a busy machine)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    if not types or set(types) - set(TYPES):
        ap.error(f"--types takes a comma list of {', '.join(TYPES)}, got {args.types!r}")
    res = run(args.work, args.size, args.limit_train, args.limit_test, args.image_tokens, args.epochs, args.max_steps,
              args.lr, args.batch_size, args.seed, types, args.threads)
    print(f"easy-vqa, {args.size} model, {res['train_questions']} training / {res['test_questions']} test questions, "
          f"{args.image_tokens} image tokens; train {res['seconds']['train']:.0f} s, "
          f"evaluate {res['seconds']['evaluate']:.0f} s")
    print(report(res["accuracy"], res["chance"]))
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
