"""LoRA (lfm2vl/finetune/lora.py) and PEFT's adapter format (finetune/adapter.py), against transformers + peft.

All in float32 on CPU on the tiny random checkpoint. The oracle is transformers' Lfm2VlForConditionalGeneration
loaded with from_pretrained from the same folder, wrapped by peft (PeftModel.from_pretrained / get_peft_model).
Adapters get random nonzero B (a fresh adapter's B = 0 changes nothing and would prove nothing). Bar: max |logit
diff| <= 1e-4 over the text, one-image and two-image prompts, so the vision tower's and projector's adapters count.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import oracle_logits, prompt_cases
from lfm2vl.finetune.adapter import AdapterError, load_adapter, save_adapter
from lfm2vl.finetune.lora import (LoraLinear, add_lora, lora_parameters, merge_lora,
                                  resolve_targets)
from lfm2vl.loading import load_model

TOL = 1e-4
CASES = ("text", "small_image", "two_images")


@pytest.fixture(scope="module")
def cases(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    every = prompt_cases(config["text_config"]["vocab_size"])
    return {name: every[name] for name in CASES}


def ours(folder):
    return load_model(folder, dtype=torch.float32)[0]


def hf_model(folder):
    from transformers import Lfm2VlForConditionalGeneration

    return Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, cases) -> dict[str, torch.Tensor]:
    return {name: model(**inp) for name, inp in cases.items()}


@torch.no_grad()
def peft_logits(model, cases) -> dict[str, torch.Tensor]:
    return {name: oracle_logits(model, inp) for name, inp in cases.items()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@torch.no_grad()
def randomise(params, seed: int, std_b: float = 0.05) -> None:
    """Nonzero adapters, the same from a seed: each lora_A (r, in) normal with std 1/sqrt(in), each lora_B (out, r)
    with std std_b (told apart by the second dimension: every r here is <= 8, every input width >= 32)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g) * (std_b if p.shape[1] <= 16 else p.shape[1] ** -0.5))


