"""The `lfm2vl bench` command's options: the parser (every option, its default and help) and the checks that run
before any work (a bad value is one line). __init__.py runs the benchmark."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..files.check import OutputError, check_file
from .data import SCENARIOS, SHAPES

DTYPES = {"bfloat16": "bf16", "float32": "fp32"}  # --dtype -> the short name of table labels and worker specs
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32"}


def _dtype_arg(text: str) -> str:
    return DTYPE_ALIASES.get(text, text)  # argparse then checks it against the long names


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is invalid; expected a number of seconds > 0")
    return v


_seconds.__name__ = "seconds"


def build_parser() -> argparse.ArgumentParser:
    from ..cli.args import HelpFormatter

    ap = argparse.ArgumentParser(prog="lfm2vl bench", description="Benchmark lfm2vl (and transformers).",
                                 formatter_class=HelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint folder (default: random weights at --shape)")
    src.add_argument("--shape", default="450M", choices=SHAPES, help="published shape for random weights")
    src.add_argument("--config", default=None,
                     help="a config.json to build random weights from, e.g. a tiny one for tests (default: none)")
    ap.add_argument("--adapter", metavar="DIR", default=None,
                    help="LoRA adapter folder merged into the weights at load, by every engine (transformers: "
                         "peft's merge_and_unload; its base is --model's checkpoint) (default: none)")
    ap.add_argument("--dtype", default="bfloat16", type=_dtype_arg, choices=tuple(DTYPES),
                    help="weights and activations (bf16 and fp32 are accepted too)")
    ap.add_argument("--int8", action="store_true", help="also run lfm2vl with weight-only int8 (+ quality check)")
    ap.add_argument("--int4", action="store_true", help="also run lfm2vl with weight-only int4 (+ quality check)")
    ap.add_argument("--bf16-packed", action="store_true", help="also run lfm2vl with its bf16 weights packed "
                    "losslessly in 12 bits (the same results as bf16; run without it too where it is lfm2vl.load's "
                    "default)")
    ap.add_argument("--int8-vision", action="store_true", help="also run lfm2vl int8 with the vision tower in int8 "
                    "too (+ quality check with the image features' cosine)")
    ap.add_argument("--int8-float-head", action="store_true",
                    help="with --int8 / --int4, keep the output head in the float dtype (default: quantized too)")
    ap.add_argument("--low-memory", action="store_true",
                    help="also run lfm2vl with low_memory=True (idle weights dropped from RSS; cpu/lowmem.py)")
    ap.add_argument("--torch-first", action="store_true",
                    help="also run lfm2vl in a process that imports torch before lfm2vl")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU lfm2vl runs its plain torch path)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile lfm2vl's static-shape decode step (CUDA graphs on a GPU; pair with "
                         "--no-optimize on CPU)")
    ap.add_argument("--min-image-tokens", type=int, default=None, help="image-token budget of the image scenarios "
                    "(default: the checkpoint's processor config)")
    ap.add_argument("--max-image-tokens", type=int, default=None,
                    help="(default: the checkpoint's processor config)")
    ap.add_argument("--no-image-splitting", action="store_true", help="no tiles: each image is one unit")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) per engine")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed runs per scenario, or timed steps with --train; the median is reported "
                         "(default: 3, 5 with --train)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed runs per scenario first, or untimed steps with --train (default: 1, 2 with --train)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, in turn (interleaved: a drift of the machine's speed "
                         "reaches all engines alike); medians reported, ratios the median of each round's")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    ap.add_argument("--engines", default=None, help="comma list of ours,transformers (default: both if available)")
    ap.add_argument("--no-optimize", action="store_true", help="lfm2vl without speed.optimize_for_cpu")
    ap.add_argument("--cache-dir", default=None,
                    help="where random checkpoints are kept (default: ~/.cache/lfm2vl/bench)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    train = ap.add_argument_group("training (--train)")
    train.add_argument("--train", action="store_true",
                       help="measure LoRA training steps (samples/s, peak RSS) instead of inference")
    train.add_argument("--batch-size", type=int, default=4, help="conversations per step")
    train.add_argument("--answer-tokens", type=int, default=64, help="trained answer tokens per conversation")
    train.add_argument("--image-size", type=int, default=512, help="side of each conversation's square image")
    train.add_argument("--targets", default="text", choices=("text", "text+projector", "all"),
                       help="LoRA targets preset (the same modules on both engines)")
    train.add_argument("--no-gradient-checkpointing", action="store_true", help="keep all activations instead")
    ap.add_argument("--keep-page-cache", action="store_true",
                    help="leave the weight files in the page cache as they are (default: evict them and read them "
                         "back sequentially first, the state a fresh read from disk leaves; bench/pagecache.py)")
    ap.add_argument("--json", default=None, help="also write the results to this file (default: no file)")
    ap.add_argument("--timeout", type=_seconds, default=3600, help="seconds per engine subprocess")
    return ap


def parse_args(argv):
    """The parsed options, checked (each bad value one line, before any work), with the derived short dtype."""
    ap = build_parser()
    args = ap.parse_args(argv)
    args.short_dtype = DTYPES[args.dtype]
    if args.reps is None:
        args.reps = 5 if args.train else 3
    if args.warmup is None:
        args.warmup = 2 if args.train else 1
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    bad = sorted(set(args.scenarios) - set(SCENARIOS))
    if bad:
        ap.error(f"unknown scenario(s) {bad}; expected {', '.join(SCENARIOS)}")
    if not args.scenarios and not args.train:
        ap.error(f"--scenarios is empty; expected a comma list of {', '.join(SCENARIOS)}")
    if args.config is not None:
        _check_config(ap, args.config)
    if args.json is not None:
        try:
            check_file("--json", args.json)  # said before the benchmark runs, not after
        except OutputError as e:
            ap.error(str(e))
    if args.engines is None:
        needs = ("transformers", "peft") if args.train else ("transformers",)
        have_hf = all(importlib.util.find_spec(m) is not None for m in needs)
        args.engines = ["ours"] + (["transformers"] if have_hf else [])
    else:
        args.engines = [e for e in args.engines.split(",") if e]
        if set(args.engines) - {"ours", "transformers"}:
            ap.error(f"--engines takes ours and/or transformers, got {args.engines}")
    if args.adapter is not None:
        from ..finetune.adapter import AdapterError, read_adapter

        try:
            read_adapter(args.adapter)  # a bad folder is said before any engine starts
        except AdapterError as e:
            ap.error(f"--adapter: {e}")
    if args.reps < 1 or args.threads < 1 or args.new_tokens < 1 or args.rounds < 1:
        ap.error("--reps, --threads, --new-tokens and --rounds must be >= 1")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    for opt in ("batch_size", "answer_tokens", "image_size"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    for opt in ("min_image_tokens", "max_image_tokens"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    args.image_knobs = {k: v for k, v in (("min_image_tokens", args.min_image_tokens),
                                          ("max_image_tokens", args.max_image_tokens),
                                          ("do_image_splitting", False if args.no_image_splitting else None))
                        if v is not None}
    if args.device != "cpu":
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            ap.error(f"--device {args.device!r}: {e}")
        if dev.type != "cuda" or not torch.cuda.is_available():
            ap.error(f"--device {args.device!r}: expected cpu or an available cuda device "
                     f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
    return args


def _check_config(ap: argparse.ArgumentParser, path: str) -> None:
    """--config names a readable LFM2-VL config.json (said before any checkpoint is built)."""
    from ..config import Lfm2VlConfig
    from ..resolve import LoadError

    if not Path(path).is_file():
        ap.error(f"--config {path} is a folder; expected a config.json file" if Path(path).is_dir()
                 else f"--config {path}: no such file")
    try:
        Lfm2VlConfig.from_file(path)
    except LoadError as e:  # the file's reading and its fields alike
        ap.error(f"--config: {e}" if path in str(e) else f"--config {path}: {e}")
