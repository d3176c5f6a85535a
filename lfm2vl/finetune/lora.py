"""LoRA as a module swap: chosen nn.Linear layers become `LoraLinear`, in place, with PEFT's parameter layout.

    names = add_lora(model, r=8, alpha=16, dropout=0.1, targets="text")   # module paths that got an adapter
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=2e-4)
    merge_lora(model)                                                     # back to plain nn.Linear, W + s*B@A

A `LoraLinear` is the same module object with its class changed: `weight` / `bias` keep their state_dict keys, and
`lora_A` / `lora_B` (nn.Linear without bias) sit beside them, so `<path>.lora_A.weight` is PEFT's key without the
adapter name. y = x W^T + b + scaling * B(A(dropout(x))), scaling = alpha / r (alpha / sqrt(r) with rslora); A is
initialised as PEFT does (kaiming-uniform, a = sqrt(5)), B with zeros, so a new adapter changes nothing.

Targets (`resolve_targets`): a preset of TARGET_PRESETS (chosen by full module path: the vision tower has q/k/v/out_proj
too), names matched as PEFT matches a list (the module's path ends with ".name"), or full module paths; several as
a list or a comma-separated string. Base weights keep their requires_grad: freezing is the trainer's choice.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

_TEXT = [r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
         r"model\.language_model\.layers\.\d+\.conv\.(in_proj|out_proj)",
         r"model\.language_model\.layers\.\d+\.feed_forward\.(w1|w2|w3)"]
_PROJECTOR = [r"model\.multi_modal_projector\.(linear_1|linear_2)"]
_VISION = [r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
           r"model\.vision_tower\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)"]
# preset -> regular expressions that full module paths must match (re.fullmatch)
TARGET_PRESETS: dict[str, list[str]] = {
    "text": _TEXT,
    "text+projector": _TEXT + _PROJECTOR,
    "all": _TEXT + _PROJECTOR + _VISION,
}


class LoraLinear(nn.Linear):
    """nn.Linear plus a low-rank update; made from an existing nn.Linear by `LoraLinear.wrap` (same object)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float

    @classmethod
    def wrap(cls, lin: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
             dtype: torch.dtype | None = torch.float32) -> "LoraLinear":
        """Turn `lin` (a plain nn.Linear) into a LoraLinear in place; returns it. The adapter's weights live on the
        base weight's device, in `dtype` (default float32, also over a bf16 base; None = the base weight's dtype)."""
        if type(lin) is not nn.Linear:
            raise TypeError(f"LoRA wraps plain nn.Linear layers, got {type(lin).__name__}")
        w = lin.weight
        kw = {"device": w.device, "dtype": dtype or w.dtype}
        lin.__class__ = cls
        lin.r, lin.lora_alpha, lin.use_rslora = int(r), float(alpha), bool(use_rslora)
        lin.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        lin.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        lin.lora_A = nn.Linear(lin.in_features, r, bias=False, **kw)
        lin.lora_B = nn.Linear(r, lin.out_features, bias=False, **kw)
        for child in (lin.lora_dropout, lin.lora_A, lin.lora_B):  # new modules follow the layer's train/eval mode
            child.train(lin.training)
        with torch.no_grad():  # PEFT's init_lora_weights=True
            nn.init.kaiming_uniform_(lin.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lin.lora_B.weight)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        a = self.lora_A.weight
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast x themselves
            x = x.to(a.dtype)
        # scaling on the rank-r intermediate (B, T, r), not on the (B, T, out) product: the same value, a smaller pass
        delta = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)
        return y + delta.to(y.dtype)

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Back to a plain nn.Linear (same object) whose weight is W + scaling * B @ A (merged_weight)."""
        w = self.weight
        merged = merged_weight(w, self.lora_A.weight, self.lora_B.weight, self.scaling)
        for name in ("lora_A", "lora_B", "lora_dropout"):
            delattr(self, name)
        for name in ("r", "lora_alpha", "use_rslora", "scaling"):
            self.__dict__.pop(name, None)
        self.__class__ = nn.Linear
        replace_weight(self, merged)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}"


@torch.no_grad()
def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32 and returned in W's dtype on W's device. A new tensor: a
    memory-mapped base weight is never written."""
    delta = (lora_b.float().to(weight.device) @ lora_a.float().to(weight.device)) * scaling
    return (weight.detach().float() + delta).to(weight.dtype)


def replace_weight(lin: nn.Linear, new: torch.Tensor) -> None:
    """Give `lin` the weight `new` (same requires_grad). The old weight's memory-mapped pages leave the resident set
    (cpu/memory.py), so a merged model holds each adapted weight once, not its file pages beside the merged copy."""
    old = lin.weight
    lin.weight = nn.Parameter(new, requires_grad=old.requires_grad)
    if old.device.type == "cpu":
        from ..cpu.memory import release_mapped_pages

        release_mapped_pages(old.detach())


