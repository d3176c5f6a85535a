"""Using adapters: `lfm2vl.load(M, adapter=DIR)`, `lfm2vl merge`, and `--adapter` errors on the command line.

The adapter is written by lfm2vl ("all" preset: text, projector and vision, random nonzero B) on the tiny random
checkpoint; the oracle is transformers + peft in float32 (PeftModel.from_pretrained on the same folder).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import lfm2vl
from checkpoints import cached_checkpoint, oracle_logits, prompt_cases
from lfm2vl.cli import main
from finetune_util import make_adapter
from lfm2vl.loading import load_model

N = 12
GREEDY = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=N, min_new_tokens=N)
TOL = 1e-4


def picture(w, h, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray((np.kron(rng.rand(h // 8 + 1, w // 8 + 1, 3), np.ones((8, 8, 1)))[:h, :w] * 255)
                           .astype("uint8"))


MESSAGES = [{"role": "user", "content": [{"type": "image", "image": picture(384, 256)},
                                         {"type": "text", "text": "What is in this image?"}]}]


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapter") / "a", tiny_checkpoint)


def hf(folder):
    from transformers import Lfm2VlForConditionalGeneration

    return Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def peft_model(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf(base), adapter).eval()


@torch.no_grad()
def hf_tokens(model, req):
    ids = torch.tensor([req.input_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=req.pixel_values,
                         pixel_attention_mask=req.pixel_attention_mask, spatial_shapes=req.spatial_shapes,
                         do_sample=False, max_new_tokens=N, min_new_tokens=N, repetition_penalty=1.0)
    return out[0, ids.shape[1]:].tolist()


def test_load_with_adapter_generates_the_tokens_of_transformers_and_peft(tiny_checkpoint, adapter):
    """lfm2vl.load(..., adapter=) merges, then applies the CPU fast paths (optimize=True, the default): its greedy
    tokens on an image prompt equal transformers + peft's merged model's, and differ from the base model's."""
    engine = lfm2vl.load(tiny_checkpoint, dtype="float32", adapter=adapter)
    req = engine.prepare(MESSAGES, **GREEDY)
    ours = engine.generate(MESSAGES, **GREEDY).token_ids
    assert ours == hf_tokens(peft_model(tiny_checkpoint, adapter).merge_and_unload(), req)
    assert ours != lfm2vl.load(tiny_checkpoint, dtype="float32").generate(MESSAGES, **GREEDY).token_ids


def test_merge_writes_a_checkpoint_transformers_loads_with_peft_logits(tiny_checkpoint, adapter, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--output", str(out)]) == 0
    assert {f.name for f in out.iterdir()} == {f.name for f in tiny_checkpoint.iterdir()
                                              if f.suffix in (".json", ".jinja", ".txt")} | {"model.safetensors"}
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(tiny_checkpoint / "model.safetensors"),
                                                                         "pt") as b:
        assert set(a.keys()) == set(b.keys())
    cases = prompt_cases(json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]["vocab_size"])
    merged, ref = hf(out), peft_model(tiny_checkpoint, adapter)
    for name in ("text", "small_image", "two_images"):
        diff = (oracle_logits(merged, cases[name]) - oracle_logits(ref, cases[name])).abs().max().item()
        assert diff <= TOL, f"{name}: merged checkpoint in transformers vs peft: max |logit diff| {diff:.2e}"
    engine = lfm2vl.load(out, dtype="float32")
    assert engine.generate(MESSAGES, **GREEDY).token_ids == lfm2vl.load(
        tiny_checkpoint, dtype="float32", adapter=adapter).generate(MESSAGES, **GREEDY).token_ids


