"""Fine-tuning on CUDA, checked against the CPU on a tiny random checkpoint (needs transformers to build it):
- LoRA, float32, no dropout: the CUDA loss curve equals the CPU one (relative 1e-3);
- LoRA and full SFT with dtype auto (bf16 autocast on GPUs with bf16): the loss falls;
- the adapter trained on CUDA, merged at load on CUDA, greedy-generates the CPU's tokens (float32);
- torchrun with one process per GPU (NCCL) runs and writes the adapter.
Prints one line per check and a JSON summary; exit status 1 if a check fails.

    python scripts/gpu_finetune.py [--device cuda] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}


def write_data(folder: Path) -> Path:
    from PIL import Image

    lines = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (96, 64), rgb).save(folder / f"{name}.png")
        lines.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{name}.png"},
                                         {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": f"It is {name}."}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def losses(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "eval_loss" not in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    import lfm2vl
    from checkpoints import make_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work / "ckpt", "tiny-lfm2vl")
    data = write_data(work)
    common = dict(model=str(ckpt), data=str(data), max_steps=20, batch_size=2, progress=False, overwrite=True)
    results, ok = {}, True

    def check(name, passed, detail):
        nonlocal ok
        ok &= bool(passed)
        results[name] = {"passed": bool(passed), **detail}
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)

    # no dropout here: the CPU's masks come from lfm2vl's kernel, CUDA's from torch's generator
    cpu = lfm2vl.finetune(output=str(work / "lora-cpu"), device="cpu", dtype="float32", lora_dropout=0.0, **common)
    gpu = lfm2vl.finetune(output=str(work / "lora-gpu"), device=args.device, dtype="float32", lora_dropout=0.0,
                          **common)
    a, b = losses(work / "lora-cpu/metrics.jsonl"), losses(work / "lora-gpu/metrics.jsonl")
    worst = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(a, b))
    check("lora_float32_matches_cpu", len(a) == len(b) and worst < 1e-3, {"max_rel_diff": worst,
                                                                         "seconds": [cpu["seconds"], gpu["seconds"]]})
    for mode in ("lora", "full"):
        s = lfm2vl.finetune(output=str(work / f"{mode}-auto"), device=args.device, full=mode == "full",
                            lr=1e-3, **common)
        check(f"{mode}_auto_dtype_learns", s["final_loss"] < s["first_loss"],
              {"dtype": s["dtype"], "first_loss": s["first_loss"], "final_loss": s["final_loss"]})
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(work / "red.png")},
                                         {"type": "text", "text": "What colour is it?"}]}]
    outs = {}
    for dev in ("cpu", args.device):
        eng = lfm2vl.load(str(ckpt), adapter=str(work / "lora-gpu"), device=dev, dtype="float32",
                          optimize=dev == "cpu")
        outs[dev] = eng.generate(msgs, max_new_tokens=8, temperature=0.0).token_ids
    check("adapter_generates_cpu_tokens", outs["cpu"] == outs[args.device], {k: v for k, v in outs.items()})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          "-m", "lfm2vl", "finetune", "--model", str(ckpt), "--data", str(data), "--output",
                          str(work / "ddp"), "--max-steps", "5", "--device", args.device, "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=env)
    check("torchrun_nccl", run.returncode == 0 and (work / "ddp/adapter_model.safetensors").is_file(),
          {"returncode": run.returncode, "stderr_tail": run.stderr[-300:]})
    print(json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
