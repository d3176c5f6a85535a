"""bfloat16 (and weight-only int8 / int4) vs float32 on a *trained* tiny model: same argmax on >= 99% (int8: 98%,
int4: 99%) of positions.

Random weights give flat next-token distributions (top-2 gaps of ~0.2 logit), so a few percent of argmaxes flip
under any bf16 run, transformers' included (tests/test_model_parity.py covers that case). A trained model is
confident, as the published checkpoints are: here transformers' own model learns a bigram language (next word =
a fixed permutation of the current one) with images in the prompts, then lfm2vl loads the saved checkpoint in
float32 and bfloat16 and we compare the argmax of every position, image and padding positions included.
"""
import torch

from checkpoints import build_hf_model, image_placeholder, make_pixels
from lfm2vl.cpu import int8mm, kernels
from lfm2vl.cpu.int8mm import linear as int8mm_linear
from lfm2vl.cpu.kernels import attn_many
from lfm2vl.cpu.quant import Int8Linear, default_max_rows
from lfm2vl.cpu.speed import optimize_for_cpu
from lfm2vl.loading import load_model
from tokenizer_build import write_tokenizer_files

WORDS = (510, 1024)  # ordinary vocabulary ids of the tiny tokenizer


def _sequence(perm, g, units, rows=1, cols=1, thumbnail=False):
    start = int(torch.randint(*WORDS, (1,), generator=g))
    text = [start]
    for _ in range(24):
        text.append(int(perm[text[-1] - WORDS[0]]) + WORDS[0])
    ids = [1, 6] + image_placeholder(units, rows, cols, thumbnail) + text + [7]
    return ids


def _units_per_row():
    return [[(16, 24)], [(32, 32), (32, 32), (26, 36)], [(16, 16)]]


def _batch(perm, g, seed):
    """Three prompts of different lengths, right-aligned with left padding, with a small and a tiled image."""
    units = _units_per_row()
    layouts = [(1, 1, False), (1, 2, True), (1, 1, False)]
    rows = [_sequence(perm, g, u, *lay) for u, lay in zip(units, layouts)]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    pv, pm, ss = make_pixels([s for u in units for s in u], seed)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "pixel_attention_mask": pm,
            "spatial_shapes": ss}


