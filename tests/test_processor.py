"""lfm2vl.Processor: size rules, token counts (worked examples), the min_tiles=1 fix, knobs, errors, padding,
loading from folders and the hub cache. Parity with transformers is in test_processor_parity.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import processor_cases as pc
from lfm2vl.processor import Processor, unit_tokens
from lfm2vl.processor.config import ImageOptions, load_settings
from lfm2vl.processor.image import plan_image, round_by_factor, smart_resize, tile_grid


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return Processor.from_pretrained(pc.write_checkpoint(tmp_path_factory.mktemp("v25"), "v25"))


@pytest.fixture(scope="module")
def proc_v1(tmp_path_factory):
    return Processor.from_pretrained(pc.write_checkpoint(tmp_path_factory.mktemp("v1"), "v1"))


def test_round_by_factor_is_bankers():
    assert round_by_factor(400, 32) == 384 and round_by_factor(720, 32) == 704  # 12.5 -> 12, 22.5 -> 22
    assert round_by_factor(432, 32) == 448  # 13.5 -> 14
    assert smart_resize(256, 384, 32, 64 * 1024, 256 * 1024) == (256, 384)


# Worked examples: (W, H) -> (image tokens, total ids of the expansion), LFM2.5 defaults.
WORKED_EXAMPLES = [((384, 256), 96, 98), ((256, 384), 96, 98), ((512, 512), 256, 258), ((1000, 3000), 1011, 1017),
                   ((3000, 1000), 1011, 1017), ((1024, 768), 1770, 1779), ((800, 1200), 1783, 1792), ((64, 64), 64, 66)]


@pytest.mark.parametrize("size,n_img,n_total", WORKED_EXAMPLES)
def test_worked_examples(proc, size, n_img, n_total):
    assert proc.num_image_tokens(*size) == n_img
    assert proc.num_image_tokens(*size, include_markers=True) == n_total
    ids = proc(text="<image>", images=[np.zeros((size[1], size[0], 3), np.uint8)])["input_ids"]
    assert ids.shape == (1, n_total) and int((ids == proc.image_token_id).sum()) == n_img


def test_other_settings(proc, proc_v1):
    assert proc.num_image_tokens(1000, 3000, use_thumbnail=False) == 768
    assert proc_v1.num_image_tokens(1000, 3000) == 768  # v1 450M ships use_thumbnail false
    assert proc.num_image_tokens(640, 640, max_pixels_tolerance=1.5) == 1280
    assert proc.num_image_tokens(640, 640) == 256
    assert proc.num_image_tokens(1000, 3000, do_image_splitting=False) == 243
    assert proc.num_image_tokens(1024, 768, do_image_splitting=False) == 234
    assert proc.num_image_tokens(4000, 100, do_image_splitting=False) == 202


def test_grid_choice():
    assert tile_grid(3000, 1000, 2, 10, 512) == (1, 3)  # never 2x6 (over max_tiles)
    assert tile_grid(768, 1024, 2, 10, 512) == (3, 2)
    assert tile_grid(688, 752, 1, 10, 512) == (1, 1)  # the min_tiles=1 edge case


def test_min_tiles_1_fix(proc):
    """752x688 with min_tiles=1 is 'too large' yet gets a 1x1 grid, i.e. one 512x512 tile (256
    features). transformers expands it to 240 placeholders (smart_resize's 480x512), so its own model fails;
    we count the unit we produce. The committed oracle digests show the reference's inconsistency."""
    out = proc(text="<image>", images=[np.zeros((688, 752, 3), np.uint8)], min_tiles=1)
    assert out["spatial_shapes"].tolist() == [[32, 32]]
    assert int((out["input_ids"] == proc.image_token_id).sum()) == 256 == unit_tokens(32, 32, 2)
    assert proc.num_image_tokens(752, 688, min_tiles=1) == 256
    ref = json.loads(pc.ORACLE_DIGESTS.read_text())["cases"]
    fixed = [c for c in pc.call_cases() if c["knobs"].get("min_tiles") == 1 and c["images"][0][0]["w"] == 752]
    assert fixed
    for c in fixed:
        r = ref[c["id"]]
        assert r["spatial_shapes"]["shape"] == [1, 2] and r["unit_tokens"] == 256
        assert r["n_image_tokens"] == 240  # the reference's placeholders disagree with its own unit


@pytest.mark.parametrize("knobs", [{}, {"use_thumbnail": False}, {"min_tiles": 1}, {"do_image_splitting": False},
                                   {"max_image_tokens": 64, "min_image_tokens": 16}, {"tile_size": 256},
                                   {"max_pixels_tolerance": 1.0, "max_tiles": 4}])
def test_placeholders_match_units(proc, knobs):
    """One source of truth: the placeholders always equal the features the units will give."""
    for w, h in [(1, 1), (50, 700), (640, 640), (752, 688), (1300, 900), (2500, 600)]:
        out = proc(text="a<image>b", images=[Image.new("RGB", (w, h))], **knobs)
        feats = sum(unit_tokens(int(a), int(b), 2) for a, b in out["spatial_shapes"])
        assert int((out["input_ids"] == proc.image_token_id).sum()) == feats == proc.num_image_tokens(w, h, **knobs)


def test_output_contract(proc):
    ims = [np.zeros((300, 200, 3), np.uint8), np.zeros((1000, 3000, 3), np.uint8)]
    out = proc(text=["<image>x", "y<image> much longer text here"], images=ims)
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["pixel_values"].shape == (1 + 4, 1024, 768) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_attention_mask"].dtype == torch.int32 and out["spatial_shapes"].dtype == torch.int64
    # Right padding with the pad id, as transformers' default; left on request.
    am = out["attention_mask"]
    assert am[0, 0] == 1 and am[0, -1] == 0 and am[1].all()
    assert (out["input_ids"][0][am[0] == 0] == proc.tokenizer.pad_token_id).all()
    left = proc(text=["<image>x", "y<image> much longer text here"], images=ims, padding_side="left")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert torch.equal(left["input_ids"][0][left["attention_mask"][0] == 1], out["input_ids"][0][am[0] == 1])
    text_only = proc(text="hello")
    assert set(text_only) == {"input_ids", "attention_mask"}
    assert text_only.to("cpu")["input_ids"].shape[0] == 1


def test_images_flat_nested_and_single(proc):
    a, b = np.zeros((64, 64, 3), np.uint8), np.full((64, 96, 3), 255, np.uint8)
    flat = proc(text=["<image>", "<image>"], images=[a, b])
    nested = proc(text=["<image>", "<image>"], images=[[a], [b]])
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])
    single = proc(text="<image>", images=a)
    assert torch.equal(single["pixel_values"], flat["pixel_values"][:1])


