"""Bad input to `lfm2vl finetune` gets one clear line (option values: argparse, status 2; the rest: status 1), and a
checkpoint write that fails leaves the last good checkpoint."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import lfm2vl
from finetune_util import write_jsonl
from lfm2vl.finetune import state
from lfm2vl.finetune.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder, 2, images=False), write_jsonl(folder, 3, images=False, name="other.jsonl")


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("flag,value,expect", [("--lora-r", "0", "expected an integer >= 1"),
                                               ("--lr", "0", "expected a number > 0"),
                                               ("--lr", "-0.001", "expected a number > 0"),
                                               ("--warmup", "2.5", "whole number of steps"),
                                               ("--lora-dropout", "1", "[0, 1)")])
def test_bad_option_values_are_usage_errors(flag, value, expect, capsys, tmp_path):
    code, err = _run(["--data", "x.jsonl", "--output", str(tmp_path), flag, value], capsys)
    assert code == 2
    assert err.startswith("usage: lfm2vl finetune") and f"argument {flag}: {value} is invalid" in err
    assert expect in err.strip().splitlines()[-1]


def test_python_api_rejects_bad_values(tmp_path):
    for kw, word in (({"lora_r": 0}, "lora_r"), ({"lr": 0.0}, "lr"), ({"lora_rank": 4}, "unknown option")):
        with pytest.raises(ValueError, match=word):
            lfm2vl.finetune(data="x.jsonl", output=str(tmp_path), **kw)


def test_seed_beyond_the_generators_range_is_refused_with_the_options(tmp_path, capsys):
    code, err = _run(["--data", "x.jsonl", "--output", str(tmp_path), "--seed", "99999999999999999999999"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("must be an integer from 0 to 2**64-1")
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*64-1, got 1180591620717411303424"):
        lfm2vl.finetune(data="x.jsonl", output=str(tmp_path), seed=2**70)


@pytest.mark.parametrize("kw,expect", [({"data": 5}, "data must be a path (str or os.PathLike) to a JSONL file"),
                                       ({"data": ["a.jsonl"]}, "data must be a path"),
                                       ({"resume": 5}, "resume must be a path (str or os.PathLike) to a run's"),
                                       ({"eval_data": 1.5}, "eval_data must be a path")])
def test_python_api_names_a_path_option_of_the_wrong_type(kw, expect, tmp_path):
    kw = {"data": "x.jsonl", **kw}
    with pytest.raises(ValueError, match=re.escape(expect)):
        lfm2vl.finetune(output=str(tmp_path), **kw)


def test_python_api_takes_numpy_numbers():
    """Numbers follow the rest of the API (plain_number): numpy scalars are read as the Python values."""
    from lfm2vl.finetune.options import TrainOptions

    o = TrainOptions(data="x", output="y", max_steps=np.int64(1), lora_alpha=np.float32(2), seed=np.uint64(7))
    assert o.check() is None and (o.max_steps, o.lora_alpha, o.seed) == (1, 2.0, 7) and type(o.max_steps) is int


def test_python_api_refuses_epochs_with_max_steps(tmp_path):
    """As on the command line, epochs and max_steps are exclusive: either sets the run's length."""
    with pytest.raises(ValueError, match="max_steps: not allowed with epochs"):
        lfm2vl.finetune(data="x.jsonl", output=str(tmp_path), epochs=2, max_steps=1)


def test_non_empty_output_needs_overwrite(tiny_checkpoint, data, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[0]), "--output", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "is not empty; pass --overwrite" in err


def test_unknown_target_names(tiny_checkpoint, data, tmp_path, capsys):
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[0]), "--output", str(tmp_path / "o"),
                      "--targets", "q_proj,gate_proj", "--dtype", "float32", "--no-progress"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "gate_proj" in err and "q_proj," not in err.split("gate_proj")[0][-10:]


def test_data_with_no_valid_row(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(bad), "--output", str(tmp_path / "o"),
                      "--skip-bad", "--dtype", "float32", "--no-progress"], capsys)
    assert code == 1 and "no valid row in" in err.splitlines()[0] and "line 1" in err


def test_missing_eval_data_is_named_as_evaluation_data(tiny_checkpoint, data, tmp_path, capsys):
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[0]), "--eval-data", "nothere.jsonl",
                      "--output", str(tmp_path / "o"), "--dtype", "float32", "--no-progress"], capsys)
    assert code == 1 and err == "lfm2vl finetune: error: evaluation data not found: nothere.jsonl\n"


