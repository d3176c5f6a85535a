"""`lfm2vl merge --model M --adapter DIR --output OUT`: a checkpoint folder with a LoRA adapter merged in.

    merge_checkpoint("LiquidAI/LFM2-VL-450M", "runs/a", "merged/")   # the same as a function

The output is the base checkpoint with each adapted weight replaced by W + scaling * B @ A (float32 math, stored in
the weight's own dtype): model.safetensors holds every tensor of the base under the base file's own key names
(vision keys with or without `vision_model.`, legacy prefixes, unused layers kept as they were), and config.json,
the processor, tokenizer and chat-template files are copied. So transformers and lfm2vl load it like the base.
The module tree the adapter is checked against is built on the meta device: no weight is read twice, and the
tensors the adapter does not touch are written bit for bit. The folder appears at once, complete (written beside
it, then renamed); an existing non-empty OUT is an error unless --overwrite.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
from pathlib import Path

from ..files import atomic
from ..files.check import OutputError, check_folder

COPIED = ["*.json", "*.jinja", "*.txt"]  # what lfm2vl reads beside the weights (resolve.HUB_PATTERNS)
SKIPPED = ["model.safetensors.index.json", "adapter_config.json"]


class MergeError(ValueError):
    """A merge that cannot run as asked (what is wrong is in the message)."""


def merge_checkpoint(model: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Write base checkpoint `model` (folder, hub id or `bundled`) with `adapter` merged into `output`; returns the
    folder."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..config import Lfm2VlConfig
    from ..loading import _SkipRandomInit, _weight_files, remap_hf_keys, resolve_folder
    from ..model.lfm2vl import Lfm2VlModel
    from ..resolve import resolve_model
    from .adapter import adapter_updates, read_adapter
    from .lora import merged_weight

    out = Path(output).expanduser()
    _check_output(out, overwrite)
    config_and_tensors = read_adapter(adapter)
    base = resolve_folder(resolve_model(model))  # a folder, a hub id or `bundled`, as every command takes
    for src, what in ((base, "the base checkpoint"), (Path(adapter), "the adapter")):
        if out.resolve() == src.resolve() or src.resolve().is_relative_to(out.resolve()):
            raise MergeError(f"--output {out} would replace {what} ({src}); pick another folder")
    config = Lfm2VlConfig.from_file(base)
    with torch.device("meta"), _SkipRandomInit():
        skeleton = Lfm2VlModel(config)
    updates = adapter_updates(skeleton, *config_and_tensors, where=f"adapter {adapter}")

    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(base):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    ours_to_file = remap_hf_keys({k: k for k in tensors}, config)  # our key -> the file's key (values are names)
    for path, (a, b, scaling) in updates.items():
        key = ours_to_file[f"{path}.weight"]
        tensors[key] = merged_weight(tensors[key], a, b, scaling).contiguous()

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in sorted(base.iterdir()):
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in COPIED) and f.name not in SKIPPED:
                shutil.copy2(f, tmp / f.name)
    return out


def _check_output(out: Path, overwrite: bool) -> None:
    try:
        check_folder("--output", out, beside=True)
    except OutputError as e:
        raise MergeError(str(e)) from None
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"--output {out} exists and is not empty; pick a new folder or pass --overwrite")


def build_parser() -> argparse.ArgumentParser:
    from ..cli.args import HelpFormatter

    p = argparse.ArgumentParser(prog="lfm2vl merge", description="Merge a LoRA adapter (PEFT's format) into a "
                                "checkpoint and write the result as a Hugging Face checkpoint folder.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint the adapter was trained on: a folder, a hub id or "
                   "'bundled' (the bundled demo model)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (adapter_config.json, "
                   "adapter_model.safetensors)")
    p.add_argument("--output", required=True, metavar="OUT", help="folder to write the merged checkpoint to")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..cli.commands import load_warnings
    from ..loading import LoadError

    try:
        with load_warnings("lfm2vl merge"):
            out = merge_checkpoint(args.model, args.adapter, args.output, overwrite=args.overwrite)
    except (MergeError, LoadError, ValueError, OSError) as e:
        print(f"lfm2vl merge: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"lfm2vl merge: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
