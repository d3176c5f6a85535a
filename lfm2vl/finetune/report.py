"""What a run shows and leaves behind: the progress bar, metrics.jsonl and the loss-curve PNG.

metrics.jsonl has one JSON object a line: {"step", "epoch", "loss", "lr", "grad_norm", "samples", "tokens",
"samples_per_s", "elapsed_s"} after each optimizer step and {"step", "eval_loss", "eval_tokens"} after each
evaluation. A resumed run keeps the lines up to its checkpoint's step and appends. loss.png plots the training loss
per step and the eval loss at its steps (matplotlib, no display needed).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..files import jsontext
from ..files.atomic import write_file, write_text

METRICS, PLOT = "metrics.jsonl", "loss.png"


class Report:
    """Rank 0's report (other ranks pass folder=None and show nothing)."""

    def __init__(self, folder: Path | None, total_steps: int, start_step: int, progress: bool = True):
        self.path = Path(folder) / METRICS if folder is not None else None
        self.start = time.perf_counter()
        self.start_step = start_step
        self.samples = 0
        self.bar = None
        if self.path is None:
            return
        kept = [line for line in _lines(self.path) if line.get("step", 0) <= start_step] if start_step else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, "".join(json.dumps(x) + "\n" for x in kept))  # a resume keeps its steps or none
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="finetune", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def step(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float, samples: int,
             tokens: int) -> None:
        self.samples += samples
        elapsed = time.perf_counter() - self.start
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        self._write({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "samples": samples, "tokens": tokens, "samples_per_s": round(rate, 4),
                     "elapsed_s": round(elapsed, 3)})
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4f} lr={lr:.2e} {rate:.2f} samples/s", refresh=False)
            self.bar.update(1)

    def eval(self, step: int, loss: float, tokens: int) -> None:
        self._write({"step": step, "eval_loss": loss, "eval_tokens": tokens})
        if self.bar is not None:
            self.bar.write(f"step {step}: eval loss {loss:.4f}", file=sys.stderr)

    def message(self, text: str) -> None:
        if self.path is None:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, row: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(jsontext.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    return out


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of a metrics.jsonl."""
    rows = _lines(Path(path))
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def plot(metrics: Path, out: Path) -> Path:
    """Write the loss curve (train per step, eval at its steps) of metrics.jsonl to out (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global backend change

    train, evals = read_metrics(metrics)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    # atomically: a crash never leaves a broken image under the final name (the type from its suffix)
    write_file(out, lambda tmp: fig.savefig(tmp, format=Path(out).suffix.lstrip(".").lower() or "png"))
    return Path(out)
