"""`lfm2vl eval`: predictions for a benchmark file (local model or any OpenAI-compatible server), then its scores.

    lfm2vl eval [--model M] (--data FILE.tsv | --data DIR --benchmark NAME) --output PRED.tsv [...]
    lfm2vl eval score PRED.tsv --benchmark NAME [--json]      rescore a predictions file (no model)
      (both take --judge URL [--judge-model NAME] [--judge-api-key KEY]: MM-IFEval's constraints no rule checks)
    lfm2vl eval merge SHARD.tsv... --output PRED.tsv           join the shards of a --shard run
    lfm2vl eval make-suite NAME --out DIR [--seed S] [--n N]   write an offline suite (suites.py)

Without --model (and without --server) the local model follows resolve.py's default rules.
Under torchrun (RANK / WORLD_SIZE set) each rank predicts its shard into PRED.shardIofN.tsv; rank 0 then merges
them into PRED.tsv and scores it. Errors the user can fix (a missing file, an unknown benchmark, a bad option, an
unreachable server or judge) print one line and exit with status 1 (2 for option errors), without a traceback;
Ctrl-C saves the predictions made so far and exits with status 130 (the same command resumes).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..cli.args import CLIError
from ..files.atomic import write_text
from .options import PROG, build_parser, merge_parser, score_parser


# ---- pieces --------------------------------------------------------------------------------------------------------
def resolve_data(data: str, name: str | None):
    """(--data, --benchmark) -> (benchmark, TSV path). An unknown --benchmark is named before any file is looked at."""
    from .benchmarks import benchmark_for, get_benchmark

    if name is not None:
        try:
            get_benchmark(name)
        except ValueError as e:
            raise CLIError(str(e)) from None
    path = Path(data)
    if path.is_dir():
        if name is None:
            raise CLIError(f"--data {data} is a folder: name the benchmark with --benchmark NAME (its file is "
                           "NAME.tsv)")
        path = path / f"{name}.tsv"
    if not path.is_file():
        raise CLIError(f"benchmark file not found: {path}")
    try:
        return benchmark_for(path, name), path
    except ValueError as e:
        raise CLIError(str(e)) from None


def scores_path(predictions: str | os.PathLike) -> Path:
    p = Path(predictions)
    return p.with_name(p.name.removesuffix(".tsv") + ".scores.json")


def read_rows_or_fail(path):
    from .tsv import read_rows

    try:
        return read_rows(path)
    except (ValueError, KeyError, OSError) as e:
        raise CLIError(f"cannot read {path}: {e}" if isinstance(e, OSError) else str(e)) from None


def make_judge(args, benchmark):
    """The judge of --judge for MM-IFEval, or None (a warning when another benchmark's rules ignore it)."""
    from .judge import Judge

    if not getattr(args, "judge", None):
        return None
    if benchmark.kind != "ifeval":
        print(f"{PROG}: warning: --judge serves MM-IFEval's rules only; {benchmark.name} ignores it", file=sys.stderr)
        return None
    return Judge(args.judge, model=args.judge_model, api_key=args.judge_api_key)


def compute_scores(benchmark, rows, predictions, vanilla: bool = False, judge=None) -> dict:
    from .judge import JudgeError
    from .scoring import score

    try:
        return score(benchmark, rows, predictions, circular=False if vanilla else None, judge=judge)
    except (ValueError, JudgeError) as e:
        raise CLIError(str(e)) from None
    finally:
        if judge is not None:
            judge.close()


def warn_md5(path, benchmark) -> None:
    from .benchmarks import md5_warning

    message = md5_warning(path, benchmark)
    if message:
        print(f"{PROG}: warning: {message}", file=sys.stderr)


def table(scores: dict) -> str:
    """The scores as a short table: the headline numbers, then one line per breakdown entry."""
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"{k:<24} {fmt(v)}" for k, v in scores.items() if not isinstance(v, (dict, list))]
    for k, v in scores.items():
        if isinstance(v, dict) and v:
            lines.append(f"{k}:")
            for name, val in v.items():
                val = val.get("overall", val.get("accuracy", val)) if isinstance(val, dict) else val
                lines.append(f"  {str(name):<22} {fmt(val) if not isinstance(val, dict) else json.dumps(val)}")
    return "\n".join(lines)


def report(scores: dict, as_json: bool, out=None) -> None:
    out = out or sys.stdout
    print(json.dumps(scores, indent=1, ensure_ascii=False) if as_json else table(scores), file=out)


def check_output(option: str, path) -> None:
    """A file that cannot be written at path is said before any work (missing folders are created when writing)."""
    from ..files.check import OutputError, check_file

    try:
        check_file(option, path, make_parents=True)
    except OutputError as e:
        raise CLIError(str(e)) from None


def save_failed(path, e: OSError, what: str = "") -> CLIError:
    return CLIError(f"cannot write {path} ({e.strerror or e}){what}")


def merge_files(shards: list[str], output: str) -> tuple[list, list]:
    from .tsv import read_predictions, write_predictions

    check_output("--output", output)
    rows, preds, seen = [], [], {}
    for s in shards:
        if not Path(s).is_file():
            raise CLIError(f"predictions file not found: {s}")
        try:
            r, p = read_predictions(s)
        except (ValueError, KeyError) as e:
            raise CLIError(str(e)) from None
        except OSError as e:
            raise CLIError(f"cannot read {s} ({e.strerror or e})") from None
        for row in r:
            if row.index in seen:
                raise CLIError(f"index {row.index} is in both {seen[row.index]} and {s}")
            seen[row.index] = s
        rows += r
        preds += p
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    try:
        write_predictions(output, rows, preds)
    except OSError as e:
        raise save_failed(output, e) from None
    return rows, preds


