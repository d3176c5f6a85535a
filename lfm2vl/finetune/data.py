"""Training data: rows of conversations read from JSONL or a Hugging Face dataset on disk, checked into Samples.

JSONL: one conversation a line, {"messages": [...]} in the OpenAI / transformers message format (processor/
messages.py), with an optional top-level "images" list that fills image parts without an image, in order. Image
payloads: paths (relative to the JSONL file's folder, or absolute), http(s) URLs, data: URLs, base64.

Datasets (needs `datasets`: pip install 'lfm2vl[train]'): a save_to_disk folder (of a DatasetDict, its "train"
split), a .parquet file or a folder of them, with a "messages" column and an optional "images" column (a list of
images, datasets' Image feature) whose images fill the {"type": "image"} parts in order: TRL's VLM layout.

Rows are named "train.jsonl line 12" (1-based lines) or "data.parquet row 12" (0-based, as dataset[12]). Every row
is checked before training: malformed JSON or messages, a bad role, a missing or unreadable image, a sentinel /
image count mismatch, no assistant turn, more tokens than max_seq_len (counted exactly by the processor's
render_for_training with the run's image knobs). Samples keep what re-loads their images (a path, a URL's bytes,
a data string, a dataset row number), never decoded pixels: memory stays small for large datasets.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

from jinja2 import TemplateError

from lfm2vl.files import jsontext
from lfm2vl.finetune.batches import Sample
from lfm2vl.processor.image import plan_image
from lfm2vl.processor.io import fetch_url, load_image
from lfm2vl.processor.messages import image_list, to_messages

MAX_LISTED = 20  # bad rows listed in a DataError; the rest are counted


class DataError(ValueError):
    """Training data that cannot be used: the bad rows with their locations and reasons, or no valid row."""


@dataclass
class Row:
    """One conversation as read, before checking: `messages` and the row's "images" list as given; `error` is set
    when the row could not even be read (malformed JSON, not an object). `folder` resolves relative image paths;
    `reload` (dataset rows) reads the row's images again, so a Sample need not hold them."""
    where: str
    messages: list
    images: list = field(default_factory=list)
    error: str | None = None
    folder: Path | None = None
    reload: object = None


def read_rows(path: str | os.PathLike, what: str = "training data") -> Iterator[Row]:
    """The rows of a JSONL file, a save_to_disk folder, a .parquet file or a folder of .parquet files. what: the
    data's role, for the error of a missing path."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            yield from _dataset_rows(_load_from_disk(p), p.name, p)
            return
        files = sorted(p.rglob("*.parquet"))
        if not files:
            raise DataError(f"{p} is a folder with neither a saved dataset (datasets' save_to_disk) nor .parquet "
                            "files; give a JSONL file, a .parquet file or such a folder")
        for f in files:
            yield from _parquet_rows(f, str(f.relative_to(p)))
        return
    if p.suffix == ".parquet":
        yield from _parquet_rows(p, p.name)
        return
    yield from _jsonl_rows(p)


def _jsonl_rows(p: Path) -> Iterator[Row]:
    with open(p, "rb") as f:  # each line decoded on its own: a line that is not UTF-8 is that row's error
        for n, raw in enumerate(f, 1):
            where = f"{p.name} line {n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte order mark may open the file
            except UnicodeDecodeError as e:
                yield Row(where, [], error=f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                           "expected JSON Lines")
                continue
            if not line.strip():
                continue
            try:
                obj = jsontext.loads(line)
            except json.JSONDecodeError as e:
                yield Row(where, [], error=f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield Row(where, [], error=f"expected a JSON object with 'messages', got {type(obj).__name__}")
                continue
            yield Row(where, obj.get("messages"), obj.get("images") or [], folder=p.parent,
                      error=None if "messages" in obj else "no 'messages'")


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading a Hugging Face dataset needs the `datasets` library: "
                        "pip install 'lfm2vl[train]'") from e
    return datasets


def _load_from_disk(p: Path):
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"could not load the saved dataset {p}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"the saved dataset {p} has splits {sorted(ds)} but no 'train' split; save the split "
                            "to train on (dataset_dict['name'].save_to_disk(...)) or name it 'train'")
        ds = ds["train"]
    return ds


def _parquet_rows(p: Path, name: str) -> Iterator[Row]:
    """The rows of one parquet file. A file without rows gives none (datasets cannot load one), so an empty shard
    in a folder is harmless and an empty file alone is load_samples' "no valid row ... (it is empty)"."""
    if _parquet_row_count(p) == 0:
        return
    yield from _dataset_rows(_load_parquet(p), name, p.parent)


def _parquet_row_count(p: Path) -> int | None:
    """The row count in a parquet file's footer; None when it cannot be read (datasets then names the problem)."""
    try:
        import pyarrow.parquet as pq

        return pq.read_metadata(str(p)).num_rows
    except Exception:  # noqa: BLE001 - not a parquet file, or no pyarrow: the dataset loader reports it
        return None


