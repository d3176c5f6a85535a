"""Model configuration: three dataclasses built from a checkpoint's config.json.

Field names are the Hugging Face config.json keys. Every published layout is accepted:
- custom-code era: model_type "lfm2-vl", `image_token_index`, text `block_ff_dim`, `tie_embedding`,
  `full_attn_idxs`, top-level `rope_theta`, processor fields at the top level;
- transformers-native `lfm2_vl`: `layer_types`, `rope_parameters`, nested configs;
- LFM2.5-VL: `projector_use_layernorm: false`, projector width 2048, 128k vocabulary.
Derived values (effective FFN width, head_dim, vision layers in use) live in `__post_init__` only.
Nothing is filled from defaults that a checkpoint is expected to state: a missing required key is an error.

It also holds the one reader of a checkpoint's JSON files (config.json, processor_config.json, tokenizer_config.json,
...), `read_json`: every way a file can be unusable (unreadable, not UTF-8, not JSON, JSON of the wrong shape) is a
LoadError naming the file and what it should hold; an absent optional file reads as {}. Nothing here imports torch,
so the processor uses it on its own.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import jsontext
from .resolve import LoadError

VL_MODEL_TYPES = ("lfm2_vl", "lfm2-vl")


def json_kind(value: Any) -> str:
    """The kind of a parsed JSON value, for error messages: "an object", "a list" (a JSON array), "a string", "a
    number", "a boolean" or "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def described(value: Any) -> str:
    """A parsed value for an error message: its JSON kind, with the value itself when it is short."""
    if value is None:
        return "null"
    shown = repr(value)
    return f"{json_kind(value)} {shown}" if len(shown) <= 40 else json_kind(value)


def read_json(path: str | Path, *, required: bool = False) -> dict:
    """The JSON object in `path`; {} when the file is absent and not required. A LoadError naming the file for a
    missing required file, an unreadable one, one that is not UTF-8 JSON, or JSON that is not an object."""
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise LoadError(f"{path} is not a file; it should be a JSON file")
        if required:
            raise LoadError(f"{path} does not exist")
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(f"{path} is not UTF-8 text (byte {e.start}); it should be a JSON file") from None
    except OSError as e:
        raise LoadError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        value = jsontext.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path}: expected a JSON object ({{...}}), got {json_kind(value)}")
    return value


