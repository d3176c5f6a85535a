"""The tests' tokenizer files: lfm2vl.bench.data's byte-level BPE builder, trained on the tests' own corpus.

The special tokens (ids 0..500: pad, bos, im_start/im_end, <image>, the row/column markers, ...) come from the
published LFM2-VL-450M tokenizer_config.json that the benchmark ships (lfm2vl/bench/configs/processor, the tests'
FIXTURE), so tests exercise the same ids and strings as the real checkpoint; the ordinary vocabulary is trained on
the tiny corpus below.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from lfm2vl.bench import data

# The published LFM2-VL-450M files: processor and tokenizer configs, chat template (the tokenizer_config.json
# without the few added words above id 64000, which a 1024-token vocabulary cannot hold), and config.json.
FIXTURE = data.CONFIGS / "processor"
FIXTURE_CONFIG = data.CONFIGS / "450M.json"

CORPUS = (
    "What is in this image? Describe it in detail.",
    "The quick brown fox jumps over the lazy dog. A cat sits on a red mat.",
    "You are a helpful multimodal assistant by Liquid AI.",
    "There are two dogs playing in the green park, near a small blue lake.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red, green, blue, yellow.",
    "Héllo wörld! Ünïcode façade, naïve café. 日本語のテキスト。 Emoji: 🙂🚀",
    "def main():\n    print('hello')\n    return 0\n",
    "A photo of a mountain at sunset, with clouds and a river below.",
)


def build_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE tokenizer with LFM2-VL's special tokens at their real ids."""
    return data.build_tokenizer(vocab_size, CORPUS)


def write_tokenizer_files(folder: Path, vocab_size: int = 1024) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    cfg = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        (folder / name).write_text((FIXTURE / name).read_text())