@pytest.mark.parametrize("text,images,match", [
    ("<image><image>", [np.zeros((8, 8, 3), np.uint8)], "2 <image> sentinels"),
    ("<image>", [np.zeros((8, 8, 3), np.uint8)] * 2, "1 <image> sentinels"),
    ("no sentinel", [np.zeros((8, 8, 3), np.uint8)], "0 <image> sentinels"),
    ("<image>", None, "no images"),
    (["<image>", "x"], [[np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8, 3), np.uint8)]], "prompt 1 has 0"),
])
def test_sentinel_mismatch(proc, text, images, match):
    with pytest.raises(ValueError, match=match):
        proc(text=text, images=images)


@pytest.mark.parametrize("knobs,match", [
    ({"max_image_tokens": 0}, "max_image_tokens"), ({"min_image_tokens": 0}, "min_image_tokens"),
    ({"min_image_tokens": 300}, "max_image_tokens"), ({"min_tiles": 0}, "min_tiles"),
    ({"min_tiles": 5, "max_tiles": 3}, "max_tiles"), ({"tile_size": 500}, "tile_size"),
    ({"tile_size": 0}, "tile_size"), ({"resample": 7}, "resample"), ({"max_pixels_tolerance": 0}, "tolerance"),
    ({"max_pixels_tolerance": -1.5}, "tolerance"), ({"use_thumbnail": "yes"}, "use_thumbnail"),
    ({"do_image_splitting": 1}, "do_image_splitting"), ({"max_tiles": 1000}, "max_tiles"),
    ({"bogus_knob": 1}, "unknown image option"),
])
def test_knob_out_of_range(proc, knobs, match):
    with pytest.raises(ValueError, match=match):
        proc(text="<image>", images=[np.zeros((8, 8, 3), np.uint8)], **knobs)
    with pytest.raises(ValueError, match=match):
        proc.num_image_tokens(100, 100, **knobs)


def test_extreme_aspect_is_a_clear_error(proc):
    with pytest.raises(ValueError, match="max_num_patches"):
        proc(text="<image>", images=[np.zeros((10, 4000, 3), np.uint8)], max_image_tokens=64, min_image_tokens=16,
             do_image_splitting=False)


def test_grid_beyond_markers_is_a_clear_error(proc):
    # 100 tiles allowed, and a 20:1 strip: a 1x20 grid has no <|img_row_1_col_20|> marker in the vocabulary.
    with pytest.raises(ValueError, match="marker"):
        proc(text="<image>", images=[np.zeros((512, 10240, 3), np.uint8)], max_tiles=30)