def need_object(value: Any, where: str, *, optional: bool = False, error: type[LoadError] = LoadError) -> dict:
    """`value` when it is a JSON object (None gives {} when optional); else `error`: "`where` must be a JSON
    object". `where` names the field, with its file where the caller does not add it, e.g.
    "processor_config.json: image_processor"."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise error(f"{where} must be a JSON object ({{...}}), got {json_kind(value)}")
    return value


class ConfigError(LoadError):
    """A config.json that lfm2vl cannot build a model from."""


def _require(d: dict, key: str, where: str = "") -> Any:
    """d[key]; a missing key is a ConfigError naming `where` (the section; "" for the top level)."""
    if key not in d:
        raise ConfigError(f"{where + ' has no' if where else 'no'} '{key}'; cannot build the model without it")
    return d[key]


def json_int(v) -> bool:
    """Whether a parsed JSON value is an integer (true and false are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def json_number(v) -> bool:
    """Whether a parsed JSON value is a number (true and false are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What each field annotation of the config dataclasses admits from JSON (`from __future__` keeps them strings).
_KINDS = {
    "int": (json_int, "an integer"),
    "float": (json_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "int | None": (lambda v: v is None or json_int(v), "an integer or null"),
    "float | None": (lambda v: v is None or json_number(v), "a number or null"),
    "int | list[int] | None": (lambda v: v is None or json_int(v) or (isinstance(v, list) and all(map(json_int, v))),
                               "an integer, a list of integers or null"),
}


def _build(cls, kw: dict, where: str):
    """cls(**kw) after checking each value's JSON type against the field's annotation (a ConfigError naming the
    field, after the prefix `where`, and what it should be, instead of a TypeError deep in __post_init__)."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in kw.items():
        check, what = _KINDS.get(types[k], (None, None))
        if check is not None and not check(v):
            raise ConfigError(f"{where}{k} must be {what}, got {described(v)}")
    return cls(**kw)


@dataclass
class TextConfig:
    """LFM2 hybrid backbone (`text_config`, model_type "lfm2")."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # as written; the FFN actually uses `ff_dim` (see block_auto_adjust_ff_dim)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    layer_types: list[str]
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    conv_L_cache: int = 3
    conv_bias: bool = False
    max_position_embeddings: int = 128_000
    block_auto_adjust_ff_dim: bool = True
    block_ffn_dim_multiplier: float | None = 1.0
    block_multiple_of: int = 256
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # derived
    head_dim: int = field(init=False)
    ff_dim: int = field(init=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {"conv", "full_attention"})
        if bad:
            raise ConfigError(f"unknown layer_types {bad}; expected 'conv' or 'full_attention'")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.ff_dim = effective_ff_dim(self.intermediate_size, self.block_auto_adjust_ff_dim,
                                       self.block_ffn_dim_multiplier, self.block_multiple_of)

    @classmethod
    def from_hf(cls, d: dict) -> "TextConfig":
        where = "text_config"
        d = dict(need_object(d, where, error=ConfigError))
        # legacy aliases (custom-code era)
        if "block_ff_dim" in d:
            d["intermediate_size"] = d["block_ff_dim"]
        n_layers = _require(d, "num_hidden_layers", where)
        if not json_int(n_layers) or n_layers < 1:
            raise ConfigError(f"{where}.num_hidden_layers must be an integer >= 1, got {n_layers!r}")
        if d.get("layer_types") is None:
            idxs = d.get("full_attn_idxs")
            idxs = range(n_layers) if idxs is None else idxs
            if not (isinstance(idxs, (list, range)) and all(map(json_int, idxs))):
                raise ConfigError(f"{where}.full_attn_idxs must be a list of layer indices, got {idxs!r}")
            d["layer_types"] = ["full_attention" if i in idxs else "conv" for i in range(n_layers)]
        rope = need_object(d.get("rope_parameters"), f"{where}.rope_parameters", optional=True, error=ConfigError)
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope.get('rope_type')!r} is not supported (LFM2 uses 'default')")
        d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads"):
            _require(d, key, where)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return _build(cls, {k: v for k, v in d.items() if k in names}, "text_config.")

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]


def effective_ff_dim(intermediate_size: int, auto_adjust: bool, multiplier: float | None,
                     multiple_of: int) -> int:
    """SwiGLU width actually built: 6656 -> 4608, 12288 -> 8192; unchanged without auto-adjust."""
    if not auto_adjust:
        return intermediate_size
    f = int(2 * intermediate_size / 3)
    if multiplier is not None:
        f = int(multiplier * f)
    return multiple_of * math.ceil(f / multiple_of)


@dataclass
class VisionConfig:
    """SigLIP2 NaFlex vision tower (`vision_config`, model_type "siglip2_vision_model")."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # layers stored in the checkpoint
    num_attention_heads: int
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256  # position-embedding table: a sqrt(num_patches) square grid
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = False
    vision_feature_layer: int = -1  # custom-code era; LFM2-VL-1.6B uses -2
    # derived
    head_dim: int = field(init=False)
    num_layers_used: int = field(init=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.vision_use_head:
            raise ConfigError("vision_use_head=true is not an LFM2-VL layout (no checkpoint has a vision head)")
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ConfigError(f"vision num_patches {self.num_patches} is not a square grid")
        self.head_dim = self.hidden_size // self.num_attention_heads
        L, v = self.num_hidden_layers, self.vision_feature_layer
        self.num_layers_used = L + v + 1 if v < 0 else v + 1
        if not 1 <= self.num_layers_used <= L:
            raise ConfigError(f"vision_feature_layer {v} is out of range for {L} vision layers")

    @classmethod
    def from_hf(cls, d: dict, vision_feature_layer: int = -1) -> "VisionConfig":
        where = "vision_config"
        d = need_object(d, where, error=ConfigError)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _require(d, key, where)
        if "vision_use_head" not in d:
            raise ConfigError("vision_config has no 'vision_use_head'; refusing to guess (the transformers "
                              "default would build an unused attention-pooling head)")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kw = {k: v for k, v in d.items() if k in names}
        kw["vision_feature_layer"] = vision_feature_layer
        return _build(cls, kw, "vision_config.")


@dataclass
class Lfm2VlConfig:
    """Top level: text + vision + projector, and the image-token id."""

    text_config: TextConfig
    vision_config: VisionConfig
    image_token_id: int
    projector_hidden_size: int
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    projector_use_layernorm: bool = True
    downsample_factor: int = 2
    tie_word_embeddings: bool = True
    model_type: str = "lfm2_vl"
    raw: dict = field(default_factory=dict, repr=False)  # the whole config.json (processor fields of old repos)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "Lfm2VlConfig":
        """Build from a parsed config.json; a ConfigError's message begins with `source` (the file's path when
        from_file reads it)."""
        try:
            return cls._from_hf(d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _from_hf(cls, d: dict) -> "Lfm2VlConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object ({{...}}), got {json_kind(d)}")
        mt = d.get("model_type")
        if mt not in VL_MODEL_TYPES:
            raise ConfigError(f"model_type {mt!r} is not an LFM2-VL model; lfm2vl loads LFM2-VL checkpoints "
                              f"(model_type 'lfm2_vl' or 'lfm2-vl')")
        text = dict(need_object(_require(d, "text_config"), "text_config", error=ConfigError))
        if text.get("model_type", "lfm2") != "lfm2":
            raise ConfigError(f"text_config has model_type {text.get('model_type')!r}, expected 'lfm2'")
        vision = dict(need_object(_require(d, "vision_config"), "vision_config", error=ConfigError))
        if vision.get("model_type", "siglip2_vision_model") != "siglip2_vision_model":
            raise ConfigError(f"vision_config has model_type {vision.get('model_type')!r}, "
                              f"expected 'siglip2_vision_model'")
        if "image_token_id" in d:
            image_token_id = d["image_token_id"]
        elif "image_token_index" in d:
            image_token_id = d["image_token_index"]
        else:
            raise ConfigError("neither 'image_token_id' nor 'image_token_index' is set")
        # Tying: the top-level flag governs the VL model; old files say `tie_embedding` (top or text level).
        tie = d.get("tie_word_embeddings", d.get("tie_embedding",
                    text.get("tie_word_embeddings", text.get("tie_embedding", True))))
        vfl = d.get("vision_feature_layer", -1)
        if not json_int(vfl):
            raise ConfigError(f"vision_feature_layer must be an integer, got {described(vfl)}")
        return _build(cls, dict(
            text_config=TextConfig.from_hf(text),
            vision_config=VisionConfig.from_hf(vision, vfl),
            image_token_id=image_token_id,
            projector_hidden_size=_require(d, "projector_hidden_size"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("projector_bias", True),
            projector_use_layernorm=d.get("projector_use_layernorm", True),
            downsample_factor=d.get("downsample_factor", 2),
            tie_word_embeddings=bool(tie),
            model_type=mt,
            raw=d,
        ), "")

    @classmethod
    def from_file(cls, path: str | Path) -> "Lfm2VlConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_hf(read_json(path, required=True), source=str(path))
