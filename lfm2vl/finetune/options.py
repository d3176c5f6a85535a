"""`TrainOptions`: the one home of every fine-tuning option, its default and its check.

The Python API (`lfm2vl.finetune(**options)`) and the CLI (`lfm2vl finetune`, flags = field names with '-') are
both built from this dataclass. model=None follows the default rules of resolve.py ($LFM2VL_MODEL, else
LiquidAI/LFM2-VL-450M when cached or reachable, else the bundled demo model). Values that depend on the mode are None here: lr (2e-4 for LoRA, 5e-5 for full
SFT; filled in by `resolved()`) and freeze_vision (on for LoRA unless the targets include the vision tower, off for
full SFT; decided by loop.py).
`check()` returns the first problem as one sentence naming the option, or None.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields

import numpy as np

from ..generate.sampling import SEED_RANGE as TORCH_SEEDS
from ..processor.config import plain_number

LR_LORA, LR_FULL = 2e-4, 5e-5
DTYPES = ("auto", "float32", "bfloat16")
SEED_MAX = TORCH_SEEDS[1]  # the largest seed torch.Generator.manual_seed takes (a training seed starts at 0)
PATHS = {"data": "a JSONL file or a Hugging Face dataset folder", "eval_data": "a JSONL file or a Hugging Face "
         "dataset folder", "output": "the result folder", "resume": "a run's output folder or a checkpoint folder"}

# Options that define what is trained and on what: a resumed run must have the same values (state.py).
STRUCTURAL = ("full", "lora_r", "lora_alpha", "lora_dropout", "targets", "freeze_vision", "batch_size", "grad_accum",
              "max_seq_len", "seed", "min_image_tokens", "max_image_tokens", "do_image_splitting", "skip_bad")


@dataclass
class TrainOptions:
    # what and where
    model: str | None = None                  # checkpoint folder, hub id or "bundled"; None: resolve.py's rules
    data: str | None = None                   # training data: JSONL file or Hugging Face dataset on disk (required)
    eval_data: str | None = None              # evaluation data, same formats
    output: str | None = None                 # result folder (required)
    # method
    full: bool = False                        # full SFT instead of LoRA
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    targets: str = "text"                     # LoRA targets: presets (text, text+projector, all) or module names
    freeze_vision: bool | None = None         # None: on for LoRA, off for full SFT
    # schedule
    epochs: int = 3
    max_steps: int | None = None              # overrides epochs
    lr: float | None = None                   # None: 2e-4 for LoRA, 5e-5 for full SFT
    warmup: float = 0.03                      # < 1: fraction of the steps; >= 1: a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0                # gradient clipping
    batch_size: int = 4                       # conversations per micro-batch and rank
    grad_accum: int = 1                       # micro-batches per optimizer step
    max_seq_len: int = 2048
    seed: int = 0
    gradient_checkpointing: bool = True
    # images (None: the checkpoint's processor settings)
    min_image_tokens: int | None = None
    max_image_tokens: int | None = None
    do_image_splitting: bool | None = None
    # bookkeeping
    eval_every: int | None = None             # steps between eval losses (None: once per epoch and at the end)
    save_every: int | None = None             # steps between checkpoints (None: once per epoch; always on Ctrl-C)
    skip_bad: bool = False                    # skip (and count) invalid rows instead of stopping
    overwrite: bool = False                   # allow a non-empty output folder
    resume: str | None = None                 # checkpoint folder (or a run's output folder) to continue from
    device: str = "cpu"
    dtype: str = "auto"                       # auto: bfloat16 where the device supports it, else float32
    progress: bool = True                     # progress bar on stderr
    extra: dict = field(default_factory=dict, repr=False)  # unknown keywords, reported by check()

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "TrainOptions":
        """Build from keywords; `lora=True/False` is accepted as the opposite of `full`."""
        kwargs = dict(kwargs)
        names = {f.name for f in fields(cls)} - {"extra"}
        if "lora" in kwargs:
            lora = kwargs.pop("lora")
            if "full" in kwargs and bool(kwargs["full"]) == bool(lora):
                raise ValueError("lora and full contradict each other; pass one of them")
            kwargs["full"] = not lora
        if kwargs.get("max_steps") is not None and "epochs" in kwargs:
            raise ValueError("max_steps: not allowed with epochs; pass one of them (max_steps sets the length "
                             "instead of epochs)")
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        return cls(**kwargs, extra=extra)

    def __post_init__(self):
        for f in fields(self):  # numpy scalars (np.int64(4), np.float32(0.5), np.bool_) become Python values
            v = getattr(self, f.name)
            if isinstance(v, np.bool_):
                setattr(self, f.name, bool(v))
            elif isinstance(v, np.generic) and plain_number(v) is not None:
                setattr(self, f.name, plain_number(v))

    @property
    def lora(self) -> bool:
        return not self.full

    def resolved(self) -> "TrainOptions":
        """A copy with the learning rate's mode-dependent default filled in. freeze_vision=None stays None: the
        trainer turns it on for LoRA unless the targets include the vision tower, and off for full SFT."""
        return dataclasses.replace(self, lr=self.lr if self.lr is not None else (LR_FULL if self.full else LR_LORA))

    def knobs(self) -> dict:
        """The image options that are set, as processor keywords."""
        d = {"min_image_tokens": self.min_image_tokens, "max_image_tokens": self.max_image_tokens,
             "do_image_splitting": self.do_image_splitting}
        return {k: v for k, v in d.items() if v is not None}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}

    def check(self) -> str | None:
        """The first problem with these values (one sentence naming the option), or None."""
        if self.extra:
            valid = ", ".join(sorted({f.name for f in fields(self)} - {"extra"} | {"lora"}))
            return f"unknown option(s) {', '.join(sorted(self.extra))}; the options are: {valid}"
        for name, expected in PATHS.items():
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                return f"{name} must be a path (str or os.PathLike) to {expected}, got {v!r:.60} ({type(v).__name__})"
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            return f"model must be a checkpoint folder, a hub id or \"bundled\", got {type(self.model).__name__}"
        if not self.data:
            return "data is required: a JSONL file or a Hugging Face dataset folder"
        if not self.output:
            return "output is required: the folder the adapter or checkpoint is written to"
        for name in ("lora_r", "epochs", "batch_size", "grad_accum", "max_seq_len"):
            problem = _positive_int(name, getattr(self, name))
            if problem:
                return problem
        for name in ("max_steps", "eval_every", "save_every", "min_image_tokens", "max_image_tokens"):
            v = getattr(self, name)
            if v is not None and _positive_int(name, v):
                return _positive_int(name, v)
        if not _real(self.lora_alpha) or self.lora_alpha <= 0:
            return f"lora_alpha must be a number > 0, got {self.lora_alpha!r}"
        if not _real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            return f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}"
        if self.lr is not None and (not _real(self.lr) or self.lr <= 0):
            return f"lr must be a number > 0, got {self.lr!r}"
        if not _real(self.warmup) or self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup)):
            return (f"warmup must be a fraction of the steps in [0, 1) or a whole number of steps >= 1, "
                    f"got {self.warmup!r}")
        if not _real(self.weight_decay) or self.weight_decay < 0:
            return f"weight_decay must be a number >= 0, got {self.weight_decay!r}"
        if not _real(self.max_grad_norm) or self.max_grad_norm <= 0:
            return f"max_grad_norm must be a number > 0, got {self.max_grad_norm!r}"
        if seed_problem(self.seed):
            return f"seed {seed_problem(self.seed)}, got {self.seed!r}"
        if (self.min_image_tokens is not None and self.max_image_tokens is not None
                and self.min_image_tokens > self.max_image_tokens):
            return (f"min_image_tokens ({self.min_image_tokens}) must not exceed max_image_tokens "
                    f"({self.max_image_tokens})")
        if not isinstance(self.targets, str) or not self.targets.strip():
            return f"targets must be preset or module names separated by commas, got {self.targets!r}"
        if self.dtype not in DTYPES:
            return f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
        return None


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SEED_RANGE = "must be an integer from 0 to 2**64-1"


def seed_problem(v) -> str | None:
    """What is wrong with `v` as a training seed, or None."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SEED_MAX:
        return SEED_RANGE
    return None


def _positive_int(name: str, v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f"{name} must be an integer >= 1, got {v!r}"
    return None


def warmup_steps(warmup: float, total: int) -> int:
    """warmup as a step count: a fraction (< 1) of the total, rounded up, or the number itself."""
    return int(warmup) if warmup >= 1 else math.ceil(warmup * total)
