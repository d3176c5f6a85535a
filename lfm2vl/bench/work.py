"""The work behind each bench figure, so it reads as a share of the machine's ceilings (machine.py): the bytes of
weights one decode step streams in each weight format, the FLOPs of one prompt token, and the FLOPs of an image's
patches in the vision tower and projector. Counted on the model built on the meta device (shapes, no weights).

Counted: every weight a decode step reads once (the language model without its embedding table, of which a step
reads one row, plus the output head, which is the embedding matrix when tied); int8 adds one fp32 scale per output
row, int4 one fp16 per 32 weights (cpu/quant.py's formats). FLOPs: 2 per weight of each linear and each token (prefill:
the language model's linears over every prompt token, the head on the last position only: the work of a prefill that
runs each layer on every row, as transformers does; lfm2vl runs the layers after the last attention layer on a few
rows, so its rate is that work over its time; vision: the tower's linears per patch, its
attention (4 x width x patches^2 per layer and image unit) and the projector per image token). Attention over the
prompt in the language model (under 1% at 512 tokens) and elementwise work are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

BYTES = {"bf16": 2.0, "fp32": 4.0}


@dataclass(frozen=True)
class Work:
    lm_linear: int         # weights of the language model's linears
    lm_linear_rows: int    # their output rows
    lm_other: int          # norms, convolutions, biases (embedding table excluded)
    head: int              # the output head's weights
    head_rows: int
    vision_linear: int     # weights of the vision tower's linears (patch embedding included)
    vision_width: int
    vision_layers: int
    projector_linear: int

    def decode_bytes(self, fmt: str, quantize_head: bool = True) -> float:
        """Bytes of weights one decode step reads with the language model in `fmt` (bf16, fp32, int8, int4, or
        bf16_packed: 12 bits a weight, its few escaped bytes and row offsets left out)."""
        if fmt in BYTES:
            return BYTES[fmt] * (self.lm_linear + self.lm_other + self.head)
        if fmt == "int8":
            lin, head = self.lm_linear + 4 * self.lm_linear_rows, self.head + 4 * self.head_rows
        elif fmt == "int4":
            lin, head = self.lm_linear * (0.5 + 2 / 32), self.head * (0.5 + 2 / 32)
        elif fmt == "bf16_packed":
            lin, head = 1.5 * self.lm_linear, 1.5 * self.head
        else:
            raise ValueError(f"unknown weight format {fmt!r}; expected bf16, fp32, int8, int4 or bf16_packed")
        return lin + 2 * self.lm_other + (head if quantize_head else 2 * self.head)

    def prefill_flops(self, tokens: int) -> float:
        return 2.0 * self.lm_linear * tokens

    def vision_flops(self, patches: int, patch_sq: int) -> float:
        """patches: valid patches of all image units; patch_sq: the sum over units of (patches in the unit)^2."""
        tower = 2.0 * self.vision_linear * patches + 4.0 * self.vision_width * self.vision_layers * patch_sq
        return tower + 2.0 * self.projector_linear * patches / 4  # 2x2 unshuffle: one token per 4 patches


def _linears(module: nn.Module) -> tuple[int, int, int]:
    """(linear weights, their output rows, every other parameter) under module."""
    lin = rows = other = 0
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, nn.Linear) and name == "weight":
                lin, rows = lin + p.numel(), rows + p.shape[0]
            else:
                other += p.numel()
    return lin, rows, other


def model_work(folder: str | Path) -> Work:
    from ..config import Lfm2VlConfig
    from ..loading import meta_model
    from ..model.vision import Attention

    model = meta_model(Lfm2VlConfig.from_file(Path(folder)))
    model.tie_weights()
    lm = model.model.language_model
    lin, rows, other = _linears(lm)
    other -= lm.embed_tokens.weight.numel()
    tower = model.model.vision_tower
    attn = [m for m in tower.modules() if isinstance(m, Attention)]
    return Work(lm_linear=lin, lm_linear_rows=rows, lm_other=other, head=model.lm_head.weight.numel(),
                head_rows=model.lm_head.weight.shape[0], vision_linear=_linears(tower)[0],
                vision_width=attn[0].q_proj.in_features if attn else 0, vision_layers=len(attn),
                projector_linear=_linears(model.model.multi_modal_projector)[0])


def add_shares(metrics: dict, work: Work, fmt: str, quantize_head: bool, machine: dict | None,
               int8_vision: bool = False) -> None:
    """Add a scenario's achieved rates (decode GB/s of weights read, prefill and vision GFLOP/s) and, when the machine
    was measured, their shares of its read bandwidth and GEMM rate, to its metrics dict. The GEMM rate is the int8
    one (machine["int8_gops"], set where int8 products run in int8) for an int8 or int4 prefill and an int8 vision
    tower."""
    m = metrics
    m["decode_gbps"] = m["decode_tps"] * work.decode_bytes(fmt, quantize_head) / 1e9
    m["prefill_gflops"] = (work.prefill_flops(m["prompt_tokens"]) / m["prefill_s"] / 1e9
                           if m["prefill_s"] > 0 else None)
    m["vision_gflops"] = (work.vision_flops(m["patches"], m["patch_sq"]) / m["vision_s"] / 1e9
                          if m.get("patches") and m["vision_s"] > 0 else None)
    if machine:
        m["decode_bw_pct"] = 100 * m["decode_gbps"] / machine["read_gbps"]
        int8 = {"prefill": fmt in ("int8", "int4"), "vision": int8_vision}  # int4 prefills widen to int8 rows
        for k in ("prefill", "vision"):
            v = m[f"{k}_gflops"]
            peak = machine.get("int8_gops") if int8[k] else None
            m[f"{k}_gemm_pct"] = None if v is None else 100 * v / (peak or machine["gemm_gflops"])
