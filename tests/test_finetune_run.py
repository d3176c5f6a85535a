"""Training runs on the tiny checkpoint (in-process, float32): results, resume, Ctrl-C, learning signal."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import lfm2vl
from finetune_util import losses, write_jsonl
from lfm2vl.finetune import report, state
from lfm2vl.loading import load_model

BASE = dict(dtype="float32", progress=False, batch_size=2, seed=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder, 4), write_jsonl(folder, 2, images=False, name="text.jsonl")


def _stop_at(monkeypatch, k):
    """Send this process SIGINT when step k is reported (Ctrl-C during the run)."""
    real = report.Report.step

    def step(self, step, *a, **kw):
        real(self, step, *a, **kw)
        if step == k:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(report.Report, "step", step)


def test_sigint_then_resume_repeats_the_uninterrupted_losses(tiny_checkpoint, data, tmp_path, monkeypatch):
    """Ctrl-C after step 2 saves a checkpoint; --resume continues to exactly the losses of an uninterrupted run
    (LoRA with dropout: the RNG, data order, optimizer and schedule all carry over)."""
    opts = dict(BASE, model=str(tiny_checkpoint), data=str(data[0]), max_steps=5, lr=5e-3)
    whole = lfm2vl.finetune(**opts, output=str(tmp_path / "whole"))
    assert not whole["interrupted"]
    _stop_at(monkeypatch, 2)
    cut = lfm2vl.finetune(**opts, output=str(tmp_path / "cut"))
    monkeypatch.undo()
    assert cut["interrupted"] and cut["steps"] == 2
    assert cut["checkpoint"].endswith("step-0000002") and state.find(tmp_path / "cut").name == "step-0000002"
    assert not (tmp_path / "cut" / "adapter_config.json").exists()
    again = lfm2vl.finetune(**opts, output=str(tmp_path / "cut"), resume=str(tmp_path / "cut"))
    assert again["steps"] == 5 and not again["interrupted"]
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # exactly
    assert len(set(losses(tmp_path / "whole"))) == 5
    assert not (tmp_path / "cut" / state.FOLDER).exists()  # the result supersedes the checkpoints


def test_lora_result_folder(tiny_checkpoint, data, tmp_path):
    """LoRA writes a PEFT adapter folder with metrics (train and eval losses) and the loss curve beside it."""
    out = tmp_path / "lora"
    s = lfm2vl.finetune(**BASE, model=str(tiny_checkpoint), data=str(data[0]), eval_data=str(data[1]), output=str(out),
                        max_steps=2, eval_every=1)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "loss.png", "metrics.jsonl"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(tiny_checkpoint)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2]
    assert s["eval_loss"] == rows[-1]["eval_loss"] and s["mode"] == "lora" and s["steps"] == 2


def test_full_sft_result_loads_in_transformers_and_lfm2vl(tiny_checkpoint, data, tmp_path):
    """A full fine-tune writes a checkpoint folder that transformers and lfm2vl load with equal logits, and whose
    weights are the trained ones (not the base's)."""
    from transformers import Lfm2VlForConditionalGeneration

    out = tmp_path / "full"
    lfm2vl.finetune(**BASE, model=str(tiny_checkpoint), data=str(data[1]), output=str(out), full=True,
                    max_steps=2, lr=1e-3)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "processor_config.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    ours, _, _ = load_model(out, dtype=torch.float32)
    base, _, _ = load_model(tiny_checkpoint, dtype=torch.float32)
    hf = Lfm2VlForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 6, 600, 601, 602, 7, 6, 700, 701, 702]])
    with torch.no_grad():
        got, ref, old = ours(ids), hf(input_ids=ids).logits, base(ids)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - old).abs().max().item() > 1e-3  # training changed the weights that were written


def test_full_sft_from_a_previous_result_keeps_its_own_metrics(tiny_checkpoint, data, tmp_path):
    """Stages chained (each run's base is the previous result): every result keeps its own metrics.jsonl."""
    first, second = tmp_path / "first", tmp_path / "second"
    for base, out, steps in ((tiny_checkpoint, first, 2), (first, second, 3)):
        lfm2vl.finetune(**BASE, model=str(base), data=str(data[1]), output=str(out), full=True, max_steps=steps)
    assert len(losses(second)) == 3 and len(losses(first)) == 2


def test_training_reduces_the_loss_on_a_memorisation_task(tiny_checkpoint, data, tmp_path):
    """Two conversations, many steps: the loss falls far below where it started (a learning signal)."""
    s = lfm2vl.finetune(**BASE, model=str(tiny_checkpoint), data=str(data[1]), output=str(tmp_path / "m"),
                        max_steps=30, lr=2e-2, lora_dropout=0.0, warmup=2)
    curve = losses(tmp_path / "m")
    assert curve[-1] < 0.25 * curve[0], curve
    assert s["final_loss"] == curve[-1]
