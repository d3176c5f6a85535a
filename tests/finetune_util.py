"""Helpers of the fine-tuning tests: small image conversations, JSONL files of them, batches built directly from the
processor's training render (independent of the trainer's own collate), and a random adapter."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

IGNORE = -100


def image(seed: int, size=(40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversations(n: int = 4, images: bool = True) -> list[list[dict]]:
    """n small conversations: a system prompt, a user turn (with an image when `images`), an assistant answer;
    every other one has a second user/assistant exchange."""
    convs = []
    for i in range(n):
        user = [{"type": "image", "image": image(i)}, {"type": "text", "text": f"What is shown, number {i}?"}] \
            if images else f"Question number {i}?"
        c = [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": user},
             {"role": "assistant", "content": f"Answer {i}: a picture of {'red' if i % 2 else 'blue'} noise."}]
        if i % 2:
            c += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"Then {i * 7}."}]
        convs.append(c)
    return convs


def write_jsonl(folder: Path, n: int = 4, images: bool = True, name: str = "train.jsonl") -> Path:
    """A JSONL training file; images are PNG files beside it, referenced by relative path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, conv in enumerate(conversations(n, images)):
        out = []
        for m in conv:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p["type"] == "image":
                        p["image"].save(folder / f"img{i}.png")
                        p = {"type": "image", "image": f"img{i}.png"}
                    parts.append(p)
                content = parts
            out.append({"role": m["role"], "content": content})
        lines.append(json.dumps({"messages": out}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_batch(processor, convs) -> tuple[SimpleNamespace, torch.Tensor]:
    """(batch with shifted labels, unshifted labels as transformers takes them), right-padded, pixels padded to
    max_num_patches (transformers' shape)."""
    rows, pixels = [], []
    for c in convs:
        ids, mask, pix = processor.render_for_training(c, return_pixels=True)
        rows.append((ids, mask))
        if pix is not None:
            pixels.append(pix)
    T = max(len(ids) for ids, _ in rows)
    B = len(rows)
    input_ids = torch.zeros(B, T, dtype=torch.int64)
    attention = torch.zeros(B, T, dtype=torch.int64)
    hf_labels = torch.full((B, T), IGNORE, dtype=torch.int64)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n], attention[b, :n] = ids, 1
        hf_labels[b, :n] = torch.where(mask, ids, torch.full_like(ids, IGNORE))
    labels = torch.full_like(hf_labels, IGNORE)
    labels[:, :-1] = hf_labels[:, 1:]
    pv = {k: torch.cat([p[k] for p in pixels]) for k in pixels[0]} if pixels else \
        {"pixel_values": None, "pixel_attention_mask": None, "spatial_shapes": None}
    batch = SimpleNamespace(input_ids=input_ids, attention_mask=attention, labels=labels,
                            n_tokens=int((labels != IGNORE).sum()), **pv)
    return batch, hf_labels


@contextlib.contextmanager
def one_thread():
    """Context: torch on one thread (the test machine's cores are shared; tiny models run fastest on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def losses(folder: Path) -> list[float]:
    """Training losses of a run's metrics.jsonl, by step."""
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def make_adapter(folder, base, seed=0):
    """An "all"-preset adapter for checkpoint `base` with random A and B (B std 0.05), saved to `folder`."""
    from lfm2vl.finetune.adapter import save_adapter
    from lfm2vl.finetune.lora import add_lora, lora_parameters
    from lfm2vl.loading import load_model

    model = load_model(base, dtype=torch.float32)[0]
    add_lora(model, r=4, alpha=8, dropout=0.1, targets="all")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.shape[1] <= 16 else p.shape[1] ** -0.5))
    return save_adapter(model, folder, str(base))
