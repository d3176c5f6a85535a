"""Data parallelism and process-level behaviour of `lfm2vl finetune` (subprocesses, CPU, float32)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import lfm2vl
from finetune_util import losses, one_thread, write_jsonl
from lfm2vl.finetune import state

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data"), 4)


def test_two_torchrun_processes_match_one_with_the_same_global_batch(tiny_checkpoint, data, tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 1 gives the loss curve of one process with batch 2: each step's
    loss is the mean over the global batch's trained tokens and the gradients are averaged to match."""
    common = ["--model", str(tiny_checkpoint), "--data", str(data), "--max-steps", "3", "--lr", "5e-3",
              "--dtype", "float32", "--seed", "1", "--no-progress", "--lora-dropout", "0",
              "--targets", "text+projector"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lfm2vl", "finetune", *common, "--batch-size", "1", "--output", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    with one_thread():
        lfm2vl.finetune(model=str(tiny_checkpoint), data=str(data), max_steps=3, lr=5e-3, dtype="float32", seed=1,
                        progress=False, lora_dropout=0.0, targets="text+projector", batch_size=2,
                        output=str(tmp_path / "one"))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == 3 and len(set(one)) == 3
    assert max(abs(a - b) for a, b in zip(two, one)) <= 1e-5, (two, one)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_checkpoint, data, tmp_path):
    """SIGINT to `lfm2vl finetune`: exit status 130, one message naming the checkpoint and the resume command, no
    traceback; the checkpoint is complete and resumable."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lfm2vl", "finetune", "--model", str(tiny_checkpoint), "--data", str(data),
           "--output", str(out), "--max-steps", "500", "--dtype", "float32", "--batch-size", "2", "--no-progress"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted after step" in stderr and f"--resume {out}" in stderr
    folder = state.find(out)
    meta, tensors, rest = state.load(folder)
    assert meta["step"] >= 2 and f"step-{meta['step']:07d}" in stderr
    assert tensors and rest["optimizer"]["state"]
    assert not (out / "adapter_config.json").exists()
