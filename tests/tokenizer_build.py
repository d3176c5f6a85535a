"""Build a small byte-level BPE tokenizer.json whose special tokens sit at LFM2's real ids.

The special tokens (ids 0..506: pad, bos, im_start/im_end, <image>, the row/column markers, ...)
are read from the published tokenizer_config.json in tests/fixtures, so tests exercise the same
ids and strings as the real checkpoint; the ordinary vocabulary is trained on a tiny corpus.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

FIXTURE = Path(__file__).parent / "fixtures" / "LFM2-VL-450M"

CORPUS = [
    "What is in this image? Describe it in detail.",
    "The quick brown fox jumps over the lazy dog. A cat sits on a red mat.",
    "You are a helpful multimodal assistant by Liquid AI.",
    "There are two dogs playing in the green park, near a small blue lake.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red, green, blue, yellow.",
    "Héllo wörld! Ünïcode façade, naïve café. 日本語のテキスト。 Emoji: 🙂🚀",
    "def main():\n    print('hello')\n    return 0\n",
    "A photo of a mountain at sunset, with clouds and a river below.",
]


N_FIXED = 501  # ids 0..500 hold LFM2-VL's control tokens; the fixture's few added words above 64000 are left out


def _added_tokens() -> dict[int, dict]:
    cfg = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    return {int(k): v for k, v in cfg["added_tokens_decoder"].items() if int(k) < N_FIXED}


def special_tokens() -> list[str]:
    """Tokens for ids 0..500 in id order; the two ids the fixture does not list get filler strings."""
    dec = _added_tokens()
    return [dec[i]["content"] if i in dec else f"<|filler_{i}|>" for i in range(N_FIXED)]


@lru_cache(maxsize=4)
def _trained(vocab_size: int) -> str:
    specials = special_tokens()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # the trainer assigns ids 0..n-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 8, trainer=trainer)
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s), i)
    # Register them as added tokens so the text "<image>" splits out as one token, as in the real file.
    dec = _added_tokens()
    tok.add_special_tokens([AddedToken(v["content"], special=True, normalized=False)
                            for v in dec.values() if v["special"]])
    tok.add_tokens([AddedToken(v["content"], special=False, normalized=False)
                    for v in dec.values() if not v["special"]])
    assert tok.token_to_id("<image>") == 396
    return tok.to_str()


def build_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE tokenizer with LFM2-VL's special tokens at their real ids."""
    return Tokenizer.from_str(_trained(vocab_size))


def write_tokenizer_files(folder: Path, vocab_size: int = 1024) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    cfg = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(k): v for k, v in _added_tokens().items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        (folder / name).write_text((FIXTURE / name).read_text())
