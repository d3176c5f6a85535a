"""LoRA adapters in PEFT's file format: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapter(model, "runs/a", base_model_name_or_path="LiquidAI/LFM2-VL-450M")   # after add_lora + training
    load_adapter(model, "runs/a")               # merge into the weights (merge=False: LoraLinear modules instead)

Keys are PEFT's without the adapter name: `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`;
module paths equal transformers' (Lfm2VlForConditionalGeneration), so `PeftModel.from_pretrained` on the same base
loads what save_adapter writes. target_modules is written as a regular expression that PEFT re.fullmatches against
module paths and that selects exactly the modules that have an adapter here (the vision tower has q/k/v/out_proj
too, so names alone would wrap more than was trained).

Reading follows PEFT's rules: a list of target_modules matches a module whose path equals a name or ends with
".name", a string is re.fullmatched; rank_pattern / alpha_pattern override r / lora_alpha per module; use_rslora
scales by alpha / sqrt(r). What lfm2vl does not implement (DoRA, modules_to_save, trained biases, layer filters,
...) is an AdapterError naming it, and so are weights for modules this model lacks or that are not linear layers.
Target names that match nothing here (names copied from other models: o_proj, gate_proj ...) get a warning:
PEFT trained nothing there.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..files import jsontext
from ..files.atomic import write_file, write_text
from .lora import LoraLinear, _shared_weights, lora_modules, merged_weight, replace_weight

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight")
# config fields whose non-default values ask for features lfm2vl does not implement -> what they mean
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "lora_bias": "trained LoRA biases (lora_bias)",
    "fan_in_fan_out": "transposed (Conv1D-style) weights (fan_in_fan_out)",
    "layers_to_transform": "a layer filter (layers_to_transform)",
    "layer_replication": "layer replication",
    "target_parameters": "parameter targets (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


class AdapterError(ValueError):
    """An adapter folder lfm2vl cannot use with this model (what is wrong is in the message)."""


class AdapterWarning(UserWarning):
    """Something about an adapter the user should know that does not stop it from loading."""


# ---- writing -------------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None, *,
                 task_type: str = "CAUSAL_LM") -> Path:
    """Write the model's LoraLinear adapters to `folder` in PEFT's format; returns the folder.

    Each file is written to a temporary name and renamed into place, so a crash never leaves a half-written file;
    the weights go first and the config last (a folder with a config has complete weights)."""
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("the model has no LoRA adapters to save (add_lora adds them)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r, alpha, dropout = (_most_common([getattr(m, a) for m in mods.values()]) for a in ("r", "lora_alpha", "dropout"))
    rslora = {m.use_rslora for m in mods.values()}
    if len(rslora) > 1:
        raise AdapterError("the adapters mix rslora and plain scaling; PEFT's format has one use_rslora per adapter")
    tensors = {}
    for path, m in mods.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": _number(alpha), "lora_dropout": dropout, "use_rslora": rslora.pop(),
        "target_modules": target_regex(list(mods)), "exclude_modules": None,
        "rank_pattern": {re.escape(p): m.r for p, m in mods.items() if m.r != r},
        "alpha_pattern": {re.escape(p): _number(m.lora_alpha) for p, m in mods.items() if m.lora_alpha != alpha},
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True, "inference_mode": True,
        "revision": None,
    }
    from safetensors.torch import save_file

    write_file(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def target_regex(paths: list[str]) -> str:
    r"""A regular expression that re.fullmatches exactly `paths`: paths that differ only in their first layer index
    and their last component share one alternative, e.g.
    `model\.language_model\.layers\.(?:0|1|3)\.conv\.(?:in_proj|out_proj)`."""
    by_index: dict[tuple[str, str], list[str]] = {}  # (path before the index, after it up to the last dot) -> indices
    for p in paths:
        m = re.search(r"\.(\d+)\.", p)
        key = (p, "") if m is None else (p[:m.start()], p[m.end():])
        by_index.setdefault(key, []).append("" if m is None else m.group(1))
    groups: dict[tuple, list[str]] = {}  # (head, indices, middle) -> last components
    for (head, rest), idx in by_index.items():
        middle, _, last = rest.rpartition(".") if rest else ("", "", "")
        groups.setdefault((head, tuple(sorted(idx, key=lambda i: int(i or 0))), middle), []).append(last)
    alts = []
    for (head, idx, middle), lasts in groups.items():
        if idx == ("",):  # no layer index: the path itself
            alts.append(re.escape(head))
            continue
        parts = [re.escape(head), _alternation(list(idx))] + ([re.escape(middle)] if middle else [])
        alts.append(r"\.".join(parts + [_alternation(lasts)]))
    return alts[0] if len(alts) == 1 else _alternation(alts, escape=False)


def _alternation(items: list[str], escape: bool = True) -> str:
    items = [re.escape(i) for i in items] if escape else items
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def _most_common(values: list):
    return max(set(values), key=lambda v: (values.count(v), -values.index(v)))


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# ---- reading -------------------------------------------------------------------------------------------------------
def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, adapter tensors by key); AdapterError for a missing folder or file, a
    malformed config, a non-LoRA adapter or a feature lfm2vl does not implement."""
    if not isinstance(folder, (str, os.PathLike)):
        raise AdapterError(f"adapter={folder!r:.80} is invalid: expected the path of an adapter folder, got "
                           f"{type(folder).__name__}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not an adapter folder" if folder.exists() else "does not exist"
        raise AdapterError(f"adapter folder {folder} {what} (it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [f.name for f in (cfg_file, weights) if not f.is_file()]
    if missing:
        hint = " (lfm2vl reads safetensors only, never pickles)" if (folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"adapter folder {folder} has no {' and no '.join(missing)}{hint}")
    try:
        config = jsontext.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file} must hold a JSON object, got {type(config).__name__}")
    check_config(config, cfg_file)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for bad headers / truncated data
        raise AdapterError(f"{weights} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    return config, tensors


def check_config(config: dict, where) -> None:
    """AdapterError naming every field of a PEFT config that lfm2vl cannot honour."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type is {config.get('peft_type')!r}; lfm2vl reads LoRA adapters only "
                           f"(peft_type 'LORA')")
    used = [f"{k}={config[k]!r} ({what})" for k, what in _UNSUPPORTED.items() if config.get(k) not in (None, False, [], {})]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r} (trained biases)")
    if used:
        raise AdapterError(f"{where} uses what lfm2vl does not support: {'; '.join(used)}")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    for name, v in (("r", r), ("lora_alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise AdapterError(f"{where}: {name} must be a positive number, got {v!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{where}: target_modules must be a list of names or a regular expression string, got "
                           f"{targets!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise AdapterError(f"{where}: {name} must be an object (pattern -> value)")


def _peft_targets(config: dict, path: str) -> bool:
    """Whether PEFT's check_target_module_exists selects module `path` (exclude_modules, then target_modules)."""
    ex = config.get("exclude_modules")
    if ex:
        if isinstance(ex, str) and re.fullmatch(ex, path):
            return False
        if not isinstance(ex, str) and (path in ex or any(path.endswith("." + e) for e in ex)):
            return False
    t = config["target_modules"]
    if isinstance(t, str):
        return re.fullmatch(t, path) is not None
    return path in t or any(path.endswith("." + x) for x in t)


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", path) gives the value."""
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", path):
            return v
    return default


def _unused_vision_layer(model: nn.Module, path: str) -> bool:
    """A vision encoder layer beyond those the model runs (vision_feature_layer): the checkpoint's extra layer,
    which transformers builds and never uses for the output; its adapter changes nothing."""
    m = re.match(r"model\.vision_tower\.encoder\.layers\.(\d+)\.", path)
    try:
        built = len(model.model.vision_tower.encoder.layers)
    except AttributeError:
        return False
    return m is not None and int(m.group(1)) >= built


def adapter_updates(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor],
                    where: str = "the adapter") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module path -> (A, B, scaling) for every adapted module, checked against the model; AdapterError for
    unknown keys, modules that do not exist here or are not linear layers, and shapes that disagree with r.
    Warns about target names that match no module of the model."""
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    odd, absent, not_linear = [], [], []
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            odd.append(key)
            continue
        path = m.group("path")
        if path not in modules:
            if not _unused_vision_layer(model, path):
                absent.append(path)
            continue
        if not isinstance(modules[path], nn.Linear):
            not_linear.append(f"{path} ({type(modules[path]).__name__})")
            continue
        pairs.setdefault(path, {})[m.group("which")] = t
    problems = []
    if odd:
        problems.append(f"tensors that are not LoRA A/B weights: {_listing(odd)}")
    if absent:
        problems.append(f"weights for modules this model does not have: {_listing(sorted(set(absent)))}")
    if not_linear:
        problems.append(f"weights for modules that are not linear layers: {_listing(sorted(set(not_linear)))}")
    shared = _shared_weights(model)
    tied = [f"{p} (its weight is also {', '.join(x for x in shared[id(modules[p].weight)] if x != p)})"
            for p in pairs if len(shared.get(id(modules[p].weight), ())) > 1]
    if tied:
        problems.append(f"weights for layers that share their weight with another module: {_listing(tied)}")
    half = [p for p, ab in pairs.items() if len(ab) != 2]
    if half:
        problems.append(f"modules with only one of lora_A / lora_B: {_listing(half)}")
    untargeted = [p for p in pairs if not _peft_targets(config, p)]
    if untargeted:
        problems.append(f"weights for modules its target_modules does not select: {_listing(untargeted)}")
    if problems:
        raise AdapterError(f"{where} does not fit this model: {'; '.join(problems)}")
    _warn_unmatched(model, config, where)
    out = {}
    rslora = bool(config.get("use_rslora", False))
    for path in (n for n in modules if n in pairs):  # module order
        a, b = pairs[path]["A"], pairs[path]["B"]
        lin = modules[path]
        r = _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, lin.in_features) or tuple(b.shape) != (lin.out_features, r):
            raise AdapterError(f"{where}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; with r={r} "
                               f"this layer ({lin.in_features} -> {lin.out_features}) needs ({r}, {lin.in_features}) "
                               f"and ({lin.out_features}, {r})")
        for name, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise AdapterError(f"{where}: {path}'s {name} holds {t.dtype} values; LoRA weights are floating point")
            bad = t.numel() - int(torch.isfinite(t).sum())
            if bad:
                raise AdapterError(f"{where}: {path}'s {name} holds {bad} NaN or infinite value"
                                   f"{'' if bad == 1 else 's'}: the adapter is damaged (a training run that diverged?)")
        out[path] = (a, b, alpha / r ** 0.5 if rslora else alpha / r)
    return out


def _warn_unmatched(model: nn.Module, config: dict, where: str) -> None:
    t = config["target_modules"]
    paths = [n for n, _ in model.named_modules() if n]
    if isinstance(t, str):
        if not any(re.fullmatch(t, p) for p in paths):
            warnings.warn(f"{where}: target_modules {t!r} matches no module of this model", AdapterWarning,
                          stacklevel=3)
        return
    unmatched = [x for x in t if not any(p == x or p.endswith("." + x) for p in paths)]
    if unmatched:
        one = len(unmatched) == 1
        warnings.warn(f"{where}: target module name{'' if one else 's'} {', '.join(unmatched)} match{'es' if one else ''} "
                      f"no module of this model, so the adapter trained nothing there (this model's linear layers: "
                      f"{', '.join(_linear_names(model))})", AdapterWarning, stacklevel=3)


def _linear_names(model: nn.Module) -> list[str]:
    from .lora import linear_names

    return linear_names(model)


def _listing(items: list[str], limit: int = 10) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_adapter(model: nn.Module, folder: str | os.PathLike, merge: bool = True) -> list[str]:
    """Apply the adapter in `folder` (written by save_adapter or by PEFT) to `model`, in place; returns the adapted
    module paths. merge=True adds scaling * B @ A to each weight (computed in float32, stored in the weight's dtype):
    plain nn.Linear layers, as fast as the base. merge=False makes them LoraLinear holding the adapter (float32).
    Apply it before optimize_for_cpu or quantization, which replace the plain linears."""
    config, tensors = read_adapter(folder)
    return apply_adapter(model, config, tensors, merge=merge, where=f"adapter {folder}")


@torch.no_grad()
def apply_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], merge: bool = True,
                  where: str = "the adapter") -> list[str]:
    """load_adapter on an adapter already read by read_adapter."""
    updates = adapter_updates(model, config, tensors, where=where)
    modules = dict(model.named_modules())
    wrapped = [f"{p} ({type(modules[p]).__name__})" for p in updates if type(modules[p]) is not nn.Linear]
    if wrapped:
        raise AdapterError(f"{where}: these layers are no longer plain linear layers: {_listing(wrapped)}; "
                           f"apply the adapter before CPU optimisation, quantization or add_lora")
    dropout = float(config.get("lora_dropout") or 0.0)
    rslora = bool(config.get("use_rslora", False))
    for path, (a, b, scaling) in updates.items():
        lin = modules[path]
        if merge:
            replace_weight(lin, merged_weight(lin.weight, a, b, scaling))
            continue
        r = a.shape[0]
        LoraLinear.wrap(lin, r, 1.0, dropout, rslora)
        lin.scaling, lin.lora_alpha = scaling, scaling * (r ** 0.5 if rslora else r)
        lin.lora_A.weight.copy_(a)
        lin.lora_B.weight.copy_(b)
    return list(updates)
