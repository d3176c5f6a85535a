"""Which model answers when none is named: the one home of the default-model rules.

    resolve_model(None)          -> "LiquidAI/LFM2-VL-450M", a folder, or the bundled demo model's folder
    resolve_model("bundled")     -> the bundled folder;  resolve_model("any/thing") -> "any/thing" (as given)

In order:
1. an explicit model (a folder or a hub id) wins; the name `bundled` selects the bundled demo model;
2. else the environment variable LFM2VL_MODEL (a folder, a hub id or `bundled`);
3. else LiquidAI/LFM2-VL-450M when it is in the local Hugging Face cache (config.json and weights in a snapshot),
   or when the hub answers a short TCP connect (never tried when HF_HUB_OFFLINE is set);
4. otherwise the bundled demo model, with one note saying so and how to get the real one.

The bundled model is package data in lfm2vl/bundled/ (config, safetensors weights, tokenizer and processor files);
BUNDLED is read at call time, so tests can point it elsewhere. Nothing here imports torch: the CLIs resolve before
they load.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

BUNDLED = Path(__file__).with_name("bundled")
BUNDLED_NAME = "bundled"
DEFAULT_HUB_MODEL = "LiquidAI/LFM2-VL-450M"
ENV_VAR = "LFM2VL_MODEL"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]  # the files of a hub repo lfm2vl fetches and reads
PROBE_TIMEOUT_S = 2.5  # the whole hub probe: name lookup and TCP connect
TRUE = ("1", "true", "yes", "on")
ORDER_HELP = (f"checkpoint folder, hub id, or '{BUNDLED_NAME}' (the bundled demo model) (default: ${ENV_VAR} if "
              f"set, else {DEFAULT_HUB_MODEL} when it is cached or the hub is reachable, else the bundled demo model)")


class LoadError(ValueError):
    """A checkpoint lfm2vl cannot load (what is wrong and how to fix it is in the message). Defined here, beside
    the rules that pick the model, so resolving needs no torch; loading.py, config.py and the readers of the
    processor and tokenizer files (config.read_json) raise it too."""


class BundledModelWarning(UserWarning):
    """The default model is not available, so the bundled demo model answers (Python API; the CLIs print a line)."""


def bundled_model() -> Path:
    """The folder of the demo model shipped inside the package; a LoadError if this installation lacks its files."""
    folder = BUNDLED
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    raise LoadError(f"the bundled model is missing from this installation (no config.json and *.safetensors in "
                    f"{folder}); reinstall lfm2vl, or name a model: a checkpoint folder or a hub id like "
                    f"{DEFAULT_HUB_MODEL} (--model, model=, or ${ENV_VAR})")


def is_bundled(model) -> bool:
    """Whether a resolved model is the bundled folder."""
    try:
        return Path(model).resolve() == BUNDLED.resolve()
    except (OSError, TypeError):
        return False


def model_label(model) -> str:
    """A short name for a resolved model in messages: `bundled` for the bundled folder, else the model as given."""
    return BUNDLED_NAME if is_bundled(model) else str(model)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def cached_snapshot(repo_id: str = DEFAULT_HUB_MODEL) -> Path | None:
    """The cached snapshot of repo_id's main revision if it holds config.json and safetensors weights, else None.
    Reads the local cache only (no network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), allow_patterns=HUB_PATTERNS,
                                         local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and kin), or an unreadable cache
        return None
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    return None


def hub_endpoint() -> tuple[str, int]:
    """(host, port) of HF_ENDPOINT, or of https://huggingface.co."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within timeout_s, name lookup included (run in a daemon
    thread, so a lookup that hangs costs timeout_s and no more)."""
    host, port = hub_endpoint()
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    t = threading.Thread(target=connect, name="lfm2vl-hub-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(answer and answer[0])


def fallback_note(reason: str) -> str:
    return (f"{DEFAULT_HUB_MODEL} is not cached and {reason}: answering with the bundled demo model (a "
            f"few-million-parameter LFM2-VL trained on toy shapes). For real use: hf download {DEFAULT_HUB_MODEL}, "
            f"or --model PATH.")


def choose_model(model: str | os.PathLike | None) -> tuple[str | Path, str | None]:
    """Apply the rules -> (model to load, note or None). The model is the argument as given (a folder or hub id),
    the bundled folder's Path, or DEFAULT_HUB_MODEL; the note is set only when rule 4 picks the bundled model."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise LoadError(f"model={model!r:.80} is invalid: expected a checkpoint folder, a hub id such as "
                        f"{DEFAULT_HUB_MODEL!r}, {BUNDLED_NAME!r} or None (the default), got {type(model).__name__}")
    if model is None or (isinstance(model, str) and not model.strip()):
        model = os.environ.get(ENV_VAR, "").strip() or None
    if model is not None:
        return (bundled_model() if str(model) == BUNDLED_NAME else model), None
    if cached_snapshot(DEFAULT_HUB_MODEL) is not None:
        return DEFAULT_HUB_MODEL, None
    if hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif hub_reachable():
        return DEFAULT_HUB_MODEL, None
    else:
        host, port = hub_endpoint()
        reason = f"the hub is unreachable ({host}:{port})"
    return bundled_model(), fallback_note(reason)


def resolve_model(model: str | os.PathLike | None = None, *,
                  announce: Callable[[str], None] | None = None) -> str | Path:
    """The model to load for `model` (None: the default rules). When the bundled model stands in for the default,
    announce(note) is called once (default: a BundledModelWarning)."""
    chosen, note = choose_model(model)
    if note is not None:
        if announce is None:
            warnings.warn(note, BundledModelWarning, stacklevel=3)
        else:
            announce(note)
    return chosen


def stderr_announcer(prog: str) -> Callable[[str], None]:
    """announce() for a command line: one line `prog: note` on stderr, from the first process of a torchrun only."""
    def announce(note: str) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: {note}", file=sys.stderr, flush=True)

    return announce