def _load_parquet(p: Path):
    datasets = _datasets()
    try:
        return datasets.Dataset.from_parquet(str(p))
    except Exception as e:
        raise DataError(f"could not read the parquet file {p}: {e}") from e


def _undecoded(ds):
    """The dataset with its image column left encoded ({"bytes", "path"} dicts): decoding is load_image's job."""
    datasets = _datasets()
    feature = ds.features.get("images")
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        feature = type(feature)(datasets.Image(decode=False))
        ds = ds.cast_column("images", feature)
    elif isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column("images", datasets.Image(decode=False))
    return ds


def _encoded(image):
    """An undecoded dataset image ({"bytes", "path"}) -> what load_image reads (the bytes, else the path)."""
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        return image.get("bytes") or image.get("path")
    return image


def _row_images(ds, i: int) -> list:
    return [_encoded(im) for im in image_list(ds[i]["images"])]


def _dataset_rows(ds, name: str, folder: Path) -> Iterator[Row]:
    if "messages" not in ds.column_names:
        raise DataError(f"{name}: the dataset has columns {ds.column_names} but no 'messages' column")
    has_images = "images" in ds.column_names
    ds = _undecoded(ds) if has_images else ds
    for i, row in enumerate(ds):
        images = [_encoded(im) for im in image_list(row.get("images"))] if has_images else []
        yield Row(f"{name} row {i}", row["messages"], images, folder=folder,
                  reload=partial(_row_images, ds, i) if has_images else None)


def _resolve(src, folder: Path | None):
    """A path string -> a Path (relative ones beside the data), so that a missing file reads as one; URLs, data:
    URLs, base64 and other inputs as they are. A string is a path when it names an existing file or contains a
    '.' (base64 never does)."""
    if not isinstance(src, str) or src.startswith(("http://", "https://", "data:")):
        return src
    candidate = Path(src) if os.path.isabs(src) or folder is None else folder / src
    return candidate if candidate.is_file() or "." in src else src


def check_row(row: Row, processor, max_seq_len: int, knobs: dict) -> Sample:
    """A Row -> its Sample; anything wrong is a ValueError with the reason (without the location)."""
    if row.error:
        raise ValueError(row.error)
    if not isinstance(row.messages, (list, tuple)) or not row.messages:
        raise ValueError(f"'messages' must be a non-empty list of {{'role', 'content'}} dicts, got "
                         f"{type(row.messages).__name__ if not isinstance(row.messages, list) else 'an empty list'}")
    if not isinstance(row.images, (list, tuple)):
        raise ValueError(f"'images' must be a list, got {type(row.images).__name__}")
    messages, sources = to_messages(row.messages, list(row.images) or None)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")
    pixels, units, kept = [], 0, []
    o = processor.options(**knobs)
    for k, src in enumerate(sources):
        src = _resolve(src, row.folder)
        try:
            if isinstance(src, str) and src.startswith(("http://", "https://")):
                src = fetch_url(src)  # once: batches read the bytes, never the network
            x = load_image(src)
        except ValueError as e:
            raise ValueError(f"image {k + 1}: {e}") from e
        units += len(plan_image(x.shape[1], x.shape[2], o).unit_sizes())
        pixels.append(x)
        kept.append(src)
    ids, mask = processor.render_for_training(messages, images=pixels, **knobs)
    if len(ids) > max_seq_len:
        raise ValueError(f"{len(ids)} tokens, over max_seq_len={max_seq_len} (shorten it, raise --max-seq-len or "
                         "lower --max-image-tokens)")
    keep = row.reload if row.reload is not None else tuple(kept)
    return Sample(row.where, ids, mask, len(kept), units, keep)


def load_samples(path: str | os.PathLike, processor, max_seq_len: int, skip_bad: bool = False, *,
                 what: str = "training data", **knobs) -> tuple[list[Sample], list[str]]:
    """Read and check every row of `path` -> (samples, skipped: "where: reason" of each bad row). `knobs` are the
    run's image knobs (min_image_tokens, max_image_tokens, do_image_splitting, ...; None keeps the default).
    Without skip_bad any bad row is a DataError listing them; no valid row is a DataError either way. what: the
    data's role in the messages ("training data", "evaluation data")."""
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len!r}: expected an int >= 1")
    processor.options(**knobs)  # unknown or out-of-range knobs fail here, not once per row
    samples, bad = [], []
    for row in read_rows(path, what):
        try:
            samples.append(check_row(row, processor, max_seq_len, knobs))
        except (ValueError, TemplateError) as e:  # TemplateError: the chat template's raise_exception
            bad.append(f"{row.where}: {e}")
    if bad and not skip_bad:
        raise DataError(_listing(f"{len(bad)} bad row{'s' if len(bad) > 1 else ''} in {path} (fix them or skip "
                                 "them with --skip-bad / skip_bad=True):", bad))
    if not samples:
        head = f"no valid row in {path}"
        raise DataError(_listing(head + ":", bad) if bad else head + " (it is empty)")
    return samples, bad


def _listing(head: str, bad: list[str]) -> str:
    lines = [head, *("  " + b for b in bad[:MAX_LISTED])]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    return "\n".join(lines)
