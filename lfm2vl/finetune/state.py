"""Training-state checkpoints: written atomically, the last good one kept, refused for another model or data.

Layout: OUTPUT/checkpoints/step-0000012/ with
  trainable.safetensors  the trained parameters (LoRA matrices, or every trained weight of a full SFT)
  state.pt               optimizer and scheduler state dicts and the RNG states (python, numpy, torch, cuda);
                         tensors, numbers and lists only, read back with torch.load(weights_only=True)
  state.json             step, epoch, the data order's state, the run's options and the model/data fingerprint
A checkpoint is written into a temporary folder beside it, then renamed into place (files/atomic.py: atomic on one
file system), and only then are older checkpoints removed: a crash or a full disk while writing leaves the previous
checkpoint as it was. Folders whose name starts with '.' (temporaries) are never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import json_kind
from ..files import atomic, jsontext

FOLDER = "checkpoints"
_STEP = re.compile(r"step-(\d+)")


class StateError(ValueError):
    """A checkpoint that cannot be resumed (missing, unreadable, or from another model, data or setup)."""


def save(output: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
         meta: dict) -> Path:
    """Write the checkpoint of `step` under output/checkpoints; returns its folder."""
    from safetensors.torch import save_file

    root = Path(output) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    if not final.exists():  # else the same step saved again (e.g. Ctrl-C right after a scheduled save): same content
        with atomic.folder(final, fsync=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                      str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": rng_state()}, tmp / "state.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    for old in root.iterdir():  # the new one is in place: older ones and stale temporaries go
        if old != final and (old.name.startswith(".step-") or _step_of(old) is not None):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(p: Path) -> int | None:
    m = _STEP.fullmatch(p.name)
    return int(m.group(1)) if m and p.is_dir() else None


def find(path: str | os.PathLike) -> Path:
    """The checkpoint folder for --resume PATH: PATH itself (a step-N folder), or the newest checkpoint of a run's
    output folder (PATH/checkpoints/step-N) or of a checkpoints folder."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    for root in (p / FOLDER, p):
        steps = sorted((s, d) for d in root.iterdir() if (s := _step_of(d)) is not None) if root.is_dir() else []
        steps = [(s, d) for s, d in steps if (d / "state.json").is_file()]
        if steps:
            return steps[-1][1]
    if not p.exists():
        raise StateError(f"--resume {path}: no such folder")
    raise StateError(f"--resume {path}: no checkpoint there (expected a run's output folder with {FOLDER}/step-N, "
                     f"or a step-N folder with state.json)")