def test_settings_merge(tmp_path):
    """config.json < preprocessor_config.json < processor_config.json < its nested image_processor."""
    (tmp_path / "config.json").write_text(json.dumps({"max_tiles": 4, "min_tiles": 1, "tile_size": 256,
                                                      "use_image_special_tokens": False}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_tiles": 6, "resample": 3,
                                                                   "max_num_patches": 9999}))
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"max_tiles": 8, "use_thumbnail": False, "image_processor": {"max_tiles": 9, "max_pixels_tolerance": 1.5}}))
    s = load_settings(tmp_path)
    assert (s.image.max_tiles, s.image.min_tiles, s.image.tile_size, s.image.resample) == (9, 1, 256, 3)
    assert s.image.use_thumbnail is False and s.image.max_pixels_tolerance == 1.5
    assert s.use_image_special_tokens is False
    assert s.image.max_num_patches == 1024  # recomputed; the JSON value is ignored as in transformers
    assert load_settings(pc.FIXTURE).image.use_thumbnail is False  # the real LFM2-VL-450M files


def test_without_special_tokens(tmp_path):
    folder = pc.write_checkpoint(tmp_path, "v25")
    cfg = json.loads((folder / "processor_config.json").read_text())
    cfg["use_image_special_tokens"] = False
    (folder / "processor_config.json").write_text(json.dumps(cfg))
    p = Processor.from_pretrained(folder)
    ids = p(text="<image>", images=[np.zeros((1000, 3000, 3), np.uint8)])["input_ids"][0]
    assert ids.tolist() == [p.image_token_id] * 1011


def test_processor_knobs_at_load(tmp_path):
    p = Processor.from_pretrained(pc.write_checkpoint(tmp_path, "v25"), max_image_tokens=64, do_image_splitting=False)
    assert p.num_image_tokens(512, 512) == 64
    assert p.num_image_tokens(512, 512, max_image_tokens=256) == 256