def _split(targets) -> list[str]:
    if isinstance(targets, str):
        items = targets.split(",")
    elif isinstance(targets, (list, tuple, set, frozenset)):
        items = list(targets)
    else:
        raise ValueError(f"targets must be a preset name, a comma-separated string or a list of names; "
                         f"got {type(targets).__name__}")
    bad = [t for t in items if not isinstance(t, str)]
    if bad:
        raise ValueError(f"target names must be strings, got {bad!r}")
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise ValueError(f"no target names given (targets={targets!r}); use a preset ({', '.join(TARGET_PRESETS)}) "
                         f"or module names")
    return names


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last path components of the model's nn.Linear layers (what a target list may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Presets, names (suffix match) or full module paths -> the sorted module paths they select (in module order).

    ValueError for a name that selects nothing (listing the valid names and presets) and for one that selects a
    module that is not an nn.Linear (the depthwise `conv.conv`, a whole block ...), naming both."""
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    unknown, not_linear = [], []
    for t in _split(targets):
        if t in TARGET_PRESETS:
            hits = [n for n in modules if any(re.fullmatch(p, n) for p in TARGET_PRESETS[t])]
        else:
            hits = [n for n in modules if n and (n == t or n.endswith("." + t))]
        if not hits:
            unknown.append(t)
            continue
        wrong = [n for n in hits if not isinstance(modules[n], nn.Linear)]
        if wrong:
            not_linear.append(f"{t!r} selects {_few(wrong)} ({type(modules[wrong[0]]).__name__}, not a Linear)")
            continue
        chosen.update(hits)
    problems = []
    if unknown:
        problems.append(f"unknown target name{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
    if not_linear:
        problems.append("; ".join(not_linear))
    if problems:
        raise ValueError(f"{'; '.join(problems)}. LoRA targets are presets ({', '.join(TARGET_PRESETS)}), linear layer "
                         f"names ({', '.join(linear_names(model))}) or full module paths")
    return [n for n in modules if n in chosen]


def _few(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_hyperparameters(r, alpha, dropout) -> None:
    """ValueError for r <= 0 (or not an integer), alpha <= 0, dropout outside [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def check_rank(r: int, layers: dict[str, nn.Linear]) -> None:
    """ValueError when rank r exceeds min(in_features, out_features) of a layer (B @ A cannot have a higher rank
    there, and A and B would outgrow the weight itself), naming the narrowest layer; checked before anything grows."""
    if not layers:
        return
    name, lin = min(layers.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
    limit = min(lin.in_features, lin.out_features)
    if r > limit:
        raise ValueError(f"LoRA rank r={r} (lora_r) is larger than the targeted layer {name} allows: it is "
                         f"{lin.in_features} in x {lin.out_features} out, so the rank can be at most {limit}")


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets="text",
             use_rslora: bool = False, dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Wrap the target linears of `model` in LoraLinear, in place; returns their module paths.

    A target that already has an adapter, is not a plain nn.Linear (e.g. after optimize_for_cpu or quantization)
    or shares its weight with another module (a tied output head), and a rank above a target's smaller side
    (check_rank), are ValueErrors raised before any module changes."""
    check_hyperparameters(r, alpha, dropout)
    names = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    shared = _shared_weights(model)
    bad = []
    for n in names:
        m = modules[n]
        if type(m) is not nn.Linear:
            bad.append(f"{n} is a {type(m).__name__}" + (" (it has an adapter already)" if isinstance(m, LoraLinear)
                                                           else " (add LoRA before CPU optimisation or quantization)"))
        elif len(shared.get(id(m.weight), ())) > 1:
            bad.append(f"{n} shares its weight with {', '.join(x for x in shared[id(m.weight)] if x != n)}")
    if bad:
        raise ValueError(f"cannot add LoRA to {len(bad)} module{'s' if len(bad) > 1 else ''}: {'; '.join(bad)}")
    check_rank(r, {n: modules[n] for n in names})
    for n in names:
        LoraLinear.wrap(modules[n], r, alpha, dropout, use_rslora, dtype)
    return names


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(weight) -> paths of the modules holding it as `weight` (tied output head and embedding)."""
    out: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        w = m.__dict__.get("_parameters", {}).get("weight")
        if w is not None:
            out.setdefault(id(w), []).append(n)
    return out


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Module path -> LoraLinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' weights (lora_A and lora_B of every LoraLinear), in module order: what LoRA training updates."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Merge every adapter into its weight (plain nn.Linear again, W + scaling * B @ A); returns the merged paths."""
    mods = lora_modules(model)
    for m in mods.values():
        m.merge()
    return list(mods)