# ---- commands ------------------------------------------------------------------------------------------------------
def cmd_score(argv: list[str]) -> int:
    args = score_parser().parse_args(argv)
    path = Path(args.predictions)
    if not path.is_file():
        raise CLIError(f"predictions file not found: {path}")
    from .benchmarks import benchmark_for
    from .tsv import read_predictions

    try:
        bench = benchmark_for(path, args.benchmark)
        rows, preds = read_predictions(path)
    except (ValueError, KeyError) as e:
        raise CLIError(str(e)) from None
    report(compute_scores(bench, rows, preds, args.vanilla, make_judge(args, bench)), args.json)
    return 0


def cmd_merge(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    rows, preds = merge_files(args.shards, args.output)
    print(f"{len(rows)} rows from {len(args.shards)} files -> {args.output}", file=sys.stderr)
    return 0


def torchrun_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def cmd_run(argv: list[str]) -> int:
    from . import run

    parser = build_parser()
    args = parser.parse_args(argv)
    rank, world = torchrun_rank()
    if world > 1 and args.shard is not None:
        parser.error("--shard and torchrun are exclusive: under torchrun each rank takes its own shard")
    bench, data = resolve_data(args.data, args.benchmark)
    check_output("--output", args.output)  # the predictions, the shards and the scores share its folder
    output = Path(args.output)
    if world > 1:
        shard = (rank, world)
        out = output.with_name(f"{output.name.removesuffix('.tsv')}.shard{rank}of{world}.tsv")
    else:
        shard, out = args.shard or (0, 1), output
    if rank == 0:
        warn_md5(data, bench)
    rows = run.select_rows(read_rows_or_fail(data), args.limit, shard)
    try:
        preds = run.Predictions(out, rows)
    except (run.RunError, ValueError) as e:
        raise CLIError(str(e)) from None
    show = not args.no_progress and rank == 0
    if preds.todo():
        predictor = make_predictor(args, bench, world)
        try:
            run.run_rows(predictor, preds, progress=show, desc=bench.name)
        except run.RunError as e:
            raise CLIError(f"{e} ({len(preds.by_index)} of {len(rows)} rows saved in {out}; the same command "
                           "resumes)") from None
        except KeyboardInterrupt:
            print(f"\n{PROG}: interrupted; {len(preds.by_index)} of {len(rows)} rows saved in {out} (the same "
                  "command resumes)", file=sys.stderr)
            return 130
        except OSError as e:  # saving the predictions failed
            raise save_failed(out, e, f"; {len(preds.by_index)} of {len(rows)} predictions are not saved") from None
        finally:
            close = getattr(predictor, "close", None)
            if close is not None:
                close()
    if preds.failed:
        print(f"{PROG}: {preds.failed} of {len(rows)} rows failed (their prediction starts with "
              f"{run.FAILED.strip()!r}; a rerun of the same command tries them again)", file=sys.stderr)
    if world > 1:
        barrier()
        if rank != 0:
            return 0
        shards = [output.with_name(f"{output.name.removesuffix('.tsv')}.shard{r}of{world}.tsv") for r in range(world)]
        rows, predictions = merge_files([str(s) for s in shards], str(output))
    else:
        predictions = preds.predictions()
    scores = compute_scores(bench, rows, predictions, args.vanilla, make_judge(args, bench))
    try:
        write_text(scores_path(output), json.dumps(scores, indent=1, ensure_ascii=False) + "\n")
    except OSError as e:
        raise save_failed(scores_path(output), e) from None
    report(scores, args.json)
    if not args.json:
        print(f"predictions: {output}\nscores: {scores_path(output)}", file=sys.stderr)
    return 0


def make_predictor(args, bench, world: int):
    from . import run

    if args.server:
        try:
            key = args.api_key or os.environ.get("OPENAI_API_KEY")
            return run.ServerPredictor(args.server, bench, api_key=key, model=args.served_model,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                       timeout_s=args.timeout)
        except run.RunError as e:
            raise CLIError(str(e)) from None
    from ..cli.args import check_device
    from ..cli.commands import load_engine

    if world > 1 and args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    args.compile = args.low_memory = False
    check_device(args)
    engine = load_engine(args, PROG)
    return run.LocalPredictor(engine, bench, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)


def barrier() -> None:
    """Wait for every torchrun rank (gloo over the rendezvous torchrun set up; no time limit worth hitting)."""
    import datetime

    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(backend="gloo", timeout=datetime.timedelta(days=7))
    tdist.barrier()
    tdist.destroy_process_group()


def cmd_make_suite(argv: list[str]) -> int:
    from .suites import main as make_suite_main

    return make_suite_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"score": cmd_score, "merge": cmd_merge, "make-suite": cmd_make_suite}.get(argv[0] if argv else "")
    try:
        return command(argv[1:]) if command else cmd_run(argv)
    except CLIError as e:
        if torchrun_rank()[0] == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