def test_merge_keeps_the_files_key_names(tmp_path_factory, tmp_path):
    """A custom-code-era checkpoint (`vision_model.` keys, an unused extra vision layer, a position_ids buffer)
    merges into a file with exactly its key names, which lfm2vl loads with the adapter's logits."""
    base, _ = cached_checkpoint(tmp_path_factory, "1.6b")
    adapter = make_adapter(tmp_path / "a", base, seed=1)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(base / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert any(".vision_model.encoder." in k for k in a.keys())
        key = "model.language_model.layers.0.feed_forward.w1.weight"
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))
        assert torch.equal(a.get_tensor("model.language_model.embed_tokens.weight"),
                           b.get_tensor("model.language_model.embed_tokens.weight"))
    cases = prompt_cases(1024)
    adapted = load_model(base, dtype=torch.float32)[0]
    from lfm2vl.finetune.adapter import load_adapter

    load_adapter(adapted, adapter)
    merged = load_model(out, dtype=torch.float32)[0]
    with torch.no_grad():
        for name in ("text", "small_image"):
            assert (merged(**cases[name]) - adapted(**cases[name])).abs().max().item() <= TOL


def test_merge_over_a_non_empty_folder_needs_overwrite(tiny_checkpoint, adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--output", str(out)]
    assert main(args) == 1
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    assert main(args + ["--overwrite"]) == 0
    assert "keep.txt" not in {f.name for f in out.iterdir()} and (out / "model.safetensors").is_file()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary folder left behind


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_models_have_the_modes_of_a_plain_write(tiny_checkpoint, adapter, tmp_path, umask_022):
    """Merged folder, adapter files and a full checkpoint: 0755 folders and 0644 files under umask 022."""
    from lfm2vl.finetune.output import write_full

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--output", str(out)]) == 0
    assert (mode(out), mode(out / "model.safetensors")) == (0o755, 0o644)
    a = make_adapter(tmp_path / "a", tiny_checkpoint)
    assert (mode(a / "adapter_model.safetensors"), mode(a / "adapter_config.json")) == (0o644, 0o644)
    model, config, folder = load_model(tiny_checkpoint, dtype=torch.float32)
    full = write_full(model, config, folder, tmp_path / "full")
    assert {f.name: mode(f) for f in full.iterdir()} == {f.name: 0o644 for f in full.iterdir()}


def test_merge_output_under_a_file_is_one_line(tiny_checkpoint, adapter, unwritable, capsys):
    assert main(["merge", "--model", str(tiny_checkpoint), "--adapter", str(adapter),
                 "--output", str(unwritable / "sub")]) == 1
    assert capsys.readouterr().err == (f"lfm2vl merge: error: --output {unwritable}/sub: {unwritable.parent} is a "
                                       "file, not a folder\n")


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lfm2vl", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("case", ["missing_adapter", "output_not_empty", "generate_missing_adapter"])
def test_bad_adapter_input_is_one_line_without_traceback(tiny_checkpoint, adapter, tmp_path, case):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    args, expected = {
        "missing_adapter": (["merge", "--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "nope"),
                             "--output", str(tmp_path / "out")], "adapter folder .* does not exist"),
        "output_not_empty": (["merge", "--model", str(tiny_checkpoint), "--adapter", str(adapter),
                              "--output", str(full)], "exists and is not empty; .* --overwrite"),
        "generate_missing_adapter": (["generate", "--messages", str(messages), "--model", str(tiny_checkpoint),
                                      "--adapter", str(tmp_path / "nope")], "adapter folder .* does not exist"),
    }[case]
    r = run_cli(*args)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_serve_and_bench_refuse_a_missing_adapter_before_loading(tmp_path, command, capsys):
    if command == "serve":
        from lfm2vl.serve.cli import main as run
    else:
        from lfm2vl.bench.options import parse_args as run
    with pytest.raises(SystemExit) as e:
        run(["--adapter", str(tmp_path / "nope")])
    assert e.value.code == 2
    assert "--adapter" in capsys.readouterr().err


def test_merge_takes_the_bundled_model_by_name(tmp_path):
    """`--model bundled` names the bundled demo model in merge as in every other command (resolve.py)."""
    from lfm2vl.finetune.merge import main as merge

    a = make_adapter(tmp_path / "a", lfm2vl.bundled_model())
    assert merge(["--model", "bundled", "--adapter", str(a), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").read_text() == (lfm2vl.bundled_model() / "config.json").read_text()