def test_output_under_a_file_is_named_before_loading(data, unwritable, capsys):
    code, err = _run(["--model", "no-such-model", "--data", str(data[0]), "--output", str(unwritable / "run")],
                     capsys)
    assert code == 1
    assert err == f"lfm2vl finetune: error: output {unwritable}/run: {unwritable.parent} is a file, not a folder\n"


def test_resume_refuses_another_model_or_data(tiny_checkpoint, data, tmp_path, capsys, monkeypatch):
    """A checkpoint resumes only with the model and data it was trained on."""
    from lfm2vl.finetune import report

    out = tmp_path / "run"
    real = report.Report.step

    def crash(self, step, *a, **kw):  # the run dies during step 2, after step 1's checkpoint
        real(self, step, *a, **kw)
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(report.Report, "step", crash)
    with pytest.raises(KeyboardInterrupt):
        lfm2vl.finetune(model=str(tiny_checkpoint), data=str(data[0]), output=str(out), max_steps=3, batch_size=1,
                        dtype="float32", progress=False, save_every=1)
    monkeypatch.undo()
    assert state.find(out).name == "step-0000001"
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_checkpoint, other_model)
    cfg = json.loads((other_model / "config.json").read_text())
    cfg["text_config"]["norm_eps"] = 1e-6
    (other_model / "config.json").write_text(json.dumps(cfg))
    rest = ["--output", str(out), "--max-steps", "3", "--save-every", "1", "--batch-size", "1", "--dtype", "float32",
            "--no-progress", "--resume", str(out)]
    code, err = _run(["--model", str(other_model), "--data", str(data[0]), *rest], capsys)
    assert code == 1 and "different model" in err and err.count("\n") == 1
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[1]), *rest], capsys)
    assert code == 1 and "different data" in err and err.count("\n") == 1
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[0]), *rest], capsys)
    assert code == 0, err  # the same model and data resume


def test_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    """A crash while writing step 2's checkpoint (the disk fills up) leaves step 1's complete checkpoint, which
    is what --resume finds, and no half-written folder."""
    w = {"a": torch.arange(4.0)}
    meta = {"epoch": 0, "total_steps": 3, "options": {}, "fingerprint": {"model": "m", "data": "d", "world_size": 1},
            "order": {"epoch": 0, "position": 1, "seed": 0, "batch_size": 1, "world_size": 1, "n_samples": 2}}
    state.save(tmp_path, 1, w, {"state": {}, "param_groups": []}, {"x": 1}, meta)

    def full_disk(obj, f, *a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        state.save(tmp_path, 2, {"a": torch.arange(4.0) * 2}, {}, {}, meta)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / state.FOLDER).iterdir()] == ["step-0000001"]
    folder = state.find(tmp_path)
    meta, tensors, rest = state.load(folder)
    assert meta["step"] == 1 and torch.equal(tensors["a"], torch.arange(4.0)) and rest["scheduler"] == {"x": 1}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, data, tmp_path_factory):
    """A run of 3 steps stopped after step 1 (its checkpoint written): (output folder, CLI arguments that resume)."""
    from lfm2vl.finetune import report

    out = tmp_path_factory.mktemp("ck") / "run"
    real = report.Report.step

    def crash(self, step, *a, **kw):
        real(self, step, *a, **kw)
        if step == 2:
            raise KeyboardInterrupt
    report.Report.step = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            lfm2vl.finetune(model=str(tiny_checkpoint), data=str(data[0]), output=str(out), max_steps=3,
                            batch_size=1, dtype="float32", progress=False, save_every=1)
    finally:
        report.Report.step = real
    return out, ["--model", str(tiny_checkpoint), "--data", str(data[0]), "--output", str(out), "--max-steps", "3",
                 "--save-every", "1", "--batch-size", "1", "--dtype", "float32", "--no-progress", "--resume", str(out)]


@pytest.mark.parametrize("edit,expect", [
    (lambda m: [1, 2], "expected a JSON object, got a list"),
    (lambda m: {**m, "options": None}, "options must be an object, got null"),
    (lambda m: {**m, "fingerprint": None}, "fingerprint must be an object, got null"),
    (lambda m: {k: v for k, v in m.items() if k != "order"}, "order is missing"),
    (lambda m: {**m, "step": "x"}, 'step must be an integer >= 1, got "x"'),
    (lambda m: {**m, "order": {**m["order"], "position": 1.5}}, "order.position must be an integer >= 0, got 1.5"),
    (lambda m: {**m, "fingerprint": {**m["fingerprint"], "data": 7}}, "fingerprint.data must be a string, got 7"),
    (lambda m: {**m, "step": 1000}, "step 1000 is beyond this run's 3 steps"),
])
def test_damaged_state_json_is_named_with_its_field(checkpoint, edit, expect, tmp_path, capsys):
    """Every field of state.json is checked when it is read: a damaged one is one line naming the file and field."""
    out, argv = checkpoint
    run = tmp_path / "run"
    shutil.copytree(out, run)
    folder = state.find(run)
    meta = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps(edit(meta)))
    code, err = _run([str(run) if a == str(out) else a for a in argv], capsys)
    assert code == 1 and err == f"lfm2vl finetune: error: checkpoint {folder}/state.json is damaged: {expect}\n"


