"""Learning on real data: a tiny LFM2-VL-shaped model trained from scratch by `lfm2vl finetune --full` on easy-vqa's
colour questions (scripts/easyvqa_learn.py: conversion to JSONL, model, training, greedy evaluation) names the
colour of unseen test images far more often than a model that ignores the image (answering from the question
text alone) does."""
import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "easyvqa_learn.py"


def _learn_module():
    spec = importlib.util.spec_from_file_location("easyvqa_learn", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_easyvqa_colour_accuracy_beats_any_image_blind_answer(tmp_path):
    learn = _learn_module()
    torch.set_num_threads(1)  # the evaluation in this process; training runs in its own (threads=1 below)
    # 6000 training questions of the first ~600 images (757 colour questions), ~400 unseen colour test questions;
    # 4 image tokens per 64x64 image, training on one thread (a tiny model is fastest there on a busy machine)
    res = learn.run(tmp_path, size="tiny", limit_train=6000, limit_test=3000, image_tokens=4, max_steps=400,
                    lr=3e-3, batch_size=16, types=("color",), threads=1, progress=False)
    acc, base = res["accuracy"]["color"], res["chance"]["color"]
    assert acc["n"] >= 300 and res["train_summary"].get("steps") == 400, res
    # text_only: each question text answered with its most frequent training answer (what ignoring the image gives)
    assert base["text_only"] < 0.25 and base["accuracy"] < 0.25, base
    assert acc["accuracy"] >= base["text_only"] + 0.2, (acc, base, res["samples"])
