"""The `lfm2vl eval` command's options: one parser per subcommand (run, score, merge), the judge's options they
share, and the --shard and URL types. cli.py runs the subcommands."""
from __future__ import annotations

import argparse

from ..cli.args import HelpFormatter, positive_int

PROG = "lfm2vl eval"


def shard_type(text: str) -> tuple[int, int]:
    from .run import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--shard ")) from None


shard_type.__name__ = "shard"


def endpoint_url(text: str) -> str:
    """--server and --judge: the URL of an OpenAI-compatible endpoint, checked before any work starts."""
    from .endpoint import check_url

    try:
        return check_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


endpoint_url.__name__ = "URL"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Evaluate a model on a benchmark file in VLMEvalKit's TSV layout: greedy predictions (the input "
                    "rows plus `prediction`, resumable), then the scores by the benchmark's published rules (a "
                    "short table, and JSON beside the predictions). Also: `lfm2vl eval score PRED.tsv --benchmark "
                    "NAME [--json]` rescores a predictions file; `lfm2vl eval merge SHARD.tsv... --output PRED.tsv` "
                    "joins shards; `lfm2vl eval make-suite NAME --out DIR` writes an offline suite (no download).")
    g = p.add_argument_group("data and result")
    g.add_argument("--data", required=True, metavar="PATH",
                   help="a benchmark TSV (a file named after a benchmark selects its rules), or a folder holding "
                        "NAME.tsv with --benchmark NAME")
    g.add_argument("--benchmark", metavar="NAME", default=None,
                   help="benchmark rules, as VLMEvalKit spells them (MMStar, MMBench_DEV_EN, POPE, ...) "
                        "(default: from the file name)")
    g.add_argument("--output", required=True, metavar="PRED.tsv",
                   help="predictions file; an existing one is resumed (its rows are skipped); the scores go to "
                        "PRED.scores.json")
    g.add_argument("--limit", metavar="N", type=positive_int, default=None, help="only the first N rows (default: all)")
    g.add_argument("--shard", metavar="i/n", type=shard_type, default=None,
                   help="predict shard i of n (0 <= i < n; contiguous slices; join with `lfm2vl eval merge`) "
                        "(default: all rows, or the torchrun rank's shard)")
    g.add_argument("--json", action="store_true", help="print only the scores JSON (default: a short table)")
    g.add_argument("--vanilla", action="store_true",
                   help="MMBench: score every copy on its own instead of circular groups")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("generation (greedy, no repetition penalty, as VLMEvalKit)")
    g.add_argument("--max-new-tokens", metavar="N", type=positive_int, default=1024,
                   help="most tokens per answer (capped by the model's context)")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=16,
                   help="rows decoded together (with --server: requests in flight)")
    g = p.add_argument_group("local model")
    from ..resolve import ORDER_HELP

    g.add_argument("--model", default=None, help=ORDER_HELP)
    g.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                   help="weights and activations")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (under torchrun, cuda takes "
                   "cuda:LOCAL_RANK)")
    g.add_argument("--adapter", metavar="DIR", default=None,
                   help="LoRA adapter folder (PEFT's format), merged into the weights at load (default: none)")
    from ..cli.args import add_weight_formats

    add_weight_formats(g)
    g.add_argument("--no-optimize", action="store_true", help="keep plain torch modules (no CPU fast paths)")
    g = p.add_argument_group("OpenAI-compatible server instead of a local model")
    g.add_argument("--server", metavar="URL", type=endpoint_url, default=None,
                   help="base URL of a /v1/chat/completions endpoint (lfm2vl serve, vLLM, ...) (default: none)")
    g.add_argument("--api-key", metavar="KEY", default=None,
                   help="bearer token for --server (default: $OPENAI_API_KEY, else none)")
    g.add_argument("--served-model", metavar="NAME", default=None,
                   help="model name sent to --server (default: the first of its /v1/models)")
    g.add_argument("--timeout", metavar="S", type=positive_int, default=600,
                   help="seconds to wait for one answer from --server")
    add_judge_options(p)
    return p


def add_judge_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MM-IFEval judge (an OpenAI-compatible model for the constraints no rule checks)")
    g.add_argument("--judge", metavar="URL", type=endpoint_url, default=None,
                   help="base URL of a /v1/chat/completions endpoint asked, per constraint, whether the response "
                        "satisfies it (default: none; the score covers the rule-checked constraints and is partial)")
    g.add_argument("--judge-model", metavar="NAME", default=None,
                   help="model name sent to --judge (default: the first of its /v1/models)")
    g.add_argument("--judge-api-key", metavar="KEY", default=None, help="bearer token for --judge (default: none)")


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} score", formatter_class=HelpFormatter,
                                description="Score a predictions file (VLMEvalKit's layout: the benchmark's "
                                            "columns plus `prediction`, from any source) without a model.")
    p.add_argument("predictions", metavar="PRED.tsv", help="predictions file")
    p.add_argument("--benchmark", metavar="NAME", default=None,
                   help="benchmark rules (default: from the file name)")
    p.add_argument("--json", action="store_true", help="print only the scores JSON (default: a short table)")
    p.add_argument("--vanilla", action="store_true",
                   help="MMBench: score every copy on its own instead of circular groups")
    add_judge_options(p)
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} merge", formatter_class=HelpFormatter,
                                description="Join the predictions files of a sharded run (--shard i/n) in the "
                                            "order given into one file.")
    p.add_argument("shards", nargs="+", metavar="SHARD.tsv", help="shard predictions files, in shard order")
    p.add_argument("--output", required=True, metavar="PRED.tsv", help="the joined predictions file")
    return p