def test_state_json_nested_past_the_bound_is_one_line(checkpoint, tmp_path, capsys):
    out, argv = checkpoint
    run = tmp_path / "run"
    shutil.copytree(out, run)
    folder = state.find(run)
    (folder / "state.json").write_text("[" * 100_000 + "]" * 100_000)  # json.loads alone: a RecursionError
    code, err = _run([str(run) if a == str(out) else a for a in argv], capsys)
    assert code == 1 and err.startswith(f"lfm2vl finetune: error: checkpoint {folder}/state.json is damaged: not "
                                        "JSON (nested too deeply (more than 100 levels") and err.count("\n") == 1


def test_garbage_state_pt_is_one_line(checkpoint, tmp_path, capsys):
    out, argv = checkpoint
    run = tmp_path / "run"
    shutil.copytree(out, run)
    folder = state.find(run)
    (folder / "state.pt").write_bytes(b"garbage\n")
    code, err = _run([str(run) if a == str(out) else a for a in argv], capsys)
    assert code == 1 and err == f"lfm2vl finetune: error: {folder}/state.pt is damaged (not a checkpoint lfm2vl wrote)\n"


def test_lora_rank_above_a_targets_size_is_refused_before_training(tiny_checkpoint, data, tmp_path, capsys):
    """A rank above min(in, out) of a targeted layer is one line naming that layer's size, before any step."""
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[0]), "--output", str(tmp_path / "o"),
                      "--lora-r", "100000", "--dtype", "float32", "--no-progress"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "LoRA rank r=100000" in err and " in x " in err and "the rank can be at most" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="rank can be at most"):
        lfm2vl.finetune(model=str(tiny_checkpoint), data=str(data[0]), output=str(tmp_path / "p"), lora_r=100000,
                        dtype="float32", progress=False)


def test_ctrl_c_during_start_up_says_nothing_was_trained(tiny_checkpoint, data, tmp_path, capsys, monkeypatch):
    from lfm2vl.finetune import data as datamod

    def interrupted(*a, **kw):  # Ctrl-C while the rows are read, before any step
        raise KeyboardInterrupt
    monkeypatch.setattr(datamod, "load_samples", interrupted)
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[0]), "--output", str(tmp_path / "o"),
                      "--dtype", "float32", "--no-progress"], capsys)
    assert code == 130 and err == "\nlfm2vl finetune: stopped before the first step finished: nothing was trained\n"


def test_a_diverging_run_stops_at_the_first_non_finite_step_keeping_its_checkpoints(tiny_checkpoint, data, tmp_path,
                                                                                     capsys):
    """A learning rate far too high: the step whose loss is no longer finite is not applied, the run stops with one
    line naming it, the checkpoints before it stay and no NaN adapter is written."""
    out = tmp_path / "run"
    code, err = _run(["--model", str(tiny_checkpoint), "--data", str(data[0]), "--output", str(out), "--max-steps",
                      "8", "--save-every", "1", "--batch-size", "1", "--dtype", "float32", "--lr", "1e30",
                      "--no-progress"], capsys)
    m = re.fullmatch(r"lfm2vl finetune: error: training diverged at step (\d) of 8: the loss \((\S+)\) or the "
                     r"gradient norm \((\S+)\) is not finite, so the step was not applied and no result was written; "
                     r"the last checkpoint, (\S+), is kept: resume from it with --resume and a lower --lr \(now "
                     r"1e\+30\)\n", err)
    assert code == 1 and m, err
    step = int(m.group(1))
    assert step >= 2 and any(v.lower() in ("nan", "inf", "-inf") for v in m.group(2, 3))
    assert m.group(4).endswith(f"step-{step - 1:07d}") and state.find(out).name == f"step-{step - 1:07d}"
    assert not (out / "adapter_model.safetensors").exists()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, step)) and all(np.isfinite(r["loss"]) for r in steps)
