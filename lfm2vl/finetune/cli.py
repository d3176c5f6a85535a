"""`lfm2vl finetune`: the command line of finetune(), built from TrainOptions (flags = field names with '-').

Bad option values are argparse errors (usage and one line, exit status 2); problems found while running (the model,
the data, the output folder, a checkpoint that does not fit) print one line and exit with status 1; Ctrl-C saves a
checkpoint, prints how to resume and exits with status 130. Under torchrun only rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys

from ..cli.args import HelpFormatter, _number, positive_int
from ..resolve import ORDER_HELP
from .options import DTYPES, TrainOptions, seed_problem

D = TrainOptions()  # the defaults shown in --help
positive_float = _number(float, lambda v: None if math.isfinite(v) and v > 0 else "expected a number > 0")
nonneg_float = _number(float, lambda v: None if math.isfinite(v) and v >= 0 else "expected a number >= 0")
dropout_float = _number(float, lambda v: None if 0 <= v < 1 else "expected a number in [0, 1)")
seed_int = _number(int, seed_problem)


def warmup_value(text: str) -> float:
    """A fraction of the steps in [0, 1), or a whole number of steps >= 1."""
    v = float(text)
    if not math.isfinite(v) or v < 0 or (v >= 1 and v != int(v)):
        raise argparse.ArgumentTypeError(f"{text} is invalid; expected a fraction of the steps in [0, 1) or a "
                                         "whole number of steps")
    return int(v) if v >= 1 else v


warmup_value.__name__ = "float"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lfm2vl finetune", formatter_class=HelpFormatter,
        description="Fine-tune an LFM2-VL checkpoint on image conversations: a LoRA adapter (PEFT's format) or a "
                    "full checkpoint. Loss on the assistant turns only. Data-parallel under torchrun: "
                    "`torchrun --nproc-per-node N -m lfm2vl finetune ...`.")
    g = p.add_argument_group("model, data and result")
    g.add_argument("--model", default=None, help="base " + ORDER_HELP)
    g.add_argument("--data", required=True, metavar="PATH",
                   help="training data: JSONL ({\"messages\": [...]} per line) or a Hugging Face dataset on disk "
                        "(save_to_disk folder, parquet file or folder) with messages and images columns")
    g.add_argument("--eval-data", metavar="PATH", default=None, help="evaluation data, same formats (default: none)")
    g.add_argument("--output", required=True, metavar="DIR", help="folder for the adapter or checkpoint, "
                   "metrics.jsonl and loss.png")
    g.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue an interrupted run: its output folder or one of its checkpoints/step-N folders")
    g = p.add_argument_group("method")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--lora", dest="full", action="store_false", default=argparse.SUPPRESS, help="train a LoRA adapter (the default)")
    m.add_argument("--full", dest="full", action="store_true", default=argparse.SUPPRESS, help="full fine-tuning (all weights)")
    g.add_argument("--lora-r", metavar="N", type=positive_int, default=D.lora_r, help="LoRA rank")
    g.add_argument("--lora-alpha", metavar="X", type=positive_float, default=D.lora_alpha,
                   help="LoRA alpha (scaling alpha/r)")
    g.add_argument("--lora-dropout", metavar="P", type=dropout_float, default=D.lora_dropout, help="LoRA dropout")
    g.add_argument("--targets", metavar="LIST", default=D.targets,
                   help="LoRA targets, comma-separated: presets text (q/k/v/out_proj, in_proj/out_proj, w1/w2/w3 of "
                        "the language model), text+projector (+ linear_1/linear_2), all (+ the vision tower's "
                        "q/k/v/out_proj, fc1/fc2), module names or full module paths")
    g.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the vision tower frozen (default: on for LoRA unless the targets include it, off for "
                        "--full)")
    g = p.add_argument_group("schedule")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--epochs", metavar="N", type=positive_int, default=D.epochs, help="passes over the data")
    s.add_argument("--max-steps", metavar="N", type=positive_int, default=None,
                   help="optimizer steps (instead of --epochs)")
    g.add_argument("--lr", metavar="X", type=positive_float, default=None,
                   help="peak learning rate (default: 2e-4 for LoRA, 5e-5 for --full)")
    g.add_argument("--warmup", metavar="X", type=warmup_value, default=D.warmup,
                   help="linear warmup: a fraction (< 1) of the steps or a number of steps; then cosine decay")
    g.add_argument("--weight-decay", metavar="X", type=nonneg_float, default=D.weight_decay, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", metavar="X", type=positive_float, default=D.max_grad_norm,
                   help="gradient clipping")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=D.batch_size,
                   help="conversations per micro-batch and process (global batch = batch size x processes x "
                        "grad accum)")
    g.add_argument("--grad-accum", metavar="N", type=positive_int, default=D.grad_accum,
                   help="micro-batches per optimizer step")
    g.add_argument("--max-seq-len", metavar="N", type=positive_int, default=D.max_seq_len,
                   help="longest conversation in tokens (image tokens included); longer rows are bad rows")
    g.add_argument("--seed", metavar="N", type=seed_int, default=D.seed, help="data order, LoRA init and dropout")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   default=argparse.SUPPRESS, help="keep all activations (faster, more memory; default: recompute them in the backward pass)")
    g = p.add_argument_group("images (defaults from the checkpoint's processor files)")
    g.add_argument("--min-image-tokens", metavar="N", type=positive_int, default=None,
                   help="fewest image tokens per image or tile (default: the checkpoint's)")
    g.add_argument("--max-image-tokens", metavar="N", type=positive_int, default=None,
                   help="most image tokens per image or tile (default: the checkpoint's)")
    g.add_argument("--no-image-splitting", dest="do_image_splitting", action="store_const", const=False,
                   default=None, help="never cut large images into tiles (default: the checkpoint's setting)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", metavar="N", type=positive_int, default=None,
                   help="steps between eval losses (default: once per epoch and at the end)")
    g.add_argument("--save-every", metavar="N", type=positive_int, default=None,
                   help="steps between checkpoints (default: once per epoch; Ctrl-C always saves one)")
    g.add_argument("--skip-bad", action="store_true", help="skip and count invalid rows instead of stopping")
    g.add_argument("--device", default=D.device, help="cpu, cuda or cuda:N (under torchrun: each process takes "
                   "cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=DTYPES, default=D.dtype,
                   help="auto: bfloat16 autocast where the device has fast bf16 (CUDA, CPUs with AVX512-BF16/AMX), "
                        "else float32")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    return p


def options_from(args) -> dict:
    names = {f for f in TrainOptions.__dataclass_fields__ if f != "extra"}
    opts = {k: v for k, v in vars(args).items() if k in names}
    if opts.get("max_steps") is not None:  # --max-steps replaces --epochs (argparse keeps them apart)
        opts.pop("epochs", None)
    return opts


def flag_wording(message: str) -> str:
    """Option names as the user typed them: min_image_tokens -> --min-image-tokens."""
    names = sorted((f for f in TrainOptions.__dataclass_fields__ if f != "extra"), key=len, reverse=True)
    return re.sub(r"\b(%s)\b" % "|".join(names), lambda m: "--" + m.group(1).replace("_", "-"), message)


def resume_command(argv: list[str], output: str) -> str:
    """The command that continues this run: the same arguments with --resume OUTPUT."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        kept.append(a)
    return shlex.join(["lfm2vl", "finetune", *kept, "--resume", output])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    opts = options_from(args)
    problem = TrainOptions(**opts).check()
    if problem:
        parser.error(flag_wording(problem))
    main_rank = os.environ.get("RANK", "0") == "0"
    from . import loop
    from .stop import Stopped
    from ..resolve import resolve_model, stderr_announcer

    try:
        opts["model"] = str(resolve_model(opts["model"], announce=stderr_announcer("lfm2vl finetune")))
        summary = loop.finetune(**opts)
    except KeyboardInterrupt as e:
        if main_rank:
            steps = e.steps if isinstance(e, Stopped) else 0
            print("\nlfm2vl finetune: stopped " + (f"after step {steps} (no checkpoint written for the step in "
                  "progress)" if steps else "before the first step finished: nothing was trained"), file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if main_rank:
            print(f"lfm2vl finetune: error: {e}", file=sys.stderr)
        return 1
    if not main_rank:
        return 130 if summary["interrupted"] else 0
    if summary["interrupted"]:
        print(f"lfm2vl finetune: interrupted after step {summary['steps']} of {summary['total_steps']}; "
              f"checkpoint saved in {summary['checkpoint']}. Resume with:\n  {resume_command(argv, args.output)}",
              file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