def peft_paths(peft_model) -> set[str]:
    """Module paths (relative to the transformers model) that peft wrapped in a LoRA layer."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    return {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}


# ---- the module swap -------------------------------------------------------------------------------------------
def test_zero_initialised_adapter_changes_no_logit(tiny_checkpoint, cases):
    model = ours(tiny_checkpoint)
    before = logits(model, cases)
    names = add_lora(model, r=4, alpha=8, dropout=0.0, targets="all")
    assert all(isinstance(dict(model.named_modules())[n], LoraLinear) for n in names)
    assert all((m.lora_B.weight == 0).all() and (m.lora_A.weight != 0).any()
               for m in model.modules() if isinstance(m, LoraLinear))
    assert max_diff(logits(model, cases), before) == 0.0


def test_presets_select_by_full_path(tiny_checkpoint):
    """"text" adapts the language model's attention, conv and MLP linears only (not the vision tower's q/k/v/out_proj),
    "text+projector" adds linear_1/2, "all" adds the vision encoder's attention and MLP; state_dict keys of the base
    weights stay where they were."""
    model = ours(tiny_checkpoint)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    text = resolve_targets(model, "text")
    assert text == [n for n in linears if n.startswith("model.language_model.")]
    assert resolve_targets(model, "text+projector") == text + ["model.multi_modal_projector.linear_1",
                                                               "model.multi_modal_projector.linear_2"]
    vision = [n for n in linears if n.startswith("model.vision_tower.encoder.")]
    assert len(vision) == 12 and set(resolve_targets(model, "all")) == set(text) | set(vision) | {
        "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    keys = set(model.state_dict())
    add_lora(model, r=2, alpha=4, targets="all")
    after = set(model.state_dict())
    assert keys <= after and {k for k in after - keys if not (".lora_A." in k or ".lora_B." in k)} == set()
    assert len(lora_parameters(model)) == 2 * len(resolve_targets(model, "all"))
    # names match as PEFT matches a list: by the path's last components
    assert resolve_targets(model, "w1, self_attn.q_proj") == [
        n for n in linears if n.endswith((".w1", ".self_attn.q_proj"))]


def test_merged_equals_unmerged(tiny_checkpoint, cases):
    model = ours(tiny_checkpoint)
    add_lora(model, r=4, alpha=8, dropout=0.1, targets="all", use_rslora=True)
    randomise(lora_parameters(model), seed=1)
    model.eval()
    unmerged = logits(model, cases)
    base = logits(ours(tiny_checkpoint), cases)
    merged_names = merge_lora(model)
    assert len(merged_names) == len(resolve_targets(model, "all"))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(type(dict(model.named_modules())[n]) is torch.nn.Linear for n in merged_names)
    print(f"[lora] adapter effect {max_diff(unmerged, base):.2f}, merged vs unmerged {max_diff(logits(model, cases), unmerged):.2e}")
    assert max_diff(unmerged, base) > 0.1  # the adapter matters
    assert max_diff(logits(model, cases), unmerged) <= TOL


# ---- lfm2vl -> peft ----------------------------------------------------------------------------------------------
def test_adapter_saved_by_lfm2vl_gives_the_same_logits_in_peft(tiny_checkpoint, cases, tmp_path):
    from peft import PeftModel

    model = ours(tiny_checkpoint)
    names = add_lora(model, r=4, alpha=8, dropout=0.1, targets="all")
    randomise(lora_parameters(model), seed=2)
    model.eval()
    mine = logits(model, cases)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_checkpoint))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.1
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{n}.lora_{x}.weight" for n in names for x in "AB"}

    peft = PeftModel.from_pretrained(hf_model(tiny_checkpoint), tmp_path / "adapter").eval()
    assert peft_paths(peft) == set(names)  # exactly our modules: no extra vision q/k/v, no missing one
    diff = max_diff(peft_logits(peft, cases), mine)
    print(f"[lora] lfm2vl adapter in peft: max|dlogit|={diff:.2e}")
    assert max_diff(mine, logits(ours(tiny_checkpoint), cases)) > 0.1
    assert diff <= TOL


# ---- peft -> lfm2vl ----------------------------------------------------------------------------------------------
PEFT_CONFIGS = {
    # the notebook's names: o_proj / gate_proj / up_proj / down_proj do not exist in LFM2-VL
    "notebook_names": dict(target_modules=["q_proj", "v_proj", "fc1", "o_proj", "gate_proj", "up_proj", "down_proj"],
                           r=4, lora_alpha=8, rank_pattern={"fc1": 2}, alpha_pattern={"v_proj": 3}),
    "regex_rslora": dict(target_modules=r"model\.language_model\.layers\.\d+\.(conv\.in_proj|feed_forward\.w2)",
                         r=8, lora_alpha=4, use_rslora=True),
}


@pytest.mark.parametrize("variant", list(PEFT_CONFIGS))
def test_adapter_written_by_peft_loads_with_the_same_logits(tiny_checkpoint, cases, tmp_path, variant):
    from peft import LoraConfig, get_peft_model

    options = PEFT_CONFIGS[variant]
    peft = get_peft_model(hf_model(tiny_checkpoint), LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.05, **options))
    randomise([p for n, p in peft.named_parameters() if "lora_" in n], seed=3)
    peft.eval()
    ref = peft_logits(peft, cases)
    peft.save_pretrained(tmp_path / "peft")

    model = ours(tiny_checkpoint)
    if variant == "notebook_names":
        with pytest.warns(UserWarning, match="match no module of this model") as rec:
            paths = load_adapter(model, tmp_path / "peft", merge=False)
        named = str(rec[0].message).split("target module names ")[1].split(" match no module")[0].split(", ")
        assert sorted(named) == ["down_proj", "gate_proj", "o_proj", "up_proj"]
    else:
        paths = load_adapter(model, tmp_path / "peft", merge=False)
    assert set(paths) == peft_paths(peft)
    unmerged = logits(model, cases)
    assert max_diff(unmerged, ref) <= TOL
    merged = ours(tiny_checkpoint)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(merged, tmp_path / "peft")  # merge=True: plain linears with W + s*B@A
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    diff = max_diff(logits(merged, cases), ref)
    print(f"[lora] peft adapter ({variant}) merged in lfm2vl: max|dlogit|={diff:.2e}")
    assert max_diff(ref, logits(ours(tiny_checkpoint), cases)) > 0.1
    assert diff <= TOL


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return ours(tiny_checkpoint)


@pytest.mark.parametrize("targets, message", [
    ("gate_proj", r"unknown target name 'gate_proj'.*presets \(text, text\+projector, all\).*w1"),
    (["q_proj", "o_proj", "down_proj"], r"unknown target names 'o_proj', 'down_proj'"),
    ("conv.conv", r"'conv.conv' selects model\.language_model\.layers\.0\.conv\.conv.*Conv1d, not a Linear"),
    ("self_attn", r"'self_attn' selects .*Attention, not a Linear"),
    ("", r"no target names given"),
])
def test_bad_targets_are_named(plain, targets, message):
    with pytest.raises(ValueError, match=message):
        add_lora(plain, r=4, alpha=8, targets=targets)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())  # nothing half-applied


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "rank r must be a positive integer, got 0"), (dict(r=2.5), "got 2.5"),
    (dict(alpha=0), "alpha must be a positive number, got 0"), (dict(alpha=-1.0), "got -1.0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"), (dict(dropout=-0.1), "got -0.1"),
])
def test_bad_hyperparameters_are_named(plain, kw, message):
    with pytest.raises(ValueError, match=message):
        add_lora(plain, **{"r": 4, "alpha": 8, "dropout": 0.0, "targets": "text", **kw})


def test_tied_output_head_is_refused(plain):
    with pytest.raises(ValueError, match="lm_head shares its weight with model.language_model.embed_tokens"):
        add_lora(plain, r=4, alpha=8, targets="lm_head")


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory):
    """A valid adapter folder written by lfm2vl ("text" preset, random B)."""
    model = ours(tiny_checkpoint)
    add_lora(model, r=4, alpha=8, targets="text")
    randomise(lora_parameters(model), seed=4)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", str(tiny_checkpoint))


def edited(saved, tmp_path, config=None, tensors=None):
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    if config is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        sd = load_file(folder / "adapter_model.safetensors")
        save_file(tensors(sd), folder / "adapter_model.safetensors")
    return folder


def with_key(path):
    def add(sd):
        """sd plus an A/B pair (copies of layer 2's q_proj) for the module at `path`."""
        q = "base_model.model.model.language_model.layers.2.self_attn.q_proj"
        return {**sd, **{f"base_model.model.{path}.lora_{x}.weight": sd[f"{q}.lora_{x}.weight"].clone() for x in "AB"}}
    return add


@pytest.mark.parametrize("change, message", [
    (dict(config={"use_dora": True}), r"use_dora=True \(DoRA"),
    (dict(config={"modules_to_save": ["lm_head"], "bias": "all"}), r"modules_to_save=\['lm_head'\].*bias='all'"),
    (dict(config={"layers_to_transform": [0, 1]}), "layers_to_transform"),
    (dict(config={"peft_type": "IA3"}), "peft_type is 'IA3'; lfm2vl reads LoRA adapters only"),
    (dict(tensors=with_key("model.language_model.layers.9.self_attn.q_proj"), config={"target_modules": ["q_proj"]}),
     r"modules this model does not have: model\.language_model\.layers\.9\.self_attn\.q_proj"),
    (dict(tensors=with_key("model.language_model.layers.0.conv.conv"), config={"target_modules": ["conv"]}),
     r"not linear layers: model\.language_model\.layers\.0\.conv\.conv \(Conv1d\)"),
    (dict(config={"r": 8}), r"layers\.0\.conv\.in_proj has lora_A \(4, 64\).*with r=8"),
    (dict(tensors=lambda sd: {k: v.masked_fill(torch.arange(v.numel()).view(v.shape) < 3, float("nan"))
                              if k.endswith("layers.2.self_attn.q_proj.lora_B.weight") else v for k, v in sd.items()}),
     r"layers\.2\.self_attn\.q_proj's lora_B holds 3 NaN or infinite values: the adapter is damaged"),
    (dict(tensors=lambda sd: {k: v.to(torch.int8) if k.endswith("lora_A.weight") else v for k, v in sd.items()}),
     r"layers\.0\.conv\.in_proj's lora_A holds torch\.int8 values; LoRA weights are floating point"),
])
def test_bad_adapters_are_named(saved, tmp_path, tiny_checkpoint, change, message):
    model = ours(tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, edited(saved, tmp_path, **change))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-applied


def test_missing_adapter_folder_or_files_are_named(plain, saved, tmp_path):
    with pytest.raises(AdapterError, match=r"adapter folder .*nope does not exist"):
        load_adapter(plain, tmp_path / "nope")
    folder = edited(saved, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"has no adapter_model\.safetensors"):
        load_adapter(plain, folder)



def test_an_adapter_argument_of_the_wrong_type_is_named():
    from lfm2vl.finetune.adapter import read_adapter

    with pytest.raises(AdapterError, match=r"^adapter=5 is invalid: expected the path of an adapter folder"):
        read_adapter(5)
