"""Tiny random LFM2-VL checkpoints in the real Hugging Face file formats, plus the transformers oracle model.

`make_checkpoint(folder, layout, seed)` builds transformers 5.24's Lfm2VlForConditionalGeneration with random
weights (re-initialised with a large spread so parity tests are sensitive: linears std 1.5/sqrt(fan_in), norms 1±0.1,
biases 0.1), saves it with save_pretrained (safetensors) or, for the custom-code-era layouts, writes config.json and
model.safetensors by hand, and adds tokenizer + processor files. Layouts:
- "tiny-lfm2vl":  LFM2-VL-like (v1): projector LayerNorm, tied, transformers-native save (stripped vision keys),
                  custom-era processor files
- "1.6b":         custom-code layout written by hand: model_type "lfm2-vl", image_token_index, block_ff_dim,
                  full_attn_idxs, top-level rope_theta, `vision_model.` key prefix, N+1 vision layers (the last one
                  random and unused) and `vision_feature_layer: -2`, plus an old position_ids buffer. The oracle runs
                  N vision layers.
- "tiny-lfm25vl": LFM2.5-VL-like: no projector LayerNorm, block_auto_adjust_ff_dim false, nested processor_config.json
- "untied":       tie_word_embeddings false (lm_head stored), saved in several shards with model.safetensors.index.json
- "vocab65k":     vocab_size 65536
- "full_450m":    the published LFM2-VL-450M shapes (the benchmark's 450M.json) with random weights (slow tests only)
All but "full_450m" are tiny (text width 64, a few layers): their names say whose layout they copy, not a size.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenizer_build import FIXTURE, FIXTURE_CONFIG, write_tokenizer_files

LAYOUTS = ("tiny-lfm2vl", "1.6b", "tiny-lfm25vl", "untied", "vocab65k")
IMAGE_TOKEN = 396
PATCH_DIM = 3 * 16 * 16
MAX_PATCHES = 1024
BRANCH_GAIN = 0.3  # text residual branches (conv/attn out_proj, MLP w2): the conv block is cubic in its
# input, so full-gain branches compound float noise ~3x per layer (bf16 error x100), unlike trained models
GAIN = 1.0  # linear std = GAIN/sqrt(fan_in): larger gains make the random net chaotic (float noise x100s)

_TEXT = dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
             norm_eps=1e-5, conv_L_cache=3, conv_bias=False, max_position_embeddings=4096,
             block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0, block_multiple_of=256,
             bos_token_id=1, eos_token_id=7, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
               patch_size=16, num_patches=256, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
               vision_use_head=False)
C, A = "conv", "full_attention"

# layout -> (text overrides, vision overrides, top-level overrides)
SPECS = {
    "tiny-lfm2vl": ({"layer_types": [C, C, A, C, A, C]}, {}, {"projector_hidden_size": 48}),
    "1.6b": ({"layer_types": [C, A, C, A], "num_key_value_heads": 1},
             {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2}, {"projector_hidden_size": 40}),
    "tiny-lfm25vl": ({"layer_types": [C, C, A, C, A], "block_auto_adjust_ff_dim": False, "intermediate_size": 160},
                     {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4},
                     {"projector_hidden_size": 64, "projector_use_layernorm": False}),
    "untied": ({"layer_types": [A, C, C, A]}, {}, {"projector_hidden_size": 48, "tie_word_embeddings": False}),
    "vocab65k": ({"layer_types": [C, A, C, A], "vocab_size": 65536}, {}, {"projector_hidden_size": 48}),
}

# what transformers 5.24's Lfm2VlProcessor.save_pretrained writes (captured with torchvision present)
NATIVE_PROCESSOR_CONFIG = {
    "image_processor": {
        "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "downsample_factor": 2, "encoder_patch_size": 16, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Lfm2VlImageProcessor", "image_std": [0.5, 0.5, 0.5], "max_image_tokens": 256,
        "max_num_patches": 1024, "max_pixels_tolerance": 2.0, "max_tiles": 10, "min_image_tokens": 64,
        "min_tiles": 2, "resample": 2, "rescale_factor": 1 / 255, "return_row_col_info": False,
        "size": {"height": 512, "width": 512}, "tile_size": 512, "use_thumbnail": True},
    "processor_class": "Lfm2VlProcessor",
}


def hf_config(layout: str):
    """transformers Lfm2VlConfig of the oracle model for a layout."""
    from transformers import Lfm2VlConfig

    if layout == "full_450m":
        d = json.loads(FIXTURE_CONFIG.read_text())
        d["model_type"] = "lfm2_vl"  # the fixture is custom-code era; transformers reads the same fields natively
        for sub in ("text_config", "vision_config"):
            d[sub] = {k: v for k, v in d[sub].items() if k not in ("torch_dtype", "dtype")}
        return Lfm2VlConfig(**{k: v for k, v in d.items() if k not in ("auto_map", "architectures", "torch_dtype")})
    t, v, top = SPECS[layout]
    text = {**_TEXT, **t, "model_type": "lfm2"}
    text["num_hidden_layers"] = len(text["layer_types"])
    vision = {**_VISION, **v, "model_type": "siglip2_vision_model"}
    return Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, downsample_factor=2,
                        projector_hidden_act="gelu", projector_bias=True,
                        **{"projector_use_layernorm": True, "tie_word_embeddings": True, **top})


def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Wide random weights: parity differences show up, logits stay finite and unsaturated."""
    g = torch.Generator().manual_seed(seed)
    d_text = model.config.text_config.hidden_size

    def normal(p, mean, std):
        p.data.copy_(torch.randn(p.shape, generator=g) * std + mean)

    with torch.no_grad():
        for name, mod in model.named_modules():
            kind = type(mod).__name__
            if isinstance(mod, torch.nn.Linear):
                branch = "language_model" in name and name.endswith(("out_proj", "w2"))
                normal(mod.weight, 0.0, (BRANCH_GAIN if branch else GAIN) / math.sqrt(mod.in_features))
            elif isinstance(mod, torch.nn.Conv1d):
                normal(mod.weight, 0.0, GAIN / math.sqrt(mod.kernel_size[0]))
            elif isinstance(mod, torch.nn.Embedding):
                normal(mod.weight, 0.0, 0.5 if "position" in name else 4.0 / math.sqrt(d_text))
            elif "Norm" in kind and getattr(mod, "weight", None) is not None:
                normal(mod.weight, 1.0, 0.1)
            else:
                continue
            if getattr(mod, "bias", None) is not None:
                normal(mod.bias, 0.0, 0.1)


