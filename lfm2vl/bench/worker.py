"""One engine's measurements for `lfm2vl bench`, run in a fresh subprocess so its peak RSS is its own.

    python -m lfm2vl.bench.worker '<json spec>'   ->  prints one line "BENCH_RESULT <json>"

Engines: "ours" (lfm2vl: load_model + cpu.speed.optimize_for_cpu, then the same calls the engine makes: image_features,
embed, generate/steps.py's chunked prefill and greedy decode steps, the decode step compiled as the engine compiles
it when --compile) and "transformers" (Lfm2VlForConditionalGeneration on the same checkpoint and the same processor
outputs; transformers' own image processor needs torchvision, so the preprocessing figure is lfm2vl's for both).
"quality" compares int8 or int4 against bf16 logits.
Each scenario: `warmup` untimed runs, then `reps` timed runs; the median of each figure is reported.
"""
from __future__ import annotations

import functools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ..generate.threads import one_thread
from ..generate.options import PREFILL_CHUNK
from ..generate.sampling import greedy_token
from ..generate.steps import compiled_decode, decode_step, prefill
from .data import scenario_inputs

_DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, not getrusage's ru_maxrss: the latter survives exec, so a
    worker would inherit the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """(1, V) -> (1, 1) next token, the way lfm2vl's engine picks it (both engines use it: it is not the model)."""
    with one_thread():
        return greedy_token(logits)[:, None]


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _ours_run(model, batch: dict, pre_s: float, new_tokens: int, dtype, forward=None) -> dict:
    """forward: the decode step's forward (compiled_decode's when --compile; default model.forward_cached)."""
    dev = model.model.language_model.embed_tokens.weight.device
    if "pixel_values" in batch:  # in the tower's dtype, as Engine.prepare hands them on (the float32 ones dropped)
        batch["pixel_values"] = batch["pixel_values"].to(model.pixel_dtype)
    batch = {k: v.to(dev) for k, v in batch.items()}
    ids = batch["input_ids"]
    T = ids.shape[1]
    with torch.inference_mode():
        t0 = _clock(dev)
        feats = None
        if "pixel_values" in batch:
            feats = model.image_features(batch["pixel_values"], batch["pixel_attention_mask"],
                                         batch["spatial_shapes"])
        t1 = _clock(dev)
        emb = model.embed(ids, feats)
        cache = model.make_cache(1, T + new_tokens + 1, dtype=dtype)
        tok = _greedy(prefill(model, cache, emb, None, 0, PREFILL_CHUNK))  # (1, 1)
        t2 = _clock(dev)
        for _ in range(new_tokens):
            tok = _greedy(decode_step(model, cache, tok, forward=forward))
        t3 = _clock(dev)
    return {"preprocess_s": pre_s, "vision_s": t1 - t0, "prefill_s": t2 - t1, "prefill_tps": T / (t2 - t1),
            "ttft_s": pre_s + t2 - t0, "decode_tps": new_tokens / (t3 - t2)}


