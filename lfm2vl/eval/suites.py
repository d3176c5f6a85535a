"""Offline suites that need no download, written as VLMEvalKit-layout TSV files so the same scorers run on them.

    make_suite(name, out_dir, seed=0, n=None) -> [paths]     NAME.tsv per suite, deterministic for (name, seed, n)
    lfm2vl eval make-suite NAME --out DIR [--seed S] [--n N] (add_make_suite_parser / cmd_make_suite)

Suites (scoring rules in brackets): easy-vqa-yesno [POPE], easy-vqa-mc [multiple choice] (easyvqa_suites.py);
synth-pope [POPE], synth-mc [MMBench circular], synth-ocr [OCRBench], synth-multi [multiple choice, several images
per row], synth-ifeval [MM-IFEval's rule-checked part] (scene_suites.py); the names are benchmarks.py's, so a file
keeps its rules. Groups: easy-vqa, synth, all.
n counts questions (synth-pope rounds up to a multiple of 6; synth-mc writes 4 circular copies of each);
without it a suite has its default size (the easy-vqa ones: the whole test split). A synth suite holds at most
MAX_SYNTH questions (more than any benchmark it imitates; every row is built in memory before the file is written);
an easy-vqa one at most its test split, which a larger n takes whole.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

from ..files.atomic import write_file
from ..files.check import check_folder
from . import easyvqa_suites, scene_suites

MAX_SYNTH = 10_000
SUITES = {  # name -> (builder(rng, n), default n, most n: None where the builder takes what its source has)
    "easy-vqa-open": (easyvqa_suites.open_questions, None, None),
    "easy-vqa-yesno": (easyvqa_suites.yesno, None, None),
    "easy-vqa-mc": (easyvqa_suites.multiple_choice, None, None),
    "synth-pope": (scene_suites.pope, 300, MAX_SYNTH),
    "synth-mc": (scene_suites.mmbench, 100, MAX_SYNTH),
    "synth-ocr": (scene_suites.ocr, 100, MAX_SYNTH),
    "synth-multi": (scene_suites.blink, 100, MAX_SYNTH),
    "synth-ifeval": (scene_suites.ifeval, 60, MAX_SYNTH),
}
GROUPS = {"easy-vqa": ["easy-vqa-open", "easy-vqa-yesno", "easy-vqa-mc"], "synth": [k for k in SUITES if k.startswith("synth-")],
          "all": list(SUITES)}
# VLMEvalKit's columns first, in its order; the suites' own columns (constraints, image_id, query, scene) after.
COLUMNS = ("index", "image", "question", "hint", *"ABCD", "answer", "category", "l2-category", "split", "constraints",
           "image_id", "query", "scene")


def suite_names(name: str) -> list[str]:
    """The suites a name stands for (a suite or a group); a clear error for an unknown name."""
    if name in SUITES:
        return [name]
    if name in GROUPS:
        return list(GROUPS[name])
    raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(list(SUITES) + list(GROUPS))}")


def check_n(name: str, n: int | None) -> None:
    """A clear error when n is not a size the suite can have: below 1, or over its most."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")
    if n is None:
        return
    if n < 1:
        raise ValueError(f"n={n}; expected a number of questions >= 1")
    most = SUITES[name][2]
    if most is not None and n > most:
        raise ValueError(f"n={n} is over {name}'s limit of {most} questions (more than any benchmark it imitates)")


def build_rows(name: str, seed: int = 0, n: int | None = None) -> list[dict]:
    """The rows of one suite (dicts of TSV columns)."""
    check_n(name, n)
    builder, default, _ = SUITES[name]
    return builder(random.Random(f"{name}:{seed}"), default if n is None else n)


def write_tsv(path: Path, rows: list[dict]) -> None:
    """VLMEvalKit's layout: tab-separated, a header, the columns any row has (in COLUMNS order); atomic."""
    columns = [c for c in COLUMNS if any(c in r for r in rows)]

    def write(tmp) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(columns)
            for r in rows:
                w.writerow([r.get(c, "") for c in columns])

    write_file(path, write)


def make_suite(name: str, out_dir, seed: int = 0, n: int | None = None) -> list[Path]:
    """Write NAME.tsv for the suite (or each suite of a group) into out_dir; returns the paths."""
    names = suite_names(name)
    for suite in names:  # every suite's size before any file is written
        check_n(suite, n)
    out = check_folder("--out", out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suite in names:
        path = out / f"{suite}.tsv"
        write_tsv(path, build_rows(suite, seed, n))
        paths.append(path)
    return paths


# ---- command line ---------------------------------------------------------------------------------------------------

def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is invalid; expected an integer >= 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid; expected an integer >= 1")
    return v


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", choices=list(SUITES) + list(GROUPS),
                   help="suite or group: " + ", ".join(list(SUITES) + list(GROUPS)))
    p.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.tsv (created if missing)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the generator and of the easy-vqa draws")
    p.add_argument("--n", type=_positive_int, default=None,
                   help=f"questions per suite, at most {MAX_SYNTH} for a synth one (default: the suite's own size; "
                        "the easy-vqa ones: the whole test split, also the most they have)")


def add_make_suite_parser(sub) -> argparse.ArgumentParser:
    """Add `make-suite` to a subparsers object; the parsed args go to cmd_make_suite."""
    p = sub.add_parser("make-suite", help="write an offline suite (no download) as VLMEvalKit-layout TSV",
                       description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=cmd_make_suite)
    return p


def cmd_make_suite(args) -> int:
    """Write the suite, print one path per line; a problem prints one line and returns 1."""
    try:
        paths = make_suite(args.name, args.out, seed=args.seed, n=args.n)
    except (ImportError, ValueError, OSError) as e:
        message = str(e)  # make_suite names its argument n=N; the user typed --n N
        print(f"lfm2vl eval make-suite: error: {'--n ' + message[2:] if message.startswith('n=') else message}",
              file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


def main(argv=None) -> int:
    """`python -m lfm2vl.eval.suites NAME --out DIR ...` (the same options as `lfm2vl eval make-suite`)."""
    p = argparse.ArgumentParser(prog="lfm2vl eval make-suite", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return cmd_make_suite(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
