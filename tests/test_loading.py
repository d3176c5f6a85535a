"""lfm2vl.loading: folders, shards, hub ids, key remapping, dtypes and every error a user can run into."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import cached_checkpoint
from tokenizer_build import FIXTURE_CONFIG
from lfm2vl.config import ConfigError, Lfm2VlConfig
from lfm2vl.loading import LoadError, load_model, remap_hf_keys

EMB = "model.language_model.embed_tokens.weight"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


# ---- successful loads --------------------------------------------------------------------------------------------
def test_tied_float32_load(tiny_checkpoint):
    model, config, folder = load_model(tiny_checkpoint, dtype=torch.float32)
    assert folder == tiny_checkpoint and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("dtype,want", [(None, torch.bfloat16), ("float16", torch.float16),
                                        ("bf16", torch.bfloat16), (torch.float32, torch.float32)])
def test_dtypes(tiny_checkpoint, dtype, want):
    model, _, _ = load_model(tiny_checkpoint, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {want}
    out = model(torch.tensor([[1, 6, 600, 601]]))
    assert out.dtype == want and torch.isfinite(out.float()).all()


def test_bad_dtype(tiny_checkpoint):
    with pytest.raises(LoadError, match="dtype 'int8' is not supported"):
        load_model(tiny_checkpoint, dtype="int8")


def test_custom_era_layout_drops_unused_vision_layer(tmp_path_factory):
    folder, hf = cached_checkpoint(tmp_path_factory, "1.6b")
    raw = load_file(str(folder / "model.safetensors"))
    n = hf.config.vision_config.num_hidden_layers
    assert any(k.startswith(f"model.vision_tower.vision_model.encoder.layers.{n}.") for k in raw)
    model, config, _ = load_model(folder, dtype=torch.float32)
    assert config.model_type == "lfm2-vl" and config.vision_config.num_layers_used == n
    assert len(model.model.vision_tower.encoder.layers) == n
    got = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight
    assert torch.equal(got, raw["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"])


def test_remap_hf_keys_is_exact(tmp_path_factory):
    folder, _ = cached_checkpoint(tmp_path_factory, "1.6b")
    config = Lfm2VlConfig.from_file(folder)
    raw = load_file(str(folder / "model.safetensors"))
    out = remap_hf_keys(raw, config)
    n = config.vision_config.num_layers_used
    dropped = {k for k in raw if f"encoder.layers.{n}." in k or k.endswith("position_ids")}
    assert len(dropped) == 16 + 1  # one SigLIP layer (16 tensors) + the old position_ids buffer
    assert len(out) == len(raw) - len(dropped) + 1  # + lm_head.weight = embedding (tied)
    assert out["lm_head.weight"] is out[EMB]
    assert not any("vision_model" in k for k in out)
    legacy = {"language_model.model.embed_tokens.weight": raw[EMB], "vision_tower.vision_model.post_layernorm.bias":
              torch.zeros(1), "multi_modal_projector.linear_1.bias": torch.zeros(1)}
    assert set(remap_hf_keys(legacy, config)) == {EMB, "lm_head.weight", "model.vision_tower.post_layernorm.bias",
                                                   "model.multi_modal_projector.linear_1.bias"}


def test_sharded_untied(tmp_path_factory):
    folder, hf = cached_checkpoint(tmp_path_factory, "untied")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model, config, _ = load_model(folder, dtype=torch.float32)
    assert not config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_hub_id_from_local_cache(tiny_checkpoint, tmp_path):
    """A hub id resolves through huggingface_hub's cache (offline, pre-populated cache; no network)."""
    snap = tmp_path / "hub" / "models--someone--tiny-vl" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_checkpoint, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    out = _run_isolated("someone/tiny-vl", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(str(snap)), out.stdout


# ---- errors ------------------------------------------------------------------------------------------------------
def test_missing_tensor(tiny_checkpoint, tmp_path):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    _edit_weights(f, lambda sd: sd.pop("model.language_model.layers.2.self_attn.k_layernorm.weight"))
    with pytest.raises(LoadError, match=r"missing tensors: model\.language_model\.layers\.2\.self_attn\.k_layernorm"):
        load_model(f)


def test_unexpected_tensor(tiny_checkpoint, tmp_path):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    _edit_weights(f, lambda sd: sd.update({"model.language_model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(LoadError, match=r"unexpected tensors: model\.language_model\.layers\.0\.extra\.weight"):
        load_model(f)


def test_wrong_shape(tiny_checkpoint, tmp_path):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    key = "model.language_model.layers.0.feed_forward.w1.weight"
    _edit_weights(f, lambda sd: sd.update({key: torch.zeros(7, 64)}))
    with pytest.raises(LoadError, match=rf"mis-shaped tensors: {key}: checkpoint \(7, 64\), config expects \(256, 64\)"):
        load_model(f)


def test_untied_config_without_lm_head(tiny_checkpoint, tmp_path):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((f / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"missing tensors \(tie_word_embeddings is false.*lm_head\.weight"):
        load_model(f)


def test_unknown_model_type(tiny_checkpoint, tmp_path):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((f / "config.json").read_text())
    cfg["model_type"] = "llava"
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llava'"):
        load_model(f)


def test_only_pickle_checkpoint(tiny_checkpoint, tmp_path):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    (f / "model.safetensors").unlink()
    (f / "pytorch_model.bin").write_bytes(b"\x80\x04 would be unpickled by torch.load: never")
    with pytest.raises(LoadError, match=r"only pickle checkpoints \(pytorch_model\.bin\).*never unpickles"):
        load_model(f)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_safetensors(tiny_checkpoint, tmp_path, how):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    w = f / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(b"this is not a safetensors file" if how == "garbage" else data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors is not a valid safetensors file"):
        load_model(f)


def test_missing_shard(tmp_path_factory, tmp_path):
    folder, _ = cached_checkpoint(tmp_path_factory, "untied")
    f = _copy(folder, tmp_path / "c")
    next(f.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LoadError, match=r"lists shards that are not in .*model-00002-of"):
        load_model(f)


# Each JSON file a checkpoint's loader reads, damaged in one way -> what the LoadError says after the file's path.
BAD_JSON_FILES = [
    ("config.json", "[1, 2]", r"config\.json: expected a JSON object \(\{\.\.\.\}\), got a list"),
    ("config.json", b"\xff\xfe\x00binary", r"config\.json is not UTF-8 text"),
    ("generation_config.json", "{x", r"generation_config\.json is not valid JSON: Expecting property name"),
    ("generation_config.json", '{"eos_token_id": "7"}', r"generation_config\.json: eos_token_id must be a token id"),
    ("processor_config.json", "[]", r"processor_config\.json: expected a JSON object"),
    ("processor_config.json", "{x", r"processor_config\.json is not valid JSON"),
    ("processor_config.json", '{"image_processor": 3}', r"processor_config\.json: image_processor must be a JSON obj"),
    ("tokenizer_config.json", "[]", r"tokenizer_config\.json: expected a JSON object"),
    ("tokenizer_config.json", "{x", r"tokenizer_config\.json is not valid JSON"),
    ("tokenizer_config.json", '{"eos_token": 5}', r"tokenizer_config\.json: eos_token must be a token"),
    ("special_tokens_map.json", '"x"', r"special_tokens_map\.json: expected a JSON object .*, got a string"),
    ("tokenizer.json", "garbage", r"tokenizer\.json is not a tokenizer file .*: expected value at line 1"),
    ("tokenizer.json", "[]", r"tokenizer\.json is not a tokenizer file"),
    ("model.safetensors.index.json", "[]", r"model\.safetensors\.index\.json: expected a JSON object"),
]


@pytest.mark.parametrize("name,content,says", BAD_JSON_FILES, ids=lambda x: x if isinstance(x, str) else None)
def test_every_checkpoint_json_file_is_a_load_error_naming_it(tiny_checkpoint, tmp_path, name, content, says):
    import lfm2vl

    f = _copy(tiny_checkpoint, tmp_path / "c")
    (f / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LoadError) as e:
        lfm2vl.load(f, optimize=False)
    assert str(e.value).startswith(str(f / name)), e.value
    assert re.search(says, str(e.value)), e.value


@pytest.mark.parametrize("edit,says", [
    (lambda c: c.update(text_config=None), "text_config must be a JSON object ({...}), got null"),
    (lambda c: c.update(vision_config=[1]), "vision_config must be a JSON object ({...}), got a list"),
    (lambda c: c["text_config"].update(hidden_size="64"), "text_config.hidden_size must be an integer, got a string"),
    (lambda c: c["text_config"].update(rope_parameters=[1]), "text_config.rope_parameters must be a JSON object"),
    (lambda c: c["vision_config"].update(num_patches=None), "vision_config.num_patches must be an integer, got null"),
    (lambda c: c.update(image_token_id="x"), "image_token_id must be an integer, got a string 'x'"),
])
def test_config_fields_of_the_wrong_json_type_are_config_errors(tiny_checkpoint, tmp_path, edit, says):
    f = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((f / "config.json").read_text())
    edit(cfg)
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        Lfm2VlConfig.from_file(f)
    assert str(e.value).startswith(f"{f / 'config.json'}: {says}"), e.value
    assert isinstance(e.value, LoadError)


def test_nonexistent_path(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(LoadError, match="does not exist"):
        load_model("./relative/missing-folder")


def test_offline_uncached_hub_id(tmp_path):
    out = _run_isolated("LiquidAI/LFM2-VL-450M", tmp_path)
    assert out.returncode == 1
    msg = out.stderr.strip().splitlines()[-1]
    assert "LoadError" in msg and "'LiquidAI/LFM2-VL-450M'" in msg and "HF_HUB_OFFLINE" in msg
    assert "--local-dir" in msg and "local folder" in msg


def _run_isolated(hub_id: str, hf_home: Path):
    """huggingface_hub reads HF_HUB_OFFLINE / HF_HOME at import time: run in a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    code = ("import sys\nfrom lfm2vl.loading import resolve_folder\n"
            f"print(resolve_folder({hub_id!r}))\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name,overrides,count", [
    ("LFM2.5-VL-450M", {}, 349),
    ("LFM2.5-VL-1.6B", {"text": {"hidden_size": 2048, "block_ff_dim": 12288, "intermediate_size": 12288,
                                 "num_attention_heads": 32},
                        "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                   "num_attention_heads": 16}}, 589)])
def test_tensor_count_matches_published_headers(name, overrides, count):
    """The published LFM2.5-VL safetensors headers hold 349 (450M) and 589 (1.6B) tensors; the module
    tree stores exactly as many under the file's key names (vision_model. prefix, tied head absent)."""
    d = json.loads(FIXTURE_CONFIG.read_text())
    d.update(model_type="lfm2_vl", projector_use_layernorm=False, projector_hidden_size=2048)
    d["text_config"].update(overrides.get("text", {}))
    d["vision_config"].update(overrides.get("vision", {}))
    config = Lfm2VlConfig.from_hf(d)
    from lfm2vl.model import Lfm2VlModel

    with torch.device("meta"):
        model = Lfm2VlModel(config)
    ours = [k for k in model.state_dict() if k != "lm_head.weight"]
    assert len(ours) == count, name
    as_in_file = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1): v
                  for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(remap_hf_keys(as_in_file, config)) == set(model.state_dict())


# ---- devices: checked before anything is read --------------------------------------------------------------------
def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("device, machine, says", [
    ("bogus", _no_cuda, r"device 'bogus' is not a known device; use cpu, cuda, cuda:N \(the N-th GPU\) or mps"),
    ("cuda", _no_cuda, r"device 'cuda': CUDA is not available"),
    ("cuda:3", _one_gpu, r"device 'cuda:3': this machine has 1 CUDA device \(cuda:0 to cuda:0\)"),
    ("meta", _no_cuda, r"device 'meta' is not supported; use cpu, cuda, cuda:N"),
])
def test_load_model_device_error(monkeypatch, tmp_path, device, machine, says):
    """Said before the checkpoint is looked at (the folder does not exist)."""
    machine(monkeypatch)
    with pytest.raises(LoadError, match=says):
        load_model(tmp_path / "missing", device=device)


@pytest.mark.parametrize("device, says", [("bogus", "is not a known device"), ("cuda", "CUDA is not available")])
def test_lfm2vl_load_device_error(monkeypatch, tmp_path, device, says):
    """The public lfm2vl.load gives the same errors, before loading anything."""
    import lfm2vl

    _no_cuda(monkeypatch)
    with pytest.raises(ValueError, match=says):
        lfm2vl.load(tmp_path / "missing", device=device)


def test_offline_hint_names_the_hf_command(tmp_path):
    out = _run_isolated("LiquidAI/LFM2-VL-450M", tmp_path)
    assert "(`hf download LiquidAI/LFM2-VL-450M --local-dir DIR`)" in out.stderr