def _hf_run(model, batch: dict, pre_s: float, new_tokens: int, dtype) -> dict:
    dev = model.device
    batch = {k: v.to(dev) for k, v in batch.items()}
    ids = batch["input_ids"]
    T = ids.shape[1]
    pix = {k: batch[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes") if k in batch}
    if "pixel_values" in pix:
        pix["pixel_values"] = pix["pixel_values"].to(dtype)
    # The vision share is timed inside the same forward (its call of get_image_features), so the prefill share,
    # the forward's time less the vision's, is never negative (a separate vision pass could take longer).
    inner, vision = model.model.get_image_features, []

    def timed_vision(*args, **kwargs):
        t = _clock(dev)
        out = inner(*args, **kwargs)
        vision.append(_clock(dev) - t)
        return out

    model.model.get_image_features = timed_vision
    try:
        with torch.inference_mode():
            t0 = _clock(dev)
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **pix)
            tok = _greedy(out.logits[:, -1])
            t1 = _clock(dev)
    finally:
        del model.model.get_image_features  # the class's method again
    if pix and not vision:
        raise RuntimeError("transformers' forward did not call get_image_features: this version's vision time "
                           "cannot be split from its prefill")
    vision_s = sum(vision)
    with torch.inference_mode():
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        for _ in range(new_tokens):
            out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
            tok = _greedy(out.logits[:, -1])
        t2 = _clock(dev)
    forward_s = t1 - t0
    return {"preprocess_s": pre_s, "vision_s": vision_s, "prefill_s": forward_s - vision_s,
            "prefill_tps": T / max(forward_s - vision_s, 1e-9), "ttft_s": pre_s + forward_s,
            "decode_tps": new_tokens / (t2 - t1)}


def _with_adapter(model, spec: dict):
    """The model with spec["adapter"] merged into its weights (as lfm2vl.load(..., adapter=) does), if given."""
    if spec.get("adapter"):
        from ..finetune.adapter import load_adapter

        load_adapter(model, spec["adapter"])
    return model


def _load(spec: dict):
    dtype = _DT[spec["dtype"]]
    device = torch.device(spec.get("device", "cpu"))
    t = time.perf_counter()
    if spec["engine"] == "transformers":
        from transformers import Lfm2VlForConditionalGeneration

        model = Lfm2VlForConditionalGeneration.from_pretrained(spec["folder"], dtype=dtype).to(device).eval()
        if spec.get("adapter"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec["adapter"]).merge_and_unload().eval()
        run = _hf_run
    else:
        from ..cpu.lowmem import set_low_memory
        from ..cpu.speed import optimize_for_cpu
        from ..loading import load_model

        model = _with_adapter(load_model(spec["folder"], dtype=dtype, device=device)[0], spec)
        if spec.get("optimize", True):  # a no-op off CPU
            optimize_for_cpu(model, int8=spec.get("int8", False), int4=spec.get("int4", False),
                             bf16_packed=spec.get("bf16_packed", False), int8_vision=spec.get("int8_vision", False),
                             quantize_head=spec.get("quantize_head", True),
                             source=None if spec.get("adapter") else spec["folder"])
        if spec.get("low_memory"):
            set_low_memory(model)
        run = _ours_run
        if spec.get("compile"):  # the engine's compiled decode step; on CUDA "reduce-overhead" replays a CUDA graph
            forward = compiled_decode(model, mode="reduce-overhead" if device.type == "cuda" else None)
            run = functools.partial(_ours_run, forward=forward)
    return model, run, time.perf_counter() - t


def measure(spec: dict) -> dict:
    from ..processor import Processor

    torch.set_num_threads(spec["threads"])
    dtype = _DT[spec["dtype"]]
    model, run, load_s = _load(spec)
    result = {"engine": spec["engine"], "load_s": load_s, "rss_after_load_mb": _peak_rss_mb(), "scenarios": {}}
    processor = Processor.from_pretrained(spec["folder"])
    for name in spec["scenarios"]:
        runs = []
        for i in range(spec["warmup"] + spec["reps"]):
            batch, pre_s = scenario_inputs(processor, name, spec.get("image_knobs"))
            r = run(model, batch, pre_s, spec["new_tokens"], dtype)
            if i >= spec["warmup"]:
                runs.append(r)
        result["scenarios"][name] = {"prompt_tokens": int(batch["input_ids"].shape[1]), **_patches(batch),
                                     **_median(runs)}
    result["peak_rss_mb"] = _peak_rss_mb()
    if torch.device(spec.get("device", "cpu")).type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def _patches(batch: dict) -> dict:
    """Valid patches of the image units and the sum of their squares per unit (bench/work.py's vision FLOPs)."""
    if "pixel_attention_mask" not in batch:
        return {"patches": 0, "patch_sq": 0}
    per_unit = batch["pixel_attention_mask"].sum(1).long()
    return {"patches": int(per_unit.sum()), "patch_sq": int((per_unit ** 2).sum())}


def _decode_logits(model, emb: torch.Tensor, n: int, forced: list[int] | None = None):
    """Prefill emb (1, T, D), then n decode steps feeding `forced` tokens (or the greedy ones) -> (n+1, V), tokens."""
    cache = model.make_cache(1, emb.shape[1] + n + 1, dtype=emb.dtype)
    logits = prefill(model, cache, emb, None, 0, PREFILL_CHUNK)
    rows, toks = [logits.float()], []
    for i in range(n):
        toks.append(int(logits.argmax(-1)) if forced is None else forced[i])
        logits = decode_step(model, cache, torch.tensor([[toks[-1]]]))
        rows.append(logits.float())
    return torch.cat(rows), toks


def quality(spec: dict) -> dict:
    """int8 (or int4: spec["format"]) vs bf16 on the benchmark prompts: logit cosine at the prompt's last position and
    at each of the next `new_tokens` positions, and how often the quantized argmax equals the bf16 one, teacher-forced
    on bf16's greedy text. With spec["int8_vision"] the quantized model encodes the images itself, and the cosine of
    its image features (per image token) with bf16's is reported too."""
    import torch.nn.functional as F

    from ..cpu.speed import optimize_for_cpu
    from ..loading import load_model
    from ..processor import Processor

    torch.set_num_threads(spec["threads"])
    ref = optimize_for_cpu(_with_adapter(load_model(spec["folder"], dtype=torch.bfloat16)[0], spec))
    # a second load, not a deepcopy: both map the same file pages, and quantizing releases the float ones
    fmt = spec.get("format", "int8")
    int8_vision = spec.get("int8_vision", False)
    q = optimize_for_cpu(_with_adapter(load_model(spec["folder"], dtype=torch.bfloat16)[0], spec), **{fmt: True},
                         int8_vision=int8_vision, quantize_head=spec.get("quantize_head", True))
    processor = Processor.from_pretrained(spec["folder"])
    out = {}
    for name in spec["scenarios"]:
        batch, _ = scenario_inputs(processor, name, spec.get("image_knobs"))
        extra = {}
        with torch.inference_mode():
            feats = qfeats = None
            if "pixel_values" in batch:
                pix = (batch["pixel_values"], batch["pixel_attention_mask"], batch["spatial_shapes"])
                feats = ref.image_features(*pix)
                qfeats = q.image_features(*pix) if int8_vision else feats
                if int8_vision:
                    fc = F.cosine_similarity(feats.float(), qfeats.float(), dim=-1)  # per image token
                    extra = {"feature_cosine_mean": fc.mean().item(), "feature_cosine_min": fc.min().item()}
            emb = ref.embed(batch["input_ids"], feats)
            lr, toks = _decode_logits(ref, emb, spec["new_tokens"])
            lq, _ = _decode_logits(q, q.embed(batch["input_ids"], qfeats), spec["new_tokens"], forced=toks)
        cos = F.cosine_similarity(lr, lq, dim=-1)
        out[name] = {"logit_cosine_mean": cos.mean().item(), "logit_cosine_min": cos.min().item(),
                     "greedy_agreement": (lr.argmax(-1) == lq.argmax(-1)).float().mean().item(),
                     "positions": int(lr.shape[0]), **extra}
    return {"engine": "quality", "format": fmt, "int8_vision": int8_vision, "scenarios": out}


def main() -> None:
    spec = json.loads(sys.argv[1])
    res = quality(spec) if spec["engine"] == "quality" else measure(spec)
    print("BENCH_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
