"""Greedy generation parity: our engine's token ids equal transformers' `generate` (float32, 64 new tokens).

The oracle is transformers' Lfm2VlForConditionalGeneration loaded with from_pretrained from the same checkpoint
folder (tiny random weights, tests/checkpoints.py). Pixel inputs: transformers' image processor needs torchvision,
missing in .venv, so transformers is fed the tensors OUR processor produced (the processor's exactness is proven by
its own tests against transformers). Random tiny models can put eos on top early; both sides use
min_new_tokens=64 (eos suppressed), so exactly 64 tokens are compared. Repetition penalty off on both sides.
Also: the cache-free reference generator equals the fast path.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import cached_checkpoint, make_checkpoint
from lfm2vl.engine import Engine, load
from lfm2vl.generate.reference import reference_generate

N = 64
GREEDY = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=N, min_new_tokens=N)


def picture(w, h, seed=0):
    rng = np.random.RandomState(seed)
    base = rng.rand(h // 8 + 1, w // 8 + 1, 3)  # smooth-ish content survives resizing
    return Image.fromarray((np.kron(base, np.ones((8, 8, 1)))[:h, :w] * 255).astype("uint8"))


def user(text, *images):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images] +
             [{"type": "text", "text": text}]}]


CASES = {
    "text": (user("Describe a quiet lake at sunset."), {}),
    "one_image": (user("What is in this image?", picture(384, 256)), {}),
    "tiled_image": (user("Describe it in detail.", picture(1024, 768, 1)), {"max_tiles": 2}),
    "two_images": ([{"role": "system", "content": "You are a helpful multimodal assistant by Liquid AI."},
                    {"role": "user", "content": [{"type": "image", "image": picture(256, 256, 2)},
                                                 {"type": "text", "text": "Compare"},
                                                 {"type": "image", "image": picture(320, 200, 3)},
                                                 {"type": "text", "text": "these two."}]}], {}),
}


def hf_inputs(req, pad_to=None):
    ids = torch.tensor([req.input_ids])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if req.pixel_values is not None:
        kw.update(pixel_values=req.pixel_values, pixel_attention_mask=req.pixel_attention_mask,
                  spatial_shapes=req.spatial_shapes)
    return kw


@torch.no_grad()
def hf_generate(hf, kw):
    out = hf.generate(**kw, do_sample=False, max_new_tokens=N, min_new_tokens=N, repetition_penalty=1.0)
    return out[:, kw["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module", params=["tiny-lfm2vl", "tiny-lfm25vl"])
def pair(request, tmp_path_factory):
    from transformers import Lfm2VlForConditionalGeneration

    folder, _ = cached_checkpoint(tmp_path_factory, request.param)
    hf = Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return load(folder, dtype="float32"), hf


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_ids_equal_transformers(pair, case):
    engine, hf = pair
    messages, knobs = CASES[case]
    req = engine.prepare(messages, **GREEDY, **knobs)
    if case == "tiled_image":
        assert len(req.spatial_shapes) >= 2, "the tiled case must produce several units"
    ours = engine.generate(messages, **GREEDY, **knobs)
    assert ours.completion_tokens == N and ours.finish_reason == "length"
    assert ours.token_ids == hf_generate(hf, hf_inputs(req))[0]


def test_batch_of_two_equals_transformers_left_padded(pair):
    engine, hf = pair
    convs = [CASES["one_image"][0], CASES["text"][0]]
    reqs = [engine.prepare(c, **GREEDY) for c in convs]
    ours = engine.generate(convs, **GREEDY)
    n = max(len(r.input_ids) for r in reqs)
    ids = torch.tensor([[0] * (n - len(r.input_ids)) + r.input_ids for r in reqs])
    mask = torch.tensor([[0] * (n - len(r.input_ids)) + [1] * len(r.input_ids) for r in reqs])
    kw = {"input_ids": ids, "attention_mask": mask, "pixel_values": reqs[0].pixel_values,
          "pixel_attention_mask": reqs[0].pixel_attention_mask, "spatial_shapes": reqs[0].spatial_shapes}
    ref = hf_generate(hf, kw)
    assert [r.token_ids for r in ours] == ref


@pytest.mark.parametrize("case", ["text", "two_images"])
def test_reference_generator_equals_fast_path(pair, case):
    engine, _ = pair
    messages, knobs = CASES[case]
    req = engine.prepare(messages, **GREEDY, **knobs)
    ref = reference_generate(engine.model, req.input_ids, 24, req.pixel_values, req.pixel_attention_mask,
                             req.spatial_shapes, engine.eos_ids, min_new_tokens=24)
    assert engine.generate(messages, **{**GREEDY, "max_new_tokens": 24, "min_new_tokens": 24}).token_ids == ref


@pytest.mark.slow
def test_full_450m_shapes_greedy_ids_equal_transformers(tmp_path):
    """The published LFM2-VL-450M architecture (fixture config) with random weights."""
    from transformers import Lfm2VlForConditionalGeneration

    folder = make_checkpoint(tmp_path / "full", "full_450m")
    engine = load(folder, dtype="float32")
    hf = Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    messages = user("What is in this image?", picture(384, 256))
    req = engine.prepare(messages, **GREEDY)
    assert engine.generate(messages, **GREEDY).token_ids == hf_generate(hf, hf_inputs(req))[0]
