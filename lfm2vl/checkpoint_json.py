"""The one reader of a checkpoint's JSON files (config.json, processor_config.json, tokenizer_config.json, ...).

    cfg = read_json(folder / "config.json", required=True)     # a dict, or a LoadError naming the file
    text = need_object(cfg.get("text_config"), "config.json: text_config")

Every way a file can be unusable ends in a LoadError that names the file and says what it should hold: unreadable,
not UTF-8 text, not JSON, or JSON of the wrong shape (a list, a number, null where an object belongs). An absent
optional file reads as {}. Nothing here imports torch, so the processor can use it on its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .resolve import LoadError


def json_kind(value: Any) -> str:
    """How JSON names the type of a parsed value: object, array, string, number, boolean or null."""
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
        value = json.loads(text)
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
