"""`lfm2vl eval` under torchrun (2 CPU processes, gloo): each rank predicts its shard, rank 0 merges and scores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from lfm2vl.cli import main
from test_eval_run import read_tsv, write_tsv

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--dtype", "float32", "--max-new-tokens", "5", "--no-progress", "--batch-size", "2"]


def test_two_torchrun_ranks_write_the_predictions_of_one_process(tiny_checkpoint, tmp_path, capsys):
    data = write_tsv(tmp_path / "MMStar.tsv", rows=5)
    one, two = tmp_path / "one.tsv", tmp_path / "two.tsv"
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", data, "--output", str(one), *FAST]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lfm2vl", "eval", "--model", str(tiny_checkpoint), "--data", data, "--output", str(two), "--json",
           *FAST]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = [read_tsv(tmp_path / f"two.shard{i}of2.tsv") for i in range(2)]
    assert [len(s) for s in shards] == [2, 3]  # each rank predicted its own contiguous slice
    assert read_tsv(two) == read_tsv(one)
    scores = json.loads((tmp_path / "two.scores.json").read_text())
    assert scores == json.loads((tmp_path / "one.scores.json").read_text())
    assert json.loads(r.stdout) == scores  # rank 0 alone prints the scores