def load(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """-> (meta from state.json, trainable tensors, {"optimizer", "scheduler", "rng"}), every part checked for the
    shape `save` writes: a damaged file is a StateError naming it (and, for state.json, the field)."""
    from safetensors.torch import load_file

    meta = read_meta(folder)
    try:
        tensors = load_file(str(folder / "trainable.safetensors"))
    except Exception as e:
        raise StateError(f"{folder / 'trainable.safetensors'} is damaged ({type(e).__name__}: {e})") from None
    try:
        rest = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except OSError as e:
        raise StateError(f"{folder / 'state.pt'} cannot be read ({e.strerror or e})") from None
    except Exception:  # torch's weights_only refusal is a page of advice that does not apply to our own files
        rest = None
    if not (isinstance(rest, dict) and isinstance(rest.get("optimizer"), dict)
            and isinstance(rest.get("scheduler"), dict) and isinstance(rest.get("rng"), dict)):
        raise StateError(damaged_state(folder))
    return meta, tensors, rest


def damaged_state(folder: Path) -> str:
    return f"{folder / 'state.pt'} is damaged (not a checkpoint lfm2vl wrote)"


# state.json's fields -> (what they must be, the check); "order" is batches.Order.state_dict()
_COUNT = ("an integer >= 0", lambda v: type(v) is int and v >= 0)
_POSITIVE = ("an integer >= 1", lambda v: type(v) is int and v >= 1)
_META = {"step": _POSITIVE, "epoch": _COUNT, "total_steps": _POSITIVE,
         "order": ("an object", lambda v: isinstance(v, dict)),
         "options": ("an object", lambda v: isinstance(v, dict)),
         "fingerprint": ("an object", lambda v: isinstance(v, dict))}
_FIELDS = {"order": {"epoch": _COUNT, "position": _COUNT, "seed": _COUNT, "batch_size": _POSITIVE,
                     "world_size": _POSITIVE, "n_samples": _POSITIVE},
           "fingerprint": {"model": ("a string", lambda v: isinstance(v, str)),
                           "data": ("a string", lambda v: isinstance(v, str)), "world_size": _POSITIVE}}


def read_meta(folder: Path) -> dict:
    """state.json of checkpoint `folder`, every field checked: StateError "checkpoint F/state.json is damaged:
    <field> ..." for the first one that is missing or of the wrong kind."""
    path = Path(folder) / "state.json"
    try:
        meta = jsontext.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise StateError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # not UTF-8, not JSON, or nested too deep
        raise StateError(f"checkpoint {path} is damaged: not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise StateError(f"checkpoint {path} is damaged: expected a JSON object, got {json_kind(meta)}")
    problems = _problems(meta, _META, "")
    for name, fields in _FIELDS.items():
        if not problems:
            problems = _problems(meta[name], fields, name + ".")
    if problems:
        raise StateError(f"checkpoint {path} is damaged: {problems[0]}")
    return meta


def _problems(obj: dict, fields: dict, prefix: str) -> list[str]:
    out = []
    for name, (expected, valid) in fields.items():
        if name not in obj:
            out.append(f"{prefix}{name} is missing")
        elif not valid(obj[name]):
            out.append(f"{prefix}{name} must be {expected}, got {json.dumps(obj[name])[:40]}")
    return out


def check_fits(folder: Path, step: int, total: int, tensors: dict[str, torch.Tensor],
               params: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose step lies beyond the run's `total` steps, or whose tensors are not the run's
    trained parameters `params` (names and shapes)."""
    if step > total:
        raise StateError(f"checkpoint {folder / 'state.json'} is damaged: step {step} is beyond this run's {total} "
                         f"steps")
    if set(tensors) != set(params):
        raise StateError(f"checkpoint {folder} holds other trained weights than this run trains")
    bad = [n for n, t in tensors.items() if t.shape != params[n].shape]
    if bad:
        raise StateError(f"{folder / 'trainable.safetensors'} is damaged: {bad[0]} has shape "
                         f"{list(tensors[bad[0]].shape)}, this run trains {list(params[bad[0]].shape)}")


def check_compatible(meta: dict, fingerprint: dict, options: dict, structural) -> None:
    """Refuse to resume a checkpoint of another model, other data or another training setup."""
    old = meta.get("fingerprint", {})
    for what, hint in (("model", "--model"), ("data", "--data")):
        if old.get(what) != fingerprint.get(what):
            raise StateError(f"the checkpoint was trained on a different {what} than {hint} "
                             f"{options.get(what)!r} (it used {meta.get('options', {}).get(what)!r}); resume with "
                             f"the same {what}, or start a new run without --resume")
    saved = meta.get("options", {})
    diff = [f"{k} ({saved.get(k)!r} there, {options.get(k)!r} now)" for k in structural
            if k in saved and saved.get(k) != options.get(k)]
    if old.get("world_size", 1) != fingerprint.get("world_size", 1):
        diff.append(f"number of processes ({old.get('world_size', 1)} there, {fingerprint.get('world_size', 1)} now)")
    if diff:
        raise StateError("the checkpoint was made with other settings: " + ", ".join(diff) +
                         "; resume with the same ones")


# ---- fingerprints ------------------------------------------------------------------------------------------------
def model_fingerprint(folder: Path) -> str:
    """config.json and, for each weight file, its name, size and first and last MiB (cheap for multi-GB files,
    different for any other checkpoint in practice)."""
    h = hashlib.sha256()
    folder = Path(folder)
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        if f.name.startswith("adapter_"):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def data_fingerprint(samples) -> str:
    """The token ids, loss masks and image-unit counts of the samples, in order: what is trained on."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.ids.numpy().tobytes())
        h.update(s.loss_mask.numpy().tobytes())
        h.update(str(getattr(s, "n_units", 0)).encode())
    return h.hexdigest()


# ---- RNG ---------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
