"""`lfm2vl bench --train`: LoRA training steps of lfm2vl beside transformers + peft, one engine per subprocess.

    python -m lfm2vl.bench.train '<json spec>'   ->  prints one line "BENCH_RESULT <json>"

Both engines train the same LoRA (r 8, alpha 16, dropout 0.1 on the language model's q/k/v/out_proj, conv
in_proj/out_proj and feed_forward w1/w2/w3: lfm2vl's "text" preset; vision frozen) on the same batch: `batch_size`
conversations, each one image + a question + an answer of `answer_tokens` tokens, loss on the answer and its
end-of-turn token only, gradient checkpointing on, AdamW. With bf16 the base weights are bf16, the LoRA weights
float32 and the forward runs under bf16 autocast (as lfm2vl's trainer and a transformers Trainer with bf16=True
run). Each step: forward, loss, backward, optimizer step. `warmup` untimed steps, then `steps` timed ones.

- "ours": lfm2vl's trainer pieces: loading.load_model, finetune.lora.add_lora, finetune.recompute (gradient
  checkpointing of the text layers, the frozen vision tower run without autograd), finetune.loss.loss_sum (the
  output head only at the trained positions).
- "transformers": as its users run it: Lfm2VlForConditionalGeneration.from_pretrained, gradient checkpointing
  enabled on the model, peft.get_peft_model with the same targets, the model's own loss (labels -100 outside the
  answer), torch.optim.AdamW.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from .data import CORPUS, test_image
from .worker import _DT, _peak_rss_mb

LORA = {"r": 8, "alpha": 16, "dropout": 0.1}
# lfm2vl's target presets as regexes over transformers' module tree (PEFT fullmatches a string target_modules).
_TEXT = r"language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|conv\.(in_proj|out_proj)" \
        r"|feed_forward\.(w1|w2|w3))"
_PROJECTOR = r"multi_modal_projector\.(linear_1|linear_2)"
_VISION = r"vision_tower\..*\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
HF_TARGETS = {"text": rf".*({_TEXT})", "text+projector": rf".*({_TEXT}|{_PROJECTOR})",
              "all": rf".*({_TEXT}|{_PROJECTOR}|{_VISION})"}
QUESTION = "What is in this image? Describe it in detail."


def _answer(tokenizer, n_tokens: int, offset: int) -> str:
    """A reply that the tokenizer encodes as exactly n_tokens tokens (words of the bench corpus from `offset`)."""
    words = " ".join(CORPUS * (n_tokens // 8 + 2)).split(" ")[offset:]
    text = ""
    for w in words:
        longer = (text + " " + w) if text else w
        if len(tokenizer.encode(longer)) > n_tokens:
            break
        text = longer
    while len(tokenizer.encode(text)) < n_tokens:  # pad with single-character tokens
        text += "."
    return text


def train_inputs(processor, batch_size: int = 4, answer_tokens: int = 64, image_size: int = 512,
                 image_knobs: dict | None = None) -> dict:
    """The benchmark's batch, as each engine's users build it: "ours" is the Batch of lfm2vl's trainer (its row
    check and collate: next-token labels, unpadded patches); "hf" the keyword arguments of transformers' forward
    (the same ids and mask, labels unshifted since transformers shifts them itself, patches padded as its processor
    returns them)."""
    from ..finetune.batches import IGNORE, collate
    from ..finetune.data import Row, check_row

    knobs = dict(image_knobs or {})
    images = [test_image(image_size, image_size, seed=i) for i in range(batch_size)]
    samples = []
    for i, img in enumerate(images):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": _answer(processor.tokenizer, answer_tokens, offset=5 * i)}]
        samples.append(check_row(Row(f"bench row {i}", msgs, [img]), processor, 1 << 30, knobs))
    batch = collate(samples, processor, **knobs)
    hf_labels = torch.full_like(batch.labels, IGNORE)
    hf_labels[:, 1:] = batch.labels[:, :-1]
    pixels, _ = processor.process_images(images, **knobs)
    hf = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": hf_labels, **pixels}
    return {"ours": batch, "hf": hf}


def _autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def _ours(spec: dict, inputs: dict):
    """-> (step function, number of trainable parameters)."""
    from ..cpu.dropout import use_fast_dropout
    from ..finetune.lora import add_lora, lora_parameters
    from ..finetune.loss import loss_sum
    from ..finetune.recompute import checkpoint_layers, freeze_vision_tower
    from ..loading import load_model

    dtype = _DT[spec["dtype"]]
    model = load_model(spec["folder"], dtype=dtype)[0]
    model.requires_grad_(False)
    add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], targets=spec["targets"])
    use_fast_dropout(model)  # as the trainer does on the CPU
    params = lora_parameters(model)  # float32; the base stays in `dtype`
    vision_trains = spec["targets"] == "all"
    if not vision_trains:
        freeze_vision_tower(model)
    if spec["gradient_checkpointing"]:
        checkpoint_layers(model, vision=vision_trains)
    model.train()
    opt = torch.optim.AdamW(params, lr=2e-4)
    batch = inputs["ours"].to("cpu", dtype)

    def step() -> float:
        with _autocast(dtype):
            total, n = loss_sum(model, batch)
        loss = total / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, sum(p.numel() for p in params)


def _transformers(spec: dict, inputs: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import Lfm2VlForConditionalGeneration

    dtype = _DT[spec["dtype"]]
    model = Lfm2VlForConditionalGeneration.from_pretrained(spec["folder"], dtype=dtype)
    if spec["gradient_checkpointing"]:
        # gradient_checkpointing_enable is the name users know; transformers 5 renamed it and warns on the old one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=HF_TARGETS[spec["targets"]], task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    kw = {**inputs["hf"], "pixel_values": inputs["hf"]["pixel_values"].to(dtype)}

    def step() -> float:
        with _autocast(dtype):
            loss = model(**kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, sum(p.numel() for p in params)


def measure(spec: dict) -> dict:
    from ..processor import Processor

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    processor = Processor.from_pretrained(spec["folder"])
    inputs = train_inputs(processor, spec["batch_size"], spec["answer_tokens"], spec["image_size"],
                          spec.get("image_knobs"))
    t = time.perf_counter()
    step, n_trainable = (_ours if spec["engine"] == "ours" else _transformers)(spec, inputs)
    load_s = time.perf_counter() - t
    rss_load = _peak_rss_mb()
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        losses.append(step())
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    s_step = statistics.median(times)
    return {"engine": spec["engine"], "load_s": load_s, "rss_after_load_mb": rss_load, "peak_rss_mb": _peak_rss_mb(),
            "s_per_step": s_step, "samples_per_s": spec["batch_size"] / s_step, "step_times": times,
            "losses": losses, "trainable_params": n_trainable, "batch_size": spec["batch_size"],
            "seq_len": int(inputs["ours"].input_ids.shape[1]), "trained_tokens": inputs["ours"].n_tokens}


def table(results: dict[str, dict]) -> str:
    """One row per engine; the ratio columns are against the transformers + peft row."""
    hdr = (f"{'engine':<22} {'samples/s':>9} {'s/step':>7} {'peak RSS MiB':>12} {'trainable':>10} "
           f"{'loss first/last':>16} | {'speed x':>7} {'memory x':>8}")
    lines = [hdr, "-" * len(hdr)]
    base = next((r for k, r in results.items() if r.get("engine") == "transformers" and "error" not in r), None)
    for label, r in results.items():
        if "error" in r:
            lines.append(f"{label}: FAILED: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        sx = f"{r['samples_per_s'] / base['samples_per_s']:.2f}" if base else "-"
        mx = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-"
        lines.append(f"{label:<22} {r['samples_per_s']:>9.3f} {r['s_per_step']:>7.2f} {r['peak_rss_mb']:>12.0f} "
                     f"{r['trainable_params']:>10} {r['losses'][0]:>7.3f}/{r['losses'][-1]:<8.3f} | {sx:>7} {mx:>8}")
    return "\n".join(lines)


def main() -> None:
    spec = json.loads(sys.argv[1])
    print("BENCH_RESULT " + json.dumps(measure(spec)), flush=True)


if __name__ == "__main__":
    main()