def test_special_ids_come_from_the_tokenizer(tmp_path):
    """Nothing hard-coded: a vocabulary with LFM2.5-VL-3B-like ids (image token far from 396) works."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    specials = ["<|pad|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>", "<|image_start|>", "<|image_end|>",
                "<|img_thumbnail|>"] + [f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]
    vocab = {f"w{i}": i for i in range(2000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<image_x>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "image_token": "<image_x>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2001, 5]}))
    p = Processor.from_pretrained(tmp_path)
    assert p.image_token_id == 2000 and p.tokenizer.pad_token_id == 2001
    assert p.tokenizer.eos_token_id == tok.token_to_id("<|im_end|>") and 5 in p.tokenizer.eos_token_ids
    ids = p(text="<image_x>", images=[np.zeros((1000, 3000, 3), np.uint8)])["input_ids"][0].tolist()
    assert ids[0] == tok.token_to_id("<|image_start|>") and ids[-1] == tok.token_to_id("<|image_end|>")
    assert ids[1] == tok.token_to_id("<|img_row_1_col_1|>") and ids.count(2000) == 1011


def test_hub_id_from_cache_and_offline_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    snap = tmp_path / "models--lfm2vl-test--tiny" / "snapshots" / ("a" * 40)
    pc.write_checkpoint(snap, "v25")
    (tmp_path / "models--lfm2vl-test--tiny" / "refs").mkdir()
    (tmp_path / "models--lfm2vl-test--tiny" / "refs" / "main").write_text("a" * 40)
    p = Processor.from_pretrained("lfm2vl-test/tiny", cache_dir=str(tmp_path))
    assert p.num_image_tokens(512, 512) == 256
    with pytest.raises(ValueError, match="not in the local huggingface_hub cache"):
        Processor.from_pretrained("lfm2vl-test/not-cached", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a hub id"):
        Processor.from_pretrained(str(tmp_path / "missing" / "folder"))


def test_plan_matches_reference_formula_on_a_grid():
    """Brute-force the size rules against a literal transcription of transformers' formulas on many sizes (no images
    needed)."""
    o = ImageOptions()
    for w in range(1, 3000, 37):
        for h in (1, 7, 100, 333, 512, 700, 1024, 2999):
            lay = plan_image(h, w, o)
            hb = max(32, round(h / 32) * 32)
            wb = max(32, round(w / 32) * 32)
            if hb * wb > 262144:
                b = math.sqrt(h * w / 262144)
                hb, wb = max(32, math.floor(h / b / 32) * 32), max(32, math.floor(w / b / 32) * 32)
            elif hb * wb < 65536:
                b = math.sqrt(65536 / (h * w))
                hb, wb = math.ceil(h * b / 32) * 32, math.ceil(w * b / 32) * 32
            assert lay.size == (hb, wb)
            too_large = max(16, round(h / 32) * 32) * max(16, round(w / 32) * 32) > 524288
            assert lay.tiled == too_large


def test_positional_order_is_transformers(proc):
    im = np.zeros((64, 64, 3), np.uint8)
    a = proc(im, "<image>hi")
    assert torch.equal(a["input_ids"], proc(text="<image>hi", images=im)["input_ids"])
    with pytest.raises(ValueError, match="text is required"):
        proc("<image>hi")


# ---- transformers' text arguments ----------------------------------------------------------------------------
BATCH = ["<image>x", "y<image> much longer text here"]


def _batch_images():
    return [np.zeros((512, 512, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]  # 256 and 64 image tokens


@pytest.mark.parametrize("padding", [True, "longest"])
def test_padding_longest_is_the_default(proc, padding):
    out = proc(text=BATCH, images=_batch_images(), padding=padding)
    default = proc(text=BATCH, images=_batch_images())
    assert out.keys() == default.keys() and all(torch.equal(out[k], default[k]) for k in out)


@pytest.mark.parametrize("padding", [False, "do_not_pad"])
def test_no_padding_keeps_equal_lengths(proc, padding):
    ims = [np.zeros((64, 64, 3), np.uint8)] * 2
    out = proc(text=["<image>a", "<image>b"], images=ims, padding=padding)
    single = proc(text="<image>a", images=ims[:1], padding=padding)
    assert out["attention_mask"].all() and single["attention_mask"].all()
    assert torch.equal(out["input_ids"][:1], single["input_ids"])


@pytest.mark.parametrize("padding", [False, "do_not_pad"])
def test_no_padding_with_unequal_lengths_is_a_clear_error(proc, padding):
    with pytest.raises(ValueError, match=rf"padding={padding!r}: the prompts are \[\d+, \d+\] tokens long"):
        proc(text=BATCH, images=_batch_images(), padding=padding)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_max_length_pads_to_it(proc, side):
    longest = proc(text=BATCH, images=_batch_images(), padding_side=side)
    n = longest["input_ids"].shape[1]
    out = proc(text=BATCH, images=_batch_images(), padding="max_length", max_length=n + 7, padding_side=side)
    assert out["input_ids"].shape == (2, n + 7)
    real = out["attention_mask"].bool()
    assert (real.sum(1) == longest["attention_mask"].sum(1)).all()
    assert (out["input_ids"][~real] == proc.tokenizer.pad_token_id).all()
    for i in range(2):
        assert torch.equal(out["input_ids"][i][real[i]], longest["input_ids"][i][longest["attention_mask"][i] == 1])
    pad_cols = slice(n, n + 7) if side == "right" else slice(0, 7)
    assert not real[:, pad_cols].any()


def test_prompt_longer_than_max_length_is_a_clear_error(proc):
    with pytest.raises(ValueError, match=r"a prompt is \d+ tokens long, over max_length=10"):
        proc(text=BATCH, images=_batch_images(), padding="max_length", max_length=10)


@pytest.mark.parametrize("truncation", [False, None, "do_not_truncate"])
def test_truncation_off_is_accepted(proc, truncation):
    out = proc(text=BATCH, images=_batch_images(), padding=True, truncation=truncation)
    assert torch.equal(out["input_ids"], proc(text=BATCH, images=_batch_images())["input_ids"])


@pytest.mark.parametrize("truncation", [True, "longest_first", "only_first"])
def test_truncation_is_a_clear_error(proc, truncation):
    with pytest.raises(ValueError, match=rf"truncation={truncation!r} is not supported: cutting a prompt"):
        proc(text=BATCH, images=_batch_images(), truncation=truncation)


def test_return_tensors_np(proc):
    out = proc(text=BATCH, images=_batch_images(), return_tensors="np", padding=True)
    pt = proc(text=BATCH, images=_batch_images())
    assert out.keys() == pt.keys()
    for k, v in out.items():
        assert isinstance(v, np.ndarray) and v.dtype == pt[k].numpy().dtype and np.array_equal(v, pt[k].numpy()), k


@pytest.mark.parametrize("kwargs,match", [
    ({"padding": "max_length"}, "padding='max_length' needs max_length"),
    ({"padding": "max_length", "max_length": 0}, "max_length=0: expected an int >= 1"),
    ({"padding": "max_length", "max_length": 64.0}, "max_length=64.0: expected an int >= 1"),
    ({"max_length": 64}, "max_length=64 applies only with padding='max_length'"),
    ({"padding": False, "max_length": 64}, "max_length=64 applies only with padding='max_length'"),
    ({"padding": "maximum"}, "padding='maximum': expected True or 'longest'"),
    ({"padding": 1}, "padding=1: expected True or 'longest'"),
    ({"return_tensors": "tf"}, "return_tensors='tf': expected 'pt' .* or 'np'"),
])
def test_unsupported_text_arguments_are_named(proc, kwargs, match):
    with pytest.raises(ValueError, match=match):
        proc(text="<image>", images=[np.zeros((8, 8, 3), np.uint8)], **kwargs)
