"""Parity of lfm2vl.Processor with transformers' Lfm2VlProcessor on 200+ cases (tests/processor_cases.py).

The reference needs torchvision, which lives only in .venv-oracle. When LFM2VL_ORACLE_PYTHON points at that
interpreter, scripts/oracle_processor.py runs live in a subprocess and its digests are the expectation (and the
committed digests must agree with it). Otherwise the committed tests/data/processor_oracle.json is used. One of
the two must exist: nothing is skipped.

Compared per case: input_ids, attention_mask, pixel_attention_mask, spatial_shapes (exact) and pixel_values (as
uint8 levels, each value within 1e-6 of its level). The only allowed difference is the documented min_tiles=1 fix
(processor/tokens.py): there the reference's placeholder count disagrees with its own units, and ours agrees.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import processor_cases as pc
from lfm2vl.processor import Processor

ROOT = Path(__file__).resolve().parents[1]
CASES = pc.all_cases()


@pytest.fixture(scope="session")
def live_oracle(tmp_path_factory):
    """Digests from the live reference, or None when LFM2VL_ORACLE_PYTHON is not set."""
    python = os.environ.get("LFM2VL_ORACLE_PYTHON")
    if not python:
        return None
    out = tmp_path_factory.mktemp("oracle") / "digests.json"
    r = subprocess.run([python, str(ROOT / "scripts" / "oracle_processor.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or not out.exists():
        return {"failed": r.stderr[-3000:]}
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def expected(live_oracle):
    if live_oracle is not None and "failed" not in live_oracle:
        return live_oracle["cases"]
    if pc.ORACLE_DIGESTS.exists():
        return json.loads(pc.ORACLE_DIGESTS.read_text())["cases"]
    pytest.fail("no oracle: set LFM2VL_ORACLE_PYTHON to .venv-oracle/bin/python or commit "
                "tests/data/processor_oracle.json (scripts/oracle_processor.py --write-digests)")


@pytest.fixture(scope="session")
def processors(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    templates = {"fixture": (pc.FIXTURE / "chat_template.jinja").read_text(), "lfm25": pc.LFM25_TEMPLATE.read_text()}
    out = {}
    for kind in ("v25", "v1"):
        for name, t in templates.items():
            out[(kind, name)] = Processor.from_pretrained(pc.write_checkpoint(base / f"{kind}_{name}", kind, t))
    return out


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


def test_live_oracle_runs(live_oracle):
    """When CI provides the oracle environment it must actually work (no silent fallback)."""
    if live_oracle is None:
        assert pc.ORACLE_DIGESTS.exists(), "neither a live oracle nor committed digests"
        return
    assert "failed" not in live_oracle, live_oracle.get("failed")
    assert live_oracle["meta"]["cases"] == len(CASES) >= 200


def test_resize_equals_torchvision(live_oracle):
    """Our uint8 resize (torch only) equals torchvision's on random sizes and modes (checked in .venv-oracle,
    where torchvision imports; the committed digests record the last run)."""
    meta = (live_oracle if live_oracle and "failed" not in live_oracle
            else json.loads(pc.ORACLE_DIGESTS.read_text()))["meta"]
    assert meta["resize_check"]["cases"] >= 50 and meta["resize_check"]["mismatches"] == []


def test_committed_digests_match_live_oracle(live_oracle):
    """The committed digests (the fallback) must be what the oracle produces today."""
    committed = json.loads(pc.ORACLE_DIGESTS.read_text())
    assert len(committed["cases"]) == len(CASES) >= 200
    if live_oracle is None or "failed" in live_oracle:
        return
    assert committed["meta"]["resize_check"] == live_oracle["meta"]["resize_check"]
    live, saved = live_oracle["cases"], committed["cases"]
    if live_oracle["meta"].get("cpu_capability") != committed["meta"].get("cpu_capability"):
        # Pixel values legitimately depend on the CPU (torchvision's uint8 vs float bilinear path): compare the rest.
        live = {k: {f: x for f, x in v.items() if f != "pixel_values"} for k, v in live.items()}
        saved = {k: {f: x for f, x in v.items() if f != "pixel_values"} for k, v in saved.items()}
    stale = [k for k, v in live.items() if saved.get(k) != v]
    assert not stale, f"stale tests/data/processor_oracle.json for {stale[:10]}: run scripts/oracle_processor.py --write-digests"


def _run_ours(proc: Processor, case: dict, workdir: Path) -> tuple[dict, list[str], list]:
    images = [[pc.make_image(s, workdir) for s in group] for group in case["images"]]
    if case["kind"] == "chat":
        texts = [proc.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])]
    else:
        texts = case["texts"]
    out = proc(text=texts, images=images if any(images) else None, **case["knobs"], **case.get("call", {}))
    return out, texts, images


def _one_by_one_grid(proc: Processor, images, knobs) -> bool:
    """Whether an image takes the min_tiles=1 path (a 'too large' image given a 1x1 grid)."""
    from lfm2vl.processor.io import load_image
    for group in images:
        for im in group:
            x = load_image(im)
            lay = proc.image_layout(x.shape[2], x.shape[1], **knobs)
            if lay.tiled and lay.rows * lay.cols == 1:
                return True
    return False


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_parity(case, expected, processors, workdir):
    ref = expected[case["id"]]
    proc = processors[(case["ckpt"], case.get("template", "fixture"))]
    if "error" in ref:
        with pytest.raises(ValueError):
            _run_ours(proc, case, workdir)
        return
    out, texts, images = _run_ours(proc, case, workdir)
    array = np.ndarray if case.get("call", {}).get("return_tensors") == "np" else torch.Tensor
    assert all(isinstance(v, array) for v in out.values()), {k: type(v) for k, v in out.items()}
    ours = pc.digest({k: np.asarray(v) for k, v in out.items()}, proc.image_token_id, texts)
    assert ours.get("text_sha") == ref.get("text_sha"), "rendered prompt differs"
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "spatial_shapes"):
        if key in ref:
            assert ours[key]["dtype"] == ref[key]["dtype"], key
    for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
        if key in ref:
            assert ours[key]["shape"] == ref[key]["shape"], key
            assert ours[key]["sha"] == ref[key]["sha"], f"{key} differs"
    if "pixel_values" in ref:
        assert ours["pixel_values"]["pv_level_err"] <= 1e-6 and ref["pixel_values"]["pv_level_err"] <= 1e-6
        assert ours["pixel_values"]["pad_zero"] and ref["pixel_values"]["pad_zero"]
        assert ours["unit_tokens"] == ours["n_image_tokens"], "our placeholders disagree with our units"
    if _one_by_one_grid(proc, images, case["knobs"]):
        # The documented fix: the reference counts smart_resize's size for a 1x1 grid's 512x512 tile.
        assert ref["n_image_tokens"] != ref["unit_tokens"], "expected the reference's min_tiles=1 inconsistency"
        assert ours["input_ids"]["sha"] != ref["input_ids"]["sha"]
        return
    for key in ("input_ids", "attention_mask"):
        assert ours[key]["shape"] == ref[key]["shape"], key
        assert ours[key]["sha"] == ref[key]["sha"], f"{key} differs"
    assert ours["n_image_tokens"] == ref["n_image_tokens"]
    # The public budget helper predicts the reference's count without running anything.
    sizes = [pc.upright_size(s) for g in case["images"] for s in g]
    knobs = case["knobs"]
    assert sum(proc.num_image_tokens(w, h, **knobs) for w, h in sizes) == ref["n_image_tokens"]


def test_case_coverage():
    """The case list covers extreme sizes, every image knob (both values of the switches), multi-image groups,
    batches of texts, and chats with a system prompt and several user turns."""
    calls = [c for c in CASES if c["kind"] == "call"]
    sizes = {(s["w"], s["h"]) for c in CASES for g in c["images"] for s in g}
    assert {(1, 1), (10, 4000), (3000, 3000), (4000, 3000)} <= sizes
    knobs = {k for c in calls for k in c["knobs"]}
    assert knobs >= {"min_image_tokens", "max_image_tokens", "do_image_splitting", "min_tiles", "max_tiles",
                     "use_thumbnail", "max_pixels_tolerance", "tile_size", "resample"}
    assert {c["knobs"].get("use_thumbnail") for c in calls} >= {True, False}
    assert {c["knobs"].get("max_pixels_tolerance") for c in calls} >= {1.5, 2.0}
    assert {c["knobs"].get("min_tiles") for c in calls} >= {1, 2}
    assert any(len(g) > 1 for c in CASES for g in c["images"])
    assert any(len(c.get("texts", [])) > 1 for c in CASES)
    chats = [c for c in CASES if c["kind"] == "chat"]
    assert any(m["role"] == "system" for c in chats for m in c["messages"])
    assert any(sum(m["role"] == "user" for m in c["messages"]) > 1 for c in chats)
    assert len(CASES) >= 200
