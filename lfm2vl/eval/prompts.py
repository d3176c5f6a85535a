"""Prompts as VLMEvalKit builds them for LFM2-VL: one user message, the images first, then the text.

Multiple-choice benchmarks (MMStar, RealWorldQA, MMBench, BLINK and the MC suites) use VLMEvalKit's template:
`Hint: ...\\n` when the row has a hint, `Question: ...\\n`, then `Options:\\n` with one `X. text\\n` line per option and
`Please select the correct answer from the options above. \\n`. The other benchmarks send the question as it is.
VLMEvalKit's LFM2-VL wrapper then appends ANSWER_DIRECTLY as a text part of its own, for every benchmark except
MM-IFEval (whose images it moves before the text, as here for all).
"""
from __future__ import annotations

from lfm2vl.eval.benchmarks import Benchmark
from lfm2vl.eval.tsv import Row

ANSWER_DIRECTLY = "\nPlease answer directly with only the final answer, do not give any explanation."
MC_KINDS = ("mc", "mmbench")


def mc_prompt(row: Row) -> str:
    """VLMEvalKit's multiple-choice prompt for a row."""
    text = f"Hint: {row.hint}\n" if row.hint is not None else ""
    text += f"Question: {row.question}\n"
    if row.options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in row.options.items())
        text += "Please select the correct answer from the options above. \n"
    return text


def prompt_texts(benchmark: Benchmark, row: Row) -> list[str]:
    """The text parts of the prompt, in order (the suffix is a part of its own, as VLMEvalKit sends it)."""
    texts = [mc_prompt(row) if benchmark.kind in MC_KINDS else row.question]
    if benchmark.suffix:
        texts.append(ANSWER_DIRECTLY)
    return texts


def prompt_text(benchmark: Benchmark, row: Row) -> str:
    """The whole prompt text as the chat template renders it (text parts joined with nothing between)."""
    return "".join(prompt_texts(benchmark, row))


def build_messages(benchmark: Benchmark, row: Row) -> list[dict]:
    """One user message: {"type": "image", "base64" | "path": ...} parts first, then the text parts."""
    key = "path" if row.images_are_paths else "base64"
    content = [{"type": "image", key: img} for img in row.images]
    content += [{"type": "text", "text": t} for t in prompt_texts(benchmark, row)]
    return [{"role": "user", "content": content}]