def test_bf16_argmax_on_a_trained_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    hf = build_hf_model("tiny-lfm2vl", seed=0).train()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(WORDS[1] - WORDS[0], generator=g)
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    for step in range(120):
        inp = _batch(perm, g, seed=step)
        labels = inp["input_ids"].masked_fill(inp["attention_mask"] == 0, -100)
        pos = (inp["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        loss = hf(**inp, position_ids=pos, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"the tiny model did not learn the bigram language (loss {loss.item():.3f})"
    hf.eval().save_pretrained(tmp_path)
    write_tokenizer_files(tmp_path)

    f32, _, _ = load_model(tmp_path, dtype=torch.float32)
    bf16, _, _ = load_model(tmp_path, dtype=torch.bfloat16)
    agree = total = 0
    max_err = 0.0
    with torch.no_grad():
        for seed in range(1000, 1004):
            inp = _batch(perm, g, seed)
            ref = f32(**inp)
            out = bf16(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in inp.items()}).float()
            valid = inp["attention_mask"].bool()
            agree += (ref.argmax(-1) == out.argmax(-1))[valid].sum().item()
            total += valid.sum().item()
            max_err = max(max_err, (ref - out)[valid].abs().max().item())
    rate = agree / total
    print(f"[bf16 trained] argmax agreement {rate:.4f} over {total} positions, max logit error {max_err:.3f}")
    assert rate >= 0.99, f"bf16 argmax agrees with float32 on {rate:.2%} of {total} positions"

    # weight-only int8 and int4 (output head included), every position through the native single-token decode step,
    # the path they exist for: image features from the float model, then one token at a time into the cache
    for fmt, floor in (("int8", 0.98), ("int4", 0.99)):
        q = optimize_for_cpu(load_model(tmp_path, dtype=torch.bfloat16)[0], **{fmt: True})
        kinds = {type(m).__name__ for m in q.modules() if isinstance(m, Int8Linear)}
        assert kinds == {"Int4Linear" if fmt == "int4" else "Int8Linear"}, kinds  # no layer kept another format
        rate, cos = _cached_agreement(q, bf16, f32, perm, g, chunk=1)
        print(f"[{fmt} trained] argmax agreement {rate:.4f}, logit cosine mean {cos.mean():.4f} min {cos.min():.4f}")
        assert rate >= floor, f"{fmt} argmax agrees with float32 on {rate:.2%} of the positions"

    # int8 with int8 compute (activations quantized per row; forced, it runs only where it wins) prefilling in
    # chunks of twice the rows the weight-streaming kernel takes (16 with a bf16 GEMM, 64 on AVX2-only CPUs), its
    # int8 vision tower encoding the images itself
    chunk = 2 * default_max_rows()
    monkeypatch.setattr(int8mm, "wins", lambda: True)
    calls = []
    monkeypatch.setattr(int8mm, "linear", lambda *a, **k: calls.append(1) or int8mm_linear(*a, **k))
    q = optimize_for_cpu(load_model(tmp_path, dtype=torch.bfloat16)[0], int8=True, int8_vision=True)
    rate, cos = _cached_agreement(q, q, f32, perm, g, chunk=chunk)
    with torch.inference_mode():
        inp = _batch(perm, g, 1000)
        pix = (inp["pixel_values"].bfloat16(), inp["pixel_attention_mask"], inp["spatial_shapes"])
        fcos = torch.nn.functional.cosine_similarity(q.image_features(*pix).float(), bf16.image_features(*pix).float())
    print(f"[int8 compute + int8 vision trained] argmax agreement {rate:.4f}, logit cosine mean {cos.mean():.4f}, "
          f"image features cosine mean {fcos.mean():.4f} min {fcos.min():.4f}")
    assert calls, "neither the prefill nor the vision tower took int8 compute"
    assert rate >= 0.98, f"int8 compute argmax agrees with float32 on {rate:.2%} of the positions"
    assert fcos.min() > 0.99, fcos.min()
    q = optimize_for_cpu(load_model(tmp_path, dtype=torch.bfloat16)[0], int4=True)  # int4 widened to int8 rows
    before = len(calls)
    rate, cos = _cached_agreement(q, bf16, f32, perm, g, chunk=chunk)
    assert len(calls) > before, "the int4 prefill did not take int8 compute"
    print(f"[int4 with int8 compute trained] argmax agreement {rate:.4f}, logit cosine mean {cos.mean():.4f}")
    assert rate >= 0.99, f"int4 through int8 compute argmax agrees with float32 on {rate:.2%} of the positions"
    monkeypatch.undo()

    # the CPU-optimized bf16 model prefilling through the cache in chunks of 16: native causal attention over each
    # chunk's cached prefix (kernels.attn_many), conv state carried between chunks
    fast = optimize_for_cpu(load_model(tmp_path, dtype=torch.bfloat16)[0])
    native = []
    # the native path, also where torch's wins (AMX CPUs without their tiles)
    monkeypatch.setattr(kernels, "attention_wins", lambda: True)
    monkeypatch.setattr(kernels, "attn_many", lambda *a, **k: native.append(1) or attn_many(*a, **k))
    rate, cos = _cached_agreement(fast, bf16, f32, perm, g, chunk=16)
    assert native or kernels.isa() < 3, "the chunked prefill did not take the native attention"
    print(f"[bf16 chunked prefill] argmax agreement {rate:.4f}, logit cosine mean {cos.mean():.4f}")
    assert rate >= 0.99, f"bf16 chunked prefill argmax agrees with float32 on {rate:.2%} of the positions"


def _cached_agreement(q, encoder, f32, perm, g, chunk):
    """Argmax agreement with float32 and the logit cosines of model q filling its cache `chunk` tokens per call, the
    images encoded by model `encoder`."""
    agree = total = 0
    cos = []
    with torch.inference_mode():
        for seed in range(1000, 1004):
            inp = _batch(perm, g, seed)
            ref = f32(**inp)
            for r in range(inp["input_ids"].shape[0]):
                valid = inp["attention_mask"][r].bool()
                ids = inp["input_ids"][r][valid][None]
                first = sum(len(u) for u in _units_per_row()[:r])  # this row's image units, in order
                sel = slice(first, first + len(_units_per_row()[r]))
                feats = encoder.image_features(inp["pixel_values"][sel].bfloat16(), inp["pixel_attention_mask"][sel],
                                            inp["spatial_shapes"][sel])
                emb = q.embed(ids, feats)
                cache = q.make_cache(1, ids.shape[1])
                out = torch.cat([q.forward_cached(emb[:, t:t + chunk], cache, torch.tensor([t]), last_only=False)[0]
                                 for t in range(0, ids.shape[1], chunk)]).float()
                want = ref[r][valid]
                agree += (want.argmax(-1) == out.argmax(-1)).sum().item()
                total += len(want)
                cos.append(torch.nn.functional.cosine_similarity(want, out, dim=-1))
    return agree / total, torch.cat(cos)
