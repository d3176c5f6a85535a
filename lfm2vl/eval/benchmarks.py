"""Benchmark names as VLMEvalKit spells them, and the offline suites' names, each with its scoring rules.

A Benchmark says which scorer applies (`kind`), whether the answer-directly suffix follows the prompt (VLMEvalKit's
LFM2-VL wrapper adds it for every benchmark except MM-IFEval) and the MD5 of the release file in VLMEvalKit's
table (None for the offline suites). `benchmark_for` picks one from a name or a file named after one.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

# Scorer kinds: "mc" multiple choice (vanilla), "mmbench" multiple choice scored circularly, "pope" yes/no with F1,
# "ocr" OCRBench substring matching, "ifeval" rule-checked instruction following, "exact" open questions whose answer
# is one word or phrase (the prediction, case and a final full stop aside, must equal it).
KINDS = ("mc", "mmbench", "pope", "ocr", "ifeval", "exact")


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str
    suffix: bool = True          # append the answer-directly instruction to the prompt
    md5: str | None = None       # MD5 of the release TSV in VLMEvalKit's table
    official: bool = True        # False for the offline suites (no published numbers)


_ALL = [
    Benchmark("MMStar", "mc", md5="e1ecd2140806c1b1bbf54b43372efb9e"),
    Benchmark("RealWorldQA", "mc", md5="92321028d2bc29040284b6674721e48f"),
    Benchmark("MMBench_DEV_EN", "mmbench", md5="b6caf1133a01c6bb705cf753bb527ed8"),
    Benchmark("BLINK", "mc", md5="3b6649b6a662184ea046908e5506260e"),
    Benchmark("POPE", "pope", md5="c12f5acb142f2ef1f85a26ba2fbe41d5"),
    Benchmark("OCRBench", "ocr", md5="e953d98a987cc6e26ef717b61260b778"),
    Benchmark("MM-IFEval", "ifeval", suffix=False, md5="973bb839961a449565073a5ee70ae7a6"),
    # Offline suites (written by `lfm2vl eval make-suite`), scored by the rules of the benchmark they imitate.
    Benchmark("easy-vqa-open", "exact", suffix=False, official=False),
    Benchmark("easy-vqa-yesno", "pope", official=False),
    Benchmark("easy-vqa-mc", "mc", official=False),
    Benchmark("synth-pope", "pope", official=False),
    Benchmark("synth-mc", "mmbench", official=False),
    Benchmark("synth-ocr", "ocr", official=False),
    Benchmark("synth-multi", "mc", official=False),
    Benchmark("synth-ifeval", "ifeval", suffix=False, official=False),
]
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _ALL}


def known_names() -> list[str]:
    return list(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """A benchmark by name (VLMEvalKit's spelling; case is forgiven). Unknown names list the known ones."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    folded = {k.lower(): b for k, b in BENCHMARKS.items()}
    if str(name).lower() in folded:
        return folded[str(name).lower()]
    raise ValueError(f"unknown benchmark {name!r}: expected one of {', '.join(known_names())}")


def benchmark_for(path, name: str | None = None) -> Benchmark:
    """The benchmark whose rules score `path`: `name` when given, else the one the file is named after
    (MMStar.tsv -> MMStar)."""
    if name is not None:
        return get_benchmark(name)
    stem = os.path.basename(os.fspath(path))
    stem = stem[:-4] if stem.lower().endswith(".tsv") else stem
    try:
        return get_benchmark(stem)
    except ValueError:
        raise ValueError(f"cannot tell which benchmark {os.path.basename(os.fspath(path))} is: name the file after "
                         f"one or give the benchmark name; known: {', '.join(known_names())}") from None


def file_md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def md5_warning(path, benchmark: Benchmark) -> str | None:
    """A warning when `path` differs from the release file VLMEvalKit knows for `benchmark`, else None."""
    if benchmark.md5 is None:
        return None
    got = file_md5(path)
    if got == benchmark.md5:
        return None
    return (f"{os.path.basename(os.fspath(path))}: MD5 {got} differs from the {benchmark.name} release file "
            f"({benchmark.md5}); scores may not be comparable with published numbers")
