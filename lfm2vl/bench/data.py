"""Inputs for `lfm2vl bench`: random-weight checkpoints at the published shapes, a small tokenizer, test images.

- `random_checkpoint(shape, folder)`: config from lfm2vl/bench/configs/<shape>.json (450M is the published file;
  1.6B and 3B follow the published models' dimensions), random bf16 weights saved as model.safetensors under the
  checkpoint's own key names, processor files, and a byte-level BPE tokenizer.json (vocab 1024) whose special tokens
  sit at LFM2-VL's real ids. Random weights: timings are those of the real shapes; generated text is meaningless.
- `scenario_inputs(processor, name)`: the prompts the benchmark times (text-only 512 tokens, one 512x512 image,
  one 1024x768 image tiled + thumbnail, two images), built with lfm2vl's processor.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CONFIGS = Path(__file__).with_name("configs")  # shapes, and the published 450M files (also the tests' fixtures)
SHAPES = ("450M", "1.6B", "3B")
SCENARIOS = ("text512", "img512", "img1024x768", "two_images")
N_FIXED = 501  # ids 0..500 hold LFM2-VL's control tokens
CORPUS = [
    "What is in this image? Describe it in detail, including colors, objects and the scene.",
    "The quick brown fox jumps over the lazy dog. A cat sits on a red mat near the window.",
    "There are two dogs playing in the green park, near a small blue lake under a cloudy sky.",
    "A photo of a mountain at sunset, with clouds and a river below, and a road along the valley.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red, green, blue, yellow, purple, orange.",
]


def _special_tokens() -> tuple[dict[int, dict], list[str]]:
    """(LFM2-VL's added tokens by id, the tokens of ids 0..500 in id order); the two ids the published
    tokenizer_config.json does not list get filler strings."""
    dec = json.loads((CONFIGS / "processor" / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    dec = {int(k): v for k, v in dec.items()}
    return dec, [dec[i]["content"] if i in dec else f"<|filler_{i}|>" for i in range(N_FIXED)]


def build_tokenizer(vocab_size: int = 1024, corpus: Sequence[str] = CORPUS):
    """A byte-level BPE tokenizer trained on a tiny corpus (the benchmark's by default; the tests pass their own),
    with LFM2-VL's special tokens at their real ids. Trained once per (vocab_size, corpus)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained(vocab_size, tuple(corpus)))


@lru_cache(maxsize=4)
def _trained(vocab_size: int, corpus: tuple[str, ...]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    dec, specials = _special_tokens()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 8, trainer=trainer)  # the trainer gives `specials` ids 0..500 in order
    # Registered as added tokens too, so the text "<image>" splits out as one token, as in the real file.
    tok.add_special_tokens([AddedToken(v["content"], special=True, normalized=False)
                            for v in dec.values() if v["special"]])
    tok.add_tokens([AddedToken(v["content"], special=False, normalized=False)
                    for v in dec.values() if not v["special"]])
    assert all(tok.token_to_id(t) == i for i, t in enumerate(specials)), "special tokens must keep LFM2-VL's ids"
    return tok.to_str()


def _init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Weights that keep activations in a trained model's range: linears std 1/sqrt(fan_in), residual branch
    outputs scaled down, norms 1, biases 0, embeddings small."""
    if len(shape) == 1:
        return torch.ones(shape) if name.endswith("weight") and "norm" in name else torch.zeros(shape)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=g) * 0.05
    fan_in = int(np.prod(shape[1:]))
    gain = 0.3 if any(k in name for k in ("out_proj", "w2", "fc2")) else 1.0
    return torch.randn(shape, generator=g) * (gain / fan_in ** 0.5)


def random_checkpoint(shape: str | Path, folder: Path, seed: int = 0, corpus: Sequence[str] | None = None,
                      vocab_size: int = 1024, processor_config: dict | None = None) -> Path:
    """Write a random checkpoint to `folder` (kept and reused if complete). shape: one of SHAPES or a config.json.
    corpus / vocab_size: what the tokenizer is trained on (default: the benchmark's corpus); processor_config:
    fields written over the published processor_config.json (image knobs such as max_image_tokens)."""
    from safetensors.torch import save_file

    from ..config import Lfm2VlConfig
    from ..files.atomic import write_file
    from ..model.lfm2vl import Lfm2VlModel

    if str(shape) in SHAPES:
        config_file = CONFIGS / f"{shape}.json"
    elif Path(shape).is_file():
        config_file = Path(shape)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)} or a config.json file")
    folder = Path(folder)
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(config_file.read_text())
    with torch.device("meta"):
        model = Lfm2VlModel(Lfm2VlConfig.from_hf(config))
    tied = model.config.tie_word_embeddings
    g = torch.Generator().manual_seed(seed)
    sd = {n: _init(n, tuple(t.shape), g).to(torch.bfloat16) for n, t in model.state_dict().items()
          if not (tied and n == "lm_head.weight")}
    write_file(folder / "model.safetensors", lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in (CONFIGS / "processor").iterdir():
        shutil.copyfile(f, folder / f.name)
    if processor_config:
        proc = json.loads((folder / "processor_config.json").read_text())
        (folder / "processor_config.json").write_text(json.dumps({**proc, **processor_config}, indent=2))
    build_tokenizer(vocab_size, corpus or CORPUS).save(str(folder / "tokenizer.json"))
    return folder


def test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with some texture (a photo-like input; the content does not change the timings)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 37 + seed), 128 + 100 * np.cos(y / 23), (x + y) % 256], -1)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def scenario_inputs(processor, name: str, image_knobs: dict | None = None) -> tuple[dict, float]:
    """-> (processor batch: input_ids (1, T) + pixel inputs, seconds the processor took). image_knobs: processor
    image options (min/max_image_tokens, do_image_splitting, ...) for the image scenarios, over their own."""
    question = "What is in this image? Describe it in detail."
    knobs: dict = {}
    if name == "text512":
        text = " ".join(CORPUS * 40)
        msgs = [{"role": "user", "content": text}]
        images = []
    elif name in ("img512", "img1024x768", "two_images"):
        sizes = {"img512": [(512, 512)], "img1024x768": [(1024, 768)], "two_images": [(512, 512), (640, 480)]}[name]
        images = [test_image(w, h, i) for i, (w, h) in enumerate(sizes)]
        msgs = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}]
        if name == "img1024x768":
            knobs["use_thumbnail"] = True  # the tiled scenario: tiles plus a thumbnail
        knobs.update(image_knobs or {})
    else:
        raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")
    t = time.perf_counter()
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    batch = processor(text=prompt, images=images or None, **knobs)
    seconds = time.perf_counter() - t
    if name == "text512":  # exactly 512 prompt tokens: keep the template's head and generation-prompt tail
        ids = batch["input_ids"][0]
        batch = {"input_ids": torch.cat([ids[:500], ids[-12:]])[None]}
    return dict(batch), seconds