def build_hf_model(layout: str, seed: int = 0):
    """The oracle: transformers' Lfm2VlForConditionalGeneration (float32, eval) with the layout's random weights."""
    from transformers import Lfm2VlForConditionalGeneration

    # .float(): a config carrying dtype "bfloat16" (the published one) would otherwise build a bf16 oracle
    model = Lfm2VlForConditionalGeneration(hf_config(layout)).float().eval()
    _reinit(model, seed)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def make_checkpoint(folder, layout: str, seed: int = 0) -> Path:
    """Write a complete checkpoint folder for `layout`; returns the folder."""
    return make_checkpoint_with_oracle(folder, layout, seed)[0]


def make_checkpoint_with_oracle(folder, layout: str, seed: int = 0):
    """-> (folder, transformers model with the same weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(layout, seed)
    if layout == "1.6b":
        _write_custom_era(folder, model, seed)
    elif layout == "full_450m":  # stored in bfloat16 like the published file; the oracle holds the same values
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
        sd = {k: v.bfloat16().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(folder)
    else:
        shard = "300KB" if layout == "untied" else "10GB"
        model.save_pretrained(folder, max_shard_size=shard)
    write_tokenizer_files(folder)
    if layout in ("tiny-lfm2vl", "1.6b", "full_450m"):
        for name in ("processor_config.json", "preprocessor_config.json"):
            shutil.copy(FIXTURE / name, folder / name)
    else:
        (folder / "processor_config.json").write_text(json.dumps(NATIVE_PROCESSOR_CONFIG, indent=2))
    return folder, model


def _write_custom_era(folder: Path, model, seed: int) -> None:
    """The custom-code layout of LFM2-VL-1.6B: old config keys, `vision_model.` prefix, one extra vision layer."""
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1): v for k, v in sd.items()}
    g = torch.Generator().manual_seed(seed + 1000)
    n = vc.num_hidden_layers
    pre = "model.vision_tower.vision_model.encoder.layers."
    for k in [k for k in sd if k.startswith(f"{pre}0.")]:  # the unused last layer: random, must never be run
        sd[k.replace(f"{pre}0.", f"{pre}{n}.")] = torch.randn(sd[k].shape, generator=g)
    sd["model.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(vc.num_patches)[None]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fixture = json.loads(FIXTURE_CONFIG.read_text())
    top_proc = {k: v for k, v in fixture.items() if k in (
        "do_image_splitting", "encoder_patch_size", "max_image_tokens", "max_num_patches", "max_pixels_tolerance",
        "max_tiles", "min_image_tokens", "min_tiles", "tile_size", "use_image_special_tokens", "use_thumbnail")}
    text = {
        "model_type": "lfm2", "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size,
        "block_ff_dim": tc.intermediate_size, "intermediate_size": tc.intermediate_size,
        "block_auto_adjust_ff_dim": tc.block_auto_adjust_ff_dim, "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 256, "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
        "full_attn_idxs": [i for i, t in enumerate(tc.layer_types) if t == "full_attention"],
        "rope_theta": tc.rope_parameters["rope_theta"], "norm_eps": tc.norm_eps, "conv_L_cache": tc.conv_L_cache,
        "conv_bias": False, "max_position_embeddings": tc.max_position_embeddings, "eos_token_id": 7,
        "block_dim": tc.hidden_size, "conv_dim": tc.hidden_size, "use_pos_enc": True,
    }
    vision = {k: getattr(vc, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels",
                                          "patch_size", "num_patches", "layer_norm_eps", "hidden_act")}
    vision.update(model_type="siglip2_vision_model", num_hidden_layers=n + 1, vision_use_head=False)
    config = {
        "architectures": ["Lfm2VlForConditionalGeneration"], "model_type": "lfm2-vl", "image_token_index": IMAGE_TOKEN,
        "downsample_factor": 2, "projector_bias": True, "projector_hidden_act": "gelu",
        "projector_hidden_size": cfg.projector_hidden_size, "vision_feature_layer": -2, **top_proc,
        "text_config": text, "vision_config": vision, "torch_dtype": "float32", "transformers_version": "4.55.0",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# ---- model inputs built directly (the processor has its own parity tests) -----------------------------------------
def make_pixels(shapes: list[tuple[int, int]], seed: int = 0):
    """Random pixel inputs in the processor's layout: (N, 1024, 768) in [-1, 1] with zero padding rows,
    pixel_attention_mask (N, 1024) int32, spatial_shapes (N, 2) long."""
    g = torch.Generator().manual_seed(seed)
    N = len(shapes)
    pv = torch.zeros(N, MAX_PATCHES, PATCH_DIM)
    mask = torch.zeros(N, MAX_PATCHES, dtype=torch.int32)
    for u, (h, w) in enumerate(shapes):
        pv[u, :h * w] = torch.rand(h * w, PATCH_DIM, generator=g) * 2 - 1
        mask[u, :h * w] = 1
    return pv, mask, torch.tensor(shapes, dtype=torch.long)


def unit_token_count(h: int, w: int, factor: int = 2) -> int:
    from lfm2vl.processor.tokens import unit_tokens  # the one source of truth for the count

    return unit_tokens(h, w, factor)


def image_placeholder(units: list[tuple[int, int]], rows: int = 1, cols: int = 1, thumbnail: bool = False) -> list[int]:
    """Token ids of one expanded <image>: start, per tile row/col marker + run, thumbnail marker + run, end."""
    ids = [498]
    tiles = rows * cols if rows * cols > 1 else 0
    for t, (h, w) in enumerate(units):
        if t < tiles:
            ids.append(397 + 10 * (t // cols) + (t % cols))
        elif tiles and thumbnail:
            ids.append(497)
        ids += [IMAGE_TOKEN] * unit_token_count(h, w)
    return ids + [499]


def clone_config(model):
    return copy.deepcopy(model.config)


# ---- shared per-process cache (pytest runs every test file in one process) ---------------------------------------
_BUILT: dict[tuple[str, int], tuple[Path, object]] = {}


def cached_checkpoint(tmp_path_factory, layout: str, seed: int = 0):
    """(folder, oracle) for a layout, built once per test session."""
    key = (layout, seed)
    if key not in _BUILT:
        _BUILT[key] = make_checkpoint_with_oracle(tmp_path_factory.mktemp(f"ckpt_{layout}"), layout, seed)
    return _BUILT[key]


def prompt_cases(vocab_size: int, seed: int = 0) -> dict[str, dict]:
    """Model inputs for the parity cases: input_ids (+ pixel inputs, attention_mask) as the processor returns them."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return torch.randint(510, vocab_size, (n,), generator=g).tolist()

    def chat(*parts):
        return [1, 6] + words(3) + [x for p in parts for x in p] + words(4) + [7, 6] + words(2)

    cases = {"text": {"input_ids": torch.tensor([chat(words(30))])}}
    small = [(16, 24)]
    cases["small_image"] = {"input_ids": torch.tensor([chat(image_placeholder(small), words(6))]),
                            **_pix(small, seed)}
    tiled = [(32, 32), (32, 32), (26, 36)]  # 1x2 grid of 512px tiles + a 416x576 thumbnail
    cases["tiled_thumbnail"] = {"input_ids": torch.tensor([chat(image_placeholder(tiled, 1, 2, True), words(5))]),
                                **_pix(tiled, seed + 1)}
    two = [(16, 16), (18, 32)]
    cases["two_images"] = {"input_ids": torch.tensor([chat(image_placeholder(two[:1]), words(4),
                                                           image_placeholder(two[1:]), words(3))]),
                           **_pix(two, seed + 2)}
    # batch of two, the shorter row left-padded with <|pad|> (id 0) and attention_mask 0
    units = [(16, 24), (16, 16)]
    r0 = chat(image_placeholder(units[:1]), words(10))
    r1 = chat(words(2), image_placeholder(units[1:]), words(3))
    pad = len(r0) - len(r1)
    assert pad > 0
    cases["batch_left_padded"] = {
        "input_ids": torch.tensor([r0, [0] * pad + r1]),
        "attention_mask": torch.tensor([[1] * len(r0), [0] * pad + [1] * len(r1)]),
        **_pix(units, seed + 3)}
    return cases


