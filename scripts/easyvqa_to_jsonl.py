"""Convert the easy-vqa data set (the `easy-vqa` package: 64x64 images of one coloured shape, questions about its
shape and colour) to lfm2vl's fine-tuning JSONL.

    python scripts/easyvqa_to_jsonl.py OUT_DIR [--limit N]

writes OUT_DIR/train.jsonl and OUT_DIR/test.jsonl, one conversation a line:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/train/17.png"},
                                               {"type": "text", "text": "what color is the shape?"}]},
                  {"role": "assistant", "content": "blue"}]}

with the images the kept questions use copied into OUT_DIR/images/<split>/ (paths are relative to the JSONL file).
--limit N keeps the first N questions of each split (the package lists an image's questions together, so a
limit keeps fewer images, each with all its questions).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

SPLITS = ("train", "test")


def data_root() -> Path:
    """The package's data folder (questions.json and images/ per split)."""
    try:
        import easy_vqa
    except ImportError:
        raise SystemExit("easyvqa_to_jsonl: the easy-vqa package is not installed (pip install easy-vqa)") from None
    return Path(easy_vqa.__file__).parent / "data"


def read_split(split: str, limit: int | None = None) -> list[tuple[str, str, int]]:
    """[(question, answer, image id)] of a split, in the package's order."""
    rows = json.loads((data_root() / split / "questions.json").read_text())
    return [(q, a, int(i)) for q, a, i in rows[:limit]]


def row(question: str, answer: str, image: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def convert(out_dir: str | Path, limit: int | None = None, splits=SPLITS) -> dict[str, Path]:
    """Write `splits` (both by default) under out_dir -> {split: jsonl path}."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    out_dir = Path(out_dir)
    paths = {}
    for split in splits:
        questions = read_split(split, limit)
        img_dir = out_dir / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        for image_id in sorted({i for _, _, i in questions}):
            src = data_root() / split / "images" / f"{image_id}.png"
            dst = img_dir / src.name
            if not dst.is_file():
                shutil.copyfile(src, dst)
        path = out_dir / f"{split}.jsonl"
        with open(path, "w") as f:
            for q, a, i in questions:
                f.write(json.dumps(row(q, a, f"images/{split}/{i}.png")) + "\n")
        paths[split] = path
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Convert easy-vqa to lfm2vl's fine-tuning JSONL.")
    ap.add_argument("out_dir", help="folder for train.jsonl, test.jsonl and images/")
    ap.add_argument("--limit", type=int, default=None, help="keep the first N questions of each split (default: all)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    for split, path in convert(args.out_dir, args.limit).items():
        n = sum(1 for _ in open(path))
        print(f"{split}: {n} conversations -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
