"""Load an LFM2-VL checkpoint (local folder or Hugging Face hub id) into `Lfm2VlModel`.

- Resolves a hub id through huggingface_hub's cache (`snapshot_download`, only the files lfm2vl needs; honours
  HF_HUB_OFFLINE). Offline and not cached: a LoadError naming the id and how to point at a local folder.
- Reads safetensors only (single file or shards listed in model.safetensors.index.json); never unpickles.
- Builds the module on the meta device (skipping its random init), then `load_state_dict(strict=True, assign=True)`,
  so weights are not allocated twice: float weights of the checkpoint's dtype stay memory-mapped from the file.
- What the mapping means for resident memory, and how pages are dropped again: cpu/memory.py.
- All key differences between published layouts are handled in ONE place: `remap_hf_keys()`.
- Before loading, names and shapes are compared with the model, so errors list every missing, unexpected or
  mis-shaped tensor instead of failing deep inside torch.
Default dtype is bfloat16 (the published checkpoints' own dtype, and faster than float32 on CPU);
pass dtype=torch.float32 for exact reference comparisons.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .config import need_object, read_json
from .config import Lfm2VlConfig
from .model.lfm2vl import Lfm2VlModel
from .resolve import HUB_PATTERNS, LoadError  # noqa: F401  (LoadError is raised here and imported from here)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# Llava-style prefixes of transformers < 4.52 (checkpoint key prefix -> ours)
_LEGACY_PREFIXES = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector.")]
_EMBED = "model.language_model.embed_tokens.weight"


def load_model(path_or_hub_id: str | os.PathLike, *, dtype=None, device=None, progress=None):
    """Load a checkpoint -> (model in eval mode, Lfm2VlConfig, resolved folder Path).

    dtype: torch dtype or "float32"/"bfloat16"/"float16" (default bfloat16); device: "cpu", "cuda", ... (default cpu).
    progress: optional callback(bytes_read, total_bytes) while the weights are read (the CLI's progress bar).
    """
    dtype = parse_dtype(dtype)
    device = check_device(device)
    folder = resolve_folder(path_or_hub_id)
    config = Lfm2VlConfig.from_file(folder)
    raw = read_safetensors(folder, dtype, device, progress)
    model = meta_model(config)
    sd = remap_hf_keys(raw, config)
    check_state_dict(sd, model)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left}"
    return model.eval(), config, folder


def meta_model(config: Lfm2VlConfig) -> Lfm2VlModel:
    """The model's modules on the meta device: shapes without memory (load_model assigns the weights)."""
    with torch.device("meta"), _SkipRandomInit():
        return Lfm2VlModel(config)


class _SkipRandomInit(TorchFunctionMode):
    """Skips normal_/uniform_ on meta tensors while the module is built: assign-loading replaces every tensor anyway,
    and torch's meta `normal_` (nn.Embedding's init) imports torch._dynamo, which costs resident memory and time."""

    _SKIP = (torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_,
             torch.Tensor.normal_, torch.Tensor.uniform_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._SKIP:
            t = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


DEVICE_FORMS = "cpu, cuda, cuda:N (the N-th GPU) or mps"


def parse_device(device) -> torch.device:
    """None (= cpu), a device name or a torch.device -> torch.device; a name torch does not know is a LoadError."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise LoadError(f"device must be a name like {DEVICE_FORMS}, got {type(device).__name__} {device!r}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise LoadError(f"device {device!r} is not a known device; use {DEVICE_FORMS}") from None


def check_device(device) -> torch.device:
    """parse_device, then a LoadError if this machine cannot run on it (no CUDA, no such GPU, no MPS)."""
    dev = parse_device(device)
    name = str(device)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"device {name!r}: CUDA is not available (no usable NVIDIA GPU, or torch "
                            f"{torch.__version__} was built without CUDA); use device 'cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise LoadError(f"device {name!r}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                            f"(cuda:0 to cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise LoadError(f"device {name!r}: Apple's MPS backend is not available on this machine; use device "
                            "'cpu'")
        return dev
    raise LoadError(f"device {name!r} is not supported; use {DEVICE_FORMS}")


def parse_dtype(dtype) -> torch.dtype:
    """A dtype or its name (None: bfloat16) -> the torch dtype; LoadError for one load_model does not take."""
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise LoadError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")


def resolve_folder(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id ("owner/name") resolved through the huggingface_hub cache."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise LoadError(f"{p} is a file; pass the checkpoint folder (with config.json and *.safetensors)")
    s = str(path_or_hub_id)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) or s.startswith((".", "/", "~")):
        raise LoadError(f"{s} does not exist (neither a local folder nor a hub id like 'LiquidAI/LFM2-VL-450M')")
    from huggingface_hub import snapshot_download  # resolve lazily: local loads need no hub client

    try:
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, not cached, no such repo, network down: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise LoadError(f"could not get hub model {s!r} ({why}). Download it where you have network access "
                        f"(`hf download {s} --local-dir DIR`) and pass the local folder DIR "
                        f"instead of the id") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wmap = need_object(read_json(index).get("weight_map"), f"{index}: weight_map (tensor name -> shard file)")
        if not all(isinstance(f, str) for f in wmap.values()):
            raise LoadError(f"{index}: weight_map must map tensor names to shard file names (strings)")
        files = [folder / f for f in sorted(set(wmap.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{index.name} lists shards that are not in {folder}: {missing}")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("adapter_"))
    if files:
        return files
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise LoadError(f"{folder} has only pickle checkpoints ({', '.join(pickles)}); lfm2vl reads safetensors "
                        f"only and never unpickles. Convert them to model.safetensors first (e.g. load with "
                        f"transformers and save_pretrained(..., safe_serialization=True))")
    raise LoadError(f"{folder} has no *.safetensors weights")


def read_safetensors(folder: Path, dtype: torch.dtype, device: torch.device,
                     progress=None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (memory-mapped reads), floating ones cast to dtype, on device."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    files = _weight_files(folder)
    total, done = sum(f.stat().st_size for f in files), 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    t = sf.get_tensor(k)
                    out[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    if progress is not None:
                        done += t.numel() * t.element_size()
                        progress(min(done, total), total)
        except LoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers / truncated data
            raise LoadError(f"{f} is not a valid safetensors file ({type(e).__name__}: {e}); "
                            f"re-download or re-save it") from None
    if progress is not None:
        progress(total, total)
    return out


def remap_hf_keys(sd: dict[str, torch.Tensor], config: Lfm2VlConfig) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> our module keys. The only place where published layouts differ:
    - legacy llava-style prefixes (`language_model.model.` ...) -> `model.language_model.` ...;
    - `model.vision_tower.vision_model.*` (custom-code era, LFM2.5 hub files) -> `model.vision_tower.*`;
    - vision layers beyond num_layers_used (vision_feature_layer = -2) and unused `position_ids` buffers: dropped;
    - tied lm_head: any stored copy is dropped and the embedding is used (the module ties them again)."""
    used = config.vision_config.num_layers_used
    out = {}
    for k, t in sd.items():
        for old, new in _LEGACY_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        k = k.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1)
        if k.startswith("model.vision_tower.") and k.endswith("position_ids"):
            continue
        m = re.match(r"model\.vision_tower\.encoder\.layers\.(\d+)\.", k)
        if m and int(m.group(1)) >= used:
            continue
        out[k] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
        if _EMBED in out:
            out["lm_head.weight"] = out[_EMBED]
    return out


def check_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise a LoadError listing every missing, unexpected and mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)}, config expects {expected[k]}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        hint = " (tie_word_embeddings is false, so lm_head.weight must be stored)" if "lm_head.weight" in missing else ""
        problems.append(f"missing tensors{hint}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped tensors: {_listing(shapes)}")
    if problems:
        raise LoadError("checkpoint does not match its config.json; " + "; ".join(problems))


def _listing(items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