def _pix(shapes, seed):
    pv, pm, ss = make_pixels(shapes, seed)
    return {"pixel_values": pv, "pixel_attention_mask": pm, "spatial_shapes": ss}


@torch.no_grad()
def oracle_logits(hf_model, inputs: dict) -> torch.Tensor:
    """transformers logits; with left padding, position ids = cumsum(mask)-1 as generate() would pass them."""
    kw = dict(inputs)
    if "attention_mask" in kw:
        kw["position_ids"] = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return hf_model(**kw).logits


def valid_positions(inputs: dict) -> torch.Tensor:
    """(B, T) bool: the positions whose logits are compared (padding excluded)."""
    m = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"], dtype=torch.bool) if m is None else m.bool()


# ---------------------------------------------------------------- tiny models in memory (no files)
def tiny_model(dtype=torch.float32, seed=0, **text):
    """A tiny random Lfm2VlModel (text width 64, 5 layers of both kinds; a 1-layer vision tower) in eval mode;
    `text` overrides text_config values."""
    from lfm2vl.config import Lfm2VlConfig
    from lfm2vl.model.lfm2vl import Lfm2VlModel

    d = json.loads(FIXTURE_CONFIG.read_text())
    d["text_config"].update(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=5, vocab_size=512,
                            layer_types=["conv", "full_attention", "conv", "conv", "full_attention"])
    d["text_config"].update(text)
    d["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    d["projector_hidden_size"] = 48
    torch.manual_seed(seed)
    model = Lfm2VlModel(Lfm2VlConfig.from_hf(d))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in n:
                p.normal_(0, 0.8 / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def run_cached(model, prompts: list[list[int]], steps: int, slots: list[int] | None = None,
               start: int = 0) -> torch.Tensor:
    """Prefill each row alone into its slot from position `start`, then `steps` batched greedy decode steps; returns
    all logits. slots: the cache rows the prompts use (decode passes them as `rows`); default 0..B-1 and rows=None."""
    B = len(prompts)
    sel = None if slots is None else torch.tensor(slots)
    slots = slots or list(range(B))
    cache = model.make_cache(max(slots) + 1, start + 64, dtype=model.model.language_model.embed_tokens.weight.dtype)
    out, last = [], []
    with torch.inference_mode():
        for r, ids in enumerate(prompts):
            lg = model.forward_cached(model.embed(torch.tensor([ids])), cache, torch.tensor([start]),
                                      rows=torch.tensor([slots[r]]))
            out.append(lg.float())
            last.append(lg.argmax(-1))
        pos = torch.tensor([start + len(p) for p in prompts])
        tok = torch.cat(last)[:, None]
        for _ in range(steps):
            lg = model.forward_cached(model.embed(tok), cache, pos, rows=sel)
            out.append(lg.float())
            tok, pos = lg.argmax(-1)[:, None], pos + 1
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
