"""VLMEvalKit's TSV layout: reading benchmark rows and writing / reading predictions files.

Columns: `index`; `image` (base64; a string of at most 64 characters naming another row's index reuses that
row's image; a list literal holds several images) or `image_path` (a path, relative to the file's folder, or a
list literal of paths); `question`; option columns A-Z (only non-empty ones count); `hint`, `category`,
`l2-category`, `split`; `answer`. Empty cells read as missing, as pandas reads them in VLMEvalKit. Predictions
files are the input columns plus `prediction`, so VLMEvalKit can rescore them.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import os
import string
import sys
from dataclasses import dataclass, field

from ..files.atomic import write_file

# A prediction that starts with this marks a row that failed (bad image, engine error): scored wrong, counted.
FAILED_PREFIX = "Failed to obtain answer: "
MAX_REFERENCE_CHARS = 64
PREDICTION = "prediction"


class TSVError(ValueError):
    """Bad input in a TSV file; the message names the file and the row."""


@dataclass
class Row:
    index: str
    images: list[str]                # base64 strings, or paths when images_are_paths
    question: str
    options: dict[str, str]          # letter -> text, non-empty A-Z columns in order
    hint: str | None = None
    category: str | None = None
    l2_category: str | None = None
    split: str | None = None
    answer: str | None = None
    raw: dict[str, str] = field(default_factory=dict)   # every original column, as read
    images_are_paths: bool = False
    source: str = ""                 # the file's name, for messages

    def where(self) -> str:
        return f"{self.source} row index {self.index}"


def _raise_field_limit() -> None:
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _cell(record: dict, key: str) -> str | None:
    value = record.get(key)
    return None if value is None or value == "" else value


def _list_literal(value: str, where: str) -> list[str] | None:
    """`value` as a list of strings when it is a list literal, else None."""
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        items = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise TSVError(f"{where}: unreadable list literal of images ({e})") from None
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise TSVError(f"{where}: expected a list of image strings")
    return list(items)


def read_table(path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the records of a TSV file, as strings."""
    _raise_field_limit()
    name = os.path.basename(os.fspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if not header:
                raise TSVError(f"{name}: empty file, expected a header row")
            records, end = [], reader.line_num
            for cells in reader:  # a quoted cell may span lines: a record's lines run from start to end
                start, end = end + 1, reader.line_num
                if not cells:
                    continue
                if len(cells) != len(header):  # a cell lost or added (a stray tab, a line broken in two)
                    lines = f"line {start}" if start == end else f"lines {start}-{end}"
                    raise TSVError(f"{name} {lines}: {len(cells)} cells but {len(header)} columns")
                records.append(dict(zip(header, cells)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        at = f" near line {reader.line_num}" if isinstance(e, csv.Error) else ""
        raise TSVError(f"{name}: cannot read{at} ({e})") from None
    if "index" not in header:
        raise TSVError(f"{name}: no 'index' column")
    return header, records


def read_rows(path) -> list[Row]:
    """The rows of a benchmark TSV file, images resolved (references followed, list literals split)."""
    _, records = read_table(path)
    return rows_from_records(records, path)


def rows_from_records(records: list[dict[str, str]], path, resolve_images: bool = True) -> list[Row]:
    """Rows from records; with resolve_images=False images stay empty (rescoring needs none)."""
    name = os.path.basename(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    by_index: dict[str, str] = {}
    for rec in records:
        idx = rec.get("index", "")
        if idx == "":
            raise TSVError(f"{name}: a row without an index")
        if idx in by_index:
            raise TSVError(f"{name} row index {idx}: index appears twice")
        by_index[idx] = rec.get("image", "") or ""
    rows = []
    for rec in records:
        idx = rec["index"]
        where = f"{name} row index {idx}"
        images, as_paths = _images(rec, by_index, where, folder) if resolve_images else ([], False)
        rows.append(Row(
            index=idx, images=images, question=rec.get("question", "") or "",
            options={c: rec[c] for c in string.ascii_uppercase if _cell(rec, c) is not None},
            hint=_cell(rec, "hint"), category=_cell(rec, "category"), l2_category=_cell(rec, "l2-category"),
            split=_cell(rec, "split"), answer=_cell(rec, "answer"), raw=dict(rec),
            images_are_paths=as_paths, source=name))
    return rows


def _images(rec: dict, by_index: dict[str, str], where: str, folder: str) -> tuple[list[str], bool]:
    value = _cell(rec, "image")
    if value is not None:
        if len(value) <= MAX_REFERENCE_CHARS:
            target = by_index.get(value)
            if target is None:
                raise TSVError(f"{where}: image refers to row index {value}, which is not in the file")
            if len(target) <= MAX_REFERENCE_CHARS:
                raise TSVError(f"{where}: image refers to row index {value}, whose image is itself a reference")
            value = target
        listed = _list_literal(value, where)
        return (listed if listed is not None else [value]), False
    value = _cell(rec, "image_path")
    if value is not None:
        listed = _list_literal(value, where)
        paths = listed if listed is not None else [value]
        return [p if os.path.isabs(p) else os.path.join(folder, p) for p in paths], True
    return [], False


def decode_images(row: Row):
    """The row's images as RGB PIL images; an undecodable one raises TSVError naming the row."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for k, src in enumerate(row.images):
        what = f"{row.where()}: image {k + 1} of {len(row.images)}"
        try:
            if row.images_are_paths:
                img = Image.open(src)
            else:
                img = Image.open(io.BytesIO(base64.b64decode(src, validate=False)))
            img.load()
            out.append(img.convert("RGB"))
        except FileNotFoundError:
            raise TSVError(f"{what}: no such file {src}") from None
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
            raise TSVError(f"{what}: undecodable image ({type(e).__name__}: {e})") from None
    return out


def write_predictions(path, rows: list[Row], predictions: list) -> None:
    """Write the rows' original columns plus `prediction`, atomically (files/atomic.py)."""
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    header: list[str] = []
    for row in rows:
        for key in row.raw:
            if key not in header and key != PREDICTION:
                header.append(key)
    header.append(PREDICTION)

    def write(tmp) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(header)
            for row, pred in zip(rows, predictions):
                cells = dict(row.raw)
                cells[PREDICTION] = "" if pred is None else str(pred)
                writer.writerow([cells.get(k, "") for k in header])

    write_file(path, write)


def read_predictions(path) -> tuple[list[Row], list[str]]:
    """The rows of a predictions file and their predictions (for rescoring and resuming); images are not
    resolved (a file of some rows may refer to images of rows it lacks)."""
    header, records = read_table(path)
    if PREDICTION not in header:
        raise TSVError(f"{os.path.basename(os.fspath(path))}: no 'prediction' column (not a predictions file)")
    predictions = [rec.pop(PREDICTION) for rec in records]
    return rows_from_records(records, path, resolve_images=False), predictions
