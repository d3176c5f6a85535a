"""The result of a run: a PEFT adapter folder (LoRA) or a Hugging Face checkpoint folder (full SFT).

A full checkpoint is written as the base checkpoint was: its config.json and every processor, tokenizer and chat
template file are copied, and model.safetensors stores the trained weights under the base's own key names and
dtypes (a checkpoint with legacy or custom-code key names stays loadable by the same code that loaded the base).
Tensors the base stores but lfm2vl does not run (unused vision layers, position_ids buffers) are copied unchanged.
Each file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from ..files.atomic import write_file
from .report import METRICS, PLOT

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# Not copied from the base folder: its weight index, and a previous run's metrics and loss curve when the base is
# itself a training result (this run writes its own).
NOT_COPIED = ("model.safetensors.index.json", METRICS, PLOT)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def write_adapter(model: nn.Module, folder: Path, base: str) -> Path:
    from .adapter import save_adapter

    return save_adapter(model, folder, base_model_name_or_path=base)


def write_full(model: nn.Module, config, base_folder: Path, folder: Path) -> Path:
    """model's weights as a checkpoint folder shaped like base_folder (see the module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..loading import _weight_files, remap_hf_keys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(base_folder)):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            keys = list(sf.keys())
            names = remap_hf_keys({k: k for k in keys}, config)  # our key -> the base's key
            theirs = {}
            for k, orig in names.items():
                theirs.setdefault(orig, k)  # a tied head maps to the embedding's key: stored once, as the base did
            for orig in keys:
                dtype = _DTYPES.get(sf.get_slice(orig).get_dtype())
                if orig in theirs and theirs[orig] in ours:
                    t = ours[theirs[orig]].detach()
                    out[orig] = t.to("cpu", dtype or t.dtype).contiguous()
                else:
                    out[orig] = sf.get_tensor(orig).contiguous()
    write_file(folder / "model.safetensors", lambda p: save_file(out, str(p), metadata={"format": "pt"}))
    copy_base_files(base_folder, folder)
    return folder


def copy_base_files(base_folder: Path, folder: Path) -> list[str]:
    """Copy config, processor, tokenizer and template files (everything but weights and adapters)."""
    copied = []
    for f in sorted(Path(base_folder).iterdir()):
        if not f.is_file() or f.suffix in WEIGHT_SUFFIXES or f.name in NOT_COPIED or f.name.startswith("adapter_"):
            continue
        write_file(Path(folder) / f.name, lambda p, src=f: shutil.copyfile(src, p))
        copied.append(f.name)
    return copied

