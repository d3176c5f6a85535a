"""Processor parity cases, shared by the pytest side (.venv) and scripts/oracle_processor.py (.venv-oracle).

Only numpy, PIL and lfm2vl's pure layout code are used here, so both environments build byte-identical inputs:
images are integer-only functions of a seed (gradients, shapes, noise), so no float or BLAS differences can creep
in. Each case: prompts, per-prompt image specs, per-call knobs (other call arguments under "call"), and which
checkpoint settings ("v25": LFM2.5 defaults, use_thumbnail true; "v1": the LFM2-VL-450M fixture, use_thumbnail
false). Chat cases also carry messages.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# a path, not an import: the oracle environment reads this module too, and must not import lfm2vl (or torch)
CONFIGS = Path(__file__).resolve().parent.parent / "lfm2vl" / "bench" / "configs"

# The published LFM2-VL-450M files, as the benchmark ships them (tests/tokenizer_build.py names them too).
FIXTURE = CONFIGS / "processor"
FIXTURE_CONFIG = CONFIGS / "450M.json"
ORACLE_DIGESTS = Path(__file__).parent / "data" / "processor_oracle.json"
LFM25_TEMPLATE = Path(__file__).parent / "fixtures" / "lfm25_chat_template.jinja"

# LFM2.5-VL-style settings (processor_config.json["image_processor"]).
V25_IMAGE_PROCESSOR = {
    "image_processor_type": "Lfm2VlImageProcessor", "do_image_splitting": True, "min_tiles": 2, "max_tiles": 10,
    "use_thumbnail": True, "min_image_tokens": 64, "max_image_tokens": 256, "encoder_patch_size": 16,
    "tile_size": 512, "max_pixels_tolerance": 2.0, "downsample_factor": 2, "resample": 2, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
# Keys of Lfm2VlImageProcessor's constructor, to build the reference from a merged settings dict.
REF_KEYS = ("do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail", "min_image_tokens", "max_image_tokens",
            "encoder_patch_size", "tile_size", "max_pixels_tolerance", "downsample_factor", "resample", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std")


# ---- checkpoints ----------------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, kind: str, template: str | None = None) -> Path:
    """A processor folder: tokenizer files (tests/tokenizer_build) plus v1 or v25 processor configs."""
    from tokenizer_build import write_tokenizer_files
    folder = Path(folder)
    write_tokenizer_files(folder)
    if kind == "v1":
        shutil.copy(FIXTURE_CONFIG, folder / "config.json")
        for n in ("preprocessor_config.json", "processor_config.json"):
            shutil.copy(FIXTURE / n, folder / n)
    else:
        cfg = {"image_processor": V25_IMAGE_PROCESSOR, "processor_class": "Lfm2VlProcessor",
               "use_image_special_tokens": True}
        (folder / "processor_config.json").write_text(json.dumps(cfg, indent=2))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def reference_settings(kind: str) -> dict:
    """The image-processor kwargs the reference is built with for a checkpoint kind (what the files say)."""
    if kind == "v1":
        src = json.loads((FIXTURE / "processor_config.json").read_text())
        src = {**V25_IMAGE_PROCESSOR, **src}
    else:
        src = V25_IMAGE_PROCESSOR
    return {k: src[k] for k in REF_KEYS}


# ---- images ---------------------------------------------------------------------------------------------------
def make_array(w: int, h: int, seed: int) -> np.ndarray:
    """Deterministic uint8 (h, w, 3) image: integer gradients, a few discs, and noise (integer math only)."""
    rs = np.random.RandomState(seed)
    y = np.arange(h, dtype=np.int32)[:, None]
    x = np.arange(w, dtype=np.int32)[None, :]
    img = np.empty((h, w, 3), dtype=np.int16)
    for c in range(3):
        p, q, s = rs.randint(1, 9), rs.randint(1, 9), rs.randint(0, 4)
        img[..., c] = ((x * p + y * q) >> s) & 255
    for _ in range(4):
        cx, cy, r = rs.randint(0, max(w, 1)), rs.randint(0, max(h, 1)), rs.randint(1, max(2, min(w, h) // 3 + 2))
        color = rs.randint(0, 256, 3)
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        disc = (x[:, x0:x1] - cx) ** 2 + (y[y0:y1] - cy) ** 2 < r * r
        img[y0:y1, x0:x1][disc] = color
    img += rs.randint(-24, 25, size=(h, w, 3), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(spec: dict, workdir: Path):
    """The input object a case passes: PIL (default), numpy (H, W, 3), torch (3, H, W), or a file path."""
    arr = make_array(spec["w"], spec["h"], spec["seed"])
    kind = spec.get("as", "pil")
    mode = spec.get("mode", "RGB")
    if kind == "np":
        if mode == "RGBA":
            return np.dstack([arr, make_array(spec["w"], spec["h"], spec["seed"] + 1)[..., 0]])
        return arr[..., 0] if mode == "L" else arr
    if kind == "pt":
        import torch
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    im = Image.fromarray(arr)
    if mode == "RGBA":
        a = make_array(spec["w"], spec["h"], spec["seed"] + 1)[..., 0]
        im = Image.fromarray(np.dstack([arr, a]), "RGBA")
    elif mode != "RGB":
        im = im.convert(mode)
    if kind in ("png", "jpg", "exif"):
        path = Path(workdir) / f"img_{spec['w']}x{spec['h']}_{spec['seed']}_{kind}_{mode}.{ 'png' if kind == 'png' else 'jpg'}"
        if not path.exists():
            if kind == "exif":
                ex = Image.Exif()
                ex[0x0112] = spec.get("orientation", 6)
                im.save(path, quality=90, exif=ex)
            else:
                im.save(path, **({"quality": 90} if kind == "jpg" else {}))
        return str(path)
    return im


# ---- cases ----------------------------------------------------------------------------------------------------
def _img(w, h, seed, **kw):
    return {"w": w, "h": h, "seed": seed, **kw}


def _knobs(rng: random.Random) -> dict:
    k = {}
    if rng.random() < 0.5:
        k["min_image_tokens"] = rng.choice([16, 32, 64, 100])
    if rng.random() < 0.5:
        k["max_image_tokens"] = rng.choice([64, 128, 200, 256, 400])
    if "min_image_tokens" in k and "max_image_tokens" in k and k["max_image_tokens"] < k["min_image_tokens"]:
        k["max_image_tokens"] = k["min_image_tokens"]
    if rng.random() < 0.3:
        k["do_image_splitting"] = rng.random() < 0.5
    if rng.random() < 0.5:
        k["min_tiles"] = rng.choice([1, 2, 3])
    if rng.random() < 0.5:
        k["max_tiles"] = rng.choice([2, 4, 6, 9, 10])
    if k.get("min_tiles", 2) > k.get("max_tiles", 10):
        k["max_tiles"] = k.get("min_tiles", 2)
    if rng.random() < 0.5:
        k["use_thumbnail"] = rng.random() < 0.5
    if rng.random() < 0.5:
        k["max_pixels_tolerance"] = rng.choice([1.0, 1.5, 2.0, 3.0])
    if rng.random() < 0.3:
        k["tile_size"] = rng.choice([256, 384, 512])
    if rng.random() < 0.25:
        k["resample"] = rng.choice([0, 2, 3])
    return k


def upright_size(spec: dict) -> tuple[int, int]:
    """(width, height) the model sees: EXIF orientations 5-8 swap the stored sides."""
    turned = spec.get("as") == "exif" and spec.get("orientation", 6) in (5, 6, 7, 8)
    return (spec["h"], spec["w"]) if turned else (spec["w"], spec["h"])


def _fits(case: dict) -> bool:
    """Cases where every unit fits max_num_patches (outside that the reference silently crops; we raise)."""
    from lfm2vl.processor.config import ImageOptions
    from lfm2vl.processor.image import plan_image
    base = reference_settings(case["ckpt"])
    o = ImageOptions(**{**{k: base[k] for k in REF_KEYS if k not in ("image_mean", "image_std")},
                        **case["knobs"]})
    for group in case["images"]:
        for s in group:
            w, h = upright_size(s)
            lay = plan_image(h, w, o)
            for uh, uw in lay.unit_sizes():
                if (uh // o.encoder_patch_size) * (uw // o.encoder_patch_size) > o.max_num_patches:
                    return False
            if lay.tiled and (lay.rows > 10 or lay.cols > 10):
                return False
    return True


def call_cases() -> list[dict]:
    rng = random.Random(1234)
    cases = []

    def add(images, texts=None, knobs=None, ckpt="v25", tag=""):
        texts = texts or ["<image>" * len(g) + "Describe." for g in images]
        c = {"id": f"c{len(cases):03d}{'-' + tag if tag else ''}", "kind": "call", "ckpt": ckpt, "texts": texts,
             "images": images, "knobs": knobs or {}}
        if _fits(c):
            cases.append(c)

    # Worked examples (test_processor.py) and edge sizes, default knobs, both checkpoints.
    named = [(384, 256), (256, 384), (512, 512), (1000, 3000), (3000, 1000), (1024, 768), (800, 1200), (64, 64),
             (1, 1), (10, 4000), (4000, 10), (4000, 100), (100, 4000), (3000, 3000), (4000, 3000), (3000, 4000),
             (2, 3), (31, 33), (400, 720), (720, 400), (1920, 1080), (640, 640), (752, 688), (1536, 1536)]
    for i, (w, h) in enumerate(named):
        for ckpt in ("v25", "v1"):
            if ckpt == "v1" and w * h >= 9_000_000:
                continue  # keep the big ones few
            add([[_img(w, h, i)]], ckpt=ckpt, tag=f"{w}x{h}")
    # Tolerance 1.5 vs 2.0, min_tiles 1 vs 2, thumbnail on/off at the boundaries.
    for tol in (1.5, 2.0):
        for (w, h) in [(640, 640), (700, 500), (724, 724), (1000, 700)]:
            add([[_img(w, h, 7)]], knobs={"max_pixels_tolerance": tol}, tag=f"tol{tol}")
    for mt in (1, 2):
        for (w, h) in [(752, 688), (700, 700), (1200, 1100), (2000, 500), (900, 880)]:
            for thumb in (True, False):
                add([[_img(w, h, 11)]], knobs={"min_tiles": mt, "use_thumbnail": thumb}, tag=f"mt{mt}")
    # Every knob on its own.
    for knob, values in [("min_image_tokens", [16, 100, 256]), ("max_image_tokens", [64, 128, 400]),
                         ("do_image_splitting", [False, True]), ("max_tiles", [2, 4, 6]),
                         ("tile_size", [256, 384]), ("resample", [0, 3]), ("use_thumbnail", [False, True])]:
        for v in values:
            for (w, h) in [(300, 200), (1500, 900), (900, 1800)]:
                add([[_img(w, h, 3)]], knobs={knob: v}, tag=knob)
    # Random sizes and random knob combinations.
    for i in range(70):
        w = rng.choice([rng.randint(1, 64), rng.randint(64, 700), rng.randint(700, 2200)])
        h = rng.choice([rng.randint(1, 64), rng.randint(64, 700), rng.randint(700, 2200)])
        if max(w, h) > 5 * min(w, h):
            h = max(h, w // 5)
            w = max(w, h // 5)
        add([[_img(w, h, 100 + i)]], knobs=_knobs(rng), ckpt=rng.choice(["v25", "v25", "v1"]), tag="rand")
    # Input kinds: numpy, torch, files (PNG, JPEG, EXIF-rotated JPEG), modes converted to RGB.
    for i, kind in enumerate(["np", "pt", "png", "jpg", "exif"]):
        for (w, h) in [(333, 222), (1300, 700)]:
            add([[_img(w, h, 200 + i, **{"as": kind})]], tag=kind)
    for (orient) in (3, 6, 8):
        add([[_img(900, 500, 210, **{"as": "exif", "orientation": orient})]], tag=f"exif{orient}")
    for mode in ("L", "RGBA", "P", "CMYK", "LA"):
        add([[_img(420, 300, 220, mode=mode)]], tag=mode)
    for mode in ("L", "RGBA"):  # arrays: (H, W) grayscale, (H, W, 4) composited with transformers' float math
        add([[_img(420, 300, 221, mode=mode, **{"as": "np"})]], tag=f"np{mode}")
    # Multi-image prompts and batches (flat per prompt, nested per sample, text-only rows).
    add([[_img(300, 200, 300), _img(1200, 900, 301), _img(50, 60, 302)]],
        texts=["First <image> then <image>, last <image>."], tag="multi")
    add([[_img(640, 480, 303), _img(480, 640, 304)]], texts=["<image><image>Compare."], knobs={"use_thumbnail": False},
        tag="multi")
    add([[_img(300, 300, 305)], [_img(1600, 1200, 306)], [_img(10, 500, 307)]],
        texts=["<image>What?", "Look: <image> here, and a much longer prompt follows to force padding.", "<image>"],
        tag="batch")
    add([[_img(700, 400, 308), _img(400, 700, 309)], []],
        texts=["<image> and <image>", "no image in this row at all"], tag="batch")
    add([[], []], texts=["only text", "more text here"], tag="text")
    # transformers' per-call use_image_special_tokens (not an image knob).
    for (w, h) in [(400, 300), (1600, 900)]:
        add([[_img(w, h, 320)]], tag="nospecial")
        cases[-1]["call"] = {"use_image_special_tokens": False}
    # transformers' text arguments: padding, truncation, max_length, return_tensors (the reference is called with
    # padding=True and return_tensors="pt" unless a case says otherwise).
    unequal = [[_img(64, 64, 330)], [_img(64, 64, 331)]], ["<image>Short.", "<image>A longer second prompt here."]
    equal = [[_img(64, 64, 332)], [_img(64, 64, 333)]], ["<image>Same.", "<image>Same."]  # equal lengths
    for call in ({"padding": "longest"}, {"padding": False}, {"padding": "max_length", "max_length": 160},
                 {"padding": True, "truncation": False}, {"return_tensors": "np"}):
        add(*unequal, tag="textargs")
        cases[-1]["call"] = call
    for call in ({"padding": False}, {"padding": "do_not_pad", "truncation": None}):
        add(*equal, tag="textargs")
        cases[-1]["call"] = call
    add([[_img(300, 200, 334)]], tag="textargs")
    cases[-1]["call"] = {"padding": False}
    return cases


def chat_cases() -> list[dict]:
    """Conversations rendered with the checkpoint template, then processed with their images."""
    sys_msg = {"role": "system", "content": "You are a helpful multimodal assistant by Liquid AI."}
    img = {"type": "image"}
    convs = [
        [{"role": "user", "content": [img, {"type": "text", "text": "What is in this image?"}]}],
        [sys_msg, {"role": "user", "content": [img, {"type": "text", "text": "Describe."}]}],
        [sys_msg, {"role": "user", "content": [{"type": "text", "text": "Two: "}, img, img]},
         {"role": "assistant", "content": "A cat and a dog."},
         {"role": "user", "content": [{"type": "text", "text": "And this one?"}, img]}],
        [{"role": "user", "content": "Plain text, no image. Héllo wörld 🙂"},
         {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again?"}],
    ]
    sizes = [[(640, 480)], [(1000, 3000)], [(300, 200), (256, 256), (2000, 1000)], []]
    out = []
    for i, (conv, sz) in enumerate(zip(convs, sizes)):
        for template in ("fixture", "lfm25"):
            for gen in (True, False):
                out.append({"id": f"chat{i}-{template}-{int(gen)}", "kind": "chat", "ckpt": "v25", "template": template,
                            "messages": conv, "add_generation_prompt": gen, "knobs": {},
                            "images": [[_img(w, h, 400 + i * 5 + j) for j, (w, h) in enumerate(sz)]]})
    return out


def all_cases() -> list[dict]:
    return call_cases() + chat_cases()


# ---- digests --------------------------------------------------------------------------------------------------
def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]


def digest(out: dict, image_token_id: int, text: list[str] | None = None) -> dict:
    """Shapes and hashes of a processor output. pixel_values are exact functions of uint8 levels, so they are
    hashed as levels round((pv*0.5+0.5)*255); `pv_level_err` is the largest distance of pv from such a level
    (0 up to float rounding) so two outputs with equal level hashes agree to that error."""
    d = {}
    for k in ("input_ids", "attention_mask", "pixel_attention_mask", "spatial_shapes"):
        if k in out:
            a = np.asarray(out[k])
            d[k] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha": _sha(a.astype(np.int64))}
    if "pixel_values" in out:
        pv = np.asarray(out["pixel_values"], dtype=np.float32)
        real = np.asarray(out["pixel_attention_mask"]).astype(bool)
        levels = np.rint((pv.astype(np.float64) * 0.5 + 0.5) * 255)
        levels[~real] = 0  # padding rows are hashed as zeros and checked to be exactly 0.0 below
        d["pixel_values"] = {"shape": list(pv.shape), "dtype": str(pv.dtype),
                             "sha": _sha(levels.astype(np.uint8)),
                             "pv_level_err": float(np.abs(pv[real] - (levels[real] - 127.5) / 127.5).max(initial=0)),
                             "pad_zero": bool((pv[~real] == 0).all())}
        shapes = np.asarray(out["spatial_shapes"])
        d["unit_tokens"] = int(sum(-(-int(h) // 2) * -(-int(w) // 2) for h, w in shapes))
    ids = np.asarray(out["input_ids"])
    d["n_image_tokens"] = int((ids == image_token_id).sum())
    if text is not None:
        d["text_sha"] = hashlib.sha256("\x00".join(text).encode()).hexdigest()[:32]
    return d
