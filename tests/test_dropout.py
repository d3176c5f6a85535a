"""FastDropout (lfm2vl/cpu/dropout.py, kernels/dropout.cpp): LoRA's dropout on the CPU, the mask hashed from a seed.

The kernel's claims: P(keep) = 1 - p and kept values scaled by 1 / (1 - p); the mask is a function of the seed (torch's
default generator draws it) and not of the thread count; the backward pass multiplies the gradient by the forward's
mask; gradient checkpointing reproduces the masks. Everything it does not take runs nn.Dropout's own forward.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lfm2vl.cpu import kernels
from lfm2vl.cpu.dropout import FastDropout, runs_natively, use_fast_dropout

REPO = str(Path(__file__).resolve().parents[1])
needs_kernels = pytest.mark.skipif(os.environ.get("LFM2VL_NO_KERNELS", "0") not in ("", "0"),
                                   reason="kernels disabled by LFM2VL_NO_KERNELS (the fallback tests still run)")


def _drop(p: float) -> FastDropout:
    return FastDropout(p).train()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_fraction_and_scale(dtype):
    """About 1 - p of the elements are kept (5 sigma), each multiplied by 1 / (1 - p) (rounded once in bf16)."""
    assert kernels.available()
    n, p = 1 << 21, 0.3
    y = _drop(p)(torch.ones(n, dtype=dtype))
    kept = y != 0
    sigma = math.sqrt(p * (1 - p) / n)
    for part in (kept, kept[: n // 2], kept[n // 2:], kept[::7]):  # also no drift along the tensor or a stride
        assert abs(part.float().mean().item() - (1 - p)) < 5 * sigma * math.sqrt(n / part.numel())
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))  # the fp32 scale, rounded to dtype
    # neighbours are independent: P(both kept) = (1 - p)^2
    both = (kept[1:] & kept[:-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / n)


@needs_kernels
def test_mask_is_a_function_of_the_seed():
    """Same seed -> same mask (also under torch.manual_seed and at any thread count); another seed -> an
    independent mask (the two agree on p^2 + (1-p)^2 of the elements)."""
    x, p = torch.randn(1 << 20), 0.1
    a = kernels.dropout(x, p, 1234)
    assert torch.equal(kernels.dropout(x, p, 1234), a)
    b = kernels.dropout(x, p, 1235)
    agree = ((a != 0) == (b != 0)).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.003
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(7)
        one = _drop(p)(x)
        torch.set_num_threads(2)
        torch.manual_seed(7)
        two = _drop(p)(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(_drop(p)(x), one)  # the generator moved on: a new seed


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_uses_the_forward_mask(dtype):
    """d(dropout(x))/dx applied to g is g * mask / (1 - p) with the mask the forward's output shows."""
    p = 0.25
    x = torch.randn(300, 70).to(dtype).requires_grad_(True)  # never exactly 0: y == 0 marks a dropped element
    y = _drop(p)(x)
    mask = (y != 0).to(dtype)
    assert 0.7 < mask.float().mean().item() < 0.8
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y, (x.detach().float() * mask.float() * scale).to(dtype))
    g = torch.randn(300, 70).to(dtype)
    y.backward(g.t().contiguous().t())  # a non-contiguous gradient too
    assert torch.equal(x.grad, (g.float() * mask.float() * scale).to(dtype))


@needs_kernels
def test_identity_for_p0_and_eval():
    x = torch.randn(64, 32)
    assert torch.equal(_drop(0.0)(x), x)
    assert torch.equal(FastDropout(0.5).eval()(x), x)


def test_fallback_is_nn_dropout_for_what_the_kernel_does_not_take():
    """A non-contiguous input (and float64) runs nn.Dropout's forward: the very same output for the same seed."""
    x = torch.randn(40, 50)
    for t in (x.t(), x.double()):
        assert not runs_natively(t, 0.2)
        torch.manual_seed(3)
        ours = _drop(0.2)(t)
        torch.manual_seed(3)
        assert torch.equal(ours, nn.Dropout(0.2).train()(t))


def test_fallback_without_kernels_is_nn_dropout():
    code = """
        import torch, torch.nn as nn
        from lfm2vl.cpu import kernels
        from lfm2vl.cpu.dropout import FastDropout
        assert not kernels.available()
        x = torch.randn(100, 30, requires_grad=True)
        torch.manual_seed(1)
        y = FastDropout(0.3).train()(x)
        torch.manual_seed(1)
        assert torch.equal(y, nn.Dropout(0.3).train()(x))
        y.sum().backward()
        assert torch.equal(x.grad, (y != 0).float() / 0.7)
        print("ok")
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, LFM2VL_NO_KERNELS="1"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_use_fast_dropout_swaps_only_lora_dropouts():
    """LoRA layers' nn.Dropout become FastDropout (same objects, same p, same state-dict); other dropouts stay."""
    from lfm2vl.finetune.lora import LoraLinear

    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    LoraLinear.wrap(m[0], r=2, alpha=4, dropout=0.1)
    LoraLinear.wrap(m[2], r=2, alpha=4, dropout=0.0)  # no dropout: an nn.Identity, nothing to swap
    keys, old = list(m.state_dict()), m[0].lora_dropout
    assert use_fast_dropout(m) == 1
    assert type(m[0].lora_dropout) is FastDropout and m[0].lora_dropout is old and old.p == 0.1
    assert type(m[1]) is nn.Dropout and type(m[2].lora_dropout) is nn.Identity
    assert list(m.state_dict()) == keys


@needs_kernels
def test_checkpointing_gives_the_same_lora_gradients(tiny_checkpoint):
    """With FastDropout in every LoRA layer, recomputing the layers in the backward pass (recompute.py) redraws the
    same masks: the LoRA gradients equal those without checkpointing, and differ for another torch seed."""
    from finetune_util import conversations, one_thread, reference_batch
    from lfm2vl.finetune import recompute
    from lfm2vl.finetune.lora import add_lora, lora_parameters
    from lfm2vl.finetune.loss import loss_sum
    from lfm2vl.loading import load_model
    from lfm2vl.processor import Processor

    batch, _ = reference_batch(Processor.from_pretrained(tiny_checkpoint), conversations(2))
    model = load_model(tiny_checkpoint, dtype=torch.float32)[0]
    model.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8, dropout=0.3, targets="text")
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # nonzero B: A's gradient then depends on the masks
            p.requires_grad_(True)
    assert use_fast_dropout(model) > 0
    model.train()

    def grads(seed):
        torch.manual_seed(seed)
        for p in params:
            p.grad = None
        total, n = loss_sum(model, batch)
        (total / n).backward()
        return [p.grad.clone() for p in params]

    with one_thread():
        plain, other = grads(5), grads(6)
        recompute.checkpoint_layers(model, vision=False)
        again = grads(5)
    for a, b in zip(plain, again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(plain, other))
